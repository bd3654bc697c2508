#!/usr/bin/env bash
# One prepared GPU run (issue 12): GPU correctness in bf16/fp16 and every headline benchmark in one
# call of at most 9 minutes, each stage's results written to OUTDIR as soon as it has them.
#   bash scripts/gpu_check.sh OUTDIR [--commit HASH] [--stages a,b] [--total SECONDS]
#   bash scripts/gpu_check.sh --dry-run [OUTDIR]     # on a CPU: imports, real shapes, plan, tiny stages
# Installs nothing and needs no network: the machine's own torch (CUDA build) and triton, with this
# checkout on PYTHONPATH; the wheels of scripts/gpu_wheels.sh, when carried, only for what the machine
# lacks (transformers). Autotuning off; never Triton's interpreter. See bench/README.md.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TFKERNELS_AUTOTUNE=0 TRITON_INTERPRET=0
# Optional peers carried as wheels (scripts/gpu_wheels.sh): unpacked into a temporary folder that
# bench.gpu_check appends to sys.path, after site-packages, so the machine's own packages win.
TFKERNELS_CARRIED_PATH=$("${PYTHON:-python3}" -m bench.gpu_check.wheels "$root/.gpu_wheels") || TFKERNELS_CARRIED_PATH=""
export TFKERNELS_CARRIED_PATH
exec "${PYTHON:-python3}" -m bench.gpu_check "$@"
