"""ReplaceMe: a training-free linear map folded into the MLP of the layer before the block.

With i = start - 1, M the MLP output of layer i (what it adds to the residual), h_i the
residual after layer i (the block's input) and h_n the residual leaving the block, the pruned
model gives h_n ~ (h_i - M) + M T. T is fitted over the fitted tokens (see
:class:`~layerprune.recovery.objective.TokenFilter`), with Y = h_n - (h_i - M):

* ``mse``: least squares, min sum_t ||M_t T - Y_t||^2, from the normal equations accumulated in
  float64 over streamed batches (ReplaceMe's ``lstsq``);
* ``nmse``: the same with each token weighted by 1 / ||h_n,t||^2, each token's error relative
  to its own output (weighted least squares, still closed form);
* ``cosine``: min mean_t (1 - cos(M_t T, Y_t)) by Adam from T = I (ReplaceMe's cosine
  objective, their best: lr 1e-4, 1024 tokens per step, 10 epochs over the tokens, which are
  gathered in bfloat16 as their code does).

``ridge`` = lambda adds lambda s ||T - I||^2, s = trace(G) / d the mean eigenvalue of the
(weighted) Gram matrix G = M^T M: it pulls T toward the identity, which is plain removal, and
is scale-free (the same lambda means the same pull whatever the number of tokens); lambda -> inf
gives T = I. Folding T into the down projection (y = z W^T + b becomes y T = z (T^T W)^T + b T)
adds no parameter and keeps the architecture standard.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedModel

from layerprune.errors import LayerpruneError
from layerprune.layers import decoder_stack
from layerprune.recovery.activations import (
    BlockBatch,
    BlockStates,
    block_batch,
    check_block,
    contiguous_block,
    in_order,
)
from layerprune.recovery.cache import CacheSettings
from layerprune.recovery.objective import TINY, TOKEN_LOSSES, TokenFilter, heldout_fit
from layerprune.recovery.report import RecoveryReport, record_recovery
from layerprune.recovery.training import split_heldout
from layerprune.surgery import remove_layers


def _down_projection(model: PreTrainedModel, index: int) -> nn.Linear:
    """Layer ``index``'s down projection, if T can be folded into it exactly."""
    stack = decoder_stack(model)
    norm = stack.post_mlp_norm(index)
    if norm is not None:
        raise LayerpruneError(
            f"recovery 'linear' cannot fold T into {type(stack.layers[index]).__name__}: its MLP "
            f"output goes through {norm} before joining the residual, so a linear map on it is "
            "not exact; allowed: Llama/Mistral/Qwen/OPT-style layers (use recovery 'layer' or "
            "'ffn')"
        )
    return stack.mlp_out(index, "linear")


def _mlp_output(batch: BlockBatch) -> torch.Tensor:
    # OPT runs its MLP on (tokens, d): bring M back to the residual's shape.
    return batch.taps["m"].reshape(batch.h_out.shape)


