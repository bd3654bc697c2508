#!/usr/bin/env bash
# Install what the test suite needs, lint, then run the suite on the CPU (Triton kernels in the interpreter).
# Works on a fresh machine: with no torch present it installs the CPU wheel torch==2.13.0 first, so
# pip never pulls the multi-GB CUDA build onto a CPU machine. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
"$PYTHON" -m pip install --quiet -e ".[test]"
"$PYTHON" -m ruff check .
export TRITON_INTERPRET=1
exec "$PYTHON" -m pytest -q tests "$@"
