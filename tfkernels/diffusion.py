"""Diffusion noise and loss: ``add_noise`` and ``diffusion_loss`` as single Triton passes
(docs/design.md#diffusion-ops).

Design
------
Every image ``i`` owns one contiguous run of elements of the flat, row-major buffer: rows
``offsets[i]:offsets[i + 1]`` of a packed patch buffer ``[P, C]`` (images of different sizes, like
``cu_seqlens``), or row ``i`` of a batch ``[N, ...]``. The grid is ``(N, splits)``: program
``(i, s)`` strides through image ``i``'s run in blocks ``s, s + splits, ...``. The image index is
the program id, so there is no per-element search of ``offsets``; its timestep and float32
coefficients are scalar loads; the loss sums per program into a ``[N, splits]`` buffer that the
host adds up in a fixed order (deterministic, no atomics). ``splits`` comes from the shapes alone
(about one block per program for the average image), so nothing syncs with the host and the launch
is CUDA-graph safe. Trade-off: an image far larger than the average walks its run with only
``splits`` programs; Transfusion's images are usually one size, where the split is even.

Seeded noise is regenerated in every kernel that needs it, from the seed and the element's
row-major index (Philox-4x32-10 + Box-Muller; constants in ``tfkernels._philox``, the same stream
in torch is ``reference.seeded_noise``), so ``add_noise`` and ``diffusion_loss`` with one seed see
identical noise and the loss never stores or reads it.

The loss forward is one pass (squared error summed per image); the backward is one pass that
recomputes the target and writes ``dL/dpred = 2 (pred - target) * g_i / numel_i``. Targets that
do not need x0 (eps) or the noise (x0) do not read it. Gradients for x0 and a given noise, rarely
needed, are ``-c * dL/dpred`` with a per-timestep coefficient ``c``: one more scaling pass each,
the same kernel that adds noise.

Coefficients are float32 whatever the data dtype; loads are cast to float32 at once. Integer
timesteps look them up in the schedule's tables; float32 times of a flow schedule (continuous time,
``t`` in ``[0, 1]``) give ``(1 - t, t)`` computed in the kernel from ``t`` (a constexpr picks the
mode: no table, no per-element cost). The rarely needed gradients for x0 and a given noise scale by
per-image coefficients: for continuous times the host builds them as ``[N]`` float32 tables indexed
by the image number (``_gradient_tables``), so the one scaling kernel serves both modes.
"""

from __future__ import annotations

import math

import torch

from . import reference
from ._checks import autocast_dtype, autocast_off, check_choice, check_float_tensor, check_index_tensor, is_int
from ._dispatch import HAS_TRITON, use_triton
from ._philox import PHILOX_KEY_A, PHILOX_KEY_B, PHILOX_ROUND_A, PHILOX_ROUND_B, PHILOX_ROUNDS, UNIFORM_BITS
from .launch import launch
from .reference.diffusion import REDUCTIONS
from .schedule import TARGETS, NoiseSchedule, check_target, target_coefficients

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["NoiseSchedule", "add_noise", "diffusion_loss"]

# Elements per block: 1024 = 4 warps x 32 lanes x 8 contiguous elements (16-byte fp16 vectors).
_BLOCK = 1024
_NUM_WARPS = 4
# The grid's second dimension is limited to 65535 programs.
_MAX_SPLITS = 65535
# Seeds are passed through torch.library as int64.
_MAX_SEED = 2**63

