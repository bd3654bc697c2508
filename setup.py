import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "tfkernels" / "_version.py").read_text()).group(1)

setup(
    name="tfkernels",
    version=VERSION,
    description="Triton kernels for Transfusion-style multimodal models: interval-mask flash "
    "attention, fused diffusion noise/loss and a fused LM loss",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tfkernels", "tfkernels.*", "transfusion_core", "transfusion_core.*"]),
    install_requires=[
        "torch>=2.11",
        "triton>=3.6; sys_platform == 'linux'",
        "einops",
        "safetensors",
    ],
    extras_require={
        # numpy: Triton's interpreter (TRITON_INTERPRET=1, how the tests run kernels on a CPU) needs it.
        # Triton 3.6's interpreter needs numpy < 2.4 (tfkernels raises saying so); a fresh install gets a newer
        # Triton, whose interpreter does not.
        # Pillow, matplotlib, diffusers: the suite also tests the train, bench and vae extras' code.
        # ruff: scripts/test.sh lints the tree before the tests.
        # transformers: tests/tfkernels/integrations/test_hf.py (the hf extra; transformers pulls no torch build).
        # diffusers >= 0.35: also tests/tfkernels/integrations/test_diffusers.py (the diffusers extra).
        "test": ["pytest", "hypothesis", "pytest-benchmark", "numpy", "Pillow", "matplotlib", "diffusers>=0.35",
                 "ruff", "transformers>=5.9,<6"],
        # python -m transfusion_core.train: user images (Pillow), loss curve and samples PNGs.
        "train": ["Pillow", "matplotlib"],
        # A real image codec: a diffusers AutoencoderKL loaded from a local directory.
        "vae": ["diffusers"],
        # python -m bench.plot: PNG charts of a benchmark CSV.
        "bench": ["matplotlib"],
        # tfkernels.integrations.hf: attn_implementation="tfkernels". Its suite passes with transformers 5.9.0 (the
        # oldest it supports: tfkernels.integrations.hf.LOWEST_TRANSFORMERS) and 5.25.0; 6 may change what it reads.
        "hf": ["transformers>=5.9,<6"],
        # tfkernels.integrations.diffusers: apply(model) (tested with diffusers 0.42.1; diffusers requires torch
        # only through its own "torch" extra, so this pulls no torch build).
        "diffusers": ["diffusers>=0.35"],
    },
)
