"""Captioned images: the embedded procedural data set, its detector, and a loader for user data.

The embedded data set (``ShapesDataset``) needs no download: each sample is a small RGB image of
one or two coloured shapes, each in a named quadrant, with its caption, e.g.

    "a red circle at the top left"
    "a red circle at the top left and a blue square at the bottom right"

Sample ``i`` of a split is a pure function of ``(seed, split, i)``. Shapes are drawn with
jittered size and position, always inside their quadrant with a margin, so that shapes never
touch and ``detect_shapes`` can read any image back: it finds the shapes of an image (generated
or rendered) by colour, shape and position, which is how ``transfusion_core.evaluate`` judges
text -> image generation.

User data (``CaptionedImageFolder``): a JSONL file of ``{"image": path, "caption": text}`` lines,
paths relative to the file's folder, loaded with Pillow, centre-cropped to a square, resized and
normalised to [-1, 1]; a missing or unreadable image is skipped with a warning and counted.

Images are float32 ``[3, H, W]`` in [-1, 1] (black background = -1).
"""

from __future__ import annotations

import functools
import json
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import is_int

# Pure colours far apart in RGB, so that even a blurry generated shape has one nearest colour.
COLOURS = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
}
SHAPES = ("circle", "square", "triangle")
# Quadrants as (row, column) halves of the image.
POSITIONS = {"top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1)}
SPLITS = ("train", "heldout")

# Geometry on a 16-pixel grid (scaled to the image size). A quadrant is 8 pixels wide; a shape's
# half extent is at most 2.7 and its centre at most 0.3 from the quadrant's centre, so it covers
# at most [1, 7] of its quadrant: the pixels on the quadrant's border stay black and shapes of
# neighbouring quadrants never touch.
_GRID = 16
_HALF_EXTENT = (2.2, 2.7)
_CENTRE_JITTER = 0.3
_SUBSAMPLES = 4  # anti-aliasing: each pixel is the coverage of 4 x 4 sub-pixel samples

# detect_shapes: a pixel belongs to a shape when its coverage (brightest channel, in [0, 1]) is
# above this; components whose coverage sums to less than this fraction of the smallest
# rendered shape's area are specks.
_FOREGROUND = 0.3
_MIN_AREA_FRACTION = 0.3
# Shape from moments of the coverage, robust to pixelation. An upward triangle's vertical profile
# is skewed (-0.57 for a continuous one; -0.38 or less rendered at 16 pixels), a square's or
# disc's is not (|skew| <= 0.13). A square's marginal is flat along its sides (kurtosis 1.8) and
# peaked along its diagonals (2.4); a disc's is the same in every direction: the difference is
# >= 0.48 for rendered squares and <= 0.16 for discs and triangles.
_TRIANGLE_SKEW = 0.25
_SQUARE_KURTOSIS_GAP = 0.3


@dataclass(frozen=True)
class Shape:
    """One shape of a scene: a colour name, a shape name and a position name."""

    colour: str
    shape: str
    position: str

    def __post_init__(self):
        for name, value, allowed in (("colour", self.colour, COLOURS), ("shape", self.shape, SHAPES),
                                     ("position", self.position, POSITIONS)):
            if value not in allowed:
                raise ValueError(f"Shape.{name}: expected one of {tuple(allowed)}, got {value!r}")


def caption(shapes) -> str:
    """``"a red circle at the top left"``; several shapes are joined by ``" and "``."""
    return " and ".join(f"a {s.colour} {s.shape} at the {s.position}" for s in shapes)


_CAPTION_PART = re.compile(
    rf"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) at the ({'|'.join(POSITIONS)})"
)


def parse_caption(text: str) -> list[Shape] | None:
    """The shapes a caption names, or ``None`` when it is not a caption of this data set."""
    parts = text.split(" and ")
    shapes = []
    for part in parts:
        match = _CAPTION_PART.fullmatch(part)
        if match is None:
            return None
        shapes.append(Shape(*match.groups()))
    return shapes


def render(shapes, image_size: int = 16, rng: random.Random | None = None) -> torch.Tensor:
    """Draw shapes, each in its quadrant, on a black image: float32 ``[3, S, S]`` in [-1, 1].

    ``rng`` draws each shape's size and centre jitter; ``None`` draws them centred, mid-size.
    """
    if not is_int(image_size, _GRID) or image_size % _GRID:
        raise ValueError(f"image_size: expected a multiple of {_GRID}, got {image_size!r}")
    positions = [s.position for s in shapes]
    if len(set(positions)) != len(positions):
        raise ValueError(f"shapes: at most one shape per position, got positions {positions}")
    ys, xs = _subpixel_centres(image_size)
    image = torch.zeros(3, image_size, image_size)
    for s in shapes:
        if rng is None:
            half, jitter_y, jitter_x = sum(_HALF_EXTENT) / 2, 0.0, 0.0
        else:
            half = rng.uniform(*_HALF_EXTENT)
            jitter_y = rng.uniform(-_CENTRE_JITTER, _CENTRE_JITTER)
            jitter_x = rng.uniform(-_CENTRE_JITTER, _CENTRE_JITTER)
        row, column = POSITIONS[s.position]
        dy = ys - (_GRID / 4 * (2 * row + 1) + jitter_y)
        dx = xs - (_GRID / 4 * (2 * column + 1) + jitter_x)
        if s.shape == "square":
            inside = (dx.abs() <= half) & (dy.abs() <= half)
        elif s.shape == "circle":
            inside = dx**2 + dy**2 <= half**2
        else:  # a triangle pointing up: apex at -half, base at +half, as wide as it is high
            inside = (dy.abs() <= half) & (dx.abs() <= (dy + half) / 2)
        coverage = torch.nn.functional.avg_pool2d(inside[None].float(), _SUBSAMPLES)[0]  # [S, S]
        image += torch.tensor(COLOURS[s.colour])[:, None, None] * coverage
    return image * 2 - 1


@functools.lru_cache(maxsize=4)
def _subpixel_centres(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every sub-pixel sample centre, in grid units: ``[S*k, S*k]`` each."""
    centres = (torch.arange(image_size * _SUBSAMPLES, dtype=torch.float32) + 0.5) * _GRID / (image_size * _SUBSAMPLES)
    return torch.meshgrid(centres, centres, indexing="ij")


@dataclass
class CaptionedImage:
    image: torch.Tensor  # float32 [3, H, W] in [-1, 1]
    caption: str
    shapes: list[Shape] | None = None  # the scene, for the embedded data set


class ShapesDataset:
    """The embedded data set: ``num_samples`` captioned scenes of ``split``, rendered on demand.

    Args:
        num_samples: size of the split.
        seed: with ``split`` and the index, determines every sample.
        split: ``"train"`` or ``"heldout"`` (same scenes, other draws of size and position).
        image_size: image side, a multiple of 16.
        max_shapes: shapes per image, uniform in ``1..max_shapes`` (1 or 2).
    """

    def __init__(self, num_samples: int, *, seed: int = 0, split: str = "train", image_size: int = 16,
                 max_shapes: int = 1):
        if not is_int(num_samples, 1):
            raise ValueError(f"num_samples: expected an int >= 1, got {num_samples!r}")
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
        if max_shapes not in (1, 2):
            raise ValueError(f"max_shapes: expected 1 or 2, got {max_shapes!r}")
        render([], image_size)  # validates image_size
        self.num_samples, self.seed, self.split = num_samples, seed, split
        self.image_size, self.max_shapes = image_size, max_shapes

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> CaptionedImage:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        rng = random.Random(f"{self.seed}:{self.split}:{index}")  # str seeds hash the same in every run
        count = rng.randint(1, self.max_shapes)
        positions = rng.sample(sorted(POSITIONS), count)
        shapes = [Shape(rng.choice(sorted(COLOURS)), rng.choice(SHAPES), p) for p in positions]
        shapes.sort(key=lambda s: list(POSITIONS).index(s.position))  # captions read in reading order
        return CaptionedImage(render(shapes, self.image_size, rng), caption(shapes), shapes)

    def chance(self) -> dict[str, float]:
        """Accuracy of a uniform random guess among one-shape scenes: per attribute and exact."""
        return {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "position": 1 / len(POSITIONS),
                "exact": 1 / (len(COLOURS) * len(SHAPES) * len(POSITIONS))}


def detect_shapes(image: torch.Tensor) -> list[Shape]:
    """The shapes in an image ``[3, H, W]`` in [-1, 1], in reading order of their positions.

    Deterministic. A pixel's coverage is its brightest channel (in [0, 1]). Each 8-connected
    component of pixels covered more than ``_FOREGROUND``, widened by one pixel to take in its
    soft edge, is a shape unless it is a speck; its pixels weighted by coverage give its colour
    (the palette colour nearest its mean colour, brightness divided out), its position (the
    quadrant of its centroid) and its shape (from its moments: see ``_TRIANGLE_SKEW``).
    """
    if image.ndim != 3 or image.shape[0] != 3 or image.shape[1] != image.shape[2]:
        raise ValueError(f"image: expected a square RGB image [3, S, S], got shape {tuple(image.shape)}")
    rgb = ((image.detach().float().cpu() + 1) / 2).clamp(0, 1)
    size = rgb.shape[1]
    coverage = rgb.amax(dim=0)  # [S, S]
    min_area = _MIN_AREA_FRACTION * 2 * (_HALF_EXTENT[0] * size / _GRID) ** 2  # smallest triangle
    palette = torch.tensor(list(COLOURS.values()))  # [K, 3]
    centres = torch.arange(size, dtype=torch.float32) + 0.5
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    found = []
    for pixels in _components(coverage > _FOREGROUND):
        region = torch.zeros(1, size, size)
        region[0, pixels[:, 0], pixels[:, 1]] = 1
        region = torch.nn.functional.max_pool2d(region, 3, stride=1, padding=1)[0]  # + one pixel around
        weights = coverage * region
        area = float(weights.sum())
        if area < min_area:
            continue
        colour_sum = (rgb * weights).sum(dim=(1, 2))
        hue = colour_sum / colour_sum.max()
        colour = list(COLOURS)[int((palette - hue).square().sum(dim=1).argmin())]
        centre_y, centre_x = float((weights * ys).sum()) / area, float((weights * xs).sum()) / area
        position = next(name for name, (r, c) in POSITIONS.items()
                        if (centre_y >= size / 2) == bool(r) and (centre_x >= size / 2) == bool(c))

        def moment(offsets, order, weights=weights, area=area):
            return float((weights * offsets**order).sum()) / area

        def kurtosis(offsets):
            return moment(offsets, 4) / moment(offsets, 2) ** 2

        dy, dx = ys - centre_y, xs - centre_x
        skew = moment(dy, 3) / moment(dy, 2) ** 1.5
        kurtosis_gap = (kurtosis(dx + dy) + kurtosis(dx - dy) - kurtosis(dx) - kurtosis(dy)) / 2
        if abs(skew) > _TRIANGLE_SKEW:
            shape = "triangle"
        else:
            shape = "square" if kurtosis_gap > _SQUARE_KURTOSIS_GAP else "circle"
        found.append(Shape(colour, shape, position))
    return sorted(found, key=lambda s: list(POSITIONS).index(s.position))


def _components(mask: torch.Tensor) -> list[torch.Tensor]:
    """8-connected components of a boolean ``[H, W]`` mask, each as int64 ``[n, 2]`` (row, column)."""
    todo = {(int(r), int(c)) for r, c in mask.nonzero().tolist()}
    components = []
    while todo:
        stack = [min(todo)]
        todo.remove(stack[0])
        component = []
        while stack:
            r, c = stack.pop()
            component.append((r, c))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    neighbour = (r + dr, c + dc)
                    if neighbour in todo:
                        todo.remove(neighbour)
                        stack.append(neighbour)
        components.append(torch.tensor(component))
    return components


class CaptionedImageFolder:
    """User data: a JSONL file of ``{"image": path, "caption": text}`` lines and their images.

    Image paths are relative to the JSONL file's folder (or absolute). Every image is read once
    with Pillow, converted to RGB, centre-cropped to a square, resized to ``image_size`` and
    normalised to [-1, 1]. An image that is missing or cannot be decoded is skipped with a
    warning; ``skipped`` lists ``(line number, reason)`` of each. A line that is not a JSON object
    with string ``image`` and ``caption`` raises ``ValueError`` naming the file and line.
    """

    def __init__(self, jsonl_path, *, image_size: int = 16):
        try:
            from PIL import Image, UnidentifiedImageError
        except ImportError as error:
            raise ImportError("CaptionedImageFolder needs Pillow: pip install 'tfkernels[train]'") from error
        if not is_int(image_size, 1):
            raise ValueError(f"image_size: expected an int >= 1, got {image_size!r}")
        path = Path(jsonl_path)
        if not path.is_file():
            raise FileNotFoundError(f"jsonl_path: {path} is not a file")
        self.image_size = image_size
        self.images, self.captions, self.skipped = [], [], []
        for line_number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not JSON ({error.msg})") from None
            if not (isinstance(record, dict) and isinstance(record.get("image"), str)
                    and isinstance(record.get("caption"), str)):
                raise ValueError(f"{path}:{line_number}: expected an object with string 'image' and 'caption'")
            image_path = path.parent / record["image"]
            try:
                with Image.open(image_path) as opened:
                    picture = opened.convert("RGB")  # decodes the whole file: truncation fails here
            except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as error:
                reason = f"{image_path}: {type(error).__name__}: {error}"
                warnings.warn(f"{path}:{line_number}: skipping unreadable image {reason}", stacklevel=2)
                self.skipped.append((line_number, reason))
                continue
            self.images.append(self._normalised(picture, Image))
            self.captions.append(record["caption"])
        if not self.images:
            raise ValueError(f"{path}: no readable image ({len(self.skipped)} skipped)")

    def _normalised(self, picture, image_module) -> torch.Tensor:
        side = min(picture.size)
        left, top = (picture.width - side) // 2, (picture.height - side) // 2
        square = picture.crop((left, top, left + side, top + side))
        resized = square.resize((self.image_size, self.image_size), image_module.Resampling.BICUBIC)
        pixels = torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8)
        return pixels.view(self.image_size, self.image_size, 3).permute(2, 0, 1).float() / 127.5 - 1

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> CaptionedImage:
        return CaptionedImage(self.images[index], self.captions[index])


def training_set(data: str, *, image_size: int = 16, max_shapes: int = 1, train_samples: int = 100_000,
                 seed: int = 0):
    """The training data a run names: ``"shapes"`` (the embedded data set, ``train_samples``
    scenes) or a JSONL file (``CaptionedImageFolder``)."""
    if data == "shapes":
        return ShapesDataset(train_samples, seed=seed, image_size=image_size, max_shapes=max_shapes)
    return CaptionedImageFolder(data, image_size=image_size)


def heldout_set(data: str, heldout_data: str | None = None, *, image_size: int = 16, max_shapes: int = 1,
                heldout_samples: int = 48, seed: int = 0):
    """The held-out data of a run: the embedded data set's ``heldout`` split (``heldout_samples``
    scenes), or for a JSONL data set the JSONL file ``heldout_data`` (``None``: none)."""
    if data == "shapes":
        if heldout_data is not None:
            raise ValueError("heldout_data: only for a JSONL data set; the embedded one has its own held-out split")
        return ShapesDataset(heldout_samples, seed=seed, split="heldout", image_size=image_size,
                             max_shapes=max_shapes)
    return CaptionedImageFolder(heldout_data, image_size=image_size) if heldout_data is not None else None


__all__ = [
    "COLOURS", "POSITIONS", "SHAPES", "CaptionedImage", "CaptionedImageFolder", "Shape", "ShapesDataset",
    "caption", "detect_shapes", "heldout_set", "parse_caption", "render", "training_set",
]