# Where add_noise's noise comes from (a constexpr of the kernel).
_NOISE_NONE, _NOISE_TENSOR, _NOISE_SEEDED = 0, 1, 2

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:
    # Globals read inside jit functions must be constexpr.
    _ROUND_A = tl.constexpr(PHILOX_ROUND_A)
    _ROUND_B = tl.constexpr(PHILOX_ROUND_B)
    _KEY_A = tl.constexpr(PHILOX_KEY_A)
    _KEY_B = tl.constexpr(PHILOX_KEY_B)
    _ROUNDS = tl.constexpr(PHILOX_ROUNDS)
    _DROP_BITS = tl.constexpr(32 - UNIFORM_BITS)
    _UNIFORM_SCALE = tl.constexpr(2.0**-UNIFORM_BITS)
    _TWO_PI = tl.constexpr(6.283185307179586)
    _TARGET_EPS = tl.constexpr(TARGETS.index("eps"))
    _TARGET_V = tl.constexpr(TARGETS.index("v"))
    _TARGET_X0 = tl.constexpr(TARGETS.index("x0"))
    _NOISE_TENSOR_C = tl.constexpr(_NOISE_TENSOR)
    _NOISE_SEEDED_C = tl.constexpr(_NOISE_SEEDED)

    @triton.jit
    def _philox_normal(seed_lo, seed_hi, index):
        """float32 N(0, 1) per int64 element index: Philox-4x32-10 keyed by the seed, Box-Muller.

        Our own Philox rather than ``tl.randn``: the latter's counter and seed handling changed
        across Triton versions, and the torch reference must reproduce the stream exactly.
        """
        c0 = index.to(tl.uint32)
        c1 = (index >> 32).to(tl.uint32)
        c2 = c0 * 0
        c3 = c2
        k0 = seed_lo.to(tl.uint32)
        k1 = seed_hi.to(tl.uint32)
        for _ in tl.static_range(_ROUNDS):
            hi0 = tl.umulhi(_ROUND_A, c0)
            lo0 = c0 * _ROUND_A
            hi1 = tl.umulhi(_ROUND_B, c2)
            lo1 = c2 * _ROUND_B
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
            k0 = k0 + _KEY_A
            k1 = k1 + _KEY_B
        # 24-bit uniforms are exact in float32; u1 in (0, 1] keeps log() finite.
        u1 = ((c0 >> _DROP_BITS) + 1).to(tl.float32) * _UNIFORM_SCALE
        u2 = (c1 >> _DROP_BITS).to(tl.float32) * _UNIFORM_SCALE
        return tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(u2 * _TWO_PI)

    @triton.jit
    def _image_program(t_ptr, offsets_ptr, signal_ptr, noise_scale_ptr, num_timesteps, row_elems, num_splits,
                       PACKED: tl.constexpr, CONTINUOUS: tl.constexpr, BLOCK: tl.constexpr):
        """What every diffusion kernel starts with: image ``i = program_id(0)``, its flat elements
        ``[start, end)`` (int64), the float32 coefficients ``(a, b)`` of its timestep, and this
        program's blocks, ``range(first, end, step)``.

        ``CONTINUOUS``: ``t`` is a float32 time, ``(a, b) = (1 - t, t)`` (a flow schedule); else an
        integer index into the tables. The host checked the timesteps; the clamps only keep a bad
        one from reading outside the tables (or leaving the path).
        """
        image = tl.program_id(0)
        split = tl.program_id(1)
        if PACKED:
            start = tl.load(offsets_ptr + image).to(tl.int64) * row_elems
            end = tl.load(offsets_ptr + image + 1).to(tl.int64) * row_elems
        else:
            start = image.to(tl.int64) * row_elems
            end = start + row_elems
        if CONTINUOUS:
            t = tl.load(t_ptr + image)
            t = tl.minimum(tl.maximum(t, 0.0), 1.0)
            a = 1.0 - t
            b = t
        else:
            step = tl.load(t_ptr + image).to(tl.int32)
            step = tl.minimum(tl.maximum(step, 0), num_timesteps - 1)
            a = tl.load(signal_ptr + step)
            b = tl.load(noise_scale_ptr + step)
        return image, start, end, a, b, start + split * BLOCK, num_splits * BLOCK

    @triton.jit
    def _noise_block(noise_ptr, index, in_image, seed_lo, seed_hi, SEEDED: tl.constexpr):
        if SEEDED:
            return _philox_normal(seed_lo, seed_hi, index)
        else:
            return tl.load(noise_ptr + index, mask=in_image, other=0.0).to(tl.float32)

    @triton.jit
    def _target_block(x0_ptr, noise_ptr, index, in_image, a, b, seed_lo, seed_hi,
                      TARGET: tl.constexpr, SEEDED: tl.constexpr):
        """The regression target (float32) on one block; loads only what the target needs."""
        if TARGET == _TARGET_X0:
            return tl.load(x0_ptr + index, mask=in_image, other=0.0).to(tl.float32)
        noise = _noise_block(noise_ptr, index, in_image, seed_lo, seed_hi, SEEDED)
        if TARGET == _TARGET_EPS:
            return noise
        x0 = tl.load(x0_ptr + index, mask=in_image, other=0.0).to(tl.float32)
        if TARGET == _TARGET_V:
            return a * noise - b * x0
        return noise - x0  # flow velocity

    @triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
    def _add_noise_kernel(
        x_ptr, noise_ptr, out_ptr,  # flat element buffers
        t_ptr, offsets_ptr,  # int [N], int [N + 1] (PACKED only)
        signal_ptr, noise_scale_ptr,  # float32 [T]
        num_timesteps, row_elems, num_splits, seed_lo, seed_hi,
        NOISE: tl.constexpr,  # none (out = a * x: gradient scaling), tensor or seeded
        PACKED: tl.constexpr,  # offsets give the images' rows; else image i is row i
        CONTINUOUS: tl.constexpr,  # t holds float32 flow times; else integer table indices
        BLOCK: tl.constexpr,  # elements per step of a program
    ):
        """``out = a[t_i] * x + b[t_i] * noise`` over image ``i = program_id(0)``."""
        image, start, end, a, b, first, step = _image_program(
            t_ptr, offsets_ptr, signal_ptr, noise_scale_ptr, num_timesteps, row_elems, num_splits, PACKED, CONTINUOUS,
            BLOCK)
        for block_start in range(first, end, step):
            index = block_start + tl.arange(0, BLOCK)
            in_image = index < end
            out = a * tl.load(x_ptr + index, mask=in_image, other=0.0).to(tl.float32)
            if NOISE == _NOISE_TENSOR_C:
                out += b * _noise_block(noise_ptr, index, in_image, seed_lo, seed_hi, False)
            if NOISE == _NOISE_SEEDED_C:
                out += b * _noise_block(noise_ptr, index, in_image, seed_lo, seed_hi, True)
            tl.store(out_ptr + index, out.to(out_ptr.dtype.element_ty), mask=in_image)

    @triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
    def _mse_fwd_kernel(
        pred_ptr, x0_ptr, noise_ptr,  # flat element buffers
        partial_ptr,  # float32 [N, num_splits]: this program's share of image i's mean
        t_ptr, offsets_ptr, signal_ptr, noise_scale_ptr,
        num_timesteps, row_elems, num_splits, seed_lo, seed_hi,
        TARGET: tl.constexpr,  # index in TARGETS: decides which inputs are read
        SEEDED: tl.constexpr,  # noise from the seed instead of noise_ptr
        PACKED: tl.constexpr,  # offsets give the images' rows
        CONTINUOUS: tl.constexpr,  # t holds float32 flow times; else integer table indices
        BLOCK: tl.constexpr,  # elements per step of a program
    ):
        image, start, end, a, b, first, step = _image_program(
            t_ptr, offsets_ptr, signal_ptr, noise_scale_ptr, num_timesteps, row_elems, num_splits, PACKED, CONTINUOUS,
            BLOCK)
        sq_sum = tl.zeros([BLOCK], dtype=tl.float32)
        for block_start in range(first, end, step):
            index = block_start + tl.arange(0, BLOCK)
            in_image = index < end
            pred = tl.load(pred_ptr + index, mask=in_image, other=0.0).to(tl.float32)
            goal = _target_block(x0_ptr, noise_ptr, index, in_image, a, b, seed_lo, seed_hi, TARGET, SEEDED)
            err = tl.where(in_image, pred - goal, 0.0)
            sq_sum += err * err
        count = (end - start).to(tl.float32)
        tl.store(partial_ptr + image * num_splits + tl.program_id(1), tl.sum(sq_sum, axis=0) / count)

    @triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
    def _mse_bwd_kernel(
        grad_mse_ptr,  # float32 [N]: dL/d(mse_i)
        pred_ptr, x0_ptr, noise_ptr, grad_pred_ptr,  # flat element buffers
        t_ptr, offsets_ptr, signal_ptr, noise_scale_ptr,
        num_timesteps, row_elems, num_splits, seed_lo, seed_hi,
        TARGET: tl.constexpr,  # index in TARGETS: decides which inputs are read
        SEEDED: tl.constexpr,  # regenerate the forward's noise from the seed
        PACKED: tl.constexpr,  # offsets give the images' rows
        CONTINUOUS: tl.constexpr,  # t holds float32 flow times; else integer table indices
        BLOCK: tl.constexpr,  # elements per step of a program
    ):
        """``dL/dpred = 2 (pred - target) * dL/dmse_i / numel_i`` over image ``i``."""
        image, start, end, a, b, first, step = _image_program(
            t_ptr, offsets_ptr, signal_ptr, noise_scale_ptr, num_timesteps, row_elems, num_splits, PACKED, CONTINUOUS,
            BLOCK)
        scale = 2.0 * tl.load(grad_mse_ptr + image) / (end - start).to(tl.float32)
        for block_start in range(first, end, step):
            index = block_start + tl.arange(0, BLOCK)
            in_image = index < end
            pred = tl.load(pred_ptr + index, mask=in_image, other=0.0).to(tl.float32)
            goal = _target_block(x0_ptr, noise_ptr, index, in_image, a, b, seed_lo, seed_hi, TARGET, SEEDED)
            grad = scale * (pred - goal)
            tl.store(grad_pred_ptr + index, grad.to(grad_pred_ptr.dtype.element_ty), mask=in_image)


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------
def _grid(x: torch.Tensor, num_images: int) -> tuple[int, int]:
    """``(N, splits)``: about one block per program for the average image, from shapes only."""
    splits = triton.cdiv(x.numel(), max(num_images, 1) * _BLOCK)
    return num_images, max(1, min(splits, _MAX_SPLITS))


