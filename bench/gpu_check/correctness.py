"""GPU correctness checks of the prepared run: every op in bf16 and fp16 at the sizes training uses,
against float64, with the anchored tolerance the CPU tests use (``tfkernels.testing``).

Each check compares the kernels' result (``ours``), the float64 reference (``ref64``) and eager
PyTorch in the same low precision (``lowp``): a quantity passes when ``assert_anchored`` accepts
it, i.e. ``max |ours - ref64| <= 2 max |lowp - ref64| + 4 eps max(1, |ref64|)`` and finite. Every
check draws fresh random inputs from its own seed. One CSV row per compared quantity.

``tiny=True`` (the dry run on a CPU) shrinks every shape; the ops then run their eager reference,
so the rows only prove that the checks run, not that the kernels are right.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

import tfkernels as tk
from tfkernels import reference
from tfkernels.testing import assert_anchored, max_error, packed_transfusion_layout, random_layout

COLUMNS = ("check", "op", "dtype", "shape", "quantity", "max_error", "eager_error", "passed", "detail", "seconds")
# Seeded noise against reference.seeded_noise (tests/tfkernels/test_diffusion.py's SEEDED_NOISE_ATOL):
# the integer stream is exact, log/sqrt/cos differ by float32 rounding (approximate GPU instructions).
SEEDED_NOISE_ATOL = 1e-5
W1_LAYOUT = dict(doc_len=(512, 2048), caption_len=(20, 200), image_len=256)
TINY_LAYOUT = dict(doc_len=(32, 64), caption_len=(4, 12), image_len=16)


@dataclass(frozen=True)
class AttentionCheck:
    name: str
    dtype: torch.dtype
    batch: int
    seq_q: int
    seq_k: int
    heads_q: int
    heads_kv: int
    dim: int
    mask: str  # packed | irregular | causal | image_decode
    seed: int
    softcap: float | None = None  # tk.attention(softcap=): the soft-capped kernels


    def tiny(self) -> AttentionCheck:
        """The same check at a CPU size: sequences of at most 96, at most 2 heads (the kv heads
        still divide them), batch 1."""
        seq_q, seq_k = min(self.seq_q, 96), min(self.seq_k, 96)
        if self.mask == "image_decode":
            seq_q, seq_k = 16, 96
        heads_kv = min(self.heads_kv, 2)
        heads_q = heads_kv * min(self.heads_q // self.heads_kv, 2)
        return replace(self, batch=1, seq_q=seq_q, seq_k=seq_k, heads_q=heads_q, heads_kv=heads_kv)

    def shape(self) -> str:
        return (f"B={self.batch} Sq={self.seq_q} Sk={self.seq_k} Hq={self.heads_q} Hkv={self.heads_kv} "
                f"D={self.dim} {self.mask}" + (f" softcap={self.softcap}" if self.softcap else ""))

    def build_mask(self, device) -> tk.IntervalMask:
        rng = random.Random(self.seed)
        layout = W1_LAYOUT if self.seq_k >= 2048 else TINY_LAYOUT
        if self.mask == "packed":
            images, documents = packed_transfusion_layout(rng, self.batch, self.seq_q, **layout)
            return tk.IntervalMask.from_spans(self.seq_q, images=images, documents=documents, device=device)
        if self.mask == "irregular":  # padding rows, one-token and adjacent images, images at document edges
            images, documents = random_layout(rng, self.batch, self.seq_q, max_documents=6,
                                              max_image_len=max(8, self.seq_q // 8))
            return tk.IntervalMask.from_spans(self.seq_q, images=images, documents=documents, device=device)
        if self.mask == "causal":  # Sq < Sk: the last Sq positions against the cache (decoding)
            return tk.IntervalMask.causal(self.batch, self.seq_q, self.seq_k, device=device)
        if self.mask == "image_decode":  # the patches of row 0's last image against the cached prefix
            images, documents = packed_transfusion_layout(rng, self.batch, self.seq_k, **layout)
            end = images[0][-1][1] if images[0] else self.seq_k  # (no image: the last rows, causal-like)
            full = tk.IntervalMask.from_spans(self.seq_k, images=images, documents=documents, device=device)
            return full.slice_queries(max(0, end - self.seq_q), end)  # keys: the prefix up to the image's end
        raise ValueError(f"unknown mask kind {self.mask!r}")


def attention_checks() -> list[AttentionCheck]:
    """In priority order: the training layouts at full length first, then head dims, then fp16."""
    bf16, fp16 = torch.bfloat16, torch.float16
    return [
        AttentionCheck("attn_packed_gqa", bf16, 1, 8192, 8192, 8, 2, 128, "packed", 1),
        AttentionCheck("attn_causal", bf16, 1, 8192, 8192, 8, 8, 128, "causal", 2),
        AttentionCheck("attn_decode_1", bf16, 2, 1, 8192, 16, 4, 128, "causal", 3),
        AttentionCheck("attn_image_decode", bf16, 1, 256, 8192, 16, 4, 128, "image_decode", 4),
        AttentionCheck("attn_packed_gqa", fp16, 1, 8192, 8192, 8, 2, 128, "packed", 5),
        AttentionCheck("attn_irregular", bf16, 2, 4096, 4096, 8, 8, 128, "irregular", 6),
        AttentionCheck("attn_d64", bf16, 2, 4096, 4096, 8, 4, 64, "packed", 7),
        AttentionCheck("attn_d256", bf16, 1, 4096, 4096, 4, 4, 256, "packed", 8),
        AttentionCheck("attn_d80", bf16, 1, 4096, 4096, 8, 2, 80, "packed", 9),
        AttentionCheck("attn_causal", fp16, 1, 4096, 4096, 8, 8, 128, "causal", 10),
        AttentionCheck("attn_d64", fp16, 2, 4096, 4096, 8, 4, 64, "packed", 11),
        AttentionCheck("attn_decode_1", fp16, 2, 1, 8192, 16, 4, 128, "causal", 12),
        AttentionCheck("attn_softcap", bf16, 1, 4096, 4096, 8, 2, 128, "packed", 13, softcap=2.0),
    ]


def _randn(shape, dtype, generator, device) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)


def _generator(device, seed: int) -> torch.Generator:
    return torch.Generator(device).manual_seed(seed)


def _row(check, op, dtype, shape, quantity, ours=None, ref=None, lowp=None, passed=True, detail="") -> dict:
    row = dict(check=check, op=op, dtype=str(dtype).removeprefix("torch."), shape=shape, quantity=quantity,
               max_error="", eager_error="", passed=passed, detail=detail, seconds="")
    if ours is not None:
        row["max_error"] = f"{max_error(ours, ref):.4g}"
        row["eager_error"] = f"{max_error(lowp, ref):.4g}" if lowp is not None else ""
    return row


def _anchored(rows, check, op, dtype, shape, name, ours, ref, lowp, magnitude=0.0) -> None:
    try:
        assert_anchored(name, ours, ref, lowp, magnitude=magnitude)
        rows.append(_row(check, op, dtype, shape, name, ours, ref, lowp))
    except AssertionError as error:
        rows.append(_row(check, op, dtype, shape, name, ours, ref, lowp, passed=False, detail=str(error)))


def run_attention_check(check: AttentionCheck, device) -> list[dict]:
    """out, lse, dq, dk, dv of ``tk.attention`` against the float64 reference (as the CPU tests do)."""
    mask = check.build_mask(device)
    check = replace(check, seq_q=mask.seq_len_q, seq_k=mask.seq_len_k)  # image_decode: the prefix's length
    generator = _generator(device, check.seed)
    q = _randn((check.batch, check.seq_q, check.heads_q, check.dim), check.dtype, generator, device)
    k = _randn((check.batch, check.seq_k, check.heads_kv, check.dim), check.dtype, generator, device)
    v = _randn((check.batch, check.seq_k, check.heads_kv, check.dim), check.dtype, generator, device)
    d_out = _randn(q.shape, check.dtype, generator, device)
    finite = None

    def run(fn, *inputs):
        nonlocal finite
        inputs = [t.detach().requires_grad_() for t in inputs]
        out, lse = fn(*inputs)
        finite = torch.isfinite(lse) if finite is None else finite
        loss = (out.double() * d_out.double()).sum()
        return (out, lse, *torch.autograd.grad(loss, inputs))

    cap = check.softcap
    ours = run(lambda a, b, c: tk.attention(a, b, c, mask, return_lse=True, softcap=cap), q, k, v)
    ref = run(lambda a, b, c: reference.attention(a, b, c, mask, softcap=cap), q.double(), k.double(), v.double())
    lowp = run(lambda a, b, c: reference.attention(a, b, c, mask, upcast=False, softcap=cap), q, k, v)
    grad_scale = max(r.abs().max().item() if r.numel() else 0.0 for r in ref[2:])
    rows, shape = [], check.shape()
    for name, a, r, low in zip(("out", "lse", "dq", "dk", "dv"), ours, ref, lowp):
        expected = torch.float32 if name == "lse" else check.dtype
        if a.shape != r.shape or a.dtype != expected:
            rows.append(_row(check.name, "attention", check.dtype, shape, name, passed=False,
                             detail=f"shape {tuple(a.shape)} {a.dtype}, expected {tuple(r.shape)} {expected}"))
            continue
        if name == "lse":
            if not torch.equal(torch.isinf(a), torch.isinf(r)):
                rows.append(_row(check.name, "attention", check.dtype, shape, name, passed=False,
                                 detail="lse: -inf not exactly on the rows that see nothing"))
                continue
            a, r, low = (torch.where(finite, t, 0.0) for t in (a, r, low))
        _anchored(rows, check.name, "attention", check.dtype, shape, name, a, r, low,
                  magnitude=grad_scale if name.startswith("d") else 0.0)
    return rows


# ----------------------------------------------------------------------------------------------
# Diffusion ops
# ----------------------------------------------------------------------------------------------
def run_diffusion_check(dtype: torch.dtype, device, tiny: bool) -> list[dict]:
    """add_noise, diffusion_loss (eps on a batch, v on a packed patch buffer, flow) with the
    gradient in pred, and the seeded noise against ``reference.seeded_noise``."""
    generator = _generator(device, 100 + (dtype == torch.float16))
    images, channels, side = (4, 4, 8) if tiny else (64, 4, 32)
    cosine, flow = tk.NoiseSchedule.cosine().to(device), tk.NoiseSchedule.rectified_flow().to(device)
    rows, check = [], "diffusion"
    x0, noise, pred = (_randn((images, channels, side, side), dtype, generator, device) for _ in range(3))
    t = torch.randint(0, 1000, (images,), generator=generator, device=device)
    t[:3] = torch.tensor([0, 1, 999], device=device)  # the schedule's ends
    shape = f"{images} images [{channels}, {side}, {side}]"
    _anchored(rows, check, "add_noise", dtype, shape, "x_t", tk.add_noise(x0, t, cosine, noise=noise),
              reference.add_noise(x0.double(), t, cosine, noise=noise.double()),
              reference.add_noise(x0, t, cosine, noise=noise))

    def loss_and_grad(fn, pred_, upstream):
        pred_ = pred_.detach().requires_grad_()
        loss = fn(pred_)
        (grad,) = torch.autograd.grad((loss * upstream.to(loss.dtype)).sum(), pred_)
        return loss, grad

    # Packed patch buffer: images of different sizes in one [P, C] tensor, with offsets.
    sizes = [1, 37, 3, 120, 9, 64] if tiny else [256, 1024, 64, 256, 4096, 17, 256, 1024]
    offsets = torch.tensor([0, *sizes], device=device).cumsum(0)
    patch_channels = 16
    packed = [_randn((sum(sizes), patch_channels), dtype, generator, device) for _ in range(3)]
    packed_t = torch.randint(0, 1000, (len(sizes),), generator=generator, device=device)
    cases = [
        ("eps", cosine, (x0, noise, pred), t, None, shape),
        ("v", cosine, packed, packed_t, offsets, f"packed [{sum(sizes)}, {patch_channels}], {len(sizes)} images"),
        ("flow", flow, (x0, noise, pred), t, None, shape),
    ]
    for target, schedule, (x0_, noise_, pred_), t_, offsets_, shape_ in cases:
        upstream = torch.randn(t_.shape[0], generator=generator, device=device)

        def fn_for(x0_arg, noise_arg, kernel=False, schedule=schedule, t_=t_, offsets_=offsets_, target=target):
            op = tk.diffusion_loss if kernel else reference.diffusion_loss
            return lambda p: op(p, x0_arg, t_, schedule, target=target, noise=noise_arg, offsets=offsets_,
                                reduction="none")

        ours = loss_and_grad(fn_for(x0_, noise_, kernel=True), pred_, upstream)
        ref = loss_and_grad(fn_for(x0_.double(), noise_.double()), pred_.double(), upstream)
        lowp = loss_and_grad(fn_for(x0_, noise_), pred_, upstream)
        for name, a, r, low in zip(("loss", "dpred"), ours, ref, lowp):
            _anchored(rows, check, f"diffusion_loss[{target}]", dtype, shape_, name, a, r, low)
    # Seeded noise: x_t with a = 0, b = 1 (rectified flow with T = 1) is the kernel's own noise.
    zeros = torch.zeros(images, channels * side * side, device=device, dtype=torch.float32)
    unit = tk.NoiseSchedule.rectified_flow(1).to(device)
    kernel_noise = tk.add_noise(zeros, torch.zeros(images, dtype=torch.long, device=device), unit, seed=1234)
    expected = reference.seeded_noise(1234, zeros.shape, device=device)
    error = max_error(kernel_noise, expected)
    rows.append(_row(check, "add_noise[seed]", dtype, f"[{images}, {channels * side * side}] float32", "noise",
                     passed=error <= SEEDED_NOISE_ATOL and bool(torch.isfinite(kernel_noise).all()),
                     detail=f"max error {error:.3g}, tolerance {SEEDED_NOISE_ATOL:g}"))
    rows[-1]["max_error"] = f"{error:.4g}"
    return rows


# ----------------------------------------------------------------------------------------------
# Linear cross-entropy
# ----------------------------------------------------------------------------------------------
def _eager_lce(hidden, weight, target, z_loss, ignore_index=-100):
    """Eager PyTorch: the logits in the inputs' dtype, F.cross_entropy, z-loss on top, mean over counted rows."""
    logits = hidden @ weight.T
    per_row = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    counted = target != ignore_index
    per_row = per_row + torch.where(counted, z_loss * torch.logsumexp(logits, dim=-1).square(), 0.0)
    return per_row.sum() / counted.sum().clamp(min=1)


