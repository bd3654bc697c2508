#!/usr/bin/env bash
# The main job on the embedded defaults. Installs what it needs (CPU torch wheel when no torch is
# present), then runs the quick-start example.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
"$PYTHON" -m pip install --quiet -e .
exec "$PYTHON" examples/quickstart.py "$@"
