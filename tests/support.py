"""What the kernel test modules share: the device, the dtypes the interpreter handles, the mark
that skips a module without a way to run Triton, and the mark of the tests that need a GPU. (The
assertion helpers, ``assert_anchored`` and ``max_error``, are public: ``tfkernels.testing``.)"""

import pytest
import torch

import tfkernels as tk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Triton's interpreter mishandles bfloat16 (loads keep raw 16-bit integers): CPU runs test these.
CPU_DTYPES = [torch.float32, torch.float16]

requires_triton = pytest.mark.skipif(
    tk.backend(DEVICE) != "triton",
    reason="needs a CUDA GPU or TRITON_INTERPRET=1 to run the Triton kernels",
)

# The GPU tests: skipped without a CUDA GPU (conftest), selected alone by ``pytest -m gpu``.
gpu_only = pytest.mark.gpu

# alphas_cumprod of diffusers' DDPMScheduler(num_train_timesteps=1000, beta_schedule=...) at a few
# timesteps, printed once with diffusers 0.42.1 (float32 values, exactly as printed): an independent
# source for the schedule tests, which must hold without diffusers installed.
DIFFUSERS_ALPHAS_CUMPROD = {
    "cosine": {  # beta_schedule="squaredcos_cap_v2"
        0: 0.9999586939811707, 1: 0.9999125599861145, 20: 0.9981141686439514, 499: 0.4938434660434723,
        500: 0.4922850430011749, 998: 2.428766265438753e-06, 999: 2.4287349909002387e-09,
    },
    "linear": {  # beta_schedule="linear"
        0: 0.9998999834060669, 1: 0.9997800588607788, 20: 0.9937353134155273, 499: 0.07858723402023315,
        999: 4.035830352222547e-05,
    },
}


def both_paths_fixture(op_module):
    """A ``path`` fixture for the tests of ``op_module`` (e.g. ``tfkernels.diffusion``): each test runs on
    the kernel path and on the reference path (which CPU tensors take without the interpreter): the
    same input must give the same answer or the same named error on both."""

    @pytest.fixture(params=["kernel", "reference"])
    def path(request, monkeypatch):
        if request.param == "reference":
            monkeypatch.setattr(op_module, "use_triton", lambda x: False)
        return request.param

    return path
