"""Fused output projection + cross-entropy (the LM loss) without ``[N, V]`` logits (DESIGN §3).

Design
------
The rows are processed in chunks. For each chunk of ``n`` rows:

1. ``logits = hidden[chunk] @ weight.T`` - one GEMM (cuBLAS on a GPU, fp32 accumulation inside),
   ``[n, V]`` in the input dtype, rounded once as eager code rounds its logits;
2. one Triton program per row streams its logits in ``BLOCK_V`` slices: an online log-sum-exp in
   float32, the target's logit, ``loss = lse - logit[target] + z_loss * lse²``; then, when
   gradients are wanted, a second sweep overwrites the logits in place with
   ``dL/dlogits = g * (softmax * (1 + 2 z_loss lse) - onehot(target))``;
3. ``grad_hidden[chunk] = dlogits @ weight`` and ``grad_weight += dlogits.T @ hidden[chunk]`` -
   two GEMMs; ``grad_weight`` accumulates across chunks in float32 (each chunk's product is rounded
   once, the running sum never is).

So the peak extra memory is one chunk of logits, sized like the larger of ``hidden`` and
``weight``, instead of ``[N, V]`` logits, their softmax and their gradient. With ``reduction``
``"mean"`` or ``"sum"`` the gradient of every row is known up to the scalar upstream gradient, so
the forward computes the gradients on the way (three GEMMs in all, as eager does) and the backward
only scales them. With ``"none"`` the per-row upstream gradients are only known in the backward,
which recomputes the logits chunk by chunk (one GEMM more).

Why the GEMMs are not Triton: they are plain dense products that cuBLAS runs near peak; a fully
fused Triton kernel that never writes even a chunk of logits needs either a recompute per output
tile or fp32 atomics for both gradients, both slower than the three GEMMs here. Why the loss is
a kernel: the row-wise softmax, target pick, z-loss and gradient are one read and one write of the
chunk instead of eager's several passes and fp32 temporaries.

Ignored rows (``target == ignore_index``) have loss 0 and gradient 0; the mean divides by the
number of counted rows, or by 1 when there are none, so an all-ignored batch gives 0, never NaN.
"""

from __future__ import annotations

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
from .reference.lm_loss import REDUCTIONS

