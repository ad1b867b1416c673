#!/usr/bin/env bash
# Which recovery, for the same LLM-Streamline block: none, a trained layer, FFN or SwiGLU
# replacement, ReplaceMe's linear map, LoRA, and layer + LoRA; into results/MODEL/ablation_recovery.
#   experiments/ablation_recovery.sh MODEL [hydra overrides...]
# On a CPU, `recovery.train_data.n=64` keeps the trained recoveries short.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: experiments/ablation_recovery.sh MODEL [hydra overrides...]}
shift
runs=results/runs/ablation_recovery/$model
status=0
python -m layerprune -m \
  scorer=streamline recovery=none,layer,ffn,swiglu,linear,lora,layer_lora \
  model="$model" sparsity=0.25 sparsity_unit=param_ratio \
  paths.runs="$runs" hydra.sweep.dir="$runs/sweep" "$@" || status=$?
python -m layerprune.report "$runs" --out "results/$model/ablation_recovery"
exit "$status"
