"""tfkernels.integrations.hf: tk.attention as transformers' attention backend.

Tiny random-initialised models (no download, no network), float32. Model results are compared with
transformers' own "sdpa" (or "eager" where SDPA cannot run) in float64, within float32 SDPA's own
error (tfkernels.testing.assert_anchored), on the kernel path (Triton's interpreter on a CPU) and on
the reference path. The mask builder is checked against transformers' dense masks on random calls.
"""

import copy
import importlib.util
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tfkernels as tk
from tests.support import DEVICE
from tfkernels.mask import DenseMaskReader, IntervalMask, NotAnIntervalError, segment_ids_from_layout
from tfkernels.testing import assert_anchored

from .support import (
    assert_grads_anchored,
    import_error_without,
    imports_of_tfkernels,
    run_readme_section,
    spy_on_attention,
)

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
needs_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers: pip install -e '.[hf]'")

if HAS_TRANSFORMERS:
    import transformers
    from torch._dynamo.testing import CompileCounter
    from transformers import masking_utils as mu
    from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

    from tfkernels.integrations import hf

    hf.register()
    hf.register("tfkernels_fallback", fallback="sdpa")

# transformers from 5.23 on evaluates the mask of packed documents on positions within each document.
POSITION_REMAP = HAS_TRANSFORMERS and hasattr(mu, "remap_positions_for_packed_sequence")

# The module (tfkernels.attention, the attribute, is the public function).


@pytest.fixture
def no_evaluation(monkeypatch):
    """Fails a test whose masks do not all take the structural (O(B * S)) path."""

    def evaluated(*args, **kwargs):
        raise AssertionError("the mask builder evaluated the closure instead of taking the structural path")

    monkeypatch.setattr(hf, "_evaluated", evaluated)


@pytest.fixture
def tk_calls(monkeypatch):
    return spy_on_attention(monkeypatch, hf)


# ----------------------------------------------------------------------------------------------
# Tiny models and comparisons
# ----------------------------------------------------------------------------------------------
def tiny_llama(**config):
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, **config,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(DEVICE)


def tiny_gemma3():
    """Gemma3 with a one-layer SigLIP tower, a sliding-window layer (window 4) and a global layer."""
    config = transformers.Gemma3Config(
        text_config=dict(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, sliding_window=4, max_position_embeddings=64,
            layer_types=["sliding_attention", "full_attention"],
        ),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=5, boi_token_index=6, eoi_token_index=7,
    )
    torch.manual_seed(0)
    return transformers.Gemma3ForConditionalGeneration(config).to(DEVICE)


