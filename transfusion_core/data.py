"""Documents: a byte-level tokenizer, the layout the model reads, and the packer into training rows.

A document is an ordered list of text (token ids) and images (latents ``[C, H, W]``). The model
reads it as ``BOS, text..., BOI, patches..., EOI, text..., EOS`` (``document_segments``), an image
as its ``p x p`` patches in raster order (``patchify`` / ``unpatchify``). The packer places
whole documents into rows of ``seq_len`` positions, pads, and returns a ``PackedBatch``: what
``Transfusion.forward`` takes.

Clean copies (BAGEL / Mogao-style): ``Packer(..., clean_image_copies=True)`` packs every image twice,
a noisy copy (the diffusion loss; a hidden span: no token outside it sees it) and then its clean
copy (``t = 0``, no noise, no loss; what later tokens read), both at the same RoPE positions, as
generation leaves a generated image in the KV cache: denoised against the prefix, then committed clean.

Retrieval augmentation (RA-CM3 / CM3Leon): ``packer(documents, retrieved=...)`` places documents
retrieved for a document just before it, in the same row. ``retrieval_mask`` says what the mask
makes of them: ``"visible"`` (RA-CM3's concatenation: the document and its retrieved documents are
one causal span, the document reads them) or ``"separate"`` (each is a document of its own, packed
alongside: the ablation, or retrieved documents used as training data only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
from einops import rearrange

import tfkernels as tk
from tfkernels._checks import check_choice, check_float, check_int

from .config import IGNORE_INDEX, TransfusionConfig, is_int, noise_schedule

INT32_MAX = 2**31 - 1  # positions index int32 interval masks
# What the mask makes of retrieved documents (``Packer(retrieval_mask=...)``).
RETRIEVAL_MASKS = ("visible", "separate")


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, then BOS, EOS, BOI, EOI (``TransfusionConfig``'s defaults)."""

    vocab_size = 260
    bos_id, eos_id, boi_id, eoi_id = 256, 257, 258, 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, tokens) -> str:
        """Token ids -> text; special tokens are dropped, invalid UTF-8 replaced."""
        return bytes(t for t in (int(t) for t in tokens) if t < 256).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------------------------
