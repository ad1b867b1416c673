#!/usr/bin/env bash
# One study's tables and figures, regenerated from its runs with the report options the study
# needs: BASE/runs/STUDY/MODEL -> BASE/MODEL/STUDY (BASE: results, or results/smoke). Every
# study script ends with it, and reports.sh runs it for every committed study.
#   experiments/report.sh STUDY MODEL [BASE]
set -euo pipefail
cd "$(dirname "$0")/.."
study=${1:?usage: experiments/report.sh STUDY MODEL [BASE]}
model=${2:?usage: experiments/report.sh STUDY MODEL [BASE]}
base=${3:-results}
case $study in
  ablation_calibration) options=(--group-by calibration.path,calibration.n --choices) ;;
  budget_curve) options=(--group-by recovery.budget.tokens --curve-over recovery.budget.tokens) ;;
  *) options=() ;;
esac
python -m layerprune.report "$base/runs/$study/$model" --out "$base/$model/$study" "${options[@]}"
