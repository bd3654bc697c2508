"""One prepared GPU run (issue 12, DESIGN §6): correctness and every headline figure in one call of
at most 9 minutes, with everything written to OUTDIR as it is measured.

``bash scripts/gpu_check.sh OUTDIR`` (or ``python -m bench.gpu_check OUTDIR``) runs the stages of
``plan.STAGES`` in priority order, each in its own process with its own deadline (``runner``):
environment and ceilings, GPU correctness in bf16 and fp16 (``correctness``), the attention,
loss and end-to-end benchmarks through ``bench.harness`` (``stages``), the compile report, and the
kernels' tests on the GPU. ``summary`` rewrites ``summary.md`` after each stage; ``--dry-run``
(``dry_run``) checks it all on a CPU. The details and what comes back: bench/README.md.
"""