def random_ids(batch_size, seq_len, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(8, 64, (batch_size, seq_len), generator=gen).to(DEVICE)


def left_padding(lengths, seq_len):
    """A 2D attention mask: row ``r`` has ``lengths[r]`` real tokens at its end."""
    mask = torch.zeros(len(lengths), seq_len, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, seq_len - length :] = 1
    return mask.to(DEVICE)


def logits_and_grads(model, implementation, inputs, weight):
    """Logits and every parameter's gradient of ``sum(logits * weight)`` with ``implementation``."""
    model.set_attn_implementation(implementation)
    model.zero_grad(set_to_none=True)
    logits = model(**inputs, use_cache=False).logits
    (logits.double() * weight).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def assert_matches_sdpa(model, inputs, rows=None, reference="sdpa", implementation="tfkernels"):
    """``implementation``'s logits (on ``rows``, bool ``[B, S]``) and parameter gradients against ``reference``
    in float64, within ``reference``'s own float32 error. Returns ``implementation``'s logits."""
    model64 = copy.deepcopy(model).double()
    inputs64 = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    batch_size, seq_len = inputs["input_ids"].shape
    rows = torch.ones(batch_size, seq_len, dtype=torch.bool, device=DEVICE) if rows is None else rows
    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(batch_size, seq_len, vocab, generator=gen, dtype=torch.float64).to(DEVICE)
    weight = weight * rows[..., None]
    ref64, grads64 = logits_and_grads(model64, reference, inputs64, weight)
    lowp, grads_lowp = logits_and_grads(model, reference, inputs, weight)
    ours, grads = logits_and_grads(model, implementation, inputs, weight)
    assert_anchored("logits", ours[rows], ref64[rows], lowp[rows])
    assert_grads_anchored(grads, grads64, grads_lowp)
    return ours


# ----------------------------------------------------------------------------------------------
# Packaging
# ----------------------------------------------------------------------------------------------
def test_importing_tfkernels_does_not_import_transformers():
    assert not imports_of_tfkernels("transformers")


def test_the_hf_module_without_transformers_names_the_extra():
    assert "pip install 'tfkernels[hf]'" in import_error_without("transformers", "tfkernels.integrations.hf")


@needs_transformers
def test_the_hf_module_refuses_transformers_older_than_it_supports():
    """Older transformers build masks with other arguments: a named ImportError at import, not a TypeError deep
    in a forward. setup.py's hf extra states the same lowest version."""
    code = ("import transformers; transformers.__version__ = '5.8.0'\n"
            "try:\n    import tfkernels.integrations.hf\nexcept ImportError as e:\n    print(e)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert f"needs transformers >= {hf.LOWEST_TRANSFORMERS} (installed: 5.8.0): pip install 'tfkernels[hf]'" in \
        result.stdout, result.stdout + result.stderr
    setup = (Path(__file__).resolve().parents[3] / "setup.py").read_text()
    assert f'"hf": ["transformers>={hf.LOWEST_TRANSFORMERS},<6"]' in setup


@needs_transformers
def test_the_readme_section_runs():
    example = run_readme_section("Use with Hugging Face transformers")
    assert example["logits"].shape == (1, 12, 256) and torch.isfinite(example["logits"]).all()
    assert example["tokens"].shape == (2, 10)


@needs_transformers
def test_register_arguments():
    assert hf.register("tfkernels") == "tfkernels"
    assert "tfkernels" in transformers.AttentionInterface._global_mapping
    assert "tfkernels" in mu.AttentionMaskInterface._global_mapping
    for name in ("sdpa", "tfkernels_or_sdpa", "flash_tfkernels"):
        with pytest.raises(ValueError, match="which transformers reads as one of its own"):
            hf.register(name)
    with pytest.raises(ValueError, match="fallback: expected one of"):
        hf.register("x", fallback="eager")
    with pytest.raises(TypeError, match="name: expected a non-empty str"):
        hf.register("")


# ----------------------------------------------------------------------------------------------
# The mask builder against transformers' dense masks
# ----------------------------------------------------------------------------------------------
def _random_padding(rng, batch_size, length, style):
    if style == "left":
        return left_padding([rng.randint(1, length) for _ in range(batch_size)], length).bool()
    if style == "right":
        return left_padding([rng.randint(1, length) for _ in range(batch_size)], length).flip(1).bool()
    return torch.tensor([[rng.random() < 0.8 for _ in range(length)] for _ in range(batch_size)], device=DEVICE)


def _random_token_types(rng, batch_size, seq_len):
    """Gemma3's image token types: several images per row, one-token images, images at both ends."""
    types = torch.zeros(batch_size, seq_len, dtype=torch.long)
    for row in range(batch_size):
        pos = rng.randint(0, 2)
        while pos < seq_len:
            length = rng.choice([1, 1, 2, 4, 5])
            types[row, pos : pos + length] = 1
            pos += length + rng.randint(1, 4)
    return types.to(DEVICE)


def _random_documents(rng, batch_size, seq_len):
    """Packed position ids restarting at 0 per document, and transformers' document ids from them."""
    rows = []
    for _ in range(batch_size):
        positions = []
        while len(positions) < seq_len:
            positions += list(range(rng.randint(1, seq_len)))
        rows.append(positions[:seq_len])
    positions = torch.tensor(rows, device=DEVICE)
    return positions, mu.find_packed_sequence_indices(positions)


def _random_call(rng):
    """A random mask-builder call as transformers makes them, and whether the structural path is
    expected to take it (when the mask is an interval mask)."""
    batch_size = rng.randint(1, 3)
    kind = rng.choice(["cache", "static", "window", "bidirectional", "cross", "chunked", "blocks", "prefix", "packed",
                       "gap", "custom"])
    q_length = rng.randint(1, 16)
    kv_offset, q_offset, structural = 0, 0, True
    kv_length = q_length
    mask_function = mu.causal_mask_function
    padding_style = rng.choice([None, "left", "right", "random"])
    use_vmap = False
    if kind == "cache":  # DynamicCache: the queries are the last of the keys
        kv_length = q_length + rng.randint(0, 12)
        q_offset = kv_length - q_length
    elif kind == "static":  # StaticCache: unwritten slots after the queries, q_offset a tensor
        q_offset = torch.tensor(rng.randint(0, 8), device=DEVICE)
        kv_length = int(q_offset) + q_length + rng.randint(0, 8)
    elif kind == "window":  # a sliding-window cache layer: kv_offset > 0
        window = rng.randint(1, 8)
        kv_offset = rng.randint(0, 10)
        kv_length = q_length + rng.randint(0, window)
        q_offset = kv_offset + kv_length - q_length
        mask_function = mu.sliding_window_causal_mask_function(window)
    elif kind == "bidirectional":
        kv_length = rng.randint(1, 16)
        mask_function = rng.choice([mu.bidirectional_mask_function,
                                    mu.sliding_window_bidirectional_mask_function(rng.randint(1, 6))])
    elif kind == "cross":  # cross-attention with a model's own AND (T5Gemma2 had one): the encoder's padding
        kv_length = rng.randint(1, 16)
        mask_function = mu.and_masks(mu.bidirectional_mask_function, lambda b, h, q, kv: kv >= 0)
        structural = False
    elif kind == "chunked":
        left = torch.tensor([rng.randint(0, 4) for _ in range(batch_size)], device=DEVICE)
        mask_function = mu.chunked_causal_mask_function(rng.randint(1, 6), left)
    elif kind == "blocks":  # Gemma3: OR(causal, blocks), and a sliding window for its local layers
        if rng.random() < 0.7:
            ids = get_block_sequence_ids_for_mask(_random_token_types(rng, batch_size, q_length))
        else:  # arbitrary ids: one id may own two runs (then the closure is evaluated)
            ids = torch.tensor([[rng.randint(-1, 2) for _ in range(q_length)] for _ in range(batch_size)], device=DEVICE)
            structural = False
        mask_function = mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(ids))
        if rng.random() < 0.5:
            mask_function = mu.and_masks(mask_function, mu.sliding_window_overlay(rng.randint(1, 6)))
            use_vmap = True
    elif kind == "prefix":  # PaliGemma: block 0 holds the prefix and the right padding, the suffix is text (-1)
        lengths = [rng.randint(1, q_length) for _ in range(batch_size)]
        ids = torch.zeros(batch_size, q_length, dtype=torch.long)
        for row, length in enumerate(lengths):
            ids[row, rng.randint(0, length) : length] = -1
        # create_causal_mask's and create_sliding_window_causal_mask's composition with block_sequence_ids
        inner = rng.choice([mu.causal_mask_function, mu.sliding_window_causal_mask_function(rng.randint(1, 6))])
        mask_function = mu.or_masks(inner, mu.blockwise_overlay(ids.to(DEVICE)))
        use_vmap = True
        padding_style = lengths
    elif kind == "packed":  # create_causal_mask's composition for padding-free packed rows
        positions, documents = _random_documents(rng, batch_size, q_length)
        documents = torch.zeros_like(positions) if documents is None else documents
        mask_function = rng.choice([mu.causal_mask_function, mu.sliding_window_causal_mask_function(rng.randint(1, 6))])
        if POSITION_REMAP:
            mask_function = mu.remap_positions_for_packed_sequence(mask_function, positions)
        if rng.random() < 0.5:
            ids = get_block_sequence_ids_for_mask(_random_token_types(rng, batch_size, q_length))
            mask_function = mu.or_masks(mask_function, mu.blockwise_overlay(ids))
        mask_function = mu.and_masks(mask_function, mu.packed_sequence_mask_function(documents))
        padding_style = None  # transformers packs only without a padding mask
    elif kind == "gap":  # a union with a gap (keys up to the query and from 2-4 past it): padding may fill it
        mask_function = mu.or_masks(mu.causal_mask_function, mu.sliding_window_overlay(-rng.randint(1, 3)))
        structural = False
    else:  # a model's own overlay (prefix-LM): only the evaluated path knows it
        prefix = rng.randint(0, q_length)
        mask_function = mu.or_masks(mu.causal_mask_function, lambda b, h, q, kv: kv < prefix)
        use_vmap, structural = True, False
    attention_mask = None
    if isinstance(padding_style, list):  # right padding after these lengths
        attention_mask = left_padding(padding_style, kv_length).flip(1).bool()
    elif padding_style is not None:
        attention_mask = _random_padding(rng, batch_size, kv_offset + kv_length, padding_style)
    call = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, use_vmap=use_vmap,
                device=torch.device(DEVICE))
    return kind, call, structural


