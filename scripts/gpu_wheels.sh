#!/usr/bin/env bash
# Wheels of the GPU run's optional peers that its machine lacks (it reaches no package index):
# transformers, diffusers and their dependencies for Python 3.12 on x86-64 Linux (the GPU machine's),
# without numpy, torch and triton (the machine's own are used). Run where pip reaches an index; then carry
# the folder: device tool `run` with carry [".gpu_wheels"] (43 MB of the 64 MiB allowed, measured).
# scripts/gpu_check.sh unpacks it into a temporary folder on PYTHONPATH (bench/gpu_check/wheels.py).
#   bash scripts/gpu_wheels.sh [DIR]      # default .gpu_wheels
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DIR=${1:-.gpu_wheels}
rm -rf "$DIR.partial"
"$PYTHON" -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --dest "$DIR.partial" "transformers==5.24.0" "diffusers==0.42.1"
rm -f "$DIR.partial"/numpy-*.whl "$DIR.partial"/torch-*.whl "$DIR.partial"/triton-*.whl
rm -rf "$DIR"
mv "$DIR.partial" "$DIR"
echo "gpu_wheels: $(ls "$DIR" | wc -l) wheels, $(du -sh "$DIR" | cut -f1) in $DIR; carry it to the GPU run"
