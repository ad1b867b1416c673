#!/usr/bin/env bash
# What a recovery's training budget buys: the LLM-Streamline layer trained with MSE and with the
# LM loss, and Gromov et al.'s LoRA healing, at about 50k, 250k, 1M and 4M training tokens
# (49,152, 262,144, 1,048,576 and 4,194,304; 8,192 a step), at a quarter of the parameters, each
# beside plain removal of its block. Into results/MODEL/budget_curve: the table, recovery.md
# (held-out MSE, cosine and LM loss against plain removal) and the curves against the budget.
# The Streamline layers train on 1,024 windows of 512 tokens of the mirror's wiki text (about
# 523k distinct tokens: the 4M budget repeats them 8 times), the LoRA on its preset's 128
# windows of C4 (about 65k tokens, all the mirror has).
#   experiments/budget_curve.sh MODEL [hydra overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: experiments/budget_curve.sh MODEL [hydra overrides...]}
shift
runs=results/runs/budget_curve/$model
common=(model="$model" sparsity=0.25 sparsity_unit=param_ratio "paths.runs=$runs"
        recovery.budget.tokens=49152,262144,1048576,4194304 recovery.budget.batch_tokens=8192)
status=0
python -m layerprune -m experiment=streamline_layer,streamline_layer_lm recovery.train_data.n=1024 \
  "${common[@]}" "hydra.sweep.dir=$runs/streamline" "$@" || status=$?
python -m layerprune -m experiment=gromov "${common[@]}" "hydra.sweep.dir=$runs/gromov" "$@" \
  || status=$?
while IFS= read -r overrides; do  # the controls: plain removal of each block
  eval "python -m layerprune $overrides paths.runs=$runs" || status=$?
done < <(python -m layerprune.controls "$runs")
experiments/report.sh budget_curve "$model" || status=$?
exit "$status"