def _padding_queries_emptied(dense, call, kind):
    """``dense`` (transformers' mask, bool ``[B, Sq, Sk]``) with the queries at padded positions seeing nothing in
    self-attention: not in cross-attention nor under bidirectional_mask_function alone, where the padding mask
    covers the keys of another sequence."""
    if call["attention_mask"] is None or kind == "cross" or call["mask_function"] is mu.bidirectional_mask_function:
        return dense
    padding = call["attention_mask"].bool()
    positions = torch.arange(call["q_length"], device=DEVICE) + call["q_offset"]
    padded = ~padding[:, positions.clamp(max=padding.shape[-1] - 1)] & (positions < padding.shape[-1])
    return dense & ~padded[:, :, None]


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is b is None or (a is not None and b is not None and torch.equal(a, b))


@needs_transformers
def test_the_mask_builder_gives_transformers_masks_as_intervals(monkeypatch):
    """On random calls (caches, windows, chunks, Gemma3 image blocks, PaliGemma prefixes, packed documents,
    padding, a custom overlay): the IntervalMask equals transformers' dense mask with its padding queries
    seeing nothing wherever that is an interval mask, with or without holes (the same mask as
    IntervalMask.from_dense gives), and NotAnIntervalError is raised exactly where it is not. The structural
    path takes every call whose pieces it knows and whose rows have no holes."""
    evaluations = []
    evaluated = hf._evaluated

    def counted(*args, **kwargs):
        evaluations.append(1)
        return evaluated(*args, **kwargs)

    monkeypatch.setattr(hf, "_evaluated", counted)
    rng = random.Random(0)
    seen = {"interval": 0, "holes": 0, "not an interval": 0, "structural": 0,
            "interval once padding queries see nothing": 0}
    for case in range(300):
        kind, call, structural = _random_call(rng)
        given = mu.sdpa_mask(**call, allow_is_causal_skip=False)[:, 0]
        given = given.expand(call["batch_size"], call["q_length"], call["kv_length"])
        dense = _padding_queries_emptied(given, call, kind)
        evaluations.clear()
        try:
            expected = IntervalMask.from_dense(dense)
        except NotAnIntervalError:
            with pytest.raises(NotAnIntervalError, match="not one key interval per query"):
                hf.interval_mask(**call)
            seen["not an interval"] += 1
            continue
        mask = hf.interval_mask(**call)
        assert torch.equal(mask.to_dense(), dense), (case, kind)
        for name in ("kv_start", "kv_end", "key_q_start", "key_q_end"):
            assert _same(getattr(mask, name), getattr(expected, name)), (case, name)
        mask.validate()
        if expected.has_holes:  # padding keys inside the rows' intervals: evaluated, as from_dense reads them
            seen["holes"] += 1
            continue
        if structural:
            assert not evaluations, (case, kind, "evaluated")
            seen["structural"] += 1
        seen["interval"] += 1
        try:
            IntervalMask.from_dense(given)
        except NotAnIntervalError:
            seen["interval once padding queries see nothing"] += 1
    assert min(seen["interval"], seen["not an interval"], seen["structural"]) >= 30 and seen["holes"] >= 10, seen
    assert seen["interval once padding queries see nothing"] >= 5, seen


@needs_transformers
@pytest.mark.parametrize("use_vmap", [False, True])
def test_the_mask_builder_reads_hidden_spans_from_a_models_mask_function(use_vmap):
    """A model's own mask function for clean-copy rows (causal, bidirectional inside each image and each noisy
    copy, a noisy copy hidden from every query outside it, packed documents) gives the mask that
    IntervalMask.from_spans builds with hidden=..., its key intervals included."""
    seq_len, images, hidden = 32, [[(14, 24)], [(2, 6), (20, 26)]], [[(4, 14)], [(10, 20)]]
    documents = [[26, 6], [32]]
    expected = IntervalMask.from_spans(seq_len, images=images, documents=documents, hidden=hidden, device=DEVICE)
    doc, image, noisy = segment_ids_from_layout(seq_len, images=images, documents=documents, hidden=hidden,
                                                device=DEVICE)
    span = torch.where(noisy > 0, noisy + 1000, image)

    def clean_copies(b, h, q, kv):
        same_span = (span[b, q] == span[b, kv]) & (span[b, q] > 0)
        return (doc[b, q] == doc[b, kv]) & ((kv <= q) | same_span) & ((noisy[b, kv] == 0) | same_span)

    mask = hf.interval_mask(batch_size=2, q_length=seq_len, kv_length=seq_len, mask_function=clean_copies,
                            use_vmap=use_vmap, device=DEVICE)
    assert mask.has_holes
    for name in ("kv_start", "kv_end", "key_q_start", "key_q_end"):
        assert torch.equal(getattr(mask, name), getattr(expected, name)), name


@needs_transformers
@pytest.mark.skipif(not POSITION_REMAP, reason="this transformers composes packed masks without a position remap")
def test_bidirectional_under_a_position_remap_reads_the_positions():
    """bidirectional_mask_function is ``q_idx >= 0``: under remap_positions_for_packed_sequence it reads the
    query's position, which is not a function of ``q_idx - kv_idx`` (a negative position sees nothing)."""
    positions = torch.tensor([[-1, 0, 1, 0, 1, 2]], device=DEVICE)
    documents = mu.find_packed_sequence_indices(positions)
    inner = mu.or_masks(mu.causal_mask_function, mu.bidirectional_mask_function)
    mask_function = mu.and_masks(mu.remap_positions_for_packed_sequence(inner, positions),
                                 mu.packed_sequence_mask_function(documents))
    call = dict(batch_size=1, q_length=6, kv_length=6, mask_function=mask_function, device=torch.device(DEVICE))
    dense = mu.sdpa_mask(**call, allow_is_causal_skip=False)[:, 0]
    # Query 0, at position -1, sees key 0 only (causal), query 1 its whole document (bidirectional).
    assert dense[0, 0].tolist() == [True] + [False] * 5 and dense[0, 1].tolist() == [True] * 3 + [False] * 3
    assert torch.equal(hf.interval_mask(**call).to_dense(), dense)


