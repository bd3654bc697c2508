"""Fused output projection + cross-entropy (the LM loss) without ``[N, V]`` logits
(docs/design.md#lm-loss).

Design
------
The rows are processed in chunks. For each chunk of ``n`` rows:

1. ``logits = hidden[chunk] @ weight.T (+ bias)`` - one GEMM (cuBLAS on a GPU, fp32 accumulation
   inside; ``addmm`` with a bias), ``[n, V]`` in the input dtype, rounded once as eager code rounds
   its logits;
2. one Triton program per row streams its logits in ``BLOCK_V`` slices: the optional soft-cap
   ``s = c * tanh(x / c)``, an online log-sum-exp in float32, the target's logit and, with label
   smoothing, the class-weighted sum of all logits; then ``F.cross_entropy``'s loss
   ``(1 - eps) w[y] (lse - s[y]) + (eps / V) sum_c w[c] (lse - s[c])`` and the z-loss
   ``z_loss * lse²``. When gradients are wanted, a second sweep overwrites the logits in place with
   ``dL/dlogits``: ``softmax * (g A + 2 g_z z_loss lse) - g (1 - eps) w[y] onehot(y) - g (eps / V) w``
   with ``A = (1 - eps) w[y] + (eps / V) sum_c w[c]``, times ``1 - (s / c)²`` under the soft-cap;
3. ``grad_hidden[chunk] = dlogits @ weight``, ``grad_weight += dlogits.T @ hidden[chunk]`` and
   ``grad_bias += dlogits.sum(0)`` - GEMMs and a column sum; ``grad_weight`` and ``grad_bias``
   accumulate across chunks in float32 (each chunk's product is rounded once, the running sum never
   is).

So the peak extra memory is one chunk of logits, sized like the larger of ``hidden`` and
``weight``, instead of ``[N, V]`` logits, their softmax and their gradient. With ``reduction``
``"mean"`` or ``"sum"`` the gradient of every row is known up to the scalar upstream gradient, so
the forward computes the gradients on the way (three GEMMs in all, as eager does) and the backward
only scales them. With ``"none"`` the per-row upstream gradients are only known in the backward,
which recomputes the logits chunk by chunk (one GEMM more).

Each option (z-loss, class weights, label smoothing, soft-cap) is a constexpr of the row kernel: off,
its code is not compiled in, so the default loss runs the instructions of a kernel without options.
The z-loss is written per row apart from the cross-entropy because ``"mean"`` divides the two
by different denominators (the summed weight of the counted targets, F.cross_entropy's weighted mean,
and the number of counted rows), and because ``return_z_loss`` reports it alone.

Why the GEMMs are not Triton: they are plain dense products that cuBLAS runs near peak; a fully
fused Triton kernel that never writes even a chunk of logits needs either a recompute per output
tile or fp32 atomics for both gradients, both slower than the three GEMMs here. Why the loss is
a kernel: the row-wise softmax, target pick, z-loss and gradient are one read and one write of the
chunk instead of eager's several passes and fp32 temporaries.

Ignored rows (``target == ignore_index``) have loss 0 and gradient 0; a mean whose denominator is 0
(no counted row, or counted targets whose class weights sum to 0) divides by 1 instead, so it gives
0 (or the smoothing term alone), never NaN.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import reference
from ._checks import (
    autocast_cast,
    autocast_dtype,
    autocast_off,
    check_choice,
    check_float,
    check_float_tensor,
    check_index_tensor,
    check_int,
)
from ._dispatch import HAS_TRITON, use_triton
from .launch import launch
from .reference.lm_loss import REDUCTIONS

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._triton_math import tanh

__all__ = ["linear_cross_entropy"]

# Vocabulary slice per step of a row program: 4096 fp32 values = 16 per thread at 8 warps.
_MAX_BLOCK_V = 4096
_NUM_WARPS = 8
# ignore_index is compared with the targets as an int64.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1

# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:
    @triton.jit
    def _cross_entropy_rows_kernel(
        logits_ptr, stride_row,  # [n, V] logits of a chunk (bias included); overwritten by dL/dlogits (COMPUTE_GRAD)
        target_ptr,  # int [n]
        loss_ptr,  # float32 [n]: per-row cross-entropy (without the z-loss), 0 on ignored rows
        z_term_ptr,  # float32 [n]: per-row z_loss * lse², 0 on ignored rows (HAS_Z_LOSS)
        class_weight_ptr,  # float32 [V] (HAS_CLASS_WEIGHT)
        class_weight_total_ptr,  # float32 [1]: sum of class_weight over all classes (HAS_CLASS_WEIGHT, HAS_SMOOTHING)
        # float32 dL/dce and dL/dz of row r at [r * grad_scale_stride] (stride 0: shared by all rows)
        grad_scale_ptr, z_grad_scale_ptr, grad_scale_stride,
        vocab_size, ignore_index, z_loss, label_smoothing, softcap,
        COMPUTE_GRAD: tl.constexpr,  # write dL/dlogits over the logits
        HAS_Z_LOSS: tl.constexpr,  # z_loss > 0: the lse² term and its share of the softmax gradient
        HAS_CLASS_WEIGHT: tl.constexpr,  # per-class weights; without, every class weighs 1 and nothing is loaded
        HAS_SMOOTHING: tl.constexpr,  # label_smoothing > 0: the weighted sum of all logits in the first sweep
        HAS_SOFTCAP: tl.constexpr,  # softcap > 0: a tanh per logit in each sweep
        BLOCK_V: tl.constexpr,  # vocabulary slice per step
    ):
        row = tl.program_id(0)
        row_ptr = logits_ptr + row.to(tl.int64) * stride_row
        target = tl.load(target_ptr + row)
        counted = target != ignore_index
        cols = tl.arange(0, BLOCK_V)
        if HAS_CLASS_WEIGHT:  # masked: an ignored target (or an unchecked one under graph capture) loads nothing
            target_weight = tl.load(class_weight_ptr + target, mask=counted & (target >= 0) & (target < vocab_size),
                                    other=0.0)
        else:
            target_weight = 1.0

        # Online log-sum-exp; a slice holds at least one real column, so its max is finite and the
        # first rescale multiplies 0 by exp(-inf) = 0.
        running_max = -float("inf")
        running_sum = 0.0
        target_logit = 0.0
        weighted_logit_sum = 0.0  # sum_c w[c] s[c] (HAS_SMOOTHING)
        for v0 in range(0, vocab_size, BLOCK_V):
            in_vocab = v0 + cols < vocab_size
            if HAS_SOFTCAP:  # capped columns past V would be -c, not -inf: masked after the cap
                x = tl.load(row_ptr + v0 + cols, mask=in_vocab, other=0.0).to(tl.float32)
                x = tl.where(in_vocab, softcap * tanh(x / softcap), -float("inf"))
            else:
                x = tl.load(row_ptr + v0 + cols, mask=in_vocab, other=-float("inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
            running_max = new_max
            target_logit += tl.sum(tl.where(v0 + cols == target, x, 0.0), axis=0)
            if HAS_SMOOTHING:
                real = tl.where(in_vocab, x, 0.0)  # columns past V hold -inf: zeroed before any product
                if HAS_CLASS_WEIGHT:
                    real = real * tl.load(class_weight_ptr + v0 + cols, mask=in_vocab, other=0.0)
                weighted_logit_sum += tl.sum(real, axis=0)
        lse = running_max + tl.log(running_sum)
        if HAS_SMOOTHING:
            if HAS_CLASS_WEIGHT:
                weight_total = tl.load(class_weight_total_ptr)
            else:
                weight_total = vocab_size.to(tl.float32)
            smooth_weight = label_smoothing / vocab_size
            target_coef = (1.0 - label_smoothing) * target_weight
            # sum_c w[c] (lse - s[c]) = W lse - sum_c w[c] s[c]
            loss = target_coef * (lse - target_logit) + smooth_weight * (weight_total * lse - weighted_logit_sum)
            softmax_coef = target_coef + smooth_weight * weight_total  # d loss / d lse
        else:
            target_coef = target_weight
            loss = target_weight * (lse - target_logit)
            softmax_coef = target_weight
        tl.store(loss_ptr + row, tl.where(counted, loss, 0.0))
        if HAS_Z_LOSS:
            tl.store(z_term_ptr + row, tl.where(counted, z_loss * lse * lse, 0.0))

        if COMPUTE_GRAD:
            g = tl.where(counted, tl.load(grad_scale_ptr + row * grad_scale_stride), 0.0)
            softmax_scale = g * softmax_coef
            if HAS_Z_LOSS:  # z-loss adds 2 z lse * softmax, at its own scale
                g_z = tl.where(counted, tl.load(z_grad_scale_ptr + row * grad_scale_stride), 0.0)
                softmax_scale += g_z * 2.0 * z_loss * lse
            target_grad = g * target_coef
            for v0 in range(0, vocab_size, BLOCK_V):
                in_vocab = v0 + cols < vocab_size
                x = tl.load(row_ptr + v0 + cols, mask=in_vocab, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    x = softcap * tanh(x / softcap)
                grad = softmax_scale * tl.exp(x - lse) - tl.where(v0 + cols == target, target_grad, 0.0)
                if HAS_SMOOTHING:
                    if HAS_CLASS_WEIGHT:
                        grad -= g * smooth_weight * tl.load(class_weight_ptr + v0 + cols, mask=in_vocab, other=0.0)
                    else:
                        grad -= g * smooth_weight
                if HAS_SOFTCAP:  # ds/dx = 1 - tanh² = 1 - (s / c)²
                    capped = x / softcap
                    grad = grad * (1.0 - capped * capped)
                tl.store(row_ptr + v0 + cols, grad.to(logits_ptr.dtype.element_ty), mask=in_vocab)


# ----------------------------------------------------------------------------------------------
# Host launcher
# ----------------------------------------------------------------------------------------------
class _Options(NamedTuple):
    """The loss options as the launcher takes them (checked; ``softcap`` 0.0 when off)."""

    ignore_index: int
    z_loss: float
    label_smoothing: float
    softcap: float


class _Grads(NamedTuple):
    """Which gradients a launch computes."""

    hidden: bool
    weight: bool
    bias: bool


def _rows_per_chunk(num_rows: int, vocab_size: int, hidden_size: int) -> int:
    """Rows whose ``[rows, V]`` logits take about as much memory as the larger of hidden and weight."""
    return max(1, min(num_rows, triton.cdiv(max(num_rows, vocab_size) * hidden_size, vocab_size)))


def _launch(hidden, weight, bias, target, class_weight, options: _Options, grad_scale, z_grad_scale,
            scale_per_row: bool, grads: _Grads):
    """Per-row losses and, if asked, the gradients of ``sum(g_r * ce_r + g_z,r * z_r)``.

    ``grad_scale`` and ``z_grad_scale`` hold ``g`` and ``g_z``: float32 ``[N]`` if ``scale_per_row``,
    else ``[1]`` shared by all rows. Returns ``(ce_rows, z_rows or None, grad_hidden, grad_weight,
    grad_bias)``, each gradient ``None`` unless asked. Autocast is off inside: the GEMMs run in the inputs'
    dtype (a backward called under autocast must not recast them).
    """
    with autocast_off(hidden):
        return _launch_chunks(hidden, weight, bias, target, class_weight, options, grad_scale, z_grad_scale,
                              scale_per_row, grads)


def _launch_chunks(hidden, weight, bias, target, class_weight, options, grad_scale, z_grad_scale, scale_per_row,
                   grads):
    num_rows, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    device = hidden.device
    target = target.contiguous()
    ce_rows = torch.zeros(num_rows, dtype=torch.float32, device=device)
    has_z_loss = options.z_loss > 0
    z_rows = torch.zeros(num_rows, dtype=torch.float32, device=device) if has_z_loss else None
    has_class_weight, has_smoothing = class_weight is not None, options.label_smoothing > 0
    if has_class_weight:
        class_weight = class_weight.float().contiguous()
    weight_total = class_weight.sum().reshape(1) if has_class_weight and has_smoothing else None
    compute_grad = grads.hidden or grads.weight or grads.bias
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if grads.hidden else None
    grad_weight = (torch.zeros(vocab_size, hidden_size, dtype=torch.float32, device=device)
                   if grads.weight else None)
    grad_bias = torch.zeros(vocab_size, dtype=torch.float32, device=device) if grads.bias else None
    chunk = _rows_per_chunk(num_rows, vocab_size, hidden_size)
    block_v = min(_MAX_BLOCK_V, triton.next_power_of_2(vocab_size))
    for r0 in range(0, num_rows, chunk):
        r1 = min(num_rows, r0 + chunk)
        hidden_chunk = hidden[r0:r1]
        # [n, V]; becomes dL/dlogits below
        logits = torch.mm(hidden_chunk, weight.t()) if bias is None else torch.addmm(bias, hidden_chunk, weight.t())
        unused = ce_rows  # stands for the pointers of options that are off (never read or written)
        launch(_cross_entropy_rows_kernel, (r1 - r0,),
            logits, logits.stride(0), target[r0:r1], ce_rows[r0:r1], z_rows[r0:r1] if has_z_loss else unused,
            class_weight if has_class_weight else unused, unused if weight_total is None else weight_total,
            grad_scale[r0:r1] if scale_per_row else grad_scale,
            z_grad_scale[r0:r1] if scale_per_row else z_grad_scale, 1 if scale_per_row else 0,
            vocab_size, options.ignore_index, options.z_loss, options.label_smoothing, options.softcap,
            COMPUTE_GRAD=compute_grad, HAS_Z_LOSS=has_z_loss, HAS_CLASS_WEIGHT=has_class_weight,
            HAS_SMOOTHING=has_smoothing, HAS_SOFTCAP=options.softcap > 0, BLOCK_V=block_v, num_warps=_NUM_WARPS,
        )
        if grads.hidden:
            torch.mm(logits, weight, out=grad_hidden[r0:r1])
        if grads.weight:
            if logits.dtype == torch.float32:
                grad_weight.addmm_(logits.t(), hidden_chunk)
            else:
                grad_weight += torch.mm(logits.t(), hidden_chunk)  # rounded once, summed in fp32
        if grads.bias:
            grad_bias += logits.sum(0, dtype=torch.float32)
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return ce_rows, z_rows, grad_hidden, grad_weight, grad_bias


def _check_target_values(target: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Targets outside ``[0, V)`` other than ``ignore_index`` are an error (one host sync; skipped
    during CUDA graph capture, where the kernel's compare-based pick keeps them memory-safe)."""
    if target.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    bad = ((target < 0) | (target >= vocab_size)) & (target != ignore_index)
    if bool(bad.any()):
        row = int(bad.int().argmax())
        raise ValueError(f"target: expected class indices in [0, {vocab_size - 1}] or ignore_index="
                         f"{ignore_index}, got target[{row}] = {int(target[row])}")