if HAS_TRITON:
    import triton
    import triton.language as tl

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
        logits_ptr, stride_row,  # [n, V] logits of a chunk; overwritten by dL/dlogits (COMPUTE_GRAD)
        target_ptr,  # int [n]
        loss_ptr,  # float32 [n]: per-row loss, 0 on ignored rows
        grad_scale_ptr, grad_scale_stride,  # float32: dL/dloss of row r = grad_scale[r * stride] (0: shared)
        vocab_size, ignore_index, z_loss,
        COMPUTE_GRAD: tl.constexpr,  # write dL/dlogits over the logits
        BLOCK_V: tl.constexpr,  # vocabulary slice per step
    ):
        row = tl.program_id(0)
        row_ptr = logits_ptr + row.to(tl.int64) * stride_row
        target = tl.load(target_ptr + row)
        counted = target != ignore_index
        cols = tl.arange(0, BLOCK_V)

        # Online log-sum-exp; a slice holds at least one real column, so its max is finite and the
        # first rescale multiplies 0 by exp(-inf) = 0.
        running_max = -float("inf")
        running_sum = 0.0
        target_logit = 0.0
        for v0 in range(0, vocab_size, BLOCK_V):
            in_vocab = v0 + cols < vocab_size
            x = tl.load(row_ptr + v0 + cols, mask=in_vocab, other=-float("inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
            running_max = new_max
            target_logit += tl.sum(tl.where(v0 + cols == target, x, 0.0), axis=0)
        lse = running_max + tl.log(running_sum)
        loss = lse - target_logit + z_loss * lse * lse
        tl.store(loss_ptr + row, tl.where(counted, loss, 0.0))

        if COMPUTE_GRAD:
            g = tl.where(counted, tl.load(grad_scale_ptr + row * grad_scale_stride), 0.0)
            softmax_scale = g * (1.0 + 2.0 * z_loss * lse)  # z-loss adds 2 z lse * softmax
            for v0 in range(0, vocab_size, BLOCK_V):
                in_vocab = v0 + cols < vocab_size
                x = tl.load(row_ptr + v0 + cols, mask=in_vocab, other=0.0).to(tl.float32)
                grad = softmax_scale * tl.exp(x - lse) - tl.where(v0 + cols == target, g, 0.0)
                tl.store(row_ptr + v0 + cols, grad.to(logits_ptr.dtype.element_ty), mask=in_vocab)


# ----------------------------------------------------------------------------------------------
# Host launcher
# ----------------------------------------------------------------------------------------------
def _rows_per_chunk(num_rows: int, vocab_size: int, hidden_size: int) -> int:
    """Rows whose ``[rows, V]`` logits take about as much memory as the larger of hidden and weight."""
    return max(1, min(num_rows, triton.cdiv(max(num_rows, vocab_size) * hidden_size, vocab_size)))


def _launch(hidden, weight, target, ignore_index, z_loss, grad_scale, scale_per_row, grad_hidden_needed,
            grad_weight_needed):
    """Per-row losses (float32 ``[N]``) and, if asked, the gradients of ``sum(g_r * loss_r)``.

    ``grad_scale`` holds ``g``: float32 ``[N]`` if ``scale_per_row``, else ``[1]`` shared by all rows.
    Returns ``(loss_rows, grad_hidden or None, grad_weight or None)``. Autocast is off inside: the
    GEMMs run in the inputs' dtype (a backward called under autocast must not recast them).
    """
    with autocast_off(hidden):
        return _launch_chunks(hidden, weight, target, ignore_index, z_loss, grad_scale, scale_per_row,
                              grad_hidden_needed, grad_weight_needed)


def _launch_chunks(hidden, weight, target, ignore_index, z_loss, grad_scale, scale_per_row, grad_hidden_needed,
                   grad_weight_needed):
    num_rows, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    target = target.contiguous()
    loss_rows = torch.zeros(num_rows, dtype=torch.float32, device=hidden.device)
    compute_grad = grad_hidden_needed or grad_weight_needed
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if grad_hidden_needed else None
    grad_weight = (torch.zeros(vocab_size, hidden_size, dtype=torch.float32, device=weight.device)
                   if grad_weight_needed else None)
    chunk = _rows_per_chunk(num_rows, vocab_size, hidden_size)
    block_v = min(_MAX_BLOCK_V, triton.next_power_of_2(vocab_size))
    for r0 in range(0, num_rows, chunk):
        r1 = min(num_rows, r0 + chunk)
        hidden_chunk = hidden[r0:r1]
        logits = torch.mm(hidden_chunk, weight.t())  # [n, V]; becomes dL/dlogits below
        _cross_entropy_rows_kernel[(r1 - r0,)](
            logits, logits.stride(0), target[r0:r1], loss_rows[r0:r1],
            grad_scale[r0:r1] if scale_per_row else grad_scale, 1 if scale_per_row else 0,
            vocab_size, ignore_index, z_loss,
            COMPUTE_GRAD=compute_grad, BLOCK_V=block_v, num_warps=_NUM_WARPS,
        )
        if grad_hidden_needed:
            torch.mm(logits, weight, out=grad_hidden[r0:r1])
        if grad_weight_needed:
            if logits.dtype == torch.float32:
                grad_weight.addmm_(logits.t(), hidden_chunk)
            else:
                grad_weight += torch.mm(logits.t(), hidden_chunk)  # rounded once, summed in fp32
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return loss_rows, grad_hidden, grad_weight


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
    reduction: str, grad_hidden_needed: bool, grad_weight_needed: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss and, for "mean"/"sum", its gradients at upstream gradient 1 (placeholders otherwise)."""
    _check_target_values(target, weight.shape[0], ignore_index)
    counted = (target != ignore_index).sum()
    if reduction == "mean":
        grad_scale = (1.0 / counted.clamp(min=1).float()).reshape(1)
    else:
        grad_scale = torch.ones(1, dtype=torch.float32, device=hidden.device)
    precompute = reduction != "none"
    loss_rows, grad_hidden, grad_weight = _launch(
        hidden, weight, target, ignore_index, z_loss, grad_scale, False,
        precompute and grad_hidden_needed, precompute and grad_weight_needed,
    )
    if reduction == "none":
        loss = loss_rows
    else:
        loss = loss_rows.sum() * grad_scale[0]
    return (loss, _placeholder(hidden) if grad_hidden is None else grad_hidden,
            _placeholder(weight) if grad_weight is None else grad_weight)


@_lce_op.register_fake
def _lce_fake(hidden, weight, target, ignore_index, z_loss, reduction, grad_hidden_needed, grad_weight_needed):
    loss = hidden.new_empty(target.shape if reduction == "none" else (), dtype=torch.float32)
    precompute = reduction != "none"
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) \
        if precompute and grad_hidden_needed else _placeholder(hidden)
    grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) \
        if precompute and grad_weight_needed else _placeholder(weight)
    return loss, grad_hidden, grad_weight


@torch.library.custom_op("tfkernels::linear_cross_entropy_bwd", mutates_args=())
def _lce_bwd_op(
    grad_rows: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
    ignore_index: int, z_loss: float, grad_hidden_needed: bool, grad_weight_needed: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients for reduction "none": recompute each chunk's logits with per-row upstream gradients."""
    _, grad_hidden, grad_weight = _launch(hidden, weight, target, ignore_index, z_loss,
                                          grad_rows.float().contiguous(), True, grad_hidden_needed,
                                          grad_weight_needed)
    return (_placeholder(hidden) if grad_hidden is None else grad_hidden,
            _placeholder(weight) if grad_weight is None else grad_weight)


@_lce_bwd_op.register_fake
def _lce_bwd_fake(grad_rows, hidden, weight, target, ignore_index, z_loss, grad_hidden_needed, grad_weight_needed):
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) \
        if grad_hidden_needed else _placeholder(hidden)
    grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) \
        if grad_weight_needed else _placeholder(weight)
    return grad_hidden, grad_weight


