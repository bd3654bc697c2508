"""Optional peers for the GPU run that its machine lacks (no network there): wheels carried along.

``bash scripts/gpu_wheels.sh`` (on a machine that reaches a package index) downloads transformers,
diffusers and their dependencies as Python 3.12 manylinux wheels into ``.gpu_wheels/`` (ignored by
git; carry it with the device tool's ``carry``). ``scripts/gpu_check.sh`` then runs
``python -m bench.gpu_check.wheels .gpu_wheels``: every wheel is unzipped into one temporary
folder, whose path it prints; the script exports it as ``TFKERNELS_CARRIED_PATH`` and
``bench.gpu_check`` (each stage's process too) appends it to ``sys.path`` (``append_carried``):
after site-packages, so only what the machine lacks comes from it. A wheel's files are importable
as they stand: nothing is installed into the machine's environment. Without the folder the hf
suite's cases are skipped with their reason, as before.
"""

from __future__ import annotations

import os
import sys
import tempfile
import zipfile
from pathlib import Path


def unpack(wheels: Path, target: Path) -> list[str]:
    """Unzip every ``*.whl`` in ``wheels`` into ``target``; the wheels' names, sorted."""
    names = sorted(p.name for p in wheels.glob("*.whl"))
    for name in names:
        with zipfile.ZipFile(wheels / name) as wheel:
            wheel.extractall(target)
    return names


def append_carried() -> str | None:
    """Append ``TFKERNELS_CARRIED_PATH`` (when set and not yet there) to ``sys.path``; the path, or None."""
    path = os.environ.get("TFKERNELS_CARRIED_PATH") or None
    if path is not None and path not in sys.path:
        sys.path.append(path)
    return path


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.gpu_check.wheels WHEELS_DIR", file=sys.stderr)
        return 2
    wheels = Path(args[0])
    if not wheels.is_dir() or not any(wheels.glob("*.whl")):
        return 0  # nothing carried: print nothing, PYTHONPATH stays as it is
    target = Path(tempfile.mkdtemp(prefix="tfkernels_gpu_wheels_"))
    names = unpack(wheels, target)
    print(f"gpu_check: {len(names)} carried wheels unpacked into {target}", file=sys.stderr)
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