def _layout(x: torch.Tensor, t: torch.Tensor, offsets: torch.Tensor | None):
    """Kernel arguments describing where the images lie: offsets (or a dummy), row size, PACKED."""
    row_elems = x[0].numel() if x.shape[0] else 0
    packed = offsets is not None
    return (offsets if packed else t), row_elems, packed


def _seed_words(seed: int | None) -> tuple[int, int]:
    seed = 0 if seed is None else seed
    return seed & 0xFFFFFFFF, seed >> 32


def _launch_add_noise(x, t, signal, noise_scale, noise, offsets, seed):
    """``a[t] * x + b[t] * noise`` (``noise``/``seed`` None: ``a[t] * x``), contiguous, x's dtype."""
    x = x.contiguous()
    out = torch.empty_like(x)
    num_images = t.shape[0]
    if x.numel() == 0 or num_images == 0:
        return out
    offsets_arg, row_elems, packed = _layout(x, t, offsets)
    mode = _NOISE_SEEDED if seed is not None else _NOISE_TENSOR if noise is not None else _NOISE_NONE
    noise = x if noise is None else noise.contiguous()  # a dummy pointer when no tensor is read
    grid = _grid(x, num_images)
    launch(_add_noise_kernel, grid,
        x, noise, out, t, offsets_arg, signal, noise_scale, signal.shape[0], row_elems, grid[1],
        *_seed_words(seed), NOISE=mode, PACKED=packed, CONTINUOUS=t.dtype.is_floating_point, BLOCK=_BLOCK,
        num_warps=_NUM_WARPS,
    )
    return out