def run_lce_check(dtype: torch.dtype, device, tiny: bool) -> list[dict]:
    """loss, d hidden, d weight of ``tk.linear_cross_entropy`` (z-loss 1e-4, every 7th row ignored)."""
    generator = _generator(device, 200 + (dtype == torch.float16))
    n, h, v = (64, 32, 500) if tiny else (4096, 2048, 32000)
    hidden = _randn((n, h), dtype, generator, device)
    weight = (_randn((v, h), torch.float32, generator, device) / h**0.25).to(dtype)  # logits of a few units
    target = torch.randint(0, v, (n,), generator=generator, device=device)
    target[::7] = -100
    upstream = torch.randn((), generator=generator, device=device)

    def run(fn, hidden_, weight_):
        hidden_, weight_ = hidden_.detach().requires_grad_(), weight_.detach().requires_grad_()
        loss = fn(hidden_, weight_)
        return (loss, *torch.autograd.grad(loss * upstream.to(loss.dtype), (hidden_, weight_)))

    ours = run(lambda a, b: tk.linear_cross_entropy(a, b, target, z_loss=1e-4), hidden, weight)
    ref = run(lambda a, b: _eager_lce(a, b, target, 1e-4), hidden.double(), weight.double())
    lowp = run(lambda a, b: _eager_lce(a, b, target, 1e-4), hidden, weight)
    rows, shape = [], f"N={n} H={h} V={v}, z-loss 1e-4, 1/7 rows ignored"
    if ours[0].dtype != torch.float32:
        rows.append(_row("linear_cross_entropy", "linear_cross_entropy", dtype, shape, "loss dtype", passed=False,
                         detail=f"loss is {ours[0].dtype}, documented float32"))
    for name, a, r, low in zip(("loss", "dhidden", "dweight"), ours, ref, lowp):
        _anchored(rows, "linear_cross_entropy", "linear_cross_entropy", dtype, shape, name, a, r, low)
    return rows