def _window_renamed(window):
    """A sliding-window overlay whose captured variable has another name (``KeyError`` when read)."""
    def inner_mask(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx > q_idx - window
    return inner_mask


def _window_of_another_type(window):
    """A sliding-window overlay whose ``sliding_window`` is no longer the window (``TypeError`` when read)."""
    sliding_window = None

    def inner_mask(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx > q_idx - (window if sliding_window is None else sliding_window)
    return inner_mask


class _WindowObject:
    """A sliding-window overlay that is a callable object, not a closure (``AttributeError`` when read)."""
    __module__ = mu.__name__ if HAS_TRANSFORMERS else None
    __code__ = _window_renamed.__code__

    def __init__(self, window):
        self.window = window
        self.__qualname__ = "sliding_window_overlay.<locals>.inner_mask"

    def __call__(self, batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx > q_idx - self.window


@needs_transformers
@pytest.mark.parametrize("overlay", [_window_renamed, _window_of_another_type, _WindowObject])
def test_pieces_that_read_otherwise_than_expected_are_evaluated(monkeypatch, overlay):
    """A closure named like one of transformers' pieces whose captured variables are not what the structural
    path reads (as a newer transformers might have it) is evaluated instead, with the same result."""
    evaluations = []
    evaluated = hf._evaluated
    monkeypatch.setattr(hf, "_evaluated", lambda *args: evaluations.append(1) or evaluated(*args))
    window = overlay(3)
    if not isinstance(window, _WindowObject):
        window.__module__, window.__qualname__ = mu.__name__, "sliding_window_overlay.<locals>.inner_mask"
    call = dict(batch_size=2, q_length=10, kv_length=10, mask_function=mu.and_masks(mu.causal_mask_function, window),
                attention_mask=left_padding([6, 10], 10).bool(), device=torch.device(DEVICE))
    mask = hf.interval_mask(**call)
    assert evaluations
    assert torch.equal(mask.to_dense(), mu.sdpa_mask(**call, allow_is_causal_skip=False)[:, 0])


@needs_transformers
def test_the_mask_builder_evaluates_in_bounded_chunks(monkeypatch):
    """The evaluated path materialises a chunk of query rows at a time, with the same result (holes included), and
    names the row of a hole found in a later chunk with its absolute query index."""
    monkeypatch.setattr(hf, "_DENSE_CHUNK_ELEMENTS", 2 * 24)  # 2 rows of 24 keys per chunk
    rows_seen = []
    sdpa_mask = mu.sdpa_mask

    def spy(**kwargs):
        rows_seen.append(kwargs["q_length"])
        return sdpa_mask(**kwargs)

    monkeypatch.setattr(hf, "sdpa_mask", spy)
    prefix = 5
    custom = mu.or_masks(mu.causal_mask_function, lambda b, h, q, kv: kv < prefix)
    call = dict(batch_size=1, q_length=24, kv_length=24, mask_function=custom, use_vmap=True, device=DEVICE)
    mask = hf.interval_mask(**call)
    assert max(rows_seen) == 2 and sum(rows_seen) == 24
    assert torch.equal(mask.to_dense(), sdpa_mask(**call, allow_is_causal_skip=False)[:, 0])
    hidden = mu.and_masks(custom, lambda b, h, q, kv: (kv != 9) | (q < 12))  # rows from 12 on miss key 9: holes
    mask = hf.interval_mask(**{**call, "mask_function": hidden})
    assert mask.has_holes and (int(mask.key_q_start[0, 9]), int(mask.key_q_end[0, 9])) == (9, 12)
    assert torch.equal(mask.to_dense(), sdpa_mask(**{**call, "mask_function": hidden}, allow_is_causal_skip=False)[:, 0])
    hole = mu.and_masks(custom, lambda b, h, q, kv: (kv != 9) | (q < 10) | (q == 17))  # key 9: by 9 and 17 only
    with pytest.raises(NotAnIntervalError, match=r"batch row 0, query 10: its visible keys are not one interval "
                                                 r"\(key 9 is hidden between visible keys 0 and 10\), and the queries "
                                                 r"that see key 9 are not one interval either \(queries 9 and 17"):
        hf.interval_mask(**{**call, "mask_function": hole})


# ----------------------------------------------------------------------------------------------
# Llama: logits, gradients, padding, KV cache, packing
# ----------------------------------------------------------------------------------------------
@needs_transformers
@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_llama_logits_and_gradients_equal_sdpa(model_path, padding, tk_calls, no_evaluation):
    model = tiny_llama()
    seq_len = 12
    inputs = {"input_ids": random_ids(2, seq_len)}
    rows = None
    if padding is not None:
        mask = left_padding([7, 12], seq_len)
        inputs["attention_mask"] = mask if padding == "left" else mask.flip(1)
        rows = inputs["attention_mask"].bool()
    assert_matches_sdpa(model, inputs, rows)
    assert tk_calls and all(isinstance(m, IntervalMask) for m in tk_calls)


@needs_transformers
def test_llama_in_float16_equals_sdpa(model_path, tk_calls):
    model = tiny_llama().half()
    inputs = {"input_ids": random_ids(2, 12), "attention_mask": left_padding([7, 12], 12)}
    assert_matches_sdpa(model, inputs, inputs["attention_mask"].bool())
    assert tk_calls


def generated_tokens(**options):
    """Greedy tokens of a tiny Llama on a left-padded batch of two, per attention implementation; and
    ``generate(**more)``, the same call on tfkernels with more options."""
    model = tiny_llama().eval()
    ids = random_ids(2, 8, seed=3)
    attention_mask = left_padding([5, 8], 8)

    def generate(**more):
        return model.generate(input_ids=ids, attention_mask=attention_mask, do_sample=False, **options, **more)

    tokens = {}
    for implementation in ("sdpa", "tfkernels"):
        model.set_attn_implementation(implementation)
        tokens[implementation] = generate()
    return tokens, generate


@needs_transformers
def test_llama_generate_with_a_kv_cache_gives_sdpa_tokens(model_path, tk_calls, monkeypatch):
    tokens, _ = generated_tokens(max_new_tokens=6)
    assert tokens["sdpa"].shape == (2, 14)
    assert torch.equal(tokens["tfkernels"], tokens["sdpa"])
    # Prefill, then one query per step against the cache (bottom-right aligned), on every layer.
    assert [m.seq_len_q for m in tk_calls[::2]] == [8, 1, 1, 1, 1, 1]
    assert [m.seq_len_k for m in tk_calls[::2]] == [8, 9, 10, 11, 12, 13]


@needs_transformers
def test_llama_generate_with_a_static_cache_gives_sdpa_tokens(model_path, tk_calls):
    """generate builds the masks of a static cache itself and the model hands the built mask to transformers'
    mask creation again, which must return it unchanged."""
    tokens, generate = generated_tokens(max_new_tokens=4, cache_implementation="static")
    assert tokens["sdpa"].shape == (2, 12)
    assert torch.equal(tokens["tfkernels"], tokens["sdpa"])
    # Each step's mask reached every layer as built: one IntervalMask object per forward.
    assert len(tk_calls) == 8 and all(a is b for a, b in zip(tk_calls[::2], tk_calls[1::2]))
    # The same with the forward compiled, as generate does for a static cache on a GPU.
    compile_config = transformers.CompileConfig(backend="eager")
    compile_config._compile_all_devices = True
    torch._dynamo.reset()
    compiled = generate(compile_config=compile_config)
    torch._dynamo.reset()
    assert torch.equal(compiled, tokens["sdpa"])


@needs_transformers
def test_packed_rows_equal_their_documents_run_separately(model_path, no_evaluation):
    """Padding-free packing (DataCollatorWithFlattening): position_ids restart at 0 per document."""
    model = tiny_llama()
    model64 = copy.deepcopy(model).double()
    documents = [[5, 7, 1, 3], [16], [2, 14]]
    ids = random_ids(3, 16, seed=4)
    positions = torch.tensor([[p for length in row for p in range(length)] for row in documents], device=DEVICE)
    model.set_attn_implementation("tfkernels")
    packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits.detach()
    separate = {"ref64": [], "lowp": []}
    for row, lengths in enumerate(documents):
        start = 0
        for length in lengths:
            doc = ids[row : row + 1, start : start + length]
            for name, m in (("ref64", model64), ("lowp", model)):
                m.set_attn_implementation("sdpa")
                separate[name].append(m(input_ids=doc, use_cache=False).logits.detach()[0])
            start += length
    assert_anchored("packed logits", packed.reshape(-1, packed.shape[-1]), torch.cat(separate["ref64"]),
                    torch.cat(separate["lowp"]))


# ----------------------------------------------------------------------------------------------
# Gemma3: bidirectional image blocks (token types), sliding windows, the vision tower
# ----------------------------------------------------------------------------------------------
def gemma3_image_batch():
    """Row 0: left padding, a 4-token image and a one-token image; row 1: an image at the row's start,
    a one-token image, two images one text token apart, an image at the row's end."""
    seq_len = 20
    images = [[(4, 8), (11, 12)], [(0, 4), (7, 8), (9, 12), (13, 15), (16, 20)]]
    ids = random_ids(2, seq_len, seed=5)
    token_type_ids = torch.zeros_like(ids)
    for row, spans in enumerate(images):
        for start, end in spans:
            token_type_ids[row, start:end] = 1
            ids[row, start:end] = 5  # image_token_index
    attention_mask = left_padding([18, 20], seq_len)
    return {"input_ids": ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}


@needs_transformers
def test_gemma3_image_blocks_equal_sdpa_and_differ_from_causal(model_path, tk_calls, no_evaluation):
    model = tiny_gemma3()
    inputs = gemma3_image_batch()
    ours = assert_matches_sdpa(model, inputs, rows=inputs["attention_mask"].bool())
    # The image blocks change the result: a backend that dropped them (plain causal) would fail above.
    model.set_attn_implementation("tfkernels")
    causal = model(**{**inputs, "token_type_ids": torch.zeros_like(inputs["token_type_ids"])}, use_cache=False)
    assert (ours - causal.logits.detach()).abs().max() > 1e-2
    # Image queries see the rest of their image, also on the sliding-window layer.
    mask = tk_calls[0]
    assert mask.kv_end[1].tolist()[:5] == [4, 4, 4, 4, 5] and mask.kv_end[1, 16:].tolist() == [20] * 4


@needs_transformers
def test_gemma3_generate_with_images_and_a_sliding_window_cache_gives_sdpa_tokens(model_path, tk_calls):
    """Prefill with image blocks, then decoding against a global cache and a sliding-window cache (whose
    keys start past position 0: kv_offset > 0)."""
    model = tiny_gemma3().eval()
    inputs = gemma3_image_batch()
    tokens = {}
    for implementation in ("sdpa", "tfkernels"):
        model.set_attn_implementation(implementation)
        tokens[implementation] = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(tokens["tfkernels"], tokens["sdpa"])
    decoding = [m for m in tk_calls if m.seq_len_q == 1]
    assert len(decoding) == 8 and {m.seq_len_k for m in decoding[::2]} == {4}  # the window's keys only
    assert [m.seq_len_k for m in decoding[1::2]] == [21, 22, 23, 24]


@needs_transformers
def test_gemma3_with_pixels_equals_sdpa(model_path):
    """The whole multimodal model: the SigLIP tower (bidirectional, no mask) also runs on tfkernels."""
    model = tiny_gemma3()
    ids = random_ids(1, 10, seed=6)
    ids[0, 3:7] = 5
    token_type_ids = torch.zeros_like(ids)
    token_type_ids[0, 3:7] = 1
    gen = torch.Generator().manual_seed(7)
    pixels = torch.randn(1, 3, 28, 28, generator=gen).to(DEVICE)
    assert_matches_sdpa(model, {"input_ids": ids, "token_type_ids": token_type_ids, "pixel_values": pixels})


# ----------------------------------------------------------------------------------------------
# PaliGemma: a prefix-LM (image and prompt bidirectional) built by the model, then by its text model
# ----------------------------------------------------------------------------------------------
def tiny_paligemma(text_model_type):
    """PaliGemma with a one-layer SigLIP tower (4 image tokens) and a Gemma (PaliGemma) or Gemma2 (PaliGemma2:
    a sliding-window layer, window 4, and a global layer) text model."""
    text_config = dict(model_type=text_model_type, vocab_size=64, hidden_size=32, intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                       max_position_embeddings=64)
    if text_model_type == "gemma2":
        text_config.update(sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                           query_pre_attn_scalar=16)
    config = transformers.PaliGemmaConfig(
        text_config=text_config, image_token_index=5, projection_dim=32,
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14, projection_dim=32),
    )
    torch.manual_seed(0)
    return transformers.PaliGemmaForConditionalGeneration(config).to(DEVICE)


def paligemma_batch(lengths, seq_len=12):
    """Rows of 4 image tokens and a 2-token prompt (the bidirectional prefix, token type 0), a suffix (token
    type 1) up to ``lengths[r]``, then right padding (token type 0, as the prefix)."""
    ids = random_ids(len(lengths), seq_len, seed=17)
    ids[:, :4] = 5  # image_token_index
    token_type_ids = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        token_type_ids[row, 6:length] = 1
    gen = torch.Generator().manual_seed(18)
    pixels = torch.randn(len(lengths), 3, 28, 28, generator=gen).to(DEVICE)
    return {"input_ids": ids, "token_type_ids": token_type_ids, "attention_mask": left_padding(lengths, seq_len).flip(1),
            "pixel_values": pixels}


@needs_transformers
def test_paligemma_prefix_lm_equals_sdpa(model_path, tk_calls):
    """PaliGemma builds its prefix-LM mask and hands it to its Gemma text model, whose own mask creation must
    pass the built mask through."""
    model = tiny_paligemma("gemma")
    inputs = paligemma_batch([12, 12])
    assert_matches_sdpa(model, inputs)
    # The prefix is bidirectional: the first image token sees the whole prefix.
    mask = next(m for m in tk_calls if m.seq_len_q == 12)
    assert mask.kv_end[:, 0].tolist() == [6, 6]


@needs_transformers
def test_paligemma2_right_padded_prefix_lm_equals_eager(model_path, tk_calls, no_evaluation):
    """Right padding after a suffix: transformers' mask lets the padding queries (token type 0, like the
    prefix) see the prefix again, after the last suffix query saw only its sliding window. Padding queries see
    nothing in an IntervalMask, which keeps the bounds monotone; the real rows equal eager (Gemma2 soft-caps its
    attention logits, which SDPA cannot)."""
    model = tiny_paligemma("gemma2")
    inputs = paligemma_batch([9, 12])
    rows = inputs["attention_mask"].bool()
    assert_matches_sdpa(model, inputs, rows, reference="eager")
    sliding = next(mask for mask in tk_calls if mask.seq_len_q == 12)  # the text model's first layer
    assert sliding.kv_start[0, 8] == 5 and sliding.kv_end[0, 8] == 9  # the last suffix query: its window
    assert (sliding.kv_start[0, 9:] == sliding.kv_end[0, 9:]).all()  # padding queries see nothing


# ----------------------------------------------------------------------------------------------
# Explicit masks, masks that are not intervals, unsupported arguments
# ----------------------------------------------------------------------------------------------
@needs_transformers
@pytest.mark.parametrize("hidden", [None, [[(7, 9)], [(3, 6)]]], ids=["transfusion", "hidden spans"])
def test_an_explicit_interval_mask_or_its_dense_form_equals_sdpa(model_path, tk_calls, monkeypatch, hidden):
    """tfkernels_mask= carries a Transfusion mask (with hidden spans: a mask with holes) to every layer; the
    same mask as a dense 4D tensor is converted once per forward (the layers share the tensor)."""
    model = tiny_llama()
    mask = IntervalMask.from_spans(16, images=[[(2, 6)], [(9, 16)]], documents=[[10, 6], [16]], hidden=hidden,
                                   device=DEVICE)
    ids = random_ids(2, 16, seed=8)
    dense = mask.to_dense()[:, None]
    sdpa = {}
    for name, m in (("ref64", copy.deepcopy(model).double()), ("lowp", model)):
        m.set_attn_implementation("sdpa")
        sdpa[name] = m(input_ids=ids, attention_mask=dense, use_cache=False).logits.detach()
    model.set_attn_implementation("tfkernels")
    explicit = model(input_ids=ids, tfkernels_mask=mask, use_cache=False).logits.detach()
    assert all(m is mask for m in tk_calls)
    conversions = []
    from_dense = IntervalMask.from_dense
    monkeypatch.setattr(IntervalMask, "from_dense", lambda d: conversions.append(1) or from_dense(d))
    converted = model(input_ids=ids, attention_mask=dense, use_cache=False).logits.detach()
    assert len(conversions) == 1 and len(tk_calls) == 4
    assert all(m.has_holes == (hidden is not None) for m in tk_calls)
    for name, out in (("explicit mask", explicit), ("dense mask", converted)):
        assert_anchored(name, out, sdpa["ref64"], sdpa["lowp"])


def tiny_gemma4():
    """Gemma 4's text model: a sliding-window layer of head dim 16 and a global layer of head dim 512."""
    config = transformers.Gemma4TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, global_head_dim=512, sliding_window=4, max_position_embeddings=64,
        layer_types=["sliding_attention", "full_attention"],
    )
    torch.manual_seed(0)
    return transformers.Gemma4ForCausalLM(config).to(DEVICE)


@needs_transformers
def test_head_dims_above_256_raise_naming_the_layer_or_fall_back_to_sdpa(model_path, tk_calls):
    model = tiny_gemma4()
    assert [layer.self_attn.head_dim for layer in model.model.layers] == [16, 512]
    inputs = {"input_ids": random_ids(2, 10, seed=19), "attention_mask": left_padding([7, 10], 10)}
    model.set_attn_implementation("tfkernels")
    with pytest.raises(NotImplementedError, match=r"Gemma4TextConfig \(model_type 'gemma4_text'\), layer 1 "
                                                 r"\(Gemma4TextAttention\): head dim 512 .*256.*fallback='sdpa'"):
        model(**inputs, use_cache=False)
    tk_calls.clear()
    assert_matches_sdpa(model, inputs, inputs["attention_mask"].bool(), implementation="tfkernels_fallback")
    # The sliding-window layer ran on tfkernels, the global layer on SDPA.
    assert len(tk_calls) == 1 and tk_calls[0].seq_len_q == 10


@needs_transformers
def test_a_mask_that_is_not_an_interval_raises_or_falls_back_to_sdpa():
    model = tiny_llama()
    ids = random_ids(2, 10, seed=9)
    attention_mask = torch.ones(2, 10, dtype=torch.long, device=DEVICE)
    # Padding in the middle: query 3 sees nothing between rows that see keys 0-2 (hidden key 3 would be a hole
    # one interval per key expresses, not the empty row between overlapping rows).
    attention_mask[1, 3] = 0
    model.set_attn_implementation("tfkernels")
    with pytest.raises(NotAnIntervalError, match=r"LlamaConfig \(model_type 'llama'\).*not one key interval per query "
                                                 r"\(batch row 1, query 4: it sees keys \[0, 5\) but query 3 sees "
                                                 r"nothing.*fallback='sdpa'"):
        model(input_ids=ids, attention_mask=attention_mask)
    outputs = {}
    for implementation in ("sdpa", "tfkernels_fallback"):
        model.set_attn_implementation(implementation)
        outputs[implementation] = model(input_ids=ids, attention_mask=attention_mask).logits
    assert torch.equal(outputs["tfkernels_fallback"], outputs["sdpa"])


def tiny_t5gemma2():
    """T5Gemma2: a Gemma3 encoder (one-layer SigLIP tower) and a decoder whose layers attend to their own keys
    and the encoder's at once, with the self- and cross-attention masks concatenated by torch.cat."""
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, sliding_window=4, max_position_embeddings=64,
                layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.T5Gemma2Config(
        encoder=dict(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=5,
                     boi_token_index=6, eoi_token_index=7),
        decoder=text, image_token_index=5,
    )
    torch.manual_seed(0)
    return transformers.T5Gemma2ForConditionalGeneration(config).to(DEVICE)


@needs_transformers
def test_masks_combined_as_tensors_run_as_masks_with_holes(model_path, tk_calls):
    """The concatenated mask of T5Gemma2's decoder (its own keys causally, then every encoder key) has a hole in
    every row but the last; each of its own keys is seen by one run of queries, so the dense mask that torch.cat
    gives converts to a mask with holes and runs on tk.attention, as it does with the fallback registered. (Row
    0's encoder input is shorter than the decoder's: the encoder's padding mask says nothing of decoder queries.)
    One model per implementation: transformers 5.9 does not switch T5Gemma2's encoder once it was set."""
    models = {name: tiny_t5gemma2().eval() for name in ("ref64", "sdpa", "tfkernels_fallback", "tfkernels")}
    models["ref64"].double()
    for name in ("tfkernels_fallback", "tfkernels"):
        models[name].set_attn_implementation(name)
    inputs = {"input_ids": random_ids(2, 9, seed=20), "attention_mask": left_padding([3, 9], 9).flip(1),
              "decoder_input_ids": random_ids(2, 6, seed=22)}
    logits = {name: model(**inputs, use_cache=False).logits.detach() for name, model in models.items()}
    for name in ("tfkernels_fallback", "tfkernels"):
        assert_anchored("logits", logits[name], logits["ref64"], logits["sdpa"])
    assert any(mask.has_holes and mask.seq_len_k == 6 + 9 for mask in tk_calls)  # the decoder's layers
    # Generating, each decoding step's query sees its own keys and the encoder's in one interval.
    generate = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=4,
                    do_sample=False)
    tokens = {name: models[name].generate(**generate) for name in ("sdpa", "tfkernels")}
    assert torch.equal(tokens["tfkernels"], tokens["sdpa"])
    assert any(mask.seq_len_q == 1 and mask.seq_len_k > 9 for mask in tk_calls)