def _launch_mse_fwd(pred, x0, t, signal, noise_scale, noise, offsets, seed, target):
    """Per-image mean squared error, float32 ``[N]``."""
    pred, x0 = pred.contiguous(), x0.contiguous()
    num_images = t.shape[0]
    if num_images == 0:
        return torch.zeros(0, dtype=torch.float32, device=pred.device)
    offsets_arg, row_elems, packed = _layout(x0, t, offsets)
    grid = _grid(x0, num_images)
    partial = torch.empty(grid, dtype=torch.float32, device=pred.device)
    noise = x0 if noise is None else noise.contiguous()
    launch(_mse_fwd_kernel, grid,
        pred, x0, noise, partial, t, offsets_arg, signal, noise_scale, signal.shape[0], row_elems,
        grid[1], *_seed_words(seed), TARGET=TARGETS.index(target), SEEDED=seed is not None,
        PACKED=packed, CONTINUOUS=t.dtype.is_floating_point, BLOCK=_BLOCK, num_warps=_NUM_WARPS,
    )
    return partial.sum(dim=1)


def _launch_mse_bwd(grad_mse, pred, x0, t, signal, noise_scale, noise, offsets, seed, target):
    """dL/dpred, contiguous, pred's dtype."""
    pred, x0 = pred.contiguous(), x0.contiguous()
    grad_pred = torch.empty_like(pred)
    num_images = t.shape[0]
    if num_images == 0 or pred.numel() == 0:
        return grad_pred
    offsets_arg, row_elems, packed = _layout(x0, t, offsets)
    grid = _grid(x0, num_images)
    noise = x0 if noise is None else noise.contiguous()
    launch(_mse_bwd_kernel, grid,
        grad_mse.float().contiguous(), pred, x0, noise, grad_pred, t, offsets_arg, signal, noise_scale,
        signal.shape[0], row_elems, grid[1], *_seed_words(seed), TARGET=TARGETS.index(target),
        SEEDED=seed is not None, PACKED=packed, CONTINUOUS=t.dtype.is_floating_point, BLOCK=_BLOCK,
        num_warps=_NUM_WARPS,
    )
    return grad_pred


