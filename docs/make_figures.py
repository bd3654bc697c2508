"""Draw the README's mask figure: a packed Transfusion row as a dense mask and as key intervals.

    python docs/make_figures.py [OUT_DIR]     # writes OUT_DIR/transfusion_mask.png (default: docs/)

The left panel is ``mask.to_dense()`` for one packed row (two documents, three images, padding);
the right panel is the same mask as the kernels see it: for every query row ``q`` one interval
``[kv_start[q], kv_end[q])``. Needs matplotlib (the ``bench`` or ``test`` extra).
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


def example_mask() -> tk.IntervalMask:
    return tk.IntervalMask.from_spans(SEQ_LEN, images=[IMAGES], documents=[DOCUMENTS])


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


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
    print(draw(target))