@needs_transformers
def test_a_fallback_converts_each_mask_of_a_forward_once(monkeypatch):
    """Gemma3 builds a global and a sliding-window mask per forward; with a padding hole neither is an
    interval mask, and each layer type then runs SDPA on its dense mask without converting it again."""
    model = tiny_gemma3()
    inputs = gemma3_image_batch()
    inputs["attention_mask"][1, 10] = 0
    conversions = []
    read = DenseMaskReader.mask
    monkeypatch.setattr(DenseMaskReader, "mask", lambda self, *args: conversions.append(1) or read(self, *args))
    outputs = {}
    for implementation in ("sdpa", "tfkernels_fallback"):
        model.set_attn_implementation(implementation)
        outputs[implementation] = model(**inputs, use_cache=False).logits
    assert len(conversions) == 2  # by the builder, one per mask (the layers reuse its verdict)
    assert torch.equal(outputs["tfkernels_fallback"], outputs["sdpa"])


@needs_transformers
def test_dense_masks_given_to_the_attention_function():
    model = tiny_llama()
    module = model.model.layers[0].self_attn
    gen = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(1, h, 6, 8, generator=gen).to(DEVICE) for h in (4, 2, 2))
    hidden = torch.ones(1, 1, 6, 6, dtype=torch.bool, device=DEVICE).tril()
    hidden[0, 0, 5, 2] = False  # key 2 seen by queries 2-4: a mask with holes
    out, _ = hf.attention_forward(module, q, k, v, hidden)
    expected = tk.attention(*(t.transpose(1, 2) for t in (q, k, v)), IntervalMask.from_dense(hidden))
    assert IntervalMask.from_dense(hidden).has_holes and torch.equal(out, expected)
    hole = torch.ones(1, 1, 6, 6, dtype=torch.bool, device=DEVICE).tril()
    hole[0, 0, 4, 2] = False  # key 2 seen by queries 2, 3 and 5
    with pytest.raises(NotAnIntervalError, match="batch row 0, query 4: its visible keys are not one interval"):
        hf.attention_forward(module, q, k, v, hole)
    out, _ = hf.attention_forward(module, q, k, v, hole, fallback="sdpa")
    expected, _ = transformers.integrations.sdpa_attention.sdpa_attention_forward(module, q, k, v, hole)
    assert torch.equal(out, expected)
    bias = torch.zeros(1, 1, 6, 6, device=DEVICE)
    bias[..., 0] = -1.0
    with pytest.raises(NotImplementedError, match="holds biases"):
        hf.attention_forward(module, q, k, v, bias)
    with pytest.raises(NotImplementedError, match=r"shape \(1, 4, 6, 6\)"):
        hf.attention_forward(module, q, k, v, hole.expand(1, 4, 6, 6))
    causal = torch.ones(1, 1, 6, 6, dtype=torch.bool, device=DEVICE).tril()
    q2, k2, v2 = (torch.cat([t, t.flip(2)]) for t in (q, k, v))  # batch 2, the mask's batch 1 broadcast
    out, _ = hf.attention_forward(module, q2, k2, v2, causal)
    expected = tk.attention(*(t.transpose(1, 2) for t in (q2, k2, v2)), IntervalMask.causal(2, 6, device=DEVICE))
    assert torch.equal(out, expected)
    with pytest.raises(TypeError, match="tfkernels_mask: expected a tfkernels.IntervalMask, got Tensor"):
        hf.attention_forward(module, q, k, v, None, tfkernels_mask=hole)