# Documents as the model sees them
# ----------------------------------------------------------------------------------------------
def patchify(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[..., C, H, W]`` -> ``[..., (H/p)*(W/p), C*p*p]``, patches in raster order."""
    return rearrange(image, "... c (h p) (w q) -> ... (h w) (c p q)", p=patch_size, q=patch_size)


def unpatchify(patches: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """``[..., h*w, C*p*p]`` -> ``[..., C, h*p, w*p]`` (inverse of ``patchify``)."""
    return rearrange(patches, "... (h w) (c p q) -> ... c (h p) (w q)", h=grid[0], w=grid[1],
                     p=patch_size, q=patch_size)


def document_segments(document, config: TransfusionConfig, *, add_eos: bool = True, name: str = "document"):
    """A document as the model reads it: alternating token runs and images.

    Args:
        document: ordered list of items: text as token ids (list of ints or a 1-D integer tensor)
            and images as float latents ``[C, H, W]`` (H, W multiples of ``patch_size``, every
            value finite).
        add_eos: end with EOS (training documents do; a generation prompt does not).
        name: how error messages call the document, e.g. ``documents[3]``.

    Returns:
        A list of 1-D int64 token runs (BOS first, BOI/EOI around every image, EOS last) and
        image tensors, e.g. ``[[BOS, *caption, BOI], image, [EOI, EOS]]``.

    Raises:
        TypeError: the document is not a list, or an item is neither token ids nor a float image
            (a complex or bool tensor, a list holding a non-int).
        ValueError: an image of the wrong shape or with NaN or infinite values, a token id out
            of ``[0, vocab_size)`` or a special token in the text.
    """
    if not isinstance(config, TransfusionConfig):
        raise TypeError(f"config: expected a TransfusionConfig, got {type(config).__name__}")
    if isinstance(document, (str, bytes, torch.Tensor)) or not isinstance(document, Sequence):
        raise TypeError(f"{name}: expected a list of token-id lists and image tensors, got {type(document).__name__}")
    segments, run = [], [config.bos_id]
    for j, item in enumerate(document):
        if isinstance(item, torch.Tensor) and item.is_floating_point():
            channels, p = config.image_channels, config.patch_size
            if item.ndim != 3 or item.shape[0] != channels or item.shape[1] < 1 or item.shape[2] < 1:
                raise ValueError(f"{name}[{j}]: expected an image [{channels}, H, W], got shape {tuple(item.shape)}")
            if item.shape[1] % p or item.shape[2] % p:
                raise ValueError(f"{name}[{j}]: image size {tuple(item.shape[1:])} is not a multiple of patch_size={p}")
            finite = torch.isfinite(item)
            if not bool(finite.all()):
                raise ValueError(f"{name}[{j}]: image has {int((~finite).sum())} NaN or infinite values")
            segments.append(torch.tensor(run + [config.boi_id]))
            segments.append(item)
            run = [config.eoi_id]
            continue
        tokens = None
        if isinstance(item, (list, tuple)) and all(is_int(i) for i in item):
            if not all(0 <= i < config.vocab_size for i in item):  # before torch.tensor: 2**70 overflows it
                raise ValueError(f"{name}[{j}]: token ids must lie in [0, vocab_size={config.vocab_size})")
            tokens = torch.tensor(item, dtype=torch.int64)
        elif isinstance(item, torch.Tensor) and not (item.is_complex() or item.dtype == torch.bool):
            tokens = item.to(torch.int64)
        if tokens is None:
            got = f"a {item.dtype} tensor" if isinstance(item, torch.Tensor) else type(item).__name__
            if isinstance(item, (list, tuple)):
                got = f"a {type(item).__name__} holding {type(next(i for i in item if not is_int(i))).__name__}"
            raise TypeError(
                f"{name}[{j}]: expected token ids (a list of ints or a 1-D integer tensor) or a float image "
                f"[C, H, W], got {got}"
            )
        if tokens.ndim != 1:
            raise ValueError(f"{name}[{j}]: expected 1-D token ids, got shape {tuple(tokens.shape)}")
        if tokens.numel() and not (int(tokens.min()) >= 0 and int(tokens.max()) < config.vocab_size):
            raise ValueError(f"{name}[{j}]: token ids must lie in [0, vocab_size={config.vocab_size})")
        if bool(torch.isin(tokens, special_tokens(config)).any()):
            raise ValueError(
                f"{name}[{j}]: text contains a special token (BOS/EOS/BOI/EOI ids "
                f"{special_tokens(config).tolist()}); the layout inserts those itself"
            )
        run += tokens.tolist()
    if add_eos:
        run.append(config.eos_id)
    segments.append(torch.tensor(run))
    return segments


def special_tokens(config: TransfusionConfig) -> torch.Tensor:
    """int64 ``[4]``: BOS, EOS, BOI, EOI."""
    return torch.tensor([config.bos_id, config.eos_id, config.boi_id, config.eoi_id])


def segment_length(segment: torch.Tensor, patch_size: int) -> int:
    """Positions a segment of ``document_segments`` takes: its tokens, or its image patches."""
    if segment.is_floating_point():
        return (segment.shape[1] // patch_size) * (segment.shape[2] // patch_size)
    return segment.numel()


# ----------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------
@dataclass
class PackedBatch:
    """Documents packed into ``B`` rows of ``S`` positions, with ``N`` images of ``P`` patches.

    Per position (``[B, S]``):
        tokens: int64 token ids; 0 at image and padding positions (never read there).
        positions: int64 position inside the attention span (RoPE): the document, or the document
            with its retrieved documents when they are visible to it; 0 on padding.
        targets: int64 next-token targets at text positions whose next position is text of the
            same document (so BOI is a target, EOI is not: it always follows an image, and EOS
            is not, also when a document follows in the same span);
            ``IGNORE_INDEX`` (-100) elsewhere.
        doc_ids: int64 index of the attention span in the row, -1 on padding: a document, or
            with ``retrieval_mask="visible"`` a document together with its retrieved documents.
        image_ids: int64 1 + index of the image in the batch at its patch positions, else 0.
        hidden_ids: int64 the image id at the patches of a noisy copy (``clean_image_copies``: a
            hidden span, seen by no position outside it), else 0.
    Per image (in row-major order of the positions):
        patches: float32 ``[P, C*p*p]`` clean latents, patchified in raster order.
        patch_offsets: int64 ``[N + 1]``; image ``i`` is ``patches[offsets[i]:offsets[i+1]]``.
        image_grids: int64 ``[N, 2]`` patch grid ``(h, w)`` of each image.
        timesteps: int64 ``[N]`` diffusion step of each image (0 for a clean copy).
        clean_images: int64 ``[N_clean]`` the indices of the images that are clean copies: read at
            ``t = 0`` without noise and without a diffusion loss (empty unless ``clean_image_copies``).
    And:
        mask: ``tk.IntervalMask`` built with ``from_segment_ids(doc_ids, image_ids)``, or with clean copies
            ``from_segment_ids(doc_ids, image_ids outside the noisy copies, hidden_ids)``.
        noise_seed: seed of the patches' noise (``tk.add_noise`` / ``tk.diffusion_loss``).
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    doc_ids: torch.Tensor
    image_ids: torch.Tensor
    patches: torch.Tensor
    patch_offsets: torch.Tensor
    image_grids: torch.Tensor
    timesteps: torch.Tensor
    hidden_ids: torch.Tensor
    clean_images: torch.Tensor
    mask: tk.IntervalMask
    noise_seed: int

    @property
    def num_images(self) -> int:
        return self.image_grids.shape[0]

    def to(self, device) -> PackedBatch:
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self) if f.name != "noise_seed"}
        return replace(self, **moved)


