"""Log-probabilities of chosen next tokens, the LM head run only where a token is scored.

A causal LM's forward applies the LM head at every position and returns a (batch, length,
vocab) tensor: 0.8 GB in fp32 for 4 windows of 1024 tokens of SmolLM2's 49k vocabulary, 4.3 GB
for Gemma-3's 262k. Scoring needs one log-probability per scored position, so the callers run
the decoder stack alone (its final norm included) and hand the states of the scored positions
here, where the head and the log-softmax run in chunks of positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

CHUNK = 256  # positions per LM-head call: memory holds at most CHUNK x vocab logits


def final_states(model: PreTrainedModel, input_ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """The decoder stack's output (final norm applied, no LM head): (batch, length, d)."""
    out = model.get_decoder()(input_ids=input_ids, use_cache=False, **kwargs)
    return out.last_hidden_state


def token_logprobs(
    model: PreTrainedModel,
    states: torch.Tensor,
    targets: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and whether the target is the argmax, per row of ``states`` (N, d).

    The log-softmax runs in ``dtype``, as lm-eval's; Gemma-2-style final logit soft-capping is
    applied where the model's config sets it.
    """
    head = model.get_output_embeddings()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    logps, greedy = [], []
    for start in range(0, len(states), CHUNK):
        logits = head(states[start : start + CHUNK])
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        logp = F.log_softmax(logits, dim=-1, dtype=dtype)
        target = targets[start : start + CHUNK]
        logps.append(logp.gather(1, target[:, None])[:, 0])
        greedy.append(logp.argmax(-1) == target)
    return torch.cat(logps), torch.cat(greedy)
