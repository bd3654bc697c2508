"""The benchmark suites: each module's ``workloads(quick, device)`` lists its fixed workloads."""

from . import adaln, attention, diffusion, e2e, hf, lm_loss, pixart


def hf_libraries(quick, device):
    """The Hugging Face libraries' suite: a transformers model per attention backend, then a diffusers
    PixArt-alpha transformer with its default and with tfkernels' attention processors."""
    return hf.workloads(quick, device) + pixart.workloads(quick, device)


SUITES = {
    "attention": attention.workloads,
    "diffusion": diffusion.workloads,
    "lm_loss": lm_loss.workloads,
    "e2e": e2e.workloads,
    "adaln": adaln.workloads,
    "hf": hf_libraries,
}