@needs_transformers
def test_dropout_in_training_raises_or_falls_back_to_sdpa():
    model = tiny_llama(attention_dropout=0.5).train()
    ids = random_ids(1, 8, seed=11)
    model.set_attn_implementation("tfkernels")
    with pytest.raises(NotImplementedError, match=r"dropout=0.5 .*fallback='sdpa'"):
        model(input_ids=ids)
    outputs = {}
    for implementation in ("sdpa", "tfkernels_fallback"):
        model.set_attn_implementation(implementation)
        torch.manual_seed(12)
        outputs[implementation] = model(input_ids=ids).logits
    assert torch.equal(outputs["tfkernels_fallback"], outputs["sdpa"])


@needs_transformers
def test_attention_weights_raise_or_fall_back_to_eager():
    model = tiny_llama().eval()
    ids = random_ids(1, 8, seed=13)
    model.set_attn_implementation("tfkernels")
    with pytest.raises(NotImplementedError, match="output_attentions=True"):
        model(input_ids=ids, output_attentions=True)
    outputs = {}
    for implementation in ("eager", "tfkernels_fallback"):
        model.set_attn_implementation(implementation)
        outputs[implementation] = model(input_ids=ids, output_attentions=True).attentions
    assert len(outputs["eager"]) == 2
    for ours, eager in zip(outputs["tfkernels_fallback"], outputs["eager"]):
        assert torch.equal(ours, eager)


