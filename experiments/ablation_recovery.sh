#!/usr/bin/env bash
# Which recovery, for the same LLM-Streamline block: none, each LLM-Streamline replacement (layer
# with MSE or the LM loss, the authors' FFN, our residual FFN, SwiGLU) and ReplaceMe's linear map
# (least squares, cosine), each with its default objective and again with position 0 (the
# BOS/attention sink) flipped: left out where the default keeps it, kept where it leaves it out
# (the LM loss has no such setting); then, for every block a recovery removed, its plain removal
# (the control `layerprune-report` pairs it with); into results/MODEL/ablation_recovery.
#   experiments/ablation_recovery.sh MODEL [hydra overrides...]
# On a CPU, `recovery.budget.tokens=1048576 recovery.budget.batch_tokens=8192` bounds the
# training of every trained recovery (each step's own epochs when unset), and
# `recovery.activation_cache=true` runs the dense prefix once per block for all of them.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: experiments/ablation_recovery.sh MODEL [hydra overrides...]}
shift
runs=results/runs/ablation_recovery/$model
common=(scorer=streamline model="$model" sparsity=0.25 sparsity_unit=param_ratio "paths.runs=$runs")
status=0
sweep() {  # NAME OVERRIDES...: one multirun in its own sweep folder
  local name=$1
  shift
  python -m layerprune -m "${common[@]}" "hydra.sweep.dir=$runs/$name" "$@" || status=$?
}
sweep sweep recovery=none,linear,linear_cosine,layer,ffn,ffn_residual,swiglu,layer_lm "$@"
sweep sweep_position0 recovery=layer,ffn,ffn_residual,swiglu \
  '++recovery.steps.replace.exclude_positions=[]' "$@"
sweep sweep_position0_linear recovery=linear '++recovery.steps.linear.exclude_positions=[]' "$@"
sweep sweep_position0_cosine recovery=linear_cosine '++recovery.steps.linear.exclude_positions=[0]' \
  "$@"
# The controls: the same scorer and statistics pick the same block of that many layers.
while IFS= read -r overrides; do
  eval "python -m layerprune $overrides paths.runs=$runs" || status=$?
done < <(python -m layerprune.controls "$runs")
experiments/report.sh ablation_recovery "$model" || status=$?
exit "$status"
