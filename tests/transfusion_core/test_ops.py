"""The op seam: the model calls whatever ``transfusion_core.ops.use`` installs, and only inside it."""

import pytest
import torch

import tfkernels as tk
import transfusion_core as tc
from tfkernels import reference

pytestmark = pytest.mark.usefixtures("reference_path")


def _model_and_batch():
    torch.manual_seed(0)
    config = tc.TransfusionConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, image_size=4)
    tok = tc.ByteTokenizer()
    documents = [[tok.encode("red dot"), torch.randn(3, 4, 4)], [tok.encode("text only")]]
    return tc.Transfusion(config), tc.Packer(config, 40, seed=0)(documents)


def test_default_ops_are_the_tfkernels_functions():
    ops = tc.ops.current()
    assert (ops.attention, ops.add_noise, ops.diffusion_loss, ops.linear_cross_entropy) == (
        tk.attention, tk.add_noise, tk.diffusion_loss, tk.linear_cross_entropy)


def test_use_swaps_every_op_the_model_calls_and_restores_on_exit():
    model, batch = _model_and_batch()
    calls = {"attention": 0, "add_noise": 0, "diffusion_loss": 0, "linear_cross_entropy": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    def attention(q, k, v, mask):
        return reference.attention(q, k, v, mask)[0]

    expected = model(batch).loss
    with tc.ops.use(attention=counting("attention", attention),
                    add_noise=counting("add_noise", reference.add_noise),
                    diffusion_loss=counting("diffusion_loss", reference.diffusion_loss),
                    linear_cross_entropy=counting("linear_cross_entropy", reference.linear_cross_entropy)):
        swapped = model(batch).loss
    assert calls == {"attention": model.config.n_layers, "add_noise": 1, "diffusion_loss": 1,
                     "linear_cross_entropy": 1}
    torch.testing.assert_close(swapped, expected)
    assert tc.ops.current() == tc.ops.ModelOps()


def test_use_restores_the_previous_ops_after_an_error_and_nests():
    def broken(*args, **kwargs):
        raise RuntimeError("broken attention")

    model, batch = _model_and_batch()
    with pytest.raises(RuntimeError, match="broken attention"), tc.ops.use(attention=broken):
        model(batch)
    assert tc.ops.current() == tc.ops.ModelOps()
    with tc.ops.use(attention=broken) as outer:
        with tc.ops.use(linear_cross_entropy=reference.linear_cross_entropy) as inner:
            assert inner.attention is broken and inner.linear_cross_entropy is reference.linear_cross_entropy
        assert tc.ops.current() is outer


@pytest.mark.parametrize("kwargs, message", [
    (dict(attn=tk.attention), r"attn: not a model op; expected one of"),
    (dict(attention=3), r"attention: expected a callable, got int"),
])
def test_use_rejects_unknown_names_and_non_callables(kwargs, message):
    with pytest.raises(TypeError, match=message), tc.ops.use(**kwargs):
        pass
    with pytest.raises(TypeError, match=r"ops: expected a transfusion_core.ops.ModelOps, got dict"), \
            tc.ops.use({"attention": tk.attention}):
        pass
    assert tc.ops.current() == tc.ops.ModelOps()
