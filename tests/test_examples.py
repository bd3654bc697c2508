"""The README's runnable example keeps running and keeps matching the reference."""

import re
import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_quickstart_runs_and_matches_the_reference(capsys):
    runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    printed = capsys.readouterr().out
    error = float(re.search(r"max \|out - reference\(float64\)\| = (\S+);", printed).group(1))
    assert error < 1e-5  # float32 on a CPU: a few ulps of the O(1) outputs
    assert "padding rows are zero: True" in printed
