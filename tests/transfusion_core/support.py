"""Helpers shared by the model-level tests: a tiny config and a packed batch of varied documents."""

import torch

import transfusion_core as tc


def tiny_config(**overrides):
    fields = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, image_size=4, unet_channels=(8, 16))
    return tc.TransfusionConfig(**(fields | overrides))


def documents(seed=0):
    """Captions before and after images of two sizes, text alone, two images in one document."""
    g = torch.Generator().manual_seed(seed)
    tok = tc.ByteTokenizer()
    return [
        [tok.encode("red dot"), torch.randn(3, 4, 4, generator=g)],
        [torch.randn(3, 4, 8, generator=g), tok.encode("wide")],
        [tok.encode("just some text")],
        [torch.randn(3, 4, 4, generator=g), tok.encode("and"), torch.randn(3, 2, 2, generator=g)],
    ]


def packed(seed=0, seq_len=48):
    return tc.Packer(tiny_config(), seq_len, seed=seed)(documents(seed))
