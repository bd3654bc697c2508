"""adaLN modulation (DiT / PixArt-alpha's adaLN-single) as one Triton pass each way
(docs/design.md#adaln-modulation).

    h = residual + gate * x          (only when residual is given; gate None means 1)
    y = norm(h) * (1 + scale) + shift,   norm = LayerNorm or RMSNorm without affine parameters

Design
------
A row is one token's ``C`` features; LayerNorm needs the whole row before it can write any of
it, so each program holds whole rows in registers: a tile of ``ROWS x BLOCK_C`` elements
(``BLOCK_C = next_power_of_2(C)``), several rows per tile when ``C`` is small. The grid is
``(B, chunks)``: program ``(b, j)`` walks a contiguous run of sample ``b``'s tokens, so a
per-sample conditioning row (``[B, C]``, DiT's timestep modulation) is the same vector for the
whole program, and its gradient - a sum over the sample's tokens - is accumulated in float32
registers and written once per program into a ``[B, chunks, C]`` buffer that the host sums in a
fixed order (deterministic, no atomics; the same scheme as ``diffusion.py``). ``chunks`` comes from
the shapes alone (about ``_TARGET_PROGRAMS`` programs in all), so nothing syncs with the host.
Per-token conditioning (``[B, T, C]``) is read and its gradient written per element.

Every tensor is addressed through its own strides (a ``[B, 1, C]`` or ``[B, C]`` conditioning row
has token stride 0), so chunked views of one ``[B, 6 C]`` projection, a ``[B, T, C]`` slice of a
bigger activation or an expanded tensor are read in place, without copies.

Why ``gate`` needs ``residual``: in DiT the gate scales a block's branch output on its way into the
residual stream (``stream + gate * attn(...)``), and the next thing that reads the stream is the
next norm. Fusing the gated add in front of the norm reads residual, branch and gate once and
writes the new stream ``h`` and the next branch's input ``y`` in the same pass (one pass instead
of three elementwise ops and a norm); a gate applied to ``y`` would only scale the next linear
layer's input, which is not what any adaLN model does.

The forward normalises ``h`` after rounding it to the residual's dtype, so ``y`` is exactly what
the op gives for the returned ``h``, and the backward (which reads the stored ``h``) differentiates
the function the forward computed. The backward recomputes the row statistics from the row it loads
anyway (two in-register reductions), so nothing but the inputs and ``h`` is saved; it writes every
gradient of the given tensors in one pass (an unneeded one costs a store, not a pass).

Loads are cast to float32 at once; stores round once to the destination's dtype.
"""

from __future__ import annotations

import torch

from . import reference
from ._checks import autocast_dtype, autocast_off, check_choice, check_float, check_float_tensor
from ._dispatch import HAS_TRITON, use_triton
from .attention import _on_device
from .launch import launch
from .reference.adaln import NORMS

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["MAX_CHANNELS", "adaln_modulate"]

