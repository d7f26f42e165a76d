#!/usr/bin/env bash
# Train the Fashion-MNIST models (docs/reference/models.md, "Fashion-MNIST"), resumably: rerun this script
# and each model continues from its last checkpoint (saved every SAVE steps) until it reaches STEPS or
# MINUTES of wall time in this call. Each save prints the held-out loss of the EMA network (2000 held-out
# images, the same t and noise every time); a model is done when that curve has flattened.
# Usage: benchmarks/train_fashion.sh [STEPS] [MINUTES] [MODELS]
#   STEPS default 20000; MINUTES per model per call, default 150 (one CPU chunk of <= 2.5 h);
#   MODELS default "fashion fashion-flow fashion-cond".
# Environment: DEVICE=cpu|cuda (default cpu), THREADS (CPU threads, default 2), SAVE (default 200),
#   FASTSDE (default .venv/bin/fastsde), FASHION_MNIST_DIR (the four idx files; default the Debian package's).
set -euo pipefail
STEPS=${1:-20000}
MINUTES=${2:-150}
MODELS=${3:-"fashion fashion-flow fashion-cond"}
FASTSDE=${FASTSDE:-.venv/bin/fastsde}
DEVICE=${DEVICE:-cpu}
for name in $MODELS; do
  case $name in
    fashion) extra=() ;;
    fashion-flow) extra=(--objective flow) ;;
    fashion-cond) extra=(--conditional) ;;
    *) echo "unknown model $name (fashion, fashion-flow, fashion-cond)" >&2; exit 2 ;;
  esac
  out=runs/$name
  if [[ -f $out/train_state.safetensors ]]; then
    "$FASTSDE" train --quiet --out "$out" --data fashion --steps "$STEPS" --save-every "${SAVE:-200}" \
      --max-minutes "$MINUTES" --threads "${THREADS:-2}" --device "$DEVICE" --resume
  else
    "$FASTSDE" train --quiet --out "$out" --data fashion --channels 32,64,128 "${extra[@]}" --steps "$STEPS" \
      --save-every "${SAVE:-200}" --max-minutes "$MINUTES" --threads "${THREADS:-2}" --device "$DEVICE"
  fi
done