# ----------------------------------------------------------------------------------------------
# The list the stage runs
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    name: str  # what the CSV's rows say
    dtype: torch.dtype
    estimate_s: float  # on the GPU: a first compile of its kernels (when new) and the float64 reference
    kernels: tuple  # which compiled kernels it needs first (a check after one with the same ones is cheaper)
    run: Callable[[torch.device], list[dict]]
    shape: str


COMPILE_S = 12.0  # Triton: one op's forward and backward kernels for a new (dtype, head dim), guessed
CHECK_S = 3.0  # inputs, the kernels, the float64 and low-precision references


def checks(tiny: bool) -> list[Check]:
    """Attention checks first (the training shapes, then the rest), the diffusion and LM-loss
    checks after the first four, in bf16 then fp16."""
    result = []
    for check in attention_checks():
        check = check.tiny() if tiny else check
        result.append(Check(check.name, check.dtype, CHECK_S, ("attention", check.dtype, check.dim, check.softcap),
                            lambda device, c=check: run_attention_check(c, device), check.shape()))
    others = []
    for dtype in (torch.bfloat16, torch.float16):
        others.append(Check("diffusion", dtype, CHECK_S, ("diffusion", dtype),
                            lambda device, d=dtype: run_diffusion_check(d, device, tiny), "see rows"))
        others.append(Check("linear_cross_entropy", dtype, CHECK_S, ("lm_loss", dtype),
                            lambda device, d=dtype: run_lce_check(d, device, tiny), "see rows"))
    # bf16 diffusion and LM loss right after the first four attention checks; fp16 at the end.
    return result[:4] + others[0::2][:1] + others[1::2][:1] + result[4:] + others[2:]