def _check_values(t: torch.Tensor, offsets: torch.Tensor | None, num_rows: int, num_timesteps: int,
                  empty_images_ok: bool) -> None:
    """Range checks on the index tensors, with one host sync; a bad index would read or write
    outside the buffers, a float time outside ``[0, 1]`` (or NaN) leave the path. Skipped while a CUDA
    graph is being captured (no sync is possible)."""
    if t.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    continuous = t.dtype.is_floating_point
    stats = []
    if t.numel():
        # Float times: one flag, "some t is outside [0, 1]" (NaN fails both comparisons).
        stats += [(~((t >= 0) & (t <= 1))).any()] if continuous else [t.min(), t.max()]
    if offsets is not None:
        sizes = offsets[1:] - offsets[:-1]
        smallest = sizes.min() if sizes.numel() else offsets.new_ones(())
        stats += [offsets[0], offsets[-1], smallest]
    if not stats:
        return
    values = torch.stack([s.to(torch.int64) for s in stats]).tolist()
    if t.numel() and continuous:
        out_of_range = values.pop(0)
        if out_of_range:
            bad = int((~((t >= 0) & (t <= 1))).int().argmax())
            raise ValueError(f"t: expected times in [0, 1], got t[{bad}] = {t[bad].item()}")
    elif t.numel():
        t_min, t_max = values[:2]
        values = values[2:]
        if t_min < 0 or t_max >= num_timesteps:
            bad = int(((t < 0) | (t >= num_timesteps)).int().argmax())
            raise ValueError(f"t: expected timesteps in [0, {num_timesteps - 1}], got t[{bad}] = {int(t[bad])}")
    if offsets is None:
        return
    first, last, smallest = values
    if first != 0:
        raise ValueError(f"offsets: expected offsets[0] == 0, got {first}")
    if last != num_rows:
        raise ValueError(f"offsets: expected offsets[-1] == {num_rows} (the rows of x0), got {last}")
    if smallest < 0 or (smallest == 0 and not empty_images_ok):
        bad = int((sizes <= (-1 if empty_images_ok else 0)).int().argmax())
        what = "non-decreasing" if empty_images_ok else "increasing (every image needs a row)"
        raise ValueError(f"offsets: expected {what} values, got offsets[{bad}] = {int(offsets[bad])}, "
                         f"offsets[{bad + 1}] = {int(offsets[bad + 1])}")


def _check_weights(weights: torch.Tensor) -> None:
    """Loss weights are finite and ``>= 0`` (one host sync; skipped during CUDA graph capture): a
    negative weight turns the loss into a reward, a NaN or inf one poisons the mean over images."""
    if weights.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    bad = ~(torch.isfinite(weights) & (weights >= 0))
    if bool(bad.any()):
        index = int(bad.int().argmax())
        raise ValueError(f"weights: expected finite values >= 0, got weights[{index}] = {weights[index].item()}")


# ----------------------------------------------------------------------------------------------
# torch.library registration and autograd
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("tfkernels::diffusion_checked_timesteps", mutates_args=())
def _checked_timesteps_op(t: torch.Tensor, offsets: torch.Tensor | None, num_rows: int, num_timesteps: int,
                          empty_images_ok: bool) -> torch.Tensor:
    """A copy of ``t`` once ``_check_values`` passed: how the reference path checks the index values
    as the kernel ops do, eagerly and under torch.compile alike (an opaque op runs at run time, and
    the computation reads its output, so it is never dropped)."""
    _check_values(t, offsets, num_rows, num_timesteps, empty_images_ok)
    return t.clone()


@_checked_timesteps_op.register_fake
def _checked_timesteps_fake(t, offsets, num_rows, num_timesteps, empty_images_ok):
    return torch.empty_like(t)


@torch.library.custom_op("tfkernels::diffusion_checked_weights", mutates_args=())
def _checked_weights_op(weights: torch.Tensor, t: torch.Tensor | None, offsets: torch.Tensor | None, num_rows: int,
                        num_timesteps: int) -> torch.Tensor:
    """A copy of the loss weights once they are finite and ``>= 0`` and, if ``t`` is given, the index
    values pass ``_check_values`` (images need a row): the checks at run time, eagerly and under
    torch.compile alike. Differentiable in the weights (the identity)."""
    _check_weights(weights)  # first, as on the kernel path, where t and offsets are checked in the loss op
    if t is not None:
        _check_values(t, offsets, num_rows, num_timesteps, empty_images_ok=False)
    return weights.clone()


@_checked_weights_op.register_fake
def _checked_weights_fake(weights, t, offsets, num_rows, num_timesteps):
    return torch.empty_like(weights)


def _checked_weights_backward(ctx, grad):
    return grad, None, None, None, None


_checked_weights_op.register_autograd(_checked_weights_backward)


