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
normalised to [-1, 1]; a missing or unreadable image is skipped with a warning and counted. Every
other problem with the file is a ``DataError`` (a ``ValueError``) whose message is one line
starting with ``file:line:`` and saying what is wrong, raised while loading, never hours later.

Images are float32 ``[3, H, W]`` in [-1, 1] (black background = -1).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from tfkernels._checks import check_choice, check_int

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
MAX_IMAGE_SIZE = 1024  # render's sub-pixel grid is (4 S)^2 floats per shape
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


class DataError(ValueError):
    """A user data file is wrong: the message starts with ``file:line:`` (or ``file:``) and says what."""


class MissingDataError(DataError, FileNotFoundError):
    """A user data file is not there (also a ``FileNotFoundError``)."""


@dataclass(frozen=True)
class Shape:
    """One shape of a scene: a colour name, a shape name and a position name."""

    colour: str
    shape: str
    position: str

    def __post_init__(self):
        for name, value, allowed in (("colour", self.colour, COLOURS), ("shape", self.shape, SHAPES),
                                     ("position", self.position, POSITIONS)):
            check_choice(f"Shape.{name}", value, tuple(allowed))


def caption(shapes) -> str:
    """``"a red circle at the top left"``; several shapes are joined by ``" and "``."""
    shapes = _check_shapes(shapes)
    return " and ".join(f"a {s.colour} {s.shape} at the {s.position}" for s in shapes)


_CAPTION_PART = re.compile(
    rf"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) at the ({'|'.join(POSITIONS)})"
)