def estimate(check_list: list[Check]) -> list[float]:
    """Seconds per check on the GPU: a compile for the first check needing its kernels, plus the work."""
    seen, estimates = set(), []
    for check in check_list:
        estimates.append(check.estimate_s + (COMPILE_S if check.kernels not in seen else 0.0))
        seen.add(check.kernels)
    return estimates


def run_checks(check_list: list[Check], device, write_rows: Callable[[list[dict]], None],
               time_left: Callable[[], float], log: Callable[[str], None] = print) -> dict:
    """Run the checks in order, writing each one's rows as soon as it is done. A check that needs
    more time than is left is not started; an error is a failed row; after a CUDA error (the
    context is lost) the remaining checks are not run. Returns counts and failures."""
    summary = {"checks": 0, "quantities": 0, "failed": [], "not_run": []}
    lost = None
    for check, needed in zip(check_list, estimate(check_list)):
        label = f"{check.name} {str(check.dtype).removeprefix('torch.')}"
        if lost is not None or time_left() < needed:
            reason = f"CUDA context lost ({lost})" if lost else f"stage budget: needs ~{needed:.0f} s, " \
                                                                 f"{max(time_left(), 0):.0f} s left"
            summary["not_run"].append(f"{label}: {reason}")
            write_rows([_row(check.name, "-", check.dtype, check.shape, "-", passed="", detail=f"not run: {reason}")])
            log(f"{label}: not run, {reason}")
            continue
        start = time.monotonic()
        try:
            rows = check.run(device)
        except Exception as error:  # reported as a failed row; the other checks still run
            message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            rows = [_row(check.name, "-", check.dtype, check.shape, "-", passed=False, detail=message)]
            if cuda_context_lost(error):
                lost = message
        seconds = time.monotonic() - start
        for row in rows:
            row["seconds"] = f"{seconds:.2f}"
        write_rows(rows)
        summary["checks"] += 1
        summary["quantities"] += len(rows)
        failed = [f"{r['check']} {r['dtype']} {r['quantity']}: {r['detail']}" for r in rows if r["passed"] is False]
        summary["failed"] += failed
        log(f"{label}: {'FAILED ' + '; '.join(failed) if failed else 'pass'} ({seconds:.1f} s)")
    return summary


def cuda_context_lost(error: BaseException) -> bool:
    """An error after which the process's CUDA context is unusable (an illegal address, a launch
    failure): torch raises ``torch.AcceleratorError`` (newer torch) or a RuntimeError naming it."""
    return isinstance(error, getattr(torch, "AcceleratorError", ())) or "CUDA error" in str(error)


def dense_memory_bytes(check: AttentionCheck) -> int:
    """The float64 reference's largest buffers at once: q/k/v/out and their gradients with the kv
    heads repeated, plus a few chunks of scores (``reference.attention`` bounds a chunk to 2^26
    elements): what the real-size checks need on the GPU."""
    tensors = 8 * check.batch * check.heads_q * (2 * check.seq_q + 3 * check.seq_k) * check.dim
    return tensors * 8 + 6 * (1 << 26) * 8

