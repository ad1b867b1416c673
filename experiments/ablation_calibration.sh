#!/usr/bin/env bash
# How much the chosen layers depend on the calibration text (wiki, C4, TinyStories, code) and on
# the number of windows (16, 64, 256), for ShortGPT's and LLM-Streamline's scores without
# recovery; one row per (scorer, text, n) in results/MODEL/ablation_calibration.
#   experiments/ablation_calibration.sh MODEL [hydra overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: experiments/ablation_calibration.sh MODEL [hydra overrides...]}
shift
runs=results/runs/ablation_calibration/$model
status=0
python -m layerprune -m \
  scorer=block_influence,streamline recovery=none \
  calibration=wiki,c4,tinystories,code calibration.n=16,64,256 \
  model="$model" sparsity=0.25 sparsity_unit=param_ratio \
  paths.runs="$runs" hydra.sweep.dir="$runs/sweep" "$@" || status=$?
python -m layerprune.report "$runs" --out "results/$model/ablation_calibration" \
  --group-by calibration.path,calibration.n
exit "$status"
