#!/usr/bin/env bash
# CI gate: every default attention launch compiles for sm_90a with the oldest Triton tfkernels
# supports, 3.6.0, beside the environment's own Triton, and passes bench.compile_report's gate: no
# spill beyond its allowance, and every tile walk issues each GEMM and exp2 once (MMA redundancy
# <= 1.05, EX2 per score <= 1.25; see gate_failures).
#
# Installs triton==3.6.0 with `pip install --no-deps --target` into TRITON_GATE_DIR (default
# ~/.cache/tfkernels/triton-3.6.0; reused when it already holds that version), puts it first on
# PYTHONPATH and runs `python -m bench.compile_report` on the attention kernels (forward, delta,
# dK/dV, dQ) at every default launch config of the 16-bit dtypes: bf16 (fp16 has the same configs;
# COMPILE_GATE_DTYPES=bf16,fp16 compiles both, twice the time), head dims 32-256, GQA on and off,
# under a causal mask and under a mask with holes (the kernels' HOLES variant, --holes): 175
# compiles, both launches of each kernel. Exits non-zero if any kernel does not compile or fails
# the gate.
# fp32 is left out: its kernels take 10-130 s each to compile. Extra arguments go to
# bench.compile_report (e.g. --jobs 4).
# The CSV goes to COMPILE_GATE_OUT (default: a temporary file, its path printed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VERSION=${TRITON_GATE_VERSION:-3.6.0}
DIR=${TRITON_GATE_DIR:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/tfkernels/triton-$VERSION}
OUT=${COMPILE_GATE_OUT:-$(mktemp -d)/compile_gate_triton-$VERSION.csv}
JOBS=${COMPILE_GATE_JOBS:-$(nproc 2>/dev/null || echo 2)}
DTYPES=${COMPILE_GATE_DTYPES:-bf16}

side_triton_version() {
    PYTHONPATH="$DIR" "$PYTHON" -c "import triton; print(triton.__version__)" 2>/dev/null || true
}

started=$(date +%s)
if [ "$(side_triton_version)" != "$VERSION" ]; then
    echo "compile gate: installing triton==$VERSION into $DIR"
    rm -rf "$DIR.partial"
    "$PYTHON" -m pip install --quiet --no-deps --target "$DIR.partial" "triton==$VERSION"
    rm -rf "$DIR"
    mv "$DIR.partial" "$DIR"
fi
if [ "$(side_triton_version)" != "$VERSION" ]; then
    echo "compile gate: $DIR does not give triton $VERSION" >&2
    exit 1
fi
installed=$(date +%s)
echo "compile gate: triton $VERSION from $DIR ($(( installed - started )) s to set up), $JOBS processes"
PYTHONPATH="$DIR${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0 "$PYTHON" -m bench.compile_report \
    --kernels attention --dtypes "$DTYPES" --gqa both --holes --arch 90 --jobs "$JOBS" --gate --out "$OUT" "$@"
echo "compile gate: every kernel compiled and passed with triton $VERSION in $(( $(date +%s) - installed )) s; CSV $OUT"
