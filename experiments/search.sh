#!/usr/bin/env bash
# The budgeted search on one model: every scorer's plan at 1/8, 1/4 and 3/8 of the layers, ranked
# by held-out KL, the best two of each budget evaluated; then, at 1/4, the presets' own plans
# evaluated beside the chosen one and compared with it on the same documents. Into
# results/runs/search/MODEL/{budgets,presets} (search.json, search.md, search.png); the tables and
# figures are written again from search.json under results/MODEL/search/{budgets,presets}.
#   experiments/search.sh MODEL [hydra overrides...]     e.g. eval=standard
# A plain removal's evaluation is cached, so the second search evaluates only the plans the
# first did not, and a search stopped part-way starts again where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: experiments/search.sh MODEL [hydra overrides...]}
shift
runs=results/runs/search/$model
presets=block_influence/independent,streamline/contiguous,angular/contiguous,sleb/independent
presets=$presets,ppl/independent,taylor/independent,last/contiguous
python -m layerprune experiment=search model="$model" search.top_k=2 "paths.runs=$runs" \
  "hydra.run.dir=$runs/budgets" "$@"
python -m layerprune experiment=search model="$model" search.top_k=2 'search.budgets=[0.25]' \
  "search.also_evaluate=[$presets]" "paths.runs=$runs" "hydra.run.dir=$runs/presets" "$@"
experiments/report.sh search "$model"