def _mean_scales(target, class_weight, ignore_index):
    """float32 ``[1]`` each: ``1 / sum of w[y]`` over the counted rows (F.cross_entropy's weighted mean; the
    count without class weights) and ``1 / count`` for the z-loss; a denominator of 0 is taken as 1."""
    counted = target != ignore_index
    count = counted.sum().float()
    if class_weight is None:
        ce_denominator = count
    else:  # clamped: an unchecked target (graph capture) must not index out of range
        target_weight = class_weight.float()[target.clamp(0, class_weight.shape[0] - 1)]
        ce_denominator = torch.where(counted, target_weight, 0.0).sum()
    one = torch.ones_like(count)
    return (one / torch.where(ce_denominator == 0, one, ce_denominator)).reshape(1), \
        (one / count.clamp(min=1)).reshape(1)


# ----------------------------------------------------------------------------------------------
# torch.library registration and autograd
# ----------------------------------------------------------------------------------------------
def _placeholder(like: torch.Tensor) -> torch.Tensor:
    """Custom ops return tensors, never None: an empty one stands for a gradient not computed."""
    return like.new_empty(0)


@torch.library.custom_op("tfkernels::linear_cross_entropy_checked_target", mutates_args=())
def _checked_target_op(target: torch.Tensor, vocab_size: int, ignore_index: int) -> torch.Tensor:
    """A copy of ``target`` once ``_check_target_values`` passed: how the reference path checks the
    targets as the kernel op does, eagerly and under torch.compile alike (an opaque op runs at run
    time, and the loss reads its output, so it is never dropped)."""
    _check_target_values(target, vocab_size, ignore_index)
    return target.clone()