@torch.library.custom_op("tfkernels::add_noise", mutates_args=())
def _add_noise_op(
    x0: torch.Tensor, t: torch.Tensor, signal: torch.Tensor, noise_scale: torch.Tensor,
    noise: torch.Tensor | None, offsets: torch.Tensor | None, seed: int | None,
) -> torch.Tensor:
    _check_values(t, offsets, x0.shape[0], signal.shape[0], empty_images_ok=True)
    return _launch_add_noise(x0, t, signal, noise_scale, noise, offsets, seed)


@_add_noise_op.register_fake
def _add_noise_fake(x0, t, signal, noise_scale, noise, offsets, seed):
    return torch.empty_like(x0, memory_format=torch.contiguous_format)


@torch.library.custom_op("tfkernels::scale_per_image", mutates_args=())
def _scale_per_image_op(x: torch.Tensor, t: torch.Tensor, table: torch.Tensor,
                        offsets: torch.Tensor | None) -> torch.Tensor:
    """``table[t_i] * x`` over each image's elements: the gradient of a per-image linear map."""
    return _launch_add_noise(x, t, table, table, None, offsets, None)


@_scale_per_image_op.register_fake
def _scale_per_image_fake(x, t, table, offsets):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _gradient_tables(t, signal, noise_scale):
    """``(index, a, b)``: each image's coefficients are ``a[index[i]]``, ``b[index[i]]``. Integer
    timesteps index the schedule's tables; float32 times get ``[N]`` tables of their own,
    ``(1 - t, t)`` in float32 as in the kernels, indexed by the image number."""
    if not t.dtype.is_floating_point:
        return t, signal, noise_scale
    return torch.arange(t.shape[0], device=t.device), 1 - t, t


def _add_noise_setup_context(ctx, inputs, output):
    x0, t, signal, noise_scale, noise, offsets, seed = inputs
    ctx.save_for_backward(t, signal, noise_scale, offsets)


def _add_noise_backward(ctx, grad_out):
    t, signal, noise_scale, offsets = ctx.saved_tensors
    index, a, b = _gradient_tables(t, signal, noise_scale)
    grad_x0 = _scale_per_image_op(grad_out, index, a, offsets) if ctx.needs_input_grad[0] else None
    grad_noise = _scale_per_image_op(grad_out, index, b, offsets) if ctx.needs_input_grad[4] else None
    return grad_x0, None, None, None, grad_noise, None, None


_add_noise_op.register_autograd(_add_noise_backward, setup_context=_add_noise_setup_context)


@torch.library.custom_op("tfkernels::diffusion_mse", mutates_args=())
def _diffusion_mse_op(
    pred: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, signal: torch.Tensor, noise_scale: torch.Tensor,
    noise: torch.Tensor | None, offsets: torch.Tensor | None, seed: int | None, target: str,
) -> torch.Tensor:
    _check_values(t, offsets, x0.shape[0], signal.shape[0], empty_images_ok=False)
    return _launch_mse_fwd(pred, x0, t, signal, noise_scale, noise, offsets, seed, target)


@_diffusion_mse_op.register_fake
def _diffusion_mse_fake(pred, x0, t, signal, noise_scale, noise, offsets, seed, target):
    return pred.new_empty(t.shape[0], dtype=torch.float32)


@torch.library.custom_op("tfkernels::diffusion_mse_bwd", mutates_args=())
def _diffusion_mse_bwd_op(
    grad_mse: torch.Tensor, pred: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, signal: torch.Tensor,
    noise_scale: torch.Tensor, noise: torch.Tensor | None, offsets: torch.Tensor | None, seed: int | None,
    target: str,
) -> torch.Tensor:
    return _launch_mse_bwd(grad_mse, pred, x0, t, signal, noise_scale, noise, offsets, seed, target)


@_diffusion_mse_bwd_op.register_fake
def _diffusion_mse_bwd_fake(grad_mse, pred, x0, t, signal, noise_scale, noise, offsets, seed, target):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _diffusion_mse_setup_context(ctx, inputs, output):
    pred, x0, t, signal, noise_scale, noise, offsets, seed, target = inputs
    ctx.save_for_backward(pred, x0, t, signal, noise_scale, noise, offsets)
    ctx.seed, ctx.target = seed, target