def parse_caption(text: str) -> list[Shape] | None:
    """The shapes a caption names, or ``None`` when it is not a caption of this data set."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
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
    check_int("image_size", image_size, _GRID, MAX_IMAGE_SIZE)
    if image_size % _GRID:
        raise ValueError(f"image_size: expected a multiple of {_GRID}, got {image_size!r}")
    if rng is not None and not isinstance(rng, random.Random):
        raise TypeError(f"rng: expected None or a random.Random, got {type(rng).__name__}")
    shapes = _check_shapes(shapes)
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


def _check_shapes(shapes) -> list[Shape]:
    if isinstance(shapes, (str, bytes)) or not isinstance(shapes, (list, tuple)):
        raise TypeError(f"shapes: expected a list of Shape, got {type(shapes).__name__}")
    for i, shape in enumerate(shapes):
        if not isinstance(shape, Shape):
            raise TypeError(f"shapes[{i}]: expected a Shape, got {type(shape).__name__}")
    return list(shapes)


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
        check_int("num_samples", num_samples, 1)
        check_int("seed", seed)
        check_choice("split", split, SPLITS)
        check_int("max_shapes", max_shapes, 1, 2)
        render([], image_size)  # validates image_size
        self.num_samples, self.seed, self.split = num_samples, seed, split
        self.image_size, self.max_shapes = image_size, max_shapes

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> CaptionedImage:
        if not is_int(index):
            raise TypeError(f"index: expected an int, got {index!r}")
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        rng = random.Random(f"{self.seed}:{self.split}:{index}")  # str seeds hash the same in every run
        count = rng.randint(1, self.max_shapes)
        positions = rng.sample(sorted(POSITIONS), count)
        shapes = [Shape(rng.choice(sorted(COLOURS)), rng.choice(SHAPES), p) for p in positions]
        shapes.sort(key=lambda s: list(POSITIONS).index(s.position))  # captions read in reading order
        return CaptionedImage(render(shapes, self.image_size, rng), caption(shapes), shapes)

    @functools.cached_property
    def longest_caption_bytes(self) -> int:
        """UTF-8 bytes of the longest caption this data set can draw (every scene of ``max_shapes``)."""
        singles = [Shape(c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS]
        longest = max(len(caption([s]).encode()) for s in singles)
        if self.max_shapes == 2:
            longest = max(len(caption([a, b]).encode()) for a in singles for b in singles if a.position != b.position)
        return longest

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
    if not isinstance(image, torch.Tensor) or not image.is_floating_point():
        raise TypeError(f"image: expected a float tensor [3, S, S], got "
                        f"{image.dtype if isinstance(image, torch.Tensor) else type(image).__name__}")
    if image.ndim != 3 or image.shape[0] != 3 or image.shape[1] != image.shape[2] or image.shape[1] < 1:
        raise ValueError(f"image: expected a square RGB image [3, S, S], got shape {tuple(image.shape)}")
    # A NaN pixel (a diverged model's) reads as background; infinities clamp to either end.
    rgb = ((image.detach().float().cpu().nan_to_num(nan=-1.0) + 1) / 2).clamp(0, 1)
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
        if min(moment(offsets, 2) for offsets in (dy, dx, dx + dy, dx - dy)) <= 0:
            continue  # a single row or column of pixels: no shape to read (images of a few pixels)
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


def _no_duplicate_keys(pairs):
    keys = [key for key, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise ValueError(f"key {key!r} appears more than once")
    return dict(pairs)


def _utf8(text: str) -> bytes | None:
    """``text`` in UTF-8, or ``None`` if it holds a lone surrogate (JSON's ``"\\ud800"``)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return None


class CaptionedImageFolder:
    """User data: a JSONL file of ``{"image": path, "caption": text}`` lines and their images.

    Image paths are relative to the JSONL file's folder (or absolute). Every image is read once
    with Pillow, converted to RGB, centre-cropped to a square, resized to ``image_size`` and
    normalised to [-1, 1]. An image that is missing or cannot be decoded is skipped with a
    warning; ``skipped`` lists ``(line number, reason)`` of each. Lines are split on ``"\\n"``
    only (a raw U+2028 or U+0085 inside a caption is text), blank lines are skipped.

    Everything else raises ``DataError`` (a ``ValueError``) naming ``file:line`` and the fault,
    while loading: a line that is not UTF-8 or not JSON (or has a key twice), that is not an
    object with string ``image`` and ``caption``, an empty image path or one with a NUL byte, a
    lone surrogate in either string, a caption of more than ``max_caption_bytes`` UTF-8 bytes
    (every such line is counted; ``None``: no limit), no readable image at all. A missing JSONL
    file raises ``MissingDataError`` (a ``DataError`` and a ``FileNotFoundError``).

    ``lines[i]`` is the line of item ``i``; ``fingerprint`` (``{"bytes", "sha256"}``) covers the
    JSONL file and every image file it names (a missing one counts as missing), so that a run can
    tell that the data changed.
    """

    def __init__(self, jsonl_path, *, image_size: int = 16, max_caption_bytes: int | None = None):
        try:
            from PIL import Image
        except ImportError as error:
            raise ImportError("CaptionedImageFolder needs Pillow: pip install 'tfkernels[train]'") from error
        if not isinstance(jsonl_path, (str, os.PathLike)):
            raise TypeError(f"jsonl_path: expected a str or os.PathLike, got {type(jsonl_path).__name__}")
        if "\0" in os.fspath(jsonl_path):
            raise ValueError(f"jsonl_path: contains a NUL byte: {jsonl_path!r}")
        check_int("image_size", image_size, 1)
        if max_caption_bytes is not None:
            check_int("max_caption_bytes", max_caption_bytes, 0)
        path = Path(jsonl_path)
        if not path.is_file():
            raise MissingDataError(f"{path}: no such file")
        try:
            raw = path.read_bytes()
        except OSError as error:
            raise DataError(f"{path}: cannot be read ({error.strerror or error})") from None
        self.image_size = image_size
        self.images, self.captions, self.lines, self.skipped = [], [], [], []
        digest, total = hashlib.sha256(raw), len(raw)
        too_long = []
        for line_number, line in enumerate(raw.split(b"\n"), start=1):
            where = f"{path}:{line_number}"
            if line_number == 1 and line.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark
                line = line[3:]
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{where}: not UTF-8 (byte 0x{line[error.start]:02x} at column {error.start + 1})"
                                ) from None
            if not text.strip():
                continue
            try:
                record = json.loads(text, object_pairs_hook=_no_duplicate_keys)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: not JSON ({error.msg} at column {error.colno})") from None
            except (ValueError, RecursionError) as error:
                raise DataError(f"{where}: not JSON ({error})") from None
            if not (isinstance(record, dict) and isinstance(record.get("image"), str)
                    and isinstance(record.get("caption"), str)):
                raise DataError(f"{where}: expected an object with string 'image' and 'caption'")
            image_name, caption_text = record["image"], record["caption"]
            if not image_name:
                raise DataError(f"{where}: 'image' is an empty path")
            if "\0" in image_name:
                raise DataError(f"{where}: 'image' contains a NUL byte: {image_name!r}")
            for key, value in (("image", image_name), ("caption", caption_text)):
                if _utf8(value) is None:
                    raise DataError(f"{where}: '{key}' holds a lone surrogate (not Unicode text): {value!r}")
            caption_bytes = len(caption_text.encode("utf-8"))
            if max_caption_bytes is not None and caption_bytes > max_caption_bytes:
                too_long.append((line_number, caption_bytes))
            image_path = path.parent / image_name
            digest.update(b"\0" + image_name.encode("utf-8") + b"\0")
            try:
                data = image_path.read_bytes()
            except OSError as error:
                digest.update(b"missing")
                self._skip(where, line_number, f"{image_path}: {type(error).__name__}: {error.strerror or error}")
                continue
            digest.update(hashlib.sha256(data).digest())
            total += len(data)
            try:
                with Image.open(io.BytesIO(data)) as opened:
                    picture = opened.convert("RGB")  # decodes the whole file: truncation fails here
                pixels = self._normalised(picture, Image)
            except Exception as error:  # noqa: BLE001 - any decoder failure: Pillow raises many kinds
                self._skip(where, line_number, f"{image_path}: {type(error).__name__}: {error}")
                continue
            self.images.append(pixels)
            self.captions.append(caption_text)
            self.lines.append(line_number)
        if too_long:
            line_number, length = too_long[0]
            raise DataError(
                f"{path}:{line_number}: caption of {length} bytes, more than the {max_caption_bytes} a training row "
                f"has room for with its image ({len(too_long)} such lines; the longest has "
                f"{max(n for _, n in too_long)} bytes): shorten them or raise --seq-len"
            )
        if not self.images:
            raise DataError(f"{path}: no readable image ({len(self.skipped)} skipped)")
        self.fingerprint = {"bytes": total, "sha256": digest.hexdigest()}

    def _skip(self, where: str, line_number: int, reason: str) -> None:
        warnings.warn(f"{where}: skipping unreadable image {reason}", stacklevel=3)
        self.skipped.append((line_number, reason))

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
        if not is_int(index):
            raise TypeError(f"index: expected an int, got {index!r}")
        if not 0 <= index < len(self.images):
            raise IndexError(f"index {index} out of range for {len(self.images)} images")
        return CaptionedImage(self.images[index], self.captions[index])


