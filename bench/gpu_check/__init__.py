"""A time-boxed validation and benchmark run on a GPU: ``python -m bench.gpu_check OUTDIR --budget-s N``
(or ``bash scripts/gpu_check.sh OUTDIR ...``), for a rented GPU or a CI job with a time limit.

One command, in order: ``env.json`` (device, versions, commit); the GPU-marked tests
(``pytest -m gpu``, their outcomes in pytest's own ``tests.xml``); then the ``python -m bench``
suites, each in its own process with its share of the time left, their rows appended to
``results.csv`` as they are measured; ``summary.md`` rewritten after each step, and ``log.txt``.
A step that reaches its deadline is stopped and keeps what it wrote. ``--dry-run`` runs the same
steps on a CPU (the GPU tests skip, the suites run ``--quick``). ``run`` has the steps,
``summary`` the summary; bench/README.md says what to expect.
"""
