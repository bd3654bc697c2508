#!/usr/bin/env bash
# Validate and benchmark tfkernels on a GPU within a time budget (a rented GPU, a CI job with a time
# limit): the GPU-marked tests, then the benchmark suites, everything written to OUTDIR as it comes.
#   bash scripts/gpu_check.sh OUTDIR [--budget-s 600] [--tests-budget-s S] [--suites a,b] [--commit HASH]
#   bash scripts/gpu_check.sh --dry-run [OUTDIR]     # the same steps on a CPU
# Installs nothing: the machine's torch (CUDA build) and triton, this checkout on PYTHONPATH.
# Optional peers (transformers, liger-kernel, flash-attn) are used where installed; their cases skip otherwise.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m bench.gpu_check "$@"
