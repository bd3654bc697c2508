"""Benchmarks of tfkernels against the implementations people use today (docs/design.md#benchmark-method).

``python -m bench`` runs the suites and writes a CSV (``harness``), ``python -m bench.plot`` turns
a CSV into PNG charts, ``python -m bench.readme_table`` writes the README's performance table from
the newest GPU CSV under ``bench/results/``, and ``pytest bench/ --benchmark-only`` runs the same
workloads through pytest-benchmark. How to run them, the method, the workloads and the CSV schema:
``bench/README.md``.
"""