def tiny_gemma2(softcap=2.0):
    """Gemma2: soft-capped attention logits, a sliding-window layer (window 4) and a global layer. q_proj and
    k_proj are scaled up so that the scores reach the cap's non-linear range (at the random init they would
    be far below it, and a backend that dropped the cap would pass unnoticed)."""
    config = transformers.Gemma2Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=4, attn_logit_softcapping=softcap,
        query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention"],
    )
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(config).to(DEVICE)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30.0)
            layer.self_attn.k_proj.weight.mul_(30.0)
    return model


@needs_transformers
def test_gemma2_softcap_equals_eager(model_path, tk_calls, no_evaluation):
    """Gemma2's attn_logit_softcapping reaches tk.attention's softcap=: logits and gradients equal eager's
    (SDPA cannot soft-cap), and differ visibly from the same model without the cap. (No padding: eager's
    float64 run turns fully masked padding rows into NaN, which its zero weights then spread.)"""
    model = tiny_gemma2()
    inputs = {"input_ids": random_ids(2, 12, seed=14)}
    ours = assert_matches_sdpa(model, inputs, reference="eager")
    assert tk_calls and all(isinstance(m, IntervalMask) for m in tk_calls)
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    uncapped = model(**inputs, use_cache=False).logits.detach()
    assert (ours - uncapped).abs().max() > 1e-2