def _check_data(name: str, value) -> None:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name}: expected \"shapes\" or a JSONL path, got {type(value).__name__}")


def training_set(data: str, *, image_size: int = 16, max_shapes: int = 1, train_samples: int = 100_000,
                 seed: int = 0, max_caption_bytes: int | None = None):
    """The training data a run names: ``"shapes"`` (the embedded data set, ``train_samples``
    scenes) or a JSONL file (``CaptionedImageFolder``, captions of at most ``max_caption_bytes``)."""
    _check_data("data", data)
    if data == "shapes":
        return ShapesDataset(train_samples, seed=seed, image_size=image_size, max_shapes=max_shapes)
    return CaptionedImageFolder(data, image_size=image_size, max_caption_bytes=max_caption_bytes)


def heldout_set(data: str, heldout_data: str | None = None, *, image_size: int = 16, max_shapes: int = 1,
                heldout_samples: int = 48, seed: int = 0):
    """The held-out data of a run: the embedded data set's ``heldout`` split (``heldout_samples``
    scenes), or for a JSONL data set the JSONL file ``heldout_data`` (``None``: none)."""
    _check_data("data", data)
    if heldout_data is not None:
        _check_data("heldout_data", heldout_data)
    if data == "shapes":
        if heldout_data is not None:
            raise ValueError("heldout_data: only for a JSONL data set; the embedded one has its own held-out split")
        return ShapesDataset(heldout_samples, seed=seed, split="heldout", image_size=image_size,
                             max_shapes=max_shapes)
    return CaptionedImageFolder(heldout_data, image_size=image_size) if heldout_data is not None else None


__all__ = [
    "COLOURS", "POSITIONS", "SHAPES", "CaptionedImage", "CaptionedImageFolder", "DataError", "MissingDataError",
    "Shape", "ShapesDataset",
    "caption", "detect_shapes", "heldout_set", "parse_caption", "render", "training_set",
]
