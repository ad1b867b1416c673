#!/usr/bin/env bash
# Every committed table and figure regenerated from the committed runs (results/runs/STUDY/MODEL
# -> results/MODEL/STUDY, results/smoke/runs/STUDY/MODEL -> results/smoke/MODEL/STUDY, the GPU
# runs -> results/MODEL/method_table_gpu); `git status` then shows any table its runs no longer
# give byte for byte.
#   experiments/reports.sh
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
for runs in results/runs/*/* results/smoke/runs/*/*; do
  [ -d "$runs" ] || continue
  study=$(basename "$(dirname "$runs")") model=$(basename "$runs")
  base=results
  [[ $runs == results/smoke/* ]] && base=results/smoke
  echo "$runs -> $base/$model/$study"
  experiments/report.sh "$study" "$model" "$base" > /dev/null || status=$?
done
exit "$status"
