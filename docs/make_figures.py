"""Draw the README's mask figures: a packed Transfusion row, and a row with hidden spans, each as a
dense mask and as the intervals the kernels read.

    python docs/make_figures.py [OUT_DIR]     # writes OUT_DIR/transfusion_mask.png and
                                              # OUT_DIR/hidden_spans_mask.png (default: docs/)

``transfusion_mask.png``: ``mask.to_dense()`` for one packed row (two documents, three images,
padding), and the same mask as the kernels see it: for every query row ``q`` one interval
``[kv_start[q], kv_end[q])``. ``hidden_spans_mask.png``: a row where each image is there twice, a
noisy copy (a hidden span) then its clean copy, dense; and as the kernels see it: the row intervals,
and for each hidden key the queries allowed to see it (its own span). Needs matplotlib (the
``bench`` or ``test`` extra).
"""

from __future__ import annotations

import sys
from pathlib import Path

import tfkernels as tk

SEQ_LEN = 32
# Document 0: text, an image, text, an image, text. Document 1: text, an image. Then padding.
DOCUMENTS = [18, 11]
IMAGES = [(3, 7), (10, 14), (23, 27)]
FIGURE_NAME = "transfusion_mask.png"
# One document, then padding: text, a noisy copy (hidden), its clean copy, text, another pair, text.
HIDDEN_DOCUMENTS = [28]
HIDDEN = [(3, 8), (16, 20)]
CLEAN = [(8, 13), (20, 24)]
HIDDEN_FIGURE_NAME = "hidden_spans_mask.png"


def example_mask() -> tk.IntervalMask:
    return tk.IntervalMask.from_spans(SEQ_LEN, images=[IMAGES], documents=[DOCUMENTS])


def example_hidden_mask() -> tk.IntervalMask:
    return tk.IntervalMask.from_spans(SEQ_LEN, images=[CLEAN], documents=[HIDDEN_DOCUMENTS], hidden=[HIDDEN])


