"""What the integration tests share: a spy on the attention function an integration calls, the
anchored comparison of a model's gradients, and the packaging and README checks."""

import re
import subprocess
import sys
from pathlib import Path

import tfkernels as tk
from tfkernels.testing import assert_anchored

README = Path(__file__).resolve().parents[3] / "README.md"


def spy_on_attention(monkeypatch, module) -> list:
    """Replace ``module.attention`` by tk.attention that records each call's mask: the list it appends to
    (proof that a model's layers ran on tfkernels, not a fallback)."""
    calls = []

    def spy(q, k, v, mask=None, **kwargs):
        calls.append(mask)
        return tk.attention(q, k, v, mask, **kwargs)

    monkeypatch.setattr(module, "attention", spy)
    return calls


def assert_grads_anchored(grads: dict, grads64: dict, grads_lowp: dict) -> None:
    """Every parameter gradient within the reference's own low-precision error (same parameters, some)."""
    assert grads.keys() == grads64.keys() and grads
    for name, grad in grads.items():
        assert_anchored(name, grad, grads64[name], grads_lowp[name])


def import_error_without(package: str, module: str) -> str:
    """The ImportError message of ``import module`` in a fresh process where ``package`` cannot be imported."""
    code = (f"import sys; sys.modules[{package!r}] = None\n"
            f"try:\n    import {module}\nexcept ImportError as e:\n    print(e)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return result.stdout + result.stderr


def imports_of_tfkernels(package: str) -> bool:
    """Whether importing tfkernels and tfkernels.integrations imports ``package`` (a fresh process)."""
    code = f"import sys, tfkernels, tfkernels.integrations; print({package!r} in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip() == "True"


def run_readme_section(heading: str) -> dict:
    """Run the first python block of the README section ``## heading``; its globals."""
    section = README.read_text().split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    example = {}
    exec(compile(code, "README.md", "exec"), example)
    return example
