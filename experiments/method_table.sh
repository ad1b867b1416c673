#!/usr/bin/env bash
# The papers' method table (ShortGPT Table 3, LLM-Streamline Table 1): every method preset at a
# quarter of the parameters on one model, the random baseline over 5 seeds, the LoRA-healed
# presets again without their healing, and the plain removal of every block a replacement or
# fold took (the control `layerprune-report` pairs it with); the table, claims and figures go to
# results/MODEL/method_table.
#   experiments/method_table.sh MODEL [hydra overrides...]
# e.g. a quarter of the layers instead: `sparsity_unit=layer_ratio` (later overrides win); on a
# CPU, `recovery.budget.tokens=1048576 recovery.budget.batch_tokens=8192` bounds every trained
# recovery. Rerunning skips the finished jobs (same config hash under the same results root).
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: experiments/method_table.sh MODEL [hydra overrides...]}
shift
runs=results/runs/method_table/$model
common=(model="$model" sparsity=0.25 sparsity_unit=param_ratio "paths.runs=$runs")
status=0
sweep() {  # NAME OVERRIDES...: one multirun in its own sweep folder
  local name=$1
  shift
  python -m layerprune -m "${common[@]}" "hydra.sweep.dir=$runs/$name" "$@" || status=$?
}
presets=shortgpt,streamline_layer,streamline_layer_lm,streamline_ffn,gromov,replaceme
presets=$presets,replaceme_cosine,sleb,ppl,taylor,last
sweep sweep "experiment=$presets" "$@"
sweep random experiment=random scorer.seed=0,1,2,3,4 "$@"  # the same documents for every seed
for healed in gromov ppl taylor; do  # what the healing adds: the same plan, no LoRA
  sweep "${healed}_removal" "experiment=$healed" recovery=none "method=${healed}_removal" "$@"
done
# The controls: the same scorer and statistics pick the same block of that many layers.
while IFS= read -r overrides; do
  eval "python -m layerprune $overrides paths.runs=$runs" || status=$?
done < <(python -m layerprune.controls "$runs")
# A failed job is a gap in the table, so the table is written either way.
experiments/report.sh method_table "$model" || status=$?
exit "$status"
