"""The README names files that exist, points at nothing outside the repository, and opens with the
quickstart example."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUTS = "bench/results/"  # written by python -m bench and gpu_check; absent until a run's results are committed
README = (ROOT / "README.md").read_text()


def test_every_path_the_readme_names_exists():
    # `tfkernels/mask.py`, [bench/README.md](bench/README.md), `tests/tfkernels/test_dispatch.py`, ...
    named = set(re.findall(r"`((?:tfkernels|transfusion_core|bench|tests|docs|scripts|examples)/[\w./<>]+)`", README))
    named |= set(re.findall(r"\]\(((?!https?:)[^)]+)\)", README))
    assert len(named) > 20
    paths = {p.split("#")[0] for p in named if "<" not in p and not p.startswith(OUTPUTS)}
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"README names paths that do not exist: {missing}"


def test_the_readme_cites_no_document_outside_the_repository():
    assert "shared/" not in README and "DESIGN" not in README


def test_the_first_example_comes_early_and_is_the_quickstart():
    # A newcomer meets runnable code within the first 80 lines; tests/test_examples.py runs it as
    # examples/quickstart.py, so the README's copy must be that file's code, docstring aside.
    opening = README.index("```python\n")
    assert README[:opening].count("\n") < 80
    code = README[opening + len("```python\n"):].split("```", 1)[0]
    quickstart = (ROOT / "examples" / "quickstart.py").read_text()
    assert code == quickstart.split('"""', 2)[2].lstrip("\n")
