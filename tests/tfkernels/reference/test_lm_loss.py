"""reference.linear_cross_entropy against torch.nn.functional.cross_entropy on full logits."""

import pytest
import torch
import torch.nn.functional as F

from tfkernels.reference import linear_cross_entropy


def _inputs(n=23, h=12, v=37, seed=0, ignored_every=3):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, v, (n,), generator=gen)
    if ignored_every:
        target[::ignored_every] = -100
    return hidden, weight, target


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_cross_entropy_on_full_logits(reduction):
    hidden, weight, target = _inputs()
    ours = linear_cross_entropy(hidden, weight, target, reduction=reduction)
    expected = F.cross_entropy(hidden @ weight.T, target, ignore_index=-100, reduction=reduction)
    torch.testing.assert_close(ours, expected)
    grads = torch.autograd.grad(ours.sum(), (hidden, weight))
    expected_grads = torch.autograd.grad(expected.sum(), (hidden, weight))
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b)


def test_custom_ignore_index_and_int32_targets():
    hidden, weight, target = _inputs(ignored_every=0)
    target[[1, 4, 5]] = 7
    ours = linear_cross_entropy(hidden, weight, target.int(), ignore_index=7)
    expected = F.cross_entropy(hidden @ weight.T, target, ignore_index=7)
    torch.testing.assert_close(ours, expected)


def test_z_loss_adds_squared_logsumexp_of_counted_rows():
    hidden, weight, target = _inputs()
    logits = hidden @ weight.T
    counted = target != -100
    lse = torch.logsumexp(logits, dim=-1)
    z = 1e-2
    expected = (F.cross_entropy(logits, target, reduction="none") + z * lse**2)[counted].mean()
    torch.testing.assert_close(linear_cross_entropy(hidden, weight, target, z_loss=z), expected)


def test_all_targets_ignored_gives_zero_loss_and_zero_gradients():
    hidden, weight, _ = _inputs()
    target = torch.full((hidden.shape[0],), -100)
    for reduction in ("mean", "sum"):
        loss = linear_cross_entropy(hidden, weight, target, reduction=reduction)
        assert loss.item() == 0.0
        grads = torch.autograd.grad(loss, (hidden, weight))
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    # F.cross_entropy gives NaN here (0 / 0); the reference's mean divides by max(count, 1).
    assert torch.isnan(F.cross_entropy(hidden @ weight.T, target))


def test_low_precision_inputs_compute_in_float32():
    hidden, weight, target = _inputs()
    loss = linear_cross_entropy(hidden.half(), weight.half(), target)
    assert loss.dtype == torch.float32
    expected = F.cross_entropy(hidden.half().float() @ weight.half().float().T, target)
    torch.testing.assert_close(loss, expected)


def test_unknown_reduction_fails():
    hidden, weight, target = _inputs()
    with pytest.raises(ValueError, match="reduction: expected one of"):
        linear_cross_entropy(hidden, weight, target, reduction="avg")


# ------------------------------------------------------------------------------ bias, class weights,
# label smoothing, soft-cap, z-loss term, any leading shape
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_bias_class_weight_and_smoothing_are_f_cross_entropys(reduction, label_smoothing):
    hidden, weight, target = _inputs()
    bias = torch.randn(weight.shape[0], dtype=torch.float64, requires_grad=True)
    class_weight = torch.rand(weight.shape[0], dtype=torch.float64) + 0.1
    ours = linear_cross_entropy(hidden, weight, target, reduction=reduction, bias=bias, class_weight=class_weight,
                                label_smoothing=label_smoothing)
    expected = F.cross_entropy(F.linear(hidden, weight, bias), target, weight=class_weight, reduction=reduction,
                               label_smoothing=label_smoothing)
    torch.testing.assert_close(ours, expected)
    for a, b in zip(torch.autograd.grad(ours.sum(), (hidden, weight, bias)),
                    torch.autograd.grad(expected.sum(), (hidden, weight, bias))):
        torch.testing.assert_close(a, b)
    if reduction == "mean":  # torch's own fused linear cross-entropy, same argument values
        torch.testing.assert_close(ours, F.linear_cross_entropy(hidden, weight, target, linear_bias=bias,
                                                                weight=class_weight, label_smoothing=label_smoothing))


def test_softcap_caps_the_logits_before_the_softmax():
    hidden, weight, target = _inputs()
    logits = hidden @ weight.T
    expected = F.cross_entropy(5.0 * torch.tanh(logits / 5.0), target)
    torch.testing.assert_close(linear_cross_entropy(hidden, weight, target, softcap=5.0), expected)
    torch.testing.assert_close(linear_cross_entropy(hidden, weight, target, softcap=None),
                               linear_cross_entropy(hidden, weight, target, softcap=0.0))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_z_term_and_weighted_mean_denominators(reduction):
    """The z-loss is averaged over the counted rows, the weighted cross-entropy over their summed class weights."""
    hidden, weight, target = _inputs()
    class_weight = torch.rand(weight.shape[0], dtype=torch.float64) + 0.1
    loss, z_term = linear_cross_entropy(hidden, weight, target, reduction=reduction, z_loss=1e-2,
                                        class_weight=class_weight, return_z_loss=True)
    counted = target != -100
    z_rows = torch.where(counted, 1e-2 * torch.logsumexp(hidden @ weight.T, -1).square(), 0.0)
    expected_z = {"none": z_rows, "sum": z_rows.sum(), "mean": z_rows[counted].mean()}[reduction]
    torch.testing.assert_close(z_term, expected_z.detach())
    assert not z_term.requires_grad
    ce = F.cross_entropy(hidden @ weight.T, target, weight=class_weight, reduction=reduction)
    torch.testing.assert_close(loss, ce + expected_z)


def test_leading_dimensions_are_flattened():
    hidden, weight, target = _inputs(n=24)
    shaped = linear_cross_entropy(hidden.reshape(2, 3, 4, -1), weight, target.reshape(2, 3, 4), reduction="none")
    assert shaped.shape == (2, 3, 4)
    torch.testing.assert_close(shaped.reshape(-1), linear_cross_entropy(hidden, weight, target, reduction="none"))
