"""bench/results_csv.py: the one CSV writer and reader of bench (cells, appending, the header and
the environment columns)."""

import pytest

from bench import harness
from bench.results_csv import ENVIRONMENT_COLUMNS, read_rows, write_rows

COLUMNS = ("name", "value", *ENVIRONMENT_COLUMNS)
ENVIRONMENT = dict(zip(ENVIRONMENT_COLUMNS, ("NVIDIA H100", "2.11.0", "3.6.0", "abc", "2030-01-02T00:00:00Z")))


def test_rows_are_written_whole_then_appended_under_one_header(tmp_path):
    path = tmp_path / "sub" / "t.csv"
    write_rows(path, [{"name": "a", "value": 1 / 3, "extra": "left out"}], COLUMNS, environment=ENVIRONMENT)
    write_rows(path, [{"name": "b", "value": None}], COLUMNS, environment=ENVIRONMENT, append=True)
    assert path.read_text().splitlines() == [
        "name,value,device,torch,triton,commit,timestamp",
        "a,0.333333,NVIDIA H100,2.11.0,3.6.0,abc,2030-01-02T00:00:00Z",
        "b,,NVIDIA H100,2.11.0,3.6.0,abc,2030-01-02T00:00:00Z",
    ]
    assert [r["value"] for r in read_rows(path, numbers=("value",))] == [0.333333, None]
    write_rows(path, [], COLUMNS)  # replaced whole, no temporary file left
    assert path.read_text() == ",".join(COLUMNS) + "\n" and [p.name for p in path.parent.iterdir()] == ["t.csv"]


def test_a_table_without_the_environment_or_with_other_columns_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"columns: expected the environment columns .* missing \['device'"):
        write_rows(tmp_path / "t.csv", [], ("name",))
    write_rows(tmp_path / "t.csv", [], COLUMNS)
    with pytest.raises(ValueError, match=r"t.csv: expected the header kernel,"):
        write_rows(tmp_path / "t.csv", [], ("kernel", *ENVIRONMENT_COLUMNS), append=True)


def test_the_benchmark_csv_is_such_a_table(quick_rows, tmp_path):
    assert harness.Environment._fields == ENVIRONMENT_COLUMNS
    harness.write_csv(quick_rows, tmp_path / "b.csv")
    assert harness.read_csv(tmp_path / "b.csv") == quick_rows  # numbers as floats, quick as a bool, both ways