# A row lives in registers. The backward keeps about six [ROWS, BLOCK_C] float32 tiles live: at 16 fp32
# values per thread per tile it needs 128 registers and no spills on sm_90a, at 32 (C = 16384 at the
# most warps, 16) it spills 0.7 KB (bench.compile_report's compiler, run on a CPU). DiT widths are
# 1152 (PixArt-alpha) to 4096.
MAX_CHANNELS = 8192
# Elements per [ROWS, BLOCK_C] tile when C is small: several rows per program step.
_TILE_ELEMENTS = 4096
# fp32 elements per thread per tile (sets the warps): see MAX_CHANNELS.
_ELEMENTS_PER_THREAD = 16
# About this many programs per launch: ~8 per SM on an H100 (132 SMs), enough to hide memory latency
# with the tile sizes above; fewer would leave SMs idle, more would mean more [B, chunks, C] partials.
_TARGET_PROGRAMS = 1024

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _tile_offsets(sample, rows, cols, stride_b, stride_t, stride_c):
        """int64 element offsets ``[ROWS, BLOCK_C]`` of tokens ``rows`` of ``sample``."""
        return (sample.to(tl.int64) * stride_b + rows.to(tl.int64)[:, None] * stride_t
                + cols.to(tl.int64)[None, :] * stride_c)

    @triton.jit
    def _normalise(h, col_in, num_cols, eps, RMS: tl.constexpr):
        """``(normalised rows, rstd per row)`` of the float32 tile ``h`` (zero outside ``col_in``)."""
        if RMS:
            centred = h
        else:
            mean = tl.sum(h, axis=1) / num_cols
            centred = tl.where(col_in, h - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / num_cols + eps)
        return centred * rstd[:, None], rstd

    @triton.jit
    def _adaln_fwd_kernel(
        x_ptr, residual_ptr, shift_ptr, scale_ptr, gate_ptr,  # inputs, each through its own strides
        y_ptr, h_ptr,  # outputs, contiguous [B, T, C]; h only with RESIDUAL
        num_tokens, num_cols, rows_per_program, eps,
        stride_xb, stride_xt, stride_xc,
        stride_rb, stride_rt, stride_rc,
        stride_shb, stride_sht, stride_shc,  # token stride 0 for per-sample conditioning
        stride_scb, stride_sct, stride_scc,
        stride_gb, stride_gt, stride_gc,
        RESIDUAL: tl.constexpr,  # h = residual + gate * x is formed, stored and normalised; else h = x
        GATE: tl.constexpr,  # a gate multiplies x (RESIDUAL only); else it is added as is
        RMS: tl.constexpr,  # RMSNorm instead of LayerNorm
        ROWS: tl.constexpr,  # tokens per tile
        BLOCK_C: tl.constexpr,  # next_power_of_2(C): a whole row per tile row
    ):
        sample = tl.program_id(0)
        first = tl.program_id(1) * rows_per_program
        last = tl.minimum(first + rows_per_program, num_tokens)
        cols = tl.arange(0, BLOCK_C)
        col_in = (cols < num_cols)[None, :]
        for row0 in range(first, last, ROWS):
            rows = row0 + tl.arange(0, ROWS)
            inside = (rows < last)[:, None] & col_in
            x = tl.load(x_ptr + _tile_offsets(sample, rows, cols, stride_xb, stride_xt, stride_xc),
                        mask=inside, other=0.0).to(tl.float32)
            out_offsets = _tile_offsets(sample, rows, cols, num_tokens * num_cols, num_cols, 1)
            if RESIDUAL:
                h = tl.load(residual_ptr + _tile_offsets(sample, rows, cols, stride_rb, stride_rt, stride_rc),
                            mask=inside, other=0.0).to(tl.float32)
                if GATE:
                    gate = tl.load(gate_ptr + _tile_offsets(sample, rows, cols, stride_gb, stride_gt, stride_gc),
                                   mask=inside, other=0.0).to(tl.float32)
                    h += gate * x
                else:
                    h += x
                h = h.to(h_ptr.dtype.element_ty)  # the stream's dtype: y must be norm(stored h)
                tl.store(h_ptr + out_offsets, h, mask=inside)
                h = h.to(tl.float32)
            else:
                h = x
            normalised, _ = _normalise(h, col_in, num_cols, eps, RMS)
            scale = tl.load(scale_ptr + _tile_offsets(sample, rows, cols, stride_scb, stride_sct, stride_scc),
                            mask=inside, other=0.0).to(tl.float32)
            shift = tl.load(shift_ptr + _tile_offsets(sample, rows, cols, stride_shb, stride_sht, stride_shc),
                            mask=inside, other=0.0).to(tl.float32)
            y = normalised * (1.0 + scale) + shift
            tl.store(y_ptr + out_offsets, y.to(y_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _conditioning_grad(grad, acc, grad_ptr, out_offsets, inside, PER_TOKEN: tl.constexpr):
        """Per-token: store ``grad``; per-sample: add its column sums (rows outside are 0) to ``acc``."""
        if PER_TOKEN:
            tl.store(grad_ptr + out_offsets, grad.to(grad_ptr.dtype.element_ty), mask=inside)
            return acc
        else:
            return acc + tl.sum(tl.where(inside, grad, 0.0), axis=0)

    @triton.jit
    def _adaln_bwd_kernel(
        dy_ptr, dh_ptr,  # upstream gradients of y and (HAS_DH) of h, contiguous [B, T, C]
        h_ptr, x_ptr, scale_ptr, gate_ptr,  # h (RESIDUAL) or x: the normalised input; x read for dgate
        dx_ptr, dresidual_ptr,  # contiguous [B, T, C]; dresidual only with RESIDUAL
        dshift_ptr, dscale_ptr, dgate_ptr,  # PER_TOKEN: [B, T, C]; else float32 partial sums [B, chunks, C]
        num_tokens, num_cols, rows_per_program, num_chunks, eps,
        stride_hb, stride_ht, stride_hc,
        stride_xb, stride_xt, stride_xc,
        stride_scb, stride_sct, stride_scc,
        stride_gb, stride_gt, stride_gc,
        RESIDUAL: tl.constexpr,  # h = residual + gate * x: dresidual = dh, dx = gate * dh, dgate = x * dh
        GATE: tl.constexpr,  # a gate multiplied x (RESIDUAL only)
        HAS_DH: tl.constexpr,  # the returned h has an upstream gradient (RESIDUAL only)
        PER_TOKEN: tl.constexpr,  # conditioning [B, T, C]; else [B, C], its gradient summed over tokens
        RMS: tl.constexpr,  # RMSNorm instead of LayerNorm
        ROWS: tl.constexpr,  # tokens per tile
        BLOCK_C: tl.constexpr,  # next_power_of_2(C)
    ):
        sample = tl.program_id(0)
        chunk = tl.program_id(1)
        first = chunk * rows_per_program
        last = tl.minimum(first + rows_per_program, num_tokens)
        cols = tl.arange(0, BLOCK_C)
        col_in = (cols < num_cols)[None, :]
        dshift_sum = tl.zeros([BLOCK_C], dtype=tl.float32)
        dscale_sum = tl.zeros([BLOCK_C], dtype=tl.float32)
        dgate_sum = tl.zeros([BLOCK_C], dtype=tl.float32)
        for row0 in range(first, last, ROWS):
            rows = row0 + tl.arange(0, ROWS)
            inside = (rows < last)[:, None] & col_in
            out_offsets = _tile_offsets(sample, rows, cols, num_tokens * num_cols, num_cols, 1)
            h = tl.load(h_ptr + _tile_offsets(sample, rows, cols, stride_hb, stride_ht, stride_hc),
                        mask=inside, other=0.0).to(tl.float32)
            normalised, rstd = _normalise(h, col_in, num_cols, eps, RMS)
            dy = tl.load(dy_ptr + out_offsets, mask=inside, other=0.0).to(tl.float32)
            scale = tl.load(scale_ptr + _tile_offsets(sample, rows, cols, stride_scb, stride_sct, stride_scc),
                            mask=inside, other=0.0).to(tl.float32)
            # dL/dnormalised, then through the norm: rstd * (dn - mean(dn) - n * mean(dn * n)).
            dn = dy * (1.0 + scale)
            dh = dn - normalised * (tl.sum(dn * normalised, axis=1) / num_cols)[:, None]
            if not RMS:
                dh -= (tl.sum(dn, axis=1) / num_cols)[:, None]
            dh *= rstd[:, None]
            if RESIDUAL:
                if HAS_DH:
                    dh += tl.load(dh_ptr + out_offsets, mask=inside, other=0.0).to(tl.float32)
                tl.store(dresidual_ptr + out_offsets, dh.to(dresidual_ptr.dtype.element_ty), mask=inside)
                if GATE:
                    gate = tl.load(gate_ptr + _tile_offsets(sample, rows, cols, stride_gb, stride_gt, stride_gc),
                                   mask=inside, other=0.0).to(tl.float32)
                    x = tl.load(x_ptr + _tile_offsets(sample, rows, cols, stride_xb, stride_xt, stride_xc),
                                mask=inside, other=0.0).to(tl.float32)
                    dgate_sum = _conditioning_grad(dh * x, dgate_sum, dgate_ptr, out_offsets, inside, PER_TOKEN)
                    dh *= gate
            tl.store(dx_ptr + out_offsets, dh.to(dx_ptr.dtype.element_ty), mask=inside)
            dshift_sum = _conditioning_grad(dy, dshift_sum, dshift_ptr, out_offsets, inside, PER_TOKEN)
            dscale_sum = _conditioning_grad(dy * normalised, dscale_sum, dscale_ptr, out_offsets, inside, PER_TOKEN)
        if not PER_TOKEN:
            partial = (sample.to(tl.int64) * num_chunks + chunk) * num_cols + cols
            tl.store(dshift_ptr + partial, dshift_sum, mask=cols < num_cols)
            tl.store(dscale_ptr + partial, dscale_sum, mask=cols < num_cols)
            if GATE:
                tl.store(dgate_ptr + partial, dgate_sum, mask=cols < num_cols)


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------
def _config(batch: int, tokens: int, channels: int) -> dict:
    """Tile, rows per program, chunks per sample and warps, from the shapes alone."""
    block_c = triton.next_power_of_2(channels)
    rows = max(1, min(_TILE_ELEMENTS // block_c, triton.next_power_of_2(tokens)))
    tiles_per_program = triton.cdiv(triton.cdiv(batch * tokens, rows), _TARGET_PROGRAMS)
    rows_per_program = rows * max(1, tiles_per_program)
    return dict(rows=rows, block_c=block_c, rows_per_program=rows_per_program,
                chunks=triton.cdiv(tokens, rows_per_program),
                num_warps=min(16, max(4, rows * block_c // (32 * _ELEMENTS_PER_THREAD))))


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """``(batch, token, channel)`` strides of ``[B, T, C]``, or of a conditioning row ``[B, C]`` /
    ``[B, 1, C]`` (token stride 0: every token reads its sample's row)."""
    if t.ndim == 2:
        return t.stride(0), 0, t.stride(1)
    return t.stride(0), (0 if t.shape[1] == 1 else t.stride(1)), t.stride(2)


def _per_token(conditioning: torch.Tensor, tokens: int) -> bool:
    """``[B, T, C]`` conditioning with ``T != 1`` (``T = 0`` included: its gradient keeps that shape);
    at ``T = 1`` it is the same as a per-sample ``[B, 1, C]`` row."""
    return conditioning.ndim == 3 and conditioning.shape[1] == tokens != 1


def _launch_fwd(x, shift, scale, gate, residual, eps, rms):
    """``(y, h)`` contiguous ``[B, T, C]``; ``h`` is None without ``residual``."""
    batch, tokens, channels = x.shape
    normed_dtype = x.dtype if residual is None else residual.dtype
    y = torch.empty(batch, tokens, channels, dtype=normed_dtype, device=x.device)
    h = None if residual is None else torch.empty_like(y)
    if batch * tokens == 0:
        return y, h
    cfg = _config(batch, tokens, channels)
    # Dummy pointers for the tensors a variant never reads.
    residual_arg = x if residual is None else residual
    gate_arg = scale if gate is None else gate
    launch(_adaln_fwd_kernel, (batch, cfg["chunks"]),
        x, residual_arg, shift, scale, gate_arg, y, y if h is None else h,
        tokens, channels, cfg["rows_per_program"], eps,
        *_strides(x), *_strides(residual_arg), *_strides(shift), *_strides(scale), *_strides(gate_arg),
        RESIDUAL=residual is not None, GATE=gate is not None, RMS=rms,
        ROWS=cfg["rows"], BLOCK_C=cfg["block_c"], num_warps=cfg["num_warps"],
    )
    return y, h


def _launch_bwd(dy, dh, normed, x, scale, gate, eps, rms, residual_mode, x_dtype, shift_dtype, per_token):
    """``(dx, dresidual or None, dshift, dscale, dgate or None)``; conditioning gradients are
    ``[B, T, C]`` per token, else ``[B, C]``; each in the dtype of the tensor it is the gradient of."""
    batch, tokens, channels = normed.shape
    device = normed.device
    cond_shape = (batch, tokens, channels) if per_token else (batch, channels)
    dx = torch.empty(batch, tokens, channels, dtype=x_dtype, device=device)
    dresidual = torch.empty(batch, tokens, channels, dtype=normed.dtype, device=device) if residual_mode else None
    cond_dtypes = (shift_dtype, scale.dtype, None if gate is None else gate.dtype)
    if batch * tokens == 0:
        return dx, dresidual, *(None if d is None else torch.zeros(cond_shape, dtype=d, device=device)
                                for d in cond_dtypes)
    cfg = _config(batch, tokens, channels)
    if per_token:
        grads = [None if d is None else torch.empty(cond_shape, dtype=d, device=device) for d in cond_dtypes]
    else:  # float32 partial sums per program, added up below in a fixed order
        grads = [None if d is None else torch.empty(batch, cfg["chunks"], channels, dtype=torch.float32,
                                                     device=device) for d in cond_dtypes]
    dy = dy.contiguous()
    x_arg = normed if x is None else x
    gate_arg = scale if gate is None else gate
    launch(_adaln_bwd_kernel, (batch, cfg["chunks"]),
        dy, dy if dh is None else dh.contiguous(), normed, x_arg, scale, gate_arg,
        dx, dx if dresidual is None else dresidual, grads[0], grads[1], grads[1] if grads[2] is None else grads[2],
        tokens, channels, cfg["rows_per_program"], cfg["chunks"], eps,
        *_strides(normed), *_strides(x_arg), *_strides(scale), *_strides(gate_arg),
        RESIDUAL=residual_mode, GATE=gate is not None, HAS_DH=dh is not None, PER_TOKEN=per_token, RMS=rms,
        ROWS=cfg["rows"], BLOCK_C=cfg["block_c"], num_warps=cfg["num_warps"],
    )
    if not per_token:
        grads = [None if g is None else g.sum(dim=1).to(d) for g, d in zip(grads, cond_dtypes)]
    return dx, dresidual, *grads


# ----------------------------------------------------------------------------------------------
# torch.library registration and autograd
# ----------------------------------------------------------------------------------------------
def _placeholder(like: torch.Tensor) -> torch.Tensor:
    """Custom ops return tensors, never None: an empty one stands for an output that does not exist."""
    return like.new_empty(0)


@torch.library.custom_op("tfkernels::adaln_modulate", mutates_args=())
def _adaln_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor | None,
              residual: torch.Tensor | None, eps: float, rms: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, h)``; ``h`` is a placeholder without residual."""
    with _on_device(x):
        y, h = _launch_fwd(x, shift, scale, gate, residual, eps, rms)
    return y, _placeholder(x) if h is None else h


@_adaln_op.register_fake
def _adaln_fake(x, shift, scale, gate, residual, eps, rms):
    normed_dtype = x.dtype if residual is None else residual.dtype
    y = x.new_empty(x.shape, dtype=normed_dtype)
    return y, _placeholder(x) if residual is None else torch.empty_like(y)


@torch.library.custom_op("tfkernels::adaln_modulate_bwd", mutates_args=())
def _adaln_bwd_op(
    dy: torch.Tensor, dh: torch.Tensor | None, normed: torch.Tensor, x: torch.Tensor | None, scale: torch.Tensor,
    gate: torch.Tensor | None, eps: float, rms: bool, residual_mode: bool, x_dtype: torch.dtype,
    shift_dtype: torch.dtype, per_token: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dresidual, dshift, dscale, dgate)``, placeholders for the inputs that do not exist."""
    with _on_device(normed):
        grads = _launch_bwd(dy, dh, normed, x, scale, gate, eps, rms, residual_mode, x_dtype, shift_dtype,
                            per_token)
    return tuple(_placeholder(normed) if g is None else g for g in grads)


@_adaln_bwd_op.register_fake
def _adaln_bwd_fake(dy, dh, normed, x, scale, gate, eps, rms, residual_mode, x_dtype, shift_dtype, per_token):
    batch, tokens, channels = normed.shape
    cond_shape = (batch, tokens, channels) if per_token else (batch, channels)
    dx = normed.new_empty(normed.shape, dtype=x_dtype)
    dresidual = normed.new_empty(normed.shape) if residual_mode else _placeholder(normed)
    dgate = _placeholder(normed) if gate is None else normed.new_empty(cond_shape, dtype=gate.dtype)
    return (dx, dresidual, normed.new_empty(cond_shape, dtype=shift_dtype),
            normed.new_empty(cond_shape, dtype=scale.dtype), dgate)


def _adaln_setup_context(ctx, inputs, output):
    x, shift, scale, gate, residual, eps, rms = inputs
    _, h = output
    residual_mode = residual is not None
    # The backward reads the normalised input (x, or the stored h) and, for dgate, x.
    ctx.save_for_backward(h if residual_mode else x, x if gate is not None else None, scale, gate)
    ctx.eps, ctx.rms, ctx.residual_mode = eps, rms, residual_mode
    ctx.x_dtype, ctx.shift_dtype, ctx.shift_shape = x.dtype, shift.dtype, shift.shape
    ctx.per_token = _per_token(shift, x.shape[1])
    ctx.set_materialize_grads(False)  # an unused h output must not cost a zero tensor


def _adaln_backward(ctx, dy, dh):
    normed, x, scale, gate = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(normed)
    dx, dresidual, dshift, dscale, dgate = _adaln_bwd_op(
        dy, dh if ctx.residual_mode else None, normed, x, scale, gate, ctx.eps, ctx.rms, ctx.residual_mode,
        ctx.x_dtype, ctx.shift_dtype, ctx.per_token)
    return (dx, dshift.reshape(ctx.shift_shape), dscale.reshape(scale.shape),
            None if gate is None else dgate.reshape(gate.shape), dresidual if ctx.residual_mode else None,
            None, None)


_adaln_op.register_autograd(_adaln_backward, setup_context=_adaln_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------
def _check_conditioning(name: str, t, x: torch.Tensor) -> None:
    batch, tokens, channels = x.shape
    check_float_tensor(name, t)
    per_sample = t.ndim == 2 or (t.ndim == 3 and t.shape[1] == 1)
    if t.shape[0:1] != (batch,) or t.shape[-1:] != (channels,) or not (per_sample or tuple(t.shape) == x.shape):
        raise ValueError(f"{name}: expected per-sample [B, C] = [{batch}, {channels}] (or [B, 1, C]) or per-token "
                         f"[B, T, C] = {list(x.shape)}, got {list(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name}: expected device {x.device} (as x), got {t.device}")


def _check_inputs(x, shift, scale, gate, residual, eps, norm) -> None:
    """Types, shapes, devices and arguments: everything, before any launch."""
    check_float_tensor("x", x)
    if x.ndim != 3:
        raise ValueError(f"x: expected [B, T, C], got shape {list(x.shape)}")
    if not 1 <= x.shape[2] <= MAX_CHANNELS:
        raise ValueError(f"x: expected 1 <= C <= {MAX_CHANNELS} channels (a row is normalised in registers), "
                         f"got C = {x.shape[2]}")
    given = {"shift": shift, "scale": scale} if gate is None else {"shift": shift, "scale": scale, "gate": gate}
    for name, t in given.items():
        _check_conditioning(name, t, x)
    kinds = {name: _per_token(t, x.shape[1]) for name, t in given.items()}
    if len(set(kinds.values())) > 1:
        described = ", ".join(f"{name} {'per-token' if k else 'per-sample'}" for name, k in kinds.items())
        raise ValueError(f"shift, scale, gate: expected all per-sample ([B, C] or [B, 1, C]) or all per-token "
                         f"([B, T, C]), got {described}")
    if residual is not None:
        check_float_tensor("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual: expected x's shape {list(x.shape)}, got {list(residual.shape)}")
        if residual.device != x.device:
            raise ValueError(f"residual: expected device {x.device} (as x), got {residual.device}")
    elif gate is not None:
        raise ValueError("gate: multiplies x in residual + gate * x (the block's gated residual add); give "
                         "residual too, or apply the gate outside the op")
    check_float("eps", eps, 0)
    check_choice("norm", norm, NORMS)


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor | None = None,
                   residual: torch.Tensor | None = None, eps: float = 1e-6, norm: str = "layer"):
    """adaLN: ``norm(x) * (1 + scale) + shift``, optionally after the gated residual add, in one pass.

    With ``residual``: ``h = residual + gate * x`` (``gate`` None: ``residual + x``), then
    ``y = norm(h) * (1 + scale) + shift``, returned as ``(y, h)``: ``x`` is then a block's branch
    output (attention or MLP), ``gate`` its adaLN gate, ``h`` the new residual stream and ``y`` the
    next branch's input - DiT's ``x = x + gate * f(...)`` and the next ``modulate(norm(x), ...)``
    in one pass.

    Args:
        x: ``[B, T, C]`` float16/bfloat16/float32, any strides; ``1 <= C <= 8192``.
        shift, scale: per-sample ``[B, C]`` or ``[B, 1, C]`` (broadcast over the tokens: DiT's
            timestep conditioning, PixArt-alpha's adaLN-single) or per-token ``[B, T, C]``; any
            float dtype and strides (e.g. chunks of one ``[B, 6 C]`` projection).
        gate: like shift (all three per-sample or all per-token); needs ``residual``.
        residual: ``[B, T, C]``, the residual stream.
        eps: finite, ``>= 0``; added to the variance (LayerNorm) or the mean square (RMSNorm).
        norm: ``"layer"`` (LayerNorm: mean and biased variance) or ``"rms"`` (RMSNorm); neither
            has affine parameters (shift and scale are the affine part).

    Returns:
        ``y`` contiguous ``[B, T, C]`` in the dtype of the tensor normalised (x, or residual), or
        ``(y, h)`` with ``h`` in residual's dtype when residual is given. ``h`` is rounded to
        that dtype before it is normalised, so ``y`` is what the op gives for ``h``.
        Differentiable in every tensor; gradients in each input's dtype and shape (a per-sample
        gradient is summed over the tokens in float32).

    CUDA tensors run the Triton kernels; CPU tensors run ``tfkernels.reference.adaln_modulate``,
    or the kernels in Triton's interpreter when ``TRITON_INTERPRET=1``.

    Under autocast it is an elementwise op (a norm): the inputs are taken as given (they may
    differ in dtype), autocast is off inside (float32 arithmetic), and the outputs keep the
    input's dtype, unlike ``F.layer_norm``, which autocast runs in float32: ``y`` feeds a linear
    layer that autocast casts to its dtype anyway, and a float32 ``y`` would double its bytes.
    """
    if autocast_dtype(x) is not None:
        with autocast_off(x):
            return adaln_modulate(x, shift, scale, gate, residual, eps, norm)
    _check_inputs(x, shift, scale, gate, residual, eps, norm)
    eps = float(eps)
    if not use_triton(x):
        return reference.adaln_modulate(x, shift, scale, gate, residual, eps, norm)
    y, h = _adaln_op(x, shift, scale, gate, residual, eps, norm == "rms")
    return y if residual is None else (y, h)
