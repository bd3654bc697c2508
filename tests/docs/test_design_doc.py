"""docs/design.md is the design reference: every pointer into it names one of its headings, and
nothing points at a design document outside the repository."""

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DESIGN = ROOT / "docs" / "design.md"
SUFFIXES = (".py", ".md", ".sh")
# Folders a checkout may hold that are not part of the project (caches, builds, training output).
UNTRACKED = {"__pycache__", "build", "dist", "runs"}
# A section sign after the seed document's name: how pointers outside the repository were written.
OUTSIDE_POINTER = "DESIGN \u00a7"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped (letters, digits,
    ``_`` and ``-`` kept), each space a ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def design_anchors() -> set[str]:
    """The anchors of docs/design.md's headings; a repeated heading gets ``-1``, ``-2``, ... as on GitHub."""
    anchors, seen = set(), {}
    in_code = False
    for line in DESIGN.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        match = None if in_code else re.match(r"#{1,6} (.+)", line)
        if match:
            anchor = github_anchor(match.group(1))
            count = seen.get(anchor, 0)
            seen[anchor] = count + 1
            anchors.add(anchor if count == 0 else f"{anchor}-{count}")
    return anchors


def project_files() -> list[Path]:
    """The project's .py, .md and .sh files: git's tracked files, or where there is no git checkout
    (a copied tree), every such file outside hidden and build folders."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        paths = [ROOT / name for name in listed.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        paths = []
        for folder, subfolders, names in os.walk(ROOT):
            subfolders[:] = [d for d in subfolders
                             if not d.startswith(".") and d not in UNTRACKED and not d.endswith(".egg-info")]
            paths += [Path(folder) / name for name in names]
    return sorted(p for p in paths if p.suffix in SUFFIXES and p.is_file())


def test_github_anchor_follows_githubs_rules():
    assert github_anchor("Empty rows and non-finite values") == "empty-rows-and-non-finite-values"
    assert github_anchor("The `IntervalMask`: one interval (per query)") == "the-intervalmask-one-interval-per-query"
    assert github_anchor("LM loss") == "lm-loss"


def test_design_doc_has_the_sections_the_code_points_to():
    anchors = design_anchors()
    for anchor in ("the-mask", "attention-kernels", "dispatch", "mask-validation",
                   "empty-rows-and-non-finite-values", "autocast", "the-op-seam", "benchmark-method"):
        assert anchor in anchors, f"docs/design.md has no heading with anchor #{anchor}"


@pytest.fixture(scope="module")
def files():
    found = project_files()
    assert ROOT / "README.md" in found and ROOT / "tfkernels" / "attention.py" in found
    return found


def test_every_design_pointer_resolves_to_a_heading(files):
    anchors = design_anchors()
    pointers = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        pointers += [(path, a) for a in re.findall(r"docs/design\.md#([\w-]+)", text)]
        if path == DESIGN:  # its own links between sections: [...](#anchor)
            pointers += [(path, a) for a in re.findall(r"\]\(#([\w-]+)\)", text)]
    assert len(pointers) >= 10, "the code and READMEs point into docs/design.md"
    broken = sorted(f"{path.relative_to(ROOT)}: #{anchor}" for path, anchor in pointers if anchor not in anchors)
    assert not broken, f"pointers to headings docs/design.md does not have: {broken}"


def test_no_file_points_at_a_design_document_outside_the_repository(files):
    offenders = sorted(str(p.relative_to(ROOT)) for p in files if OUTSIDE_POINTER in p.read_text(encoding="utf-8"))
    assert not offenders, f"files citing {OUTSIDE_POINTER!r} instead of docs/design.md: {offenders}"
