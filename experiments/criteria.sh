#!/usr/bin/env bash
# The depth-pruning criteria side by side on one model at a quarter of the parameters: ShortGPT's
# Block Influence, SLEB, Shortened LLaMA's PPL and Taylor+ (each with the paper's LoRA healing and
# without it) and LLM-Streamline's block removed plainly; into results/MODEL/criteria.
#   experiments/criteria.sh MODEL [hydra overrides...]
# Rerunning skips the finished jobs (same config hash under the same results root).
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: experiments/criteria.sh MODEL [hydra overrides...]}
shift
runs=results/runs/criteria/$model
common=(model="$model" sparsity=0.25 sparsity_unit=param_ratio "paths.runs=$runs")
status=0
sweep() {  # NAME OVERRIDES...: one multirun in its own sweep folder
  local name=$1
  shift
  python -m layerprune -m "${common[@]}" "hydra.sweep.dir=$runs/$name" "$@" || status=$?
}
sweep sweep experiment=shortgpt,sleb "$@"
sweep healed experiment=ppl,taylor "$@"
# the criteria without their healing: the pair tells what LoRA adds
sweep ppl_removal experiment=ppl recovery=none method=ppl_removal "$@"
sweep taylor_removal experiment=taylor recovery=none method=taylor_removal "$@"
sweep streamline_removal experiment=streamline_layer recovery=none method=streamline_removal "$@"
# A failed job is a gap in the table, so the table is written either way.
experiments/report.sh criteria "$model" || status=$?
exit "$status"