@dataclass(kw_only=True)
class LinearReplacement(TokenFilter, CacheSettings):
    """ReplaceMe: training-free linear map folded into the layer before the block.

    Gets the dense model and removes the block itself; adds no layer. The last
    ``heldout_fraction`` of the windows is held out for the before/after figures; "after" is
    what the folded model computes (T folded into weights of the model's dtype), not the
    float64 map. ``train_tokens`` and ``settings.tokens`` count the fitted tokens (times the
    epochs for cosine).
    """

    prunes: ClassVar[bool] = True
    contiguous: ClassVar[bool] = True
    layers_added: ClassVar[int] = 0
    first_start: ClassVar[int] = 1  # T is folded into the layer before the block

    loss: str = "mse"  # mse (least squares) | nmse (per-token normalised) | cosine (Adam)
    ridge: float = 0.0  # pull toward the identity, relative to the Gram matrix's mean eigenvalue
    batch_size: int = 8  # windows per forward pass
    heldout_fraction: float = 0.1
    lr: float = 1e-4  # cosine: Adam's learning rate (ReplaceMe)
    epochs: int = 10  # cosine: passes over the fitted tokens (ReplaceMe)
    token_batch: int = 1024  # cosine: tokens per Adam step (ReplaceMe)
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.loss not in TOKEN_LOSSES:
            raise LayerpruneError(
                f"unknown recovery loss '{self.loss}' for 'linear'; allowed: "
                f"{', '.join(TOKEN_LOSSES)}"
            )
        if self.loss == "cosine" and self.ridge:
            raise LayerpruneError(
                f"recovery 'linear': ridge {self.ridge} with loss cosine; allowed: ridge 0 (the "
                "pull toward the identity applies to the closed forms, mse and nmse)"
            )
        self.check_filter("linear")
        self.check_cache("linear")

    def _states(
        self,
        model: PreTrainedModel,
        start: int,
        size: int,
        windows: torch.Tensor,
        cache_dir: str | None,
    ) -> BlockStates:
        down = decoder_stack(model).mlp_out(start - 1, "linear")
        return self.states(model, start, size, windows, self.batch_size, cache_dir, {"m": down})

    def _pairs(self, batch: BlockBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """M, Y and h_n of the fitted tokens, float64, one row per token."""
        m = _mlp_output(batch).double()
        h_in, h_out = batch.h_in.double(), batch.h_out.double()
        mask = self.fitted(batch.h_in, batch.h_out)
        return m[mask], (h_out - h_in + m)[mask], h_out[mask]

    @torch.no_grad()
    def fit(
        self,
        model: PreTrainedModel,
        start: int,
        size: int,
        windows: torch.Tensor,
        cache_dir: str | None = None,
    ) -> tuple[torch.Tensor, int]:
        """The float64 (d, d) T on CPU, and the number of tokens it was fitted on."""
        states = self._states(model, start, size, windows, cache_dir)
        if self.loss == "cosine":
            return self._fit_cosine(states, next(model.parameters()).device)
        dim = decoder_stack(model).mlp_out(start - 1, "linear").out_features
        gram = torch.zeros(dim, dim, dtype=torch.float64)
        cross = torch.zeros(dim, dim, dtype=torch.float64)
        n_tokens = 0
        for batch in in_order(states, self.batch_size):
            m, y, h_out = self._pairs(batch)
            weighted = (
                m if self.loss == "mse" else m / h_out.pow(2).sum(-1, keepdim=True).clamp_min(TINY)
            )
            gram += (weighted.T @ m).cpu()
            cross += (weighted.T @ y).cpu()
            n_tokens += m.shape[0]
        if self.ridge:
            pull = self.ridge * torch.trace(gram) / dim * torch.eye(dim, dtype=torch.float64)
            gram, cross = gram + pull, cross + pull
        # gelsd gives the minimum-norm solution when M^T M is singular (e.g. too few tokens).
        return torch.linalg.lstsq(gram, cross, driver="gelsd").solution, n_tokens

    def _fit_cosine(self, states: BlockStates, device: torch.device) -> tuple[torch.Tensor, int]:
        """ReplaceMe's cosine objective: Adam on T from the identity, over tokens in bfloat16
        kept on the CPU; T and each token batch live on the model's ``device``."""
        xs, ys = [], []
        for batch in in_order(states, self.batch_size):
            m, y, _ = self._pairs(batch)
            xs.append(m.to(torch.bfloat16).cpu())
            ys.append(y.to(torch.bfloat16).cpu())
        x, y = torch.cat(xs), torch.cat(ys)
        with torch.enable_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return self._adam(x, y, device), len(x)

    def _adam(self, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> torch.Tensor:
        t = nn.Parameter(torch.eye(x.shape[1], device=device))
        optimizer = torch.optim.Adam([t], lr=self.lr)
        gen = torch.Generator().manual_seed(self.seed)
        epochs = tqdm(range(self.epochs), desc="recovery linear (cosine)", unit="epoch",
                      disable=not self.progress)  # fmt: skip
        for _ in epochs:
            for index in torch.randperm(len(x), generator=gen).split(self.token_batch):
                optimizer.zero_grad(set_to_none=True)
                pred = x[index].to(device).float() @ t
                target = y[index].to(device).float()
                loss = (1 - F.cosine_similarity(pred, target, dim=-1)).mean()
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise LayerpruneError(
                        f"recovery 'linear': the cosine loss became {value}; the model is left "
                        f"unchanged (try a lower lr than {self.lr:g})"
                    )
                loss.backward()
                optimizer.step()
        return t.detach().double().cpu()

    def __call__(
        self,
        model: PreTrainedModel,
        removed: list[int],
        windows: torch.Tensor,
        heldout: torch.Tensor | None = None,
        cache_dir: str | None = None,
    ) -> RecoveryReport:
        """Remove the block ``removed`` in place, folding the fitted T into the layer before."""
        start, size = contiguous_block(removed, "linear")
        check_block(model, start, size, "linear")
        if start == 0:
            raise LayerpruneError(
                "recovery 'linear' folds T into the layer before the block, and block start 0 "
                "has none; allowed: blocks starting at layer 1 or later"
            )
        down = _down_projection(model, start - 1)
        # a fit needs no full batch: one training window will do
        train, heldout = split_heldout(windows, heldout, self.heldout_fraction, 1, "linear")
        self.check_positions(min(train.shape[1], heldout.shape[1]), "linear")
        started = time.perf_counter()
        transform, n_fitted = self.fit(model, start, size, train, cache_dir)
        seconds = time.perf_counter() - started
        t = transform.to(device=down.weight.device)
        params = [p for p in (down.weight, down.bias) if p is not None]
        with torch.no_grad():
            dense = [p.detach().clone() for p in params]
            folded = [(t.T @ down.weight.double()).to(down.weight.dtype)]
            if down.bias is not None:
                folded.append((down.bias.double() @ t).to(down.bias.dtype))

        def use(values: list[torch.Tensor]) -> None:
            with torch.no_grad():
                for p, value in zip(params, values, strict=True):
                    p.copy_(value)

        def with_fold(batches: Iterator[BlockBatch]) -> Iterator[BlockBatch]:
            """The dense held-out states, each with what the folded model feeds the layer after
            the block: T in the model's dtype, computed by the model itself."""
            for batch in batches:  # drawn from the dense model (or its cache)
                use(folded)
                try:
                    batch.taps["folded"] = block_batch(model, start, 1, batch.input_ids).h_in
                finally:
                    use(dense)
                yield batch

        held = self._states(model, start, size, heldout, cache_dir)
        fns = {"identity": lambda b: b.h_in, "after": lambda b: b.taps["folded"]}
        fits, n_held_fitted = heldout_fit(with_fold(in_order(held, self.batch_size)), fns, self)
        use(folded)
        block = decoder_stack(model).layers[start : start + size]
        passes = self.epochs if self.loss == "cosine" else 1
        report = RecoveryReport(
            method="replace_linear",
            block_start=start,
            block_size=size,
            params_removed=sum(p.numel() for layer in block for p in layer.parameters()),
            train_tokens=passes * n_fitted,
            train_time_s=seconds,
            train_windows=len(train),
            heldout_windows=len(heldout),
            heldout_tokens=heldout.numel(),
            heldout_fitted_tokens=n_held_fitted,
            settings={
                "loss": self.loss,
                "ridge": self.ridge,
                "batch_size": self.batch_size,
                "tokens": n_fitted,
                **self.filter_settings(),
                **self.cache_settings(),
                **(
                    {
                        "lr": self.lr,
                        "epochs": self.epochs,
                        "token_batch": self.token_batch,
                        "seed": self.seed,
                    }
                    if self.loss == "cosine"
                    else {}
                ),
            },
        )
        report.add_fit("identity", fits["identity"])
        report.add_fit("before", fits["identity"])  # T = I before the fit: plain removal
        report.add_fit("after", fits["after"])
        record_recovery(model, report, list(range(start, start + size)))
        remove_layers(model, range(start, start + size))
        return report