def _lce_setup_context(ctx, inputs, output):
    hidden, weight, target, ignore_index, z_loss, reduction, _, _ = inputs
    _, grad_hidden, grad_weight = output
    ctx.reduction, ctx.ignore_index, ctx.z_loss = reduction, ignore_index, z_loss
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, target)
    else:
        ctx.save_for_backward(grad_hidden, grad_weight)


def _lce_backward(ctx, grad_loss, _grad_hidden_out, _grad_weight_out):
    need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if ctx.reduction == "none":
        hidden, weight, target = ctx.saved_tensors
        grad_hidden, grad_weight = _lce_bwd_op(grad_loss, hidden, weight, target, ctx.ignore_index, ctx.z_loss,
                                               need_hidden, need_weight)
    else:
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden, grad_weight = grad_hidden * grad_loss, grad_weight * grad_loss
    return (grad_hidden if need_hidden else None, grad_weight if need_weight else None,
            None, None, None, None, None, None)


_lce_op.register_autograd(_lce_backward, setup_context=_lce_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------
def _check_inputs(hidden, weight, target, ignore_index, reduction, z_loss) -> None:
    for name, x, shape in (("hidden", hidden, "[N, H]"), ("weight", weight, "[V, H]")):
        check_float_tensor(name, x)
        if x.ndim != 2:
            raise ValueError(f"{name}: expected a 2-d tensor ({shape}), got shape {tuple(x.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: expected hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight: expected [V, H] with H = {hidden.shape[1]} (hidden [N, H]), "
                         f"got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight: expected at least one class (V >= 1), got V = 0")
    check_index_tensor("target", target, "[N]")
    if target.shape != hidden.shape[:1]:
        raise ValueError(f"target: expected shape [{hidden.shape[0]}] (hidden's rows), got {tuple(target.shape)}")
    for name, x in (("weight", weight), ("target", target)):
        if x.device != hidden.device:
            raise ValueError(f"{name}: expected device {hidden.device} (as hidden), got {x.device}")
    check_int("ignore_index", ignore_index, _INT64_MIN, _INT64_MAX)  # compared with int64 targets
    check_choice("reduction", reduction, REDUCTIONS)
    check_float("z_loss", z_loss, 0)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean", z_loss: float = 0.0) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``target``, never materialising the logits.

    Args:
        hidden: ``[N, H]`` float16/bfloat16/float32, any strides (the model passes text positions
            only; image patches have no LM loss).
        weight: ``[V, H]``, hidden's dtype (``nn.Linear(H, V).weight``).
        target: int ``[N]``, class indices in ``[0, V)`` or ``ignore_index``.
        ignore_index: rows with this target count for nothing.
        reduction: ``"mean"`` over counted rows (0 if none), ``"sum"``, or ``"none"`` (``[N]``).
        z_loss: adds ``z_loss * logsumexp(logits)²`` per counted row (PaLM's z-loss).

    Returns:
        float32 loss; differentiable in hidden and weight (gradients in their dtype).

    Under autocast (on hidden's device type) it is a matmul consumer like ``nn.Linear``: float
    hidden and weight are cast to autocast's dtype (then they may differ in dtype before the cast),
    the op runs with autocast off (GEMMs in that dtype with float32 accumulation, the softmax in
    float32), the loss is float32 and the gradients come back in hidden's and weight's own dtypes.
    """
    dtype = autocast_dtype(hidden)
    if dtype is not None:
        hidden, weight = autocast_cast(dtype, hidden, weight)
        with autocast_off(hidden):
            return linear_cross_entropy(hidden, weight, target, ignore_index, reduction, z_loss)
    _check_inputs(hidden, weight, target, ignore_index, reduction, z_loss)
    z_loss = float(z_loss)
    if target.dtype != torch.int64 and not _INT32_MIN <= ignore_index <= _INT32_MAX:
        # torch compares an int32 tensor with a Python int modulo 2**32 (target 0 would equal 2**40):
        # no int32 target equals an ignore_index beyond int32, so compare in int64.
        target = target.long()
    if not use_triton(hidden):
        target = _checked_target_op(target, weight.shape[0], ignore_index)
        return reference.linear_cross_entropy(hidden, weight, target, ignore_index, reduction, z_loss)
    grad_enabled = torch.is_grad_enabled()
    loss, _, _ = _lce_op(hidden, weight, target, ignore_index, z_loss, reduction,
                         grad_enabled and hidden.requires_grad, grad_enabled and weight.requires_grad)
    return loss