def _diffusion_mse_backward(ctx, grad_mse):
    pred, x0, t, signal, noise_scale, noise, offsets = ctx.saved_tensors
    grad_pred = _diffusion_mse_bwd_op(grad_mse, pred, x0, t, signal, noise_scale, noise, offsets, ctx.seed,
                                      ctx.target)
    # target = c_x0 * x0 + c_noise * noise, so dL/dx0 = -c_x0 * dL/dpred (likewise for the noise).
    index, a, b = _gradient_tables(t, signal, noise_scale)
    c_x0, c_noise = target_coefficients(ctx.target, a, b)
    grad_x0 = _scale_per_image_op(grad_pred, index, -c_x0, offsets) if ctx.needs_input_grad[1] else None
    grad_noise = _scale_per_image_op(grad_pred, index, -c_noise, offsets) if ctx.needs_input_grad[5] else None
    return (grad_pred if ctx.needs_input_grad[0] else None, grad_x0, None, None, None, grad_noise,
            None, None, None)


_diffusion_mse_op.register_autograd(_diffusion_mse_backward, setup_context=_diffusion_mse_setup_context)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------
def _check_like_x0(name: str, x, x0: torch.Tensor) -> None:
    check_float_tensor(name, x)
    if x.shape != x0.shape:
        raise ValueError(f"{name}: expected shape {tuple(x0.shape)} (as x0), got {tuple(x.shape)}")
    if x.device != x0.device:
        raise ValueError(f"{name}: expected device {x0.device} (as x0), got {x.device}")


def _check_index(name: str, x, length: int, device: torch.device, what: str) -> None:
    if not (name == "t" and x.dtype.is_floating_point):  # t's dtype was checked against the schedule
        check_index_tensor(name, x, f"[{what}]")
    if x.ndim != 1 or x.shape[0] != length:
        raise ValueError(f"{name}: expected shape [{what}] = [{length}], got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name}: expected device {device} (as x0), got {x.device}")


def _check_inputs(x0, t, schedule, noise, seed, offsets) -> None:
    """Types, shapes and devices: everything checkable without reading the tensors' values."""
    check_float_tensor("x0", x0)
    if x0.ndim < 1:
        raise ValueError("x0: expected [N, ...] or a patch buffer [P, C], got a 0-d tensor")
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule: expected a tfkernels.NoiseSchedule, got {type(schedule).__name__}")
    if isinstance(t, torch.Tensor) and t.dtype.is_floating_point:
        schedule.check_times(t)  # float32 times of a flow schedule
    else:
        check_index_tensor("t", t, "[N]")
    if t.ndim != 1:
        raise ValueError(f"t: expected an int tensor [N] (float32 times for a flow schedule), one timestep per image, "
                         f"got shape {tuple(t.shape)}")
    if offsets is None:
        _check_index("t", t, x0.shape[0], x0.device, "N = x0.shape[0]")
    else:
        _check_index("t", t, t.shape[0], x0.device, "N")
        _check_index("offsets", offsets, t.shape[0] + 1, x0.device, "N + 1")
    if (noise is None) == (seed is None):
        raise ValueError("noise, seed: expected exactly one of them (a noise tensor, or an int seed "
                         "to generate it in-kernel)")
    if noise is not None:
        _check_like_x0("noise", noise, x0)
    elif not is_int(seed, 0, _MAX_SEED - 1):
        raise (ValueError if is_int(seed) else TypeError)(f"seed: expected an int in [0, 2**63), got {seed!r}")