@_checked_target_op.register_fake
def _checked_target_fake(target, vocab_size, ignore_index):
    return torch.empty_like(target)


@torch.library.custom_op("tfkernels::linear_cross_entropy", mutates_args=())
def _lce_op(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, ignore_index: int, z_loss: float,
    reduction: str, grad_hidden_needed: bool, grad_weight_needed: bool, bias: torch.Tensor | None = None,
    class_weight: torch.Tensor | None = None, label_smoothing: float = 0.0, softcap: float = 0.0,
    grad_bias_needed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss, its z-loss term and, for "mean"/"sum", the gradients at upstream gradient 1 (placeholders
    otherwise). The options come last, with defaults: a call written before they existed still works."""
    _check_target_values(target, weight.shape[0], ignore_index)
    if reduction == "mean":
        grad_scale, z_grad_scale = _mean_scales(target, class_weight, ignore_index)
    else:
        grad_scale = z_grad_scale = torch.ones(1, dtype=torch.float32, device=hidden.device)
    precompute = reduction != "none"
    grads = _Grads(precompute and grad_hidden_needed, precompute and grad_weight_needed,
                   precompute and grad_bias_needed and bias is not None)
    ce_rows, z_rows, grad_hidden, grad_weight, grad_bias = _launch(
        hidden, weight, bias, target, class_weight, _Options(ignore_index, z_loss, label_smoothing, softcap),
        grad_scale, z_grad_scale, False, grads,
    )
    if z_rows is None:
        z_rows = torch.zeros_like(ce_rows)
    if reduction == "none":
        loss, z_term = ce_rows + z_rows, z_rows
    else:
        z_term = z_rows.sum() * z_grad_scale[0]
        loss = ce_rows.sum() * grad_scale[0] + z_term
    return (loss, z_term, _placeholder(hidden) if grad_hidden is None else grad_hidden,
            _placeholder(weight) if grad_weight is None else grad_weight,
            _placeholder(hidden) if grad_bias is None else grad_bias)


def _like_or_placeholder(needed: bool, x, placeholder_of) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format) if needed else _placeholder(placeholder_of)


@_lce_op.register_fake
def _lce_fake(hidden, weight, target, ignore_index, z_loss, reduction, grad_hidden_needed, grad_weight_needed,
              bias=None, class_weight=None, label_smoothing=0.0, softcap=0.0, grad_bias_needed=False):
    loss = hidden.new_empty(target.shape if reduction == "none" else (), dtype=torch.float32)
    precompute = reduction != "none"
    return (loss, torch.empty_like(loss), _like_or_placeholder(precompute and grad_hidden_needed, hidden, hidden),
            _like_or_placeholder(precompute and grad_weight_needed, weight, weight),
            _like_or_placeholder(precompute and grad_bias_needed and bias is not None, bias, hidden))


@torch.library.custom_op("tfkernels::linear_cross_entropy_bwd", mutates_args=())
def _lce_bwd_op(
    grad_rows: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, ignore_index: int,
    z_loss: float, grad_hidden_needed: bool, grad_weight_needed: bool, bias: torch.Tensor | None,
    class_weight: torch.Tensor | None, label_smoothing: float, softcap: float, grad_bias_needed: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for reduction "none": recompute each chunk's logits with per-row upstream gradients."""
    grad_rows = grad_rows.float().contiguous()
    grads = _Grads(grad_hidden_needed, grad_weight_needed, grad_bias_needed and bias is not None)
    _, _, grad_hidden, grad_weight, grad_bias = _launch(
        hidden, weight, bias, target, class_weight, _Options(ignore_index, z_loss, label_smoothing, softcap),
        grad_rows, grad_rows, True, grads,
    )
    return (_placeholder(hidden) if grad_hidden is None else grad_hidden,
            _placeholder(weight) if grad_weight is None else grad_weight,
            _placeholder(hidden) if grad_bias is None else grad_bias)


@_lce_bwd_op.register_fake
def _lce_bwd_fake(grad_rows, hidden, weight, target, ignore_index, z_loss, grad_hidden_needed, grad_weight_needed,
                  bias, class_weight, label_smoothing, softcap, grad_bias_needed):
    return (_like_or_placeholder(grad_hidden_needed, hidden, hidden),
            _like_or_placeholder(grad_weight_needed, weight, weight),
            _like_or_placeholder(grad_bias_needed and bias is not None, bias, hidden))


def _lce_setup_context(ctx, inputs, output):
    hidden, weight, target, ignore_index, z_loss, reduction, _, _, bias, class_weight, label_smoothing, softcap, _ = \
        inputs
    _, _, grad_hidden, grad_weight, grad_bias = output
    ctx.reduction = reduction
    ctx.ignore_index, ctx.z_loss, ctx.label_smoothing, ctx.softcap = ignore_index, z_loss, label_smoothing, softcap
    ctx.has_bias = bias is not None
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, bias, target, class_weight)
    else:
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)