class Packer:
    """Packs documents into rows of ``seq_len`` positions (first fit, documents never split).

    Args:
        config: the model's config (special tokens, patch size, noise schedule).
        seq_len: positions per row.
        num_rows: pad the batch to exactly this many rows (fixed shapes; ``num_rows * seq_len``
            within int32); ``None``: as many rows as the documents need. Documents that do not
            fit raise ``ValueError``.
        image_first_t_max: largest timestep of an image that text follows in its document (the
            paper caps it at 500 when an image precedes its caption, so the text conditions on
            a recognisable image); ``None``: no cap. With ``clean_image_copies`` the text reads the
            clean copy, so the cap is not needed there: pass ``None`` to train the noisy copies on
            every timestep.
        clean_image_copies: pack every image twice: a noisy copy (diffusion loss, a hidden span that
            no other position sees) then its clean copy (``t = 0``, no noise, no loss), which the
            positions after it read; both copies take the same RoPE positions and count against
            ``seq_len``.
        caption_first_prob: for documents of one text and one image, put the text first with
            this probability (the paper: 0.8); ``None`` keeps the given order.
        drop_caption_prob: drop the text of caption-then-image documents with this probability,
            so that the model learns the unconditional ``BOS, BOI, image`` that classifier-free
            guidance uses (the paper drops 10%).
        truncate: cut a document longer than ``seq_len`` (whole images only) instead of raising;
            a document with retrieved documents first drops those (the first listed first).
        retrieval_mask: what the mask makes of the documents retrieved for a document:
            ``"visible"``: the document reads them (RA-CM3's concatenation); they and the document
            are one causal span (one doc id, positions counted from the first one's BOS; EOS still
            ends each document's targets) and their images get the ``image_first_t_max`` cap, since
            the document conditions on them. ``"separate"``: each is a document of its own for the
            mask and the positions, placed just before the document in its row.
        seed: seed of every random choice (order, caption drop, timesteps, noise seed), an int in
            ``[0, 2**64)``. ``packer.generator`` holds the state, for exact resumption.

    Calling it: ``packer(documents, retrieved=None)``. ``retrieved``: ``None``, or one list per
    document (possibly empty) of the documents retrieved for it, placed before it in the order
    given, in the same row. They are trained on like any document (text targets, noised images),
    as RA-CM3 does, and laid out as given: ``caption_first_prob`` and ``drop_caption_prob`` act on
    the document only.

    An argument of the wrong type raises ``TypeError`` (``seed=1.5``, ``drop_caption_prob=None``,
    ``truncate=1``), one out of range ``ValueError``, the message naming it; so do the documents
    (``document_segments``).
    """

    def __init__(
        self,
        config: TransfusionConfig,
        seq_len: int,
        *,
        num_rows: int | None = None,
        image_first_t_max: int | None = 500,
        caption_first_prob: float | None = None,
        drop_caption_prob: float = 0.0,
        truncate: bool = False,
        retrieval_mask: str = "visible",
        clean_image_copies: bool = False,
        seed: int = 0,
    ):
        if not isinstance(config, TransfusionConfig):
            raise TypeError(f"config: expected a TransfusionConfig, got {type(config).__name__}")
        check_int("seq_len", seq_len, 2, INT32_MAX)
        if num_rows is not None:
            check_int("num_rows", num_rows, 1, INT32_MAX // seq_len)  # the batch's positions fit int32
        if image_first_t_max is not None:
            check_int("image_first_t_max", image_first_t_max, 0, config.num_timesteps - 1)
        if caption_first_prob is not None:
            caption_first_prob = check_float("caption_first_prob", caption_first_prob, 0, 1)
        drop_caption_prob = check_float("drop_caption_prob", drop_caption_prob, 0, 1)
        if not isinstance(truncate, bool):
            raise TypeError(f"truncate: expected a bool, got {truncate!r}")
        check_choice("retrieval_mask", retrieval_mask, RETRIEVAL_MASKS)
        if not isinstance(clean_image_copies, bool):
            raise TypeError(f"clean_image_copies: expected a bool, got {clean_image_copies!r}")
        check_int("seed", seed, 0, 2**64 - 1)
        self.config = config
        self.seq_len = seq_len
        self.num_rows = num_rows
        self.image_first_t_max = image_first_t_max
        self.caption_first_prob = caption_first_prob
        self.drop_caption_prob = drop_caption_prob
        self.truncate = truncate
        self.retrieval_mask = retrieval_mask
        self.clean_image_copies = clean_image_copies
        self.schedule = noise_schedule(config)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, documents, retrieved=None) -> PackedBatch:
        if isinstance(documents, (str, bytes, torch.Tensor)) or not isinstance(documents, Sequence):
            raise TypeError(f"documents: expected a list of documents, got {type(documents).__name__}")
        if not documents:
            raise ValueError("documents: expected at least one document")
        retrieved = self._check_retrieved(retrieved, len(documents))
        groups = [self._lay_out(i, doc, retrieved[i]) for i, doc in enumerate(documents)]
        rows = self._assign_rows([sum(length for piece in group for _, length, _ in piece) for group in groups])
        return self._fill(groups, rows)

    @staticmethod
    def _check_retrieved(retrieved, num_documents: int):
        """``retrieved`` as one list of documents per document (``None``: none anywhere)."""
        if retrieved is None:
            return [[] for _ in range(num_documents)]
        if isinstance(retrieved, (str, bytes, torch.Tensor)) or not isinstance(retrieved, Sequence):
            raise TypeError(f"retrieved: expected None or one list of documents per document, "
                            f"got {type(retrieved).__name__}")
        if len(retrieved) != num_documents:
            raise ValueError(f"retrieved: expected one list of retrieved documents per document "
                             f"({num_documents}), got {len(retrieved)}")
        for i, docs in enumerate(retrieved):
            if isinstance(docs, (str, bytes, torch.Tensor)) or not isinstance(docs, Sequence):
                raise TypeError(f"retrieved[{i}]: expected a list of documents (possibly empty), "
                                f"got {type(docs).__name__}")
        return retrieved

    # ------------------------------------------------------------------ per document
    def _coin(self, p: float) -> bool:
        return bool(torch.rand((), generator=self.generator) < p)

    @staticmethod
    def _is_image(item) -> bool:
        return isinstance(item, torch.Tensor) and item.is_floating_point()

    def _reorder(self, document):
        """Caption order and caption dropout, for documents of one text and one image."""
        document = list(document) if isinstance(document, (list, tuple)) else document
        if not isinstance(document, list) or len(document) != 2:
            return document
        if self._is_image(document[0]) == self._is_image(document[1]):
            return document
        text, image = (document[1], document[0]) if self._is_image(document[0]) else (document[0], document[1])
        caption_first = not self._is_image(document[0])
        if self.caption_first_prob is not None:
            caption_first = self._coin(self.caption_first_prob)
        if caption_first and self.drop_caption_prob > 0 and self._coin(self.drop_caption_prob):
            return [image]
        return [text, image] if caption_first else [image, text]

    def _lay_out(self, index: int, document, retrieved):
        """What goes into a row for ``documents[index]``: its retrieved documents, then itself; each
        a list of ``(segment, length, timestep cap)``."""
        name = f"documents[{index}]"
        pieces = [document_segments(doc, self.config, name=f"retrieved[{index}][{j}]")
                  for j, doc in enumerate(retrieved)]
        pieces.append(document_segments(self._reorder(document), self.config, name=name))
        lengths = [[self._positions_taken(s) for s in piece] for piece in pieces]
        total = sum(map(sum, lengths))
        if total > self.seq_len:
            if not self.truncate:
                what = f"{name}: takes"
                if len(pieces) > 1:
                    what = f"{name} and its {len(pieces) - 1} retrieved documents: take"
                raise ValueError(
                    f"{what} {total} positions (BOS/EOS, text, BOI/EOI and image patches), "
                    f"more than seq_len={self.seq_len}; shorten it, raise seq_len or pass truncate=True"
                )
            while len(pieces) > 1 and total > self.seq_len:  # retrieved documents go first, in order
                pieces.pop(0)
                total -= sum(lengths.pop(0))
            if total > self.seq_len:
                pieces[0], lengths[0] = self._truncated(pieces[0], lengths[0])
        read_later = self.retrieval_mask == "visible"
        return [list(zip(piece, piece_lengths, self._timestep_caps(piece, read_later and k < len(pieces) - 1)))
                for k, (piece, piece_lengths) in enumerate(zip(pieces, lengths))]

    def _positions_taken(self, segment) -> int:
        """Row positions a segment takes: ``segment_length``, twice for an image with a clean copy."""
        length = segment_length(segment, self.config.patch_size)
        return 2 * length if self.clean_image_copies and segment.is_floating_point() else length

    def _timestep_caps(self, segments, read_later: bool) -> list[int]:
        """The largest timestep of each segment's image: ``image_first_t_max`` for an image that text of
        its document follows (it precedes its caption: the text should condition on a recognisable
        image) or that a later document reads (``read_later``), else ``num_timesteps - 1``."""
        has_text = [not s.is_floating_point() and bool((~torch.isin(s, special_tokens(self.config))).any())
                    for s in segments]
        caps = []
        for k, segment in enumerate(segments):
            capped = segment.is_floating_point() and (read_later or any(has_text[k + 1:]))
            caps.append(self.image_first_t_max if capped and self.image_first_t_max is not None
                        else self.config.num_timesteps - 1)
        return caps

    def _truncated(self, segments, lengths):
        """The longest prefix that fits: text cut anywhere, images kept whole or dropped."""
        kept, kept_lengths, room = [], [], self.seq_len
        for segment, length in zip(segments, lengths):
            if segment.is_floating_point():
                if length + 1 > room:  # the image and its EOI must fit
                    break
                kept.append(segment)
            else:
                kept.append(segment[:room])
                length = min(length, room)
            kept_lengths.append(length)
            room -= length
        if int(kept[-1][-1]) == self.config.boi_id:  # its image was cut: no BOI without an image
            kept[-1] = kept[-1][:-1]
            kept_lengths[-1] -= 1
        return kept, kept_lengths

    def _assign_rows(self, lengths: list[int]) -> list[list[int]]:
        """First fit: each document goes to the first row with room for it."""
        rows, room = [], []
        for doc, length in enumerate(lengths):
            for r, free in enumerate(room):
                if length <= free:
                    rows[r].append(doc)
                    room[r] -= length
                    break
            else:
                rows.append([doc])
                room.append(self.seq_len - length)
        if self.num_rows is not None:
            if len(rows) > self.num_rows:
                raise ValueError(
                    f"documents: need {len(rows)} rows of seq_len={self.seq_len}, more than num_rows={self.num_rows}"
                )
            rows += [[] for _ in range(self.num_rows - len(rows))]
        return rows

    # ------------------------------------------------------------------ the batch
    def _fill(self, groups, rows) -> PackedBatch:
        shape = (len(rows), self.seq_len)  # [B, S]
        tokens = torch.zeros(shape, dtype=torch.int64)
        positions = torch.zeros(shape, dtype=torch.int64)
        doc_ids = torch.full(shape, -1, dtype=torch.int64)  # attention spans
        document_ids = torch.full(shape, -1, dtype=torch.int64)  # documents: targets stop at their ends
        image_ids = torch.zeros(shape, dtype=torch.int64)
        hidden_ids = torch.zeros(shape, dtype=torch.int64)
        patches, grids, caps, clean = [], [], [], []
        patch_size = self.config.patch_size
        for r, row in enumerate(rows):
            p, span, document = 0, -1, 0
            for group in row:
                for k, piece in enumerate(groups[group]):
                    if k == 0 or self.retrieval_mask == "separate":  # a new attention span
                        span += 1
                        position = 0  # RoPE position inside the span
                    start = p
                    for segment, length, cap in piece:
                        if not segment.is_floating_point():
                            tokens[r, p:p + length] = segment
                            positions[r, p:p + length] = torch.arange(position, position + length)
                            p += length
                            position += length
                            continue
                        # An image; with clean copies its noisy copy, then the clean one at the same positions.
                        copies = ("noisy", "clean") if self.clean_image_copies else ("image",)
                        length //= len(copies)
                        for copy in copies:
                            patches.append(patchify(segment.float(), patch_size))  # [h*w, C*p*p]
                            grids.append((segment.shape[1] // patch_size, segment.shape[2] // patch_size))
                            caps.append(cap)
                            image_ids[r, p:p + length] = len(patches)
                            if copy == "noisy":
                                hidden_ids[r, p:p + length] = len(patches)
                            elif copy == "clean":
                                clean.append(len(patches) - 1)
                            positions[r, p:p + length] = torch.arange(position, position + length)
                            p += length
                        position += length
                    doc_ids[r, start:p] = span
                    document_ids[r, start:p] = document
                    document += 1
        is_text = (doc_ids >= 0) & (image_ids == 0)
        targets = torch.full(shape, IGNORE_INDEX, dtype=torch.int64)
        next_is_text = is_text[:, :-1] & is_text[:, 1:] & (document_ids[:, :-1] == document_ids[:, 1:])
        targets[:, :-1] = torch.where(next_is_text, tokens[:, 1:], IGNORE_INDEX)
        counts = torch.tensor([p.shape[0] for p in patches], dtype=torch.int64)  # [N] patches per image
        clean_images = torch.tensor(clean, dtype=torch.int64)
        timesteps = torch.zeros(len(caps), dtype=torch.int64)
        noisy = torch.ones(len(caps), dtype=torch.bool).index_fill_(0, clean_images, False)
        if bool(noisy.any()):  # a clean copy is read at t = 0: only the others draw a timestep
            t_max = torch.tensor(caps, dtype=torch.int64)[noisy]
            timesteps[noisy] = self.schedule.sample_timesteps(int(noisy.sum()), t_max=t_max,
                                                              generator=self.generator).to(torch.int64)
        if self.clean_image_copies:
            mask = tk.IntervalMask.from_segment_ids(doc_ids, torch.where(hidden_ids != 0, 0, image_ids), hidden_ids)
        else:
            mask = tk.IntervalMask.from_segment_ids(doc_ids, image_ids)
        return PackedBatch(
            tokens=tokens,
            positions=positions,
            targets=targets,
            doc_ids=doc_ids,
            image_ids=image_ids,
            patches=torch.cat(patches) if patches else torch.zeros(0, self.config.patch_dim),
            patch_offsets=torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]),
            image_grids=torch.tensor(grids, dtype=torch.int64).reshape(-1, 2),
            timesteps=timesteps,
            hidden_ids=hidden_ids,
            clean_images=clean_images,
            mask=mask,
            noise_seed=int(torch.randint(2**31 - 1, (), generator=self.generator)),
        )