def _contiguous(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.contiguous()


def _tables(schedule: NoiseSchedule, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 coefficient tables on the data's device (a copy if the schedule lives elsewhere)."""
    return schedule.signal_scale.to(device), schedule.noise_scale.to(device)


def add_noise(x0: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule, noise: torch.Tensor | None = None,
              seed: int | None = None, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Noise each image to its timestep: ``x_t = a[t_i] * x0 + b[t_i] * noise``, in one launch.

    Args:
        x0: float16/bfloat16/float32; a batch ``[N, ...]``, or a packed patch buffer ``[P, C]``
            (any ``[P, ...]``) whose image ``i`` owns rows ``offsets[i]:offsets[i + 1]``.
        t: ``[N]``, one per image: int timesteps in ``[0, schedule.num_timesteps)``, or, with a
            flow schedule, float32 continuous times in ``[0, 1]`` (``a = 1 - t``, ``b = t``,
            computed in float32 in the kernel: ``t = 0`` is x0, ``t = 1`` the noise).
        schedule: a ``NoiseSchedule``; its float32 tables are used whatever x0's dtype.
        noise: like x0. Or ``seed``: an int in ``[0, 2**63)``; the noise is generated in-kernel
            from the seed and each element's index and can be regenerated exactly (it equals
            ``tfkernels.reference.seeded_noise(seed, x0.shape)`` up to float32 rounding of
            ``log``/``cos``). Give exactly one.
        offsets: int ``[N + 1]`` for a packed buffer: non-decreasing, from 0 to ``P``.

    Returns:
        x_t, contiguous, x0's shape and dtype; differentiable in x0 and noise.

    Under autocast it is an elementwise op: the inputs are taken as given, autocast is off inside
    (float32 arithmetic), x_t has x0's dtype.
    """
    if autocast_dtype(x0) is not None:
        with autocast_off(x0):
            return add_noise(x0, t, schedule, noise, seed, offsets)
    _check_inputs(x0, t, schedule, noise, seed, offsets)
    signal, noise_scale = _tables(schedule, x0.device)
    if use_triton(x0):
        return _add_noise_op(x0, t.contiguous(), signal, noise_scale, noise, _contiguous(offsets), seed)
    t = _checked_timesteps_op(t, offsets, x0.shape[0], schedule.num_timesteps, True)
    return reference.add_noise(x0, t, schedule.to(x0.device), noise=noise, seed=seed, offsets=offsets)


def diffusion_loss(pred: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule,
                   target: str = "eps", noise: torch.Tensor | None = None, seed: int | None = None,
                   offsets: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                   reduction: str = "mean") -> torch.Tensor:
    """Per-image mean squared error of ``pred`` against the diffusion target; one pass each way.

    Args:
        pred: the model's prediction, x0's shape; float16/bfloat16/float32 (any of them: pred, x0
            and noise need not share a dtype).
        x0, t, schedule, noise, seed, offsets: as in ``add_noise`` (the same seed and offsets
            regenerate the same noise; it is never stored). Every image needs at least one element
            (one row of a packed buffer, and rows of at least one element): the mean over an empty
            image is undefined, a ``ValueError``.
        target: ``"eps"`` (the noise), ``"v"`` (``a * noise - b * x0``), ``"x0"``, or ``"flow"``
            (``noise - x0``, the velocity of ``NoiseSchedule.rectified_flow()``, which it needs);
            diffusers' names ``"epsilon"``, ``"v_prediction"`` and ``"sample"`` are accepted.
        weights: optional float ``[N]``, finite and ``>= 0``, multiplies each image's loss.
        reduction: ``"mean"`` over images (0 when ``N == 0``) or ``"none"`` (float32 ``[N]``).

    Returns:
        float32 loss, ``weights[i] * mean((pred_i - target_i)^2)`` reduced over images.
        Differentiable in pred (one fused pass), and in x0, noise and weights.

    Under autocast it is an elementwise op: the inputs are taken as given, autocast is off inside
    (float32 arithmetic), the loss is float32 and the gradients have the inputs' dtypes.
    """
    if autocast_dtype(x0) is not None:
        with autocast_off(x0):
            return diffusion_loss(pred, x0, t, schedule, target, noise, seed, offsets, weights, reduction)
    _check_inputs(x0, t, schedule, noise, seed, offsets)
    _check_like_x0("pred", pred, x0)
    target = check_target(target, schedule)
    check_choice("reduction", reduction, REDUCTIONS)
    num_images = t.shape[0]
    if num_images and math.prod(x0.shape[1:]) == 0:
        raise ValueError(f"x0: expected images of at least one element (the loss is a mean over each image), "
                         f"got shape {tuple(x0.shape)}")
    if weights is not None:
        if not isinstance(weights, torch.Tensor) or not weights.dtype.is_floating_point:
            raise TypeError(f"weights: expected a float tensor [N], got {weights!r:.60}")
        if weights.shape != (num_images,) or weights.device != x0.device:
            raise ValueError(f"weights: expected shape [{num_images}] on {x0.device}, got "
                             f"{tuple(weights.shape)} on {weights.device}")
    signal, noise_scale = _tables(schedule, x0.device)
    if not use_triton(x0):
        # The op checks t, offsets and the weights (ones if none) at run time: the loss multiplies by
        # its output, so it runs under torch.compile too, even for targets that do not read t.
        ones = torch.ones(num_images, dtype=torch.float32, device=x0.device)
        checked = _checked_weights_op(ones if weights is None else weights, t, offsets, x0.shape[0],
                                      schedule.num_timesteps)
        return reference.diffusion_loss(pred, x0, t, schedule.to(x0.device), target=target, noise=noise,
                                        seed=seed, offsets=offsets, weights=checked, reduction=reduction)
    if weights is not None:  # t and offsets are checked inside the loss op
        weights = _checked_weights_op(weights, None, None, 0, 0)
    loss = _diffusion_mse_op(pred, x0, t.contiguous(), signal, noise_scale, noise, _contiguous(offsets), seed, target)
    if weights is not None:
        loss = loss * weights.float()
    return loss if reduction == "none" else loss.sum() / max(num_images, 1)
