#!/usr/bin/env bash
# Which recovery, for the same LLM-Streamline block: none, each LLM-Streamline replacement (layer
# with MSE or the LM loss, the authors' FFN, our residual FFN, SwiGLU), ReplaceMe's linear map
# (least squares, cosine), LoRA, and layer + LoRA; then, for every block a recovery removed, its
# plain removal (the control `layerprune-report` pairs it with); into
# results/MODEL/ablation_recovery.
#   experiments/ablation_recovery.sh MODEL [hydra overrides...]
# On a CPU, `recovery.budget.tokens=1048576 recovery.budget.batch_tokens=16384` bounds the
# training of every trained recovery (each step's own epochs when unset).
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: experiments/ablation_recovery.sh MODEL [hydra overrides...]}
shift
runs=results/runs/ablation_recovery/$model
status=0
python -m layerprune -m \
  scorer=streamline \
  recovery=none,layer,layer_lm,ffn,ffn_residual,swiglu,linear,linear_cosine,lora,layer_lora \
  model="$model" sparsity=0.25 sparsity_unit=param_ratio \
  paths.runs="$runs" hydra.sweep.dir="$runs/sweep" "$@" || status=$?
# The controls: the same scorer and statistics pick the same block of that many layers.
while IFS= read -r overrides; do
  eval "python -m layerprune $overrides paths.runs=$runs" || status=$?
done < <(python -m layerprune.controls "$runs")
python -m layerprune.report "$runs" --out "results/$model/ablation_recovery"
exit "$status"
