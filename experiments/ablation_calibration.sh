#!/usr/bin/env bash
# How much the chosen layers depend on the calibration text (wiki, C4, TinyStories, code), on the
# number of windows (16, 64, 256) and on the seed of the window draw (3 seeds), for the
# criteria without recovery: ShortGPT's block influence, LLM-Streamline's block, Gromov et al.'s
# angular block, Shortened LLaMA's PPL and Taylor+ (SLEB's greedy search, hours per setting on a
# CPU, is left out). Windows of 128 tokens: the mirror's smallest text (TinyStories, about 62k
# tokens) holds 256 windows only at that length. The seed of the draw is `calibration.seed`, so
# every run is evaluated on the same documents and a plan repeated by several settings is
# evaluated once (the removal cache). Into results/MODEL/ablation_calibration: the table (a row
# per criterion, text and number of windows, over the 3 draws) and choices.md (agreement of the
# chosen layers, the distinct plans, and what they cost in accuracy, paired).
#   experiments/ablation_calibration.sh MODEL [hydra overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: experiments/ablation_calibration.sh MODEL [hydra overrides...]}
shift
runs=results/runs/ablation_calibration/$model
status=0
for scorer in block_influence streamline angular ppl taylor; do
  python -m layerprune -m "scorer=$scorer" "++method=$scorer" recovery=none \
    calibration=wiki,c4,tinystories,code calibration.n=16,64,256 calibration.seq_len=128 \
    calibration.seed=0,1,2 model="$model" sparsity=0.25 sparsity_unit=param_ratio \
    paths.runs="$runs" hydra.sweep.dir="$runs/$scorer" "$@" || status=$?
done
experiments/report.sh ablation_calibration "$model" || status=$?
exit "$status"
