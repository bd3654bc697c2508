"""The benchmark suites: each module's ``workloads(quick, device)`` lists its fixed workloads."""

from . import adaln, attention, diffusion, e2e, hf, lm_loss

SUITES = {
    "attention": attention.workloads,
    "diffusion": diffusion.workloads,
    "lm_loss": lm_loss.workloads,
    "e2e": e2e.workloads,
    "adaln": adaln.workloads,
    "hf": hf.workloads,
}
