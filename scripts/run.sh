#!/usr/bin/env bash
# The main job: train the tiny preset on the embedded data set, evaluate it, write the PNGs.
# Installs what it needs on a fresh machine (the CPU wheel torch==2.13.0 when no torch is present,
# so pip never pulls the multi-GB CUDA build; then this package with its "train" extra).
# Output in runs/tiny (OUT=... to change): loss_curve.png, samples.png, checkpoint/ and
# checkpoint/eval.json. Extra arguments go to the training script, e.g. --steps 300.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-runs/tiny}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
"$PYTHON" -m pip install --quiet -e ".[train]"
started=$(date +%s)
"$PYTHON" -m transfusion_core.train --preset tiny --out "$OUT" "$@"
"$PYTHON" -m transfusion_core.evaluate "$OUT/checkpoint"
echo "main job: trained and evaluated in $(( $(date +%s) - started )) s;" \
     "see $OUT/loss_curve.png, $OUT/samples.png, $OUT/checkpoint/eval.json"
