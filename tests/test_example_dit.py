"""examples/dit.py, the PixArt-alpha-style DiT on tk.attention and tk.adaln_modulate: its cross-attention
through the key-length interval mask equals dense SDPA, the Triton kernels (interpreted) and the
reference path compute the same model, and training makes the held-out loss fall and the captions
matter."""

import importlib
import runpy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tfkernels as tk
import tfkernels.adaln as adaln_module
from tfkernels.testing import assert_anchored

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "dit.py"
attention_module = importlib.import_module("tfkernels.attention")  # tk.attention is the function


@pytest.fixture(scope="module")
def dit():
    """The example's module globals (not run as __main__: nothing trains on import)."""
    return runpy.run_path(str(EXAMPLE), run_name="dit_example")


@pytest.fixture(params=["kernel", "reference"])
def path(request, monkeypatch):
    """The example on the Triton kernels (Triton's interpreter on a CPU) and on the reference path."""
    if request.param == "reference":
        for module in (attention_module, adaln_module):
            monkeypatch.setattr(module, "use_triton", lambda x: False)
    elif tk.backend("cuda" if torch.cuda.is_available() else "cpu") != "triton":
        pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1 to run the Triton kernels")
    return request.param


def _randn(*shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _dense_cross_attention(attention, x, text, lengths):
    """The same module's projections around SDPA with a dense ``[B, 1, T, L]`` key-padding mask."""
    batch, tokens, dim = x.shape
    q = attention.q(x).view(batch, tokens, attention.heads, -1).transpose(1, 2)
    k, v = attention.kv(text).view(batch, text.shape[1], 2, attention.heads, -1).unbind(2)
    visible = torch.arange(text.shape[1]) < lengths[:, None, None, None]  # [B, 1, 1, L]
    out = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=visible)
    return attention.out(out.transpose(1, 2).reshape(batch, tokens, dim))


def test_cross_attention_through_the_interval_mask_equals_dense_sdpa(dit, path):
    torch.manual_seed(0)
    attention = dit["Attention"](32, 4)
    x, text = _randn(3, 10, 32, seed=1), _randn(3, 16, 32, seed=2) * 3  # peaked scores: padding would show
    lengths = torch.tensor([7, 15, 16])  # captions padded to the longest (16)
    mask = tk.IntervalMask.from_key_lengths(lengths, 10, 16)
    assert mask.kv_start.eq(0).all() and torch.equal(mask.kv_end, lengths[:, None].expand(3, 10).int())

    def run(fn, module, x, text):
        x, text = x.clone().requires_grad_(), text.clone().requires_grad_()
        out = fn(module, x, text)
        params = [p for p in module.parameters()]
        grads = torch.autograd.grad((out * _randn(*out.shape, seed=3, dtype=out.dtype)).sum(), [x, text, *params])
        return out, grads

    ours = run(lambda m, x, text: m(x, mask, text), attention, x, text)
    # The padding keys hold large values: a leak would move the output far from the dense result.
    text_junk = text.clone()
    text_junk[0, 7:], text_junk[1, 15:] = 1e4, -1e4
    assert torch.equal(attention(x, mask, text_junk), ours[0])
    exact = run(lambda m, x, text: _dense_cross_attention(m, x, text, lengths), attention.double(), x.double(),
                text.double())
    attention.float()
    lowp = run(lambda m, x, text: _dense_cross_attention(m, x, text, lengths), attention, x, text)
    names = ["out", "dx", "dtext"] + [f"d{name}" for name, _ in attention.named_parameters()]
    for name, a, ref64, low in zip(names, [ours[0], *ours[1]], [exact[0], *exact[1]], [lowp[0], *lowp[1]]):
        assert_anchored(name, a, ref64, low)


def test_kernels_and_reference_compute_the_same_model(dit, monkeypatch):
    if tk.backend("cuda" if torch.cuda.is_available() else "cpu") != "triton":
        pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1 to run the Triton kernels")
    torch.manual_seed(0)
    model = dit["DiT"](image_size=16, patch_size=4, dim=32, depth=2, heads=2)
    for p in model.parameters():  # away from the zero initialisation, so that every path matters
        torch.nn.init.normal_(p, std=0.2)
    images = _randn(3, 3, 16, 16, seed=4)
    captions, lengths = dit["caption_batch"](["a red circle at the top left",
                                              "a blue square at the top right and a green triangle at the bottom left",
                                              "a yellow circle at the bottom right"])
    t = torch.tensor([10, 500, 990])

    def run():
        out = model(images, t, captions, lengths)
        return out, torch.autograd.grad(out.square().sum(), list(model.parameters()))

    kernel = run()
    for module in (attention_module, adaln_module):
        monkeypatch.setattr(module, "use_triton", lambda x: False)
    reference = run()
    for a, b in zip([kernel[0], *kernel[1]], [reference[0], *reference[1]]):
        # float32 both ways; the kernels sum in other orders: a few ulps through two blocks
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_caption_batch_pads_words_and_counts_them(dit):
    captions, lengths = dit["caption_batch"](["a red circle at the top left",
                                              "a blue square at the top right and a green triangle at the bottom left"])
    assert captions.shape == (2, dit["CAPTION_LEN"]) and lengths.tolist() == [7, 15]
    assert (captions[0, 7:] == 0).all() and (captions[0, :7] > 0).all() and (captions[1, :15] > 0).all()


def test_training_makes_the_loss_fall_and_uses_the_captions(dit, reference_path, one_thread):
    """The example's defaults (800 steps, about 30 s on one core): the held-out loss at fixed noise falls
    from about 1 (the zero-initialised output) and is clearly worse with another image's caption."""
    lines = []
    result = dit["train"](log=lines.append)
    assert len(result["losses"]) == 800 and len(lines) == 16
    first, last = (sum(w) / len(w) for w in (result["losses"][:50], result["losses"][-50:]))
    assert last < 0.25 * first
    assert 0.9 < result["heldout_before"] < 1.1
    assert result["heldout_after"] < 0.2 * result["heldout_before"]
    assert result["heldout_shuffled"] > 1.15 * result["heldout_after"], "the captions must matter"


def test_readme_pixart_snippet_runs(path):
    """The README's PixArt-alpha block snippet runs as written, on both paths."""
    readme = (EXAMPLE.parent.parent / "README.md").read_text()
    section = readme.split("\n### PixArt-alpha: DiT blocks\n")[1].split("\n## ")[0]
    code = section.split("```python\n")[1].split("```")[0]
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    B, T, C = (namespace[n] for n in ("B", "T", "C"))
    assert namespace["y"].shape == namespace["x"].shape == (B, T, C)
    assert torch.isfinite(namespace["y"]).all() and torch.isfinite(namespace["x"]).all()
