#!/usr/bin/env bash
# Accuracy and perplexity against the fraction of layers removed (1/8, 1/4, 3/8, 1/2), as in
# Gromov et al. and ShortGPT's figures, for ShortGPT, LLM-Streamline, SLEB and the random
# baseline (5 seeds), and the plain removal of every block the Streamline layer replaced (the
# control `layerprune-report` pairs it with); the curves and table go to
# results/MODEL/sparsity_curve.
#   experiments/sparsity_curve.sh MODEL [hydra overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: experiments/sparsity_curve.sh MODEL [hydra overrides...]}
shift
runs=results/runs/sparsity_curve/$model
status=0
common=(model="$model" sparsity=0.125,0.25,0.375,0.5 sparsity_unit=layer_ratio "paths.runs=$runs")
python -m layerprune -m experiment=shortgpt,streamline_layer,sleb "${common[@]}" \
  "hydra.sweep.dir=$runs/sweep" "$@" || status=$?
python -m layerprune -m experiment=random scorer.seed=0,1,2,3,4 "${common[@]}" \
  "hydra.sweep.dir=$runs/random" "$@" || status=$?
while IFS= read -r overrides; do  # the controls: plain removal of each replaced block
  eval "python -m layerprune $overrides paths.runs=$runs" || status=$?
done < <(python -m layerprune.controls "$runs")
experiments/report.sh sparsity_curve "$model" || status=$?
exit "$status"
