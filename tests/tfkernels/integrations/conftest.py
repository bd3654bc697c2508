"""Fixtures of the integration tests: a model test runs once on tk.attention's kernel path and once on
its reference path (``path``); ``model_path`` skips the kernel path where the Triton kernels cannot run."""

import importlib

import pytest

import tfkernels as tk
from tests.support import DEVICE, both_paths_fixture

path = both_paths_fixture(importlib.import_module("tfkernels.attention"))


@pytest.fixture
def model_path(path):
    if path == "kernel" and tk.backend(DEVICE) != "triton":
        pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1 to run the Triton kernels")
    return path
