"""The public API, ``import tfkernels as tk``: its names, and the same objects as in the modules."""

import tfkernels as tk
import tfkernels.mask
import tfkernels.schedule
import tfkernels.testing
from tfkernels import reference


def test_public_names():
    assert sorted(tk.__all__) == ["IntervalMask", "NoiseSchedule", "NotAnIntervalError", "__version__",
                                  "adaln_modulate", "add_noise", "attention", "backend", "diffusion_loss",
                                  "linear_cross_entropy"]
    assert all(hasattr(tk, name) for name in tk.__all__)
    assert isinstance(tk.__version__, str) and tk.__version__


def test_moved_names_are_the_same_objects():
    assert tk.IntervalMask is tfkernels.mask.IntervalMask
    assert tk.NotAnIntervalError is tfkernels.mask.NotAnIntervalError
    assert tk.NoiseSchedule is tfkernels.schedule.NoiseSchedule is reference.NoiseSchedule
    assert tfkernels.testing.segment_ids_from_layout is tfkernels.mask.segment_ids_from_layout
    for name in ("attention", "add_noise", "diffusion_loss", "linear_cross_entropy", "seeded_noise", "NoiseSchedule"):
        assert callable(getattr(reference, name))
