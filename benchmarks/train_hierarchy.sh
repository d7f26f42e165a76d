#!/usr/bin/env bash
# Train the ML-EM network hierarchy (docs/benchmarks/multilevel.md) with equal step counts, resumably:
# rerun this script and each model continues from its last checkpoint (saved every 250 steps) until it
# reaches STEPS.
# Usage: benchmarks/train_hierarchy.sh [STEPS] (default 4000; then measure with benchmarks/hierarchy.py and
# rerun with a larger STEPS, e.g. 8000, while some bucket is not strictly ordered); FASTSDE=.venv/bin/fastsde.
set -euo pipefail
STEPS=${1:-4000}
FASTSDE=${FASTSDE:-.venv/bin/fastsde}
for preset in small medium large; do
  out=runs/h-$preset
  resume=()
  [[ -f $out/train_state.json ]] && resume=(--resume)
  "$FASTSDE" train --quiet --out "$out" --preset "$preset" --steps "$STEPS" --save-every 250 --threads 1 "${resume[@]}"
done