def _lce_backward(ctx, grad_loss, _grad_z_term, _grad_hidden_out, _grad_weight_out, _grad_bias_out):
    # The z-loss term is returned for logging only (detached by the public function): its gradient is in the loss's.
    need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_bias = ctx.has_bias and ctx.needs_input_grad[8]
    if ctx.reduction == "none":
        hidden, weight, bias, target, class_weight = ctx.saved_tensors
        grad_hidden, grad_weight, grad_bias = _lce_bwd_op(
            grad_loss, hidden, weight, target, ctx.ignore_index, ctx.z_loss, need_hidden, need_weight, bias,
            class_weight, ctx.label_smoothing, ctx.softcap, need_bias)
    else:
        grad_hidden, grad_weight, grad_bias = (g * grad_loss for g in ctx.saved_tensors)
    return (grad_hidden if need_hidden else None, grad_weight if need_weight else None) + (None,) * 6 + \
        (grad_bias if need_bias else None,) + (None,) * 4


_lce_op.register_autograd(_lce_backward, setup_context=_lce_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------
def _check_inputs(hidden, weight, target, ignore_index, reduction, z_loss, bias, class_weight, label_smoothing,
                  softcap, return_z_loss) -> None:
    check_float_tensor("hidden", hidden)
    if hidden.ndim < 2:
        raise ValueError(f"hidden: expected [N, H] or [..., H] (at least 2-d), got shape {tuple(hidden.shape)}")
    check_float_tensor("weight", weight)
    if weight.ndim != 2:
        raise ValueError(f"weight: expected a 2-d tensor ([V, H]), got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: expected hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight: expected [V, H] with H = {hidden.shape[-1]} (hidden [..., H]), "
                         f"got {tuple(weight.shape)}")
    vocab_size = weight.shape[0]
    if vocab_size == 0:
        raise ValueError("weight: expected at least one class (V >= 1), got V = 0")
    leading = f"[{', '.join(str(n) for n in hidden.shape[:-1])}]"
    check_index_tensor("target", target, leading)
    if target.shape != hidden.shape[:-1]:
        raise ValueError(f"target: expected shape {leading} (hidden's leading dimensions), got {tuple(target.shape)}")
    if bias is not None:
        check_float_tensor("bias", bias)
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias: expected hidden's dtype {hidden.dtype}, got {bias.dtype}")
        if bias.shape != (vocab_size,):
            raise ValueError(f"bias: expected shape [{vocab_size}] (one per class), got {tuple(bias.shape)}")
    if class_weight is not None:
        if not isinstance(class_weight, torch.Tensor) or not class_weight.dtype.is_floating_point:
            got = class_weight.dtype if isinstance(class_weight, torch.Tensor) else type(class_weight).__name__
            raise TypeError(f"class_weight: expected a float tensor [{vocab_size}], got {got}")
        if class_weight.shape != (vocab_size,):
            raise ValueError(f"class_weight: expected shape [{vocab_size}] (one per class), got "
                             f"{tuple(class_weight.shape)}")
        if class_weight.requires_grad and torch.is_grad_enabled():
            # As F.cross_entropy: the kernel has no gradient for it, and the reference must not have one either.
            raise ValueError("class_weight: not differentiated; pass class_weight.detach() (it requires grad)")
    for name, x in (("weight", weight), ("target", target), ("bias", bias), ("class_weight", class_weight)):
        if x is not None and x.device != hidden.device:
            raise ValueError(f"{name}: expected device {hidden.device} (as hidden), got {x.device}")
    check_int("ignore_index", ignore_index, _INT64_MIN, _INT64_MAX)  # compared with int64 targets
    check_choice("reduction", reduction, REDUCTIONS)
    check_float("z_loss", z_loss, 0)
    check_float("label_smoothing", label_smoothing, 0, 1)
    if softcap is not None:
        check_float("softcap", softcap, 0, what="None or a finite float >= 0 (0: off)")
    if not isinstance(return_z_loss, bool):
        raise TypeError(f"return_z_loss: expected a bool, got {return_z_loss!r}")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean", z_loss: float = 0.0, *,
                         bias: torch.Tensor | None = None, class_weight: torch.Tensor | None = None,
                         label_smoothing: float = 0.0, softcap: float | None = None, return_z_loss: bool = False):
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``target``, never materialising the logits.

    The same loss as ``F.cross_entropy(F.linear(hidden, weight, bias), target, weight=class_weight,
    ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)`` (and torch's
    ``F.linear_cross_entropy`` with ``linear_bias=bias``), plus a z-loss and a logit soft-cap.

    Args:
        hidden: ``[N, H]`` or ``[..., H]`` (e.g. ``[B, T, H]``, flattened inside: a view when the strides
            allow it, else a copy) float16/bfloat16/float32, any strides (the model passes text positions
            only; image patches have no LM loss).
        weight: ``[V, H]``, hidden's dtype (``nn.Linear(H, V).weight``).
        target: int, hidden's leading shape (``[N]``, ``[B, T]``): class indices in ``[0, V)`` or
            ``ignore_index``.
        ignore_index: rows with this target count for nothing.
        reduction: ``"mean"``, ``"sum"``, or ``"none"`` (target's shape, 0 on ignored rows). ``"mean"`` is
            F.cross_entropy's: the cross-entropy summed over counted rows divided by the summed
            ``class_weight[target]`` of those rows (their number without class weights); the z-loss is
            averaged over the counted rows. A denominator of 0 is taken as 1 (all rows ignored: 0, never NaN).
        z_loss: adds ``z_loss * logsumexp(logits)²`` per counted row (PaLM's z-loss; Liger's
            ``lse_square_scale``).
        bias: ``[V]``, hidden's dtype, or ``None`` (``nn.Linear(H, V).bias``; torch's ``linear_bias``).
        class_weight: ``[V]`` float or ``None``: F.cross_entropy's ``weight`` (Liger's ``ce_weight``), a
            rescaling per class, not differentiated.
        label_smoothing: in ``[0, 1]``, as F.cross_entropy's (the target mixed with a uniform distribution,
            weighted by ``class_weight``).
        softcap: ``None`` or 0 for none; ``c > 0`` caps the logits to ``c * tanh(logits / c)`` before the
            softmax (Gemma 2's final logit soft-capping).
        return_z_loss: also return the z-loss term alone, reduced as it enters the loss, for logging
            (detached: its gradient is already in the loss's).

    Returns:
        float32 loss; differentiable in hidden, weight and bias (gradients in their dtype). With
        ``return_z_loss``, ``(loss, z_term)``.

    Under autocast (on hidden's device type) it is a matmul consumer like ``nn.Linear``: float
    hidden, weight and bias are cast to autocast's dtype (then they may differ in dtype before the
    cast), the op runs with autocast off (GEMMs in that dtype with float32 accumulation, the softmax in
    float32), the loss is float32 and the gradients come back in the inputs' own dtypes.
    """
    options = dict(bias=bias, class_weight=class_weight, label_smoothing=label_smoothing, softcap=softcap,
                   return_z_loss=return_z_loss)
    dtype = autocast_dtype(hidden)
    if dtype is not None:
        hidden, weight, options["bias"] = autocast_cast(dtype, hidden, weight, bias)
        with autocast_off(hidden):
            return linear_cross_entropy(hidden, weight, target, ignore_index, reduction, z_loss, **options)
    _check_inputs(hidden, weight, target, ignore_index, reduction, z_loss, bias, class_weight, label_smoothing,
                  softcap, return_z_loss)
    z_loss, label_smoothing, softcap = float(z_loss), float(label_smoothing), float(softcap or 0.0)
    if target.dtype != torch.int64 and not _INT32_MIN <= ignore_index <= _INT32_MAX:
        # torch compares an int32 tensor with a Python int modulo 2**32 (target 0 would equal 2**40):
        # no int32 target equals an ignore_index beyond int32, so compare in int64.
        target = target.long()
    target_shape = target.shape
    hidden, target = hidden.reshape(target.numel(), hidden.shape[-1]), target.reshape(-1)  # -1 fails at H = 0
    if not use_triton(hidden):
        target = _checked_target_op(target, weight.shape[0], ignore_index)
        loss, z_term = reference.linear_cross_entropy(
            hidden, weight, target, ignore_index, reduction, z_loss, bias=bias, class_weight=class_weight,
            label_smoothing=label_smoothing, softcap=softcap, return_z_loss=True)
    else:
        grad_enabled = torch.is_grad_enabled()
        loss, z_term, _, _, _ = _lce_op(
            hidden, weight, target, ignore_index, z_loss, reduction, grad_enabled and hidden.requires_grad,
            grad_enabled and weight.requires_grad, bias, class_weight, label_smoothing, softcap,
            grad_enabled and bias is not None and bias.requires_grad)
    if reduction == "none":
        loss, z_term = loss.reshape(target_shape), z_term.reshape(target_shape)
    return (loss, z_term.detach()) if return_z_loss else loss
