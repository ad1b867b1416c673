#!/usr/bin/env bash
# The papers' method table (ShortGPT Table 3, LLM-Streamline Table 1): every method preset at a
# quarter of the parameters on one model, then the table and figures in results/MODEL/method_table.
#   experiments/method_table.sh MODEL [hydra overrides...]
# Rerunning skips the finished jobs (same config hash under the same results root).
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: experiments/method_table.sh MODEL [hydra overrides...]}
shift
runs=results/runs/method_table/$model
status=0
python -m layerprune -m \
  experiment=shortgpt,streamline_layer,streamline_ffn,gromov,replaceme,sleb,ppl,taylor,random,last \
  model="$model" sparsity=0.25 sparsity_unit=param_ratio \
  paths.runs="$runs" hydra.sweep.dir="$runs/sweep" "$@" || status=$?
# A failed job is a gap in the table, so the table is written either way.
python -m layerprune.report "$runs" --out "results/$model/method_table"
exit "$status"