def draw(out_dir: Path) -> Path:
    """Write the figure into ``out_dir`` and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    mask = example_mask()
    dense = mask.to_dense()[0].int()  # [Sq, Sk]
    kind = dense.clone()  # 0 hidden, 1 visible (causal text), 2 visible inside an image span
    for start, end in IMAGES:
        kind[start:end, start:end] *= 2
    kv_start, kv_end = mask.kv_start[0].tolist(), mask.kv_end[0].tolist()

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5.4))
    colours = ListedColormap(["#f2f2f2", "#4c72b0", "#dd8452"])
    left.imshow(kind.numpy(), cmap=colours, vmin=0, vmax=2, interpolation="nearest")
    left.set_title("mask.to_dense(): query row q sees key k")
    right.set_title("the kernels' view: one interval [kv_start, kv_end) per row")
    for q, (start, end) in enumerate(zip(kv_start, kv_end)):
        if end > start:
            right.barh(q, end - start, left=start - 0.5, height=0.8, color="#4c72b0")
        else:
            right.plot([start - 0.5], [q], marker="x", color="#c44e52", markersize=5)
    right.set_xlim(-0.5, SEQ_LEN - 0.5)
    right.set_ylim(SEQ_LEN - 0.5, -0.5)
    for axis in (left, right):
        axis.set_xlabel("key position k")
        axis.set_ylabel("query position q")
        boundaries = [sum(DOCUMENTS[: i + 1]) for i in range(len(DOCUMENTS))]
        for b in boundaries:
            axis.axhline(b - 0.5, color="black", linewidth=0.8)
            axis.axvline(b - 0.5, color="black", linewidth=0.8)
    left.legend(handles=[Patch(color="#4c72b0", label="causal (text)"),
                         Patch(color="#dd8452", label="bidirectional (image span)"),
                         Patch(color="#f2f2f2", label="hidden (other document, future)")],
                loc="lower left", fontsize=8)
    right.legend(handles=[Patch(color="#4c72b0", label="visible interval"),
                          plt.Line2D([], [], color="#c44e52", marker="x", linestyle="", label="padding: empty")],
                 loc="lower left", fontsize=8)
    fig.suptitle(f"One packed row: documents of {DOCUMENTS[0]} and {DOCUMENTS[1]} tokens, images at "
                 f"{', '.join(f'[{s}, {e})' for s, e in IMAGES)}, {SEQ_LEN - sum(DOCUMENTS)} padding tokens")
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FIGURE_NAME
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_hidden(out_dir: Path) -> Path:
    """Write the hidden-span figure into ``out_dir`` and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    mask = example_hidden_mask()
    dense = mask.to_dense()[0].int()  # [Sq, Sk]
    envelope = tk.IntervalMask(mask.kv_start, mask.kv_end, SEQ_LEN).to_dense()[0]
    # 0 not seen, 1 causal, 2 inside a clean image, 3 inside a hidden span, 4 a hole: inside the row's interval
    # but a hidden span the row is not in.
    kind = dense.clone()
    for (start, end), value in [(span, 2) for span in CLEAN] + [(span, 3) for span in HIDDEN]:
        kind[start:end, start:end] *= value
    kind[envelope & ~dense.bool()] = 4
    kv_start, kv_end = mask.kv_start[0].tolist(), mask.kv_end[0].tolist()
    key_q_start, key_q_end = mask.key_q_start[0].tolist(), mask.key_q_end[0].tolist()

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5.4))
    colours = ListedColormap(["#f2f2f2", "#4c72b0", "#dd8452", "#55a868", "#f4c7c3"])
    left.imshow(kind.numpy(), cmap=colours, vmin=0, vmax=4, interpolation="nearest")
    left.set_title("mask.to_dense(): query row q sees key k")
    right.set_title("the kernels' view: [kv_start, kv_end) per row,\n[key_q_start, key_q_end) per hidden key")
    for q, (start, end) in enumerate(zip(kv_start, kv_end)):
        if end > start:
            right.barh(q, end - start, left=start - 0.5, height=0.8, color="#c6d4ea")
        else:
            right.plot([start - 0.5], [q], marker="x", color="#c44e52", markersize=5)
    for k, (start, end) in enumerate(zip(key_q_start, key_q_end)):
        if (start, end) != (0, SEQ_LEN):  # a hidden key: only its span's queries
            right.bar(k, end - start, bottom=start - 0.5, width=0.8, color="#55a868")
    right.set_xlim(-0.5, SEQ_LEN - 0.5)
    right.set_ylim(SEQ_LEN - 0.5, -0.5)
    for axis in (left, right):
        axis.set_xlabel("key position k")
        axis.set_ylabel("query position q")
        axis.axhline(HIDDEN_DOCUMENTS[0] - 0.5, color="black", linewidth=0.8)
        axis.axvline(HIDDEN_DOCUMENTS[0] - 0.5, color="black", linewidth=0.8)
    left.legend(handles=[Patch(color="#4c72b0", label="causal (text)"),
                         Patch(color="#dd8452", label="bidirectional (clean copy)"),
                         Patch(color="#55a868", label="bidirectional (noisy copy, hidden)"),
                         Patch(color="#f4c7c3", label="hole: a hidden span outside the row's own")],
                loc="lower left", fontsize=8)
    right.legend(handles=[Patch(color="#c6d4ea", label="row interval"),
                          Patch(color="#55a868", label="a hidden key's queries"),
                          plt.Line2D([], [], color="#c44e52", marker="x", linestyle="", label="padding: empty")],
                 loc="lower left", fontsize=8)
    fig.suptitle(f"One row with clean copies: noisy (hidden) {', '.join(f'[{s}, {e})' for s, e in HIDDEN)}, "
                 f"clean {', '.join(f'[{s}, {e})' for s, e in CLEAN)}, {SEQ_LEN - sum(HIDDEN_DOCUMENTS)} padding "
                 f"tokens")
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / HIDDEN_FIGURE_NAME
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
    print(draw(target))
    print(draw_hidden(target))