@needs_transformers
def test_gemma2_softcap_falls_back_to_eager_not_sdpa():
    """A soft-capped call that falls back (a padding hole) runs the model's eager attention, which applies
    the cap; SDPA would silently drop it."""
    model = tiny_gemma2()
    ids = random_ids(2, 10, seed=16)
    attention_mask = torch.ones(2, 10, dtype=torch.long, device=DEVICE)
    attention_mask[1, 3] = 0
    outputs = {}
    for implementation in ("eager", "tfkernels_fallback"):
        model.set_attn_implementation(implementation)
        outputs[implementation] = model(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits
    assert torch.equal(outputs["tfkernels_fallback"], outputs["eager"])
    model.set_attn_implementation("tfkernels")
    with pytest.raises(NotAnIntervalError, match="fallback='sdpa'"):
        model(input_ids=ids, attention_mask=attention_mask, use_cache=False)


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------
@needs_transformers
def test_compiled_model_breaks_only_at_the_mask_builder_and_does_not_recompile(model_path):
    """The builder runs eagerly (it reads closures and syncs once); the attention layers trace without a
    graph break, and a batch with another padding layout of the same shape reuses the graphs."""
    model = tiny_llama()
    model.set_attn_implementation("tfkernels")
    ids = random_ids(2, 12, seed=15)
    layouts = [left_padding([7, 12], 12), left_padding([12, 3], 12)]
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(input_ids=ids, attention_mask=layouts[0], use_cache=False)
    assert explanation.graph_break_count >= 1
    for reason in explanation.break_reasons:
        assert "interval_mask" in reason.reason, reason.reason
        assert not any("attention" in frame.name or "tfkernels" in frame.filename for frame in reason.user_stack)
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    frame_counts = []
    with torch.no_grad():
        for layout in layouts:
            out = compiled(input_ids=ids, attention_mask=layout, use_cache=False).logits
            frame_counts.append(counter.frame_count)
            expected = model(input_ids=ids, attention_mask=layout, use_cache=False).logits
            assert torch.equal(out, expected)
    assert frame_counts[0] >= 1 and frame_counts[1] == frame_counts[0]
    torch._dynamo.reset()
