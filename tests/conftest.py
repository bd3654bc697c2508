"""Test set-up: without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

NO_GPU = pytest.mark.skip(reason="needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip, with the reason, where there is no CUDA GPU."""
    if not torch.cuda.is_available():
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(NO_GPU)


@pytest.fixture
def reference_path(monkeypatch):
    """CPU tensors run the eager reference (fast), for tests of the code above the kernels; a test
    that compares with the kernels sets TRITON_INTERPRET=1 itself."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and lose a lot when another process is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
