"""The CSV files bench writes: one writer and one reader for every table (the benchmark rows of
``python -m bench``, the GPU run's results, the compile report).

A table is a header of column names and one line per row dict; a cell is empty for ``None``,
6 significant digits for a float, ``str(value)`` otherwise; keys outside the columns are left
out. Every table carries ``ENVIRONMENT_COLUMNS`` (where and with what a row was measured):
pass ``environment=`` to fill them in each row, or put them in the rows yourself.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

ENVIRONMENT_COLUMNS = ("device", "torch", "triton", "commit", "timestamp")


def cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_rows(path: Path, rows: Iterable[Mapping], columns: Sequence[str], *,
               environment: Mapping | None = None, append: bool = False) -> None:
    """Write ``rows`` under the header ``columns``.

    ``append=False`` replaces ``path`` whole (a reader never sees half a file); ``append=True``
    adds the rows to it as they come, with the header when the file is new, and refuses a file
    whose header is not ``columns``. ``environment`` fills its columns in every row.
    """
    missing = [c for c in ENVIRONMENT_COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"columns: expected the environment columns {ENVIRONMENT_COLUMNS}, missing {missing}")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    new = not append or not path.exists() or path.stat().st_size == 0
    if new:
        writer.writerow(columns)
    elif read_header(path) != tuple(columns):
        raise ValueError(f"{path}: expected the header {','.join(columns)}, found {','.join(read_header(path))}")
    for row in rows:
        row = {**row, **(environment or {})}
        writer.writerow([cell(row.get(column)) for column in columns])
    path.parent.mkdir(parents=True, exist_ok=True)
    if append:
        with open(path, "a", newline="") as f:
            f.write(buffer.getvalue())
        return
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(buffer.getvalue())
    os.replace(temporary, path)


def read_header(path: Path) -> tuple[str, ...]:
    with open(path, newline="") as f:
        return tuple(next(csv.reader(f), ()))


def read_rows(path: Path, numbers: Sequence[str] = (), flags: Sequence[str] = ()) -> list[dict]:
    """The rows of ``path`` as dicts of strings; ``numbers`` as floats (None where empty),
    ``flags`` as bools (``True`` written as such)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for column in numbers:
            row[column] = float(row[column]) if row[column] != "" else None
        for column in flags:
            row[column] = row[column] == "True"
    return rows
