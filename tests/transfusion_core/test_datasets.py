"""The embedded captioned-shapes data set, its detector, and the user-data loader."""

import itertools
import json
import random

import pytest
import torch

from transfusion_core.datasets import (
    _CENTRE_JITTER,
    _HALF_EXTENT,
    COLOURS,
    POSITIONS,
    SHAPES,
    CaptionedImageFolder,
    DataError,
    MissingDataError,
    Shape,
    ShapesDataset,
    caption,
    detect_shapes,
    heldout_set,
    parse_caption,
    render,
)


def test_samples_are_a_function_of_seed_split_and_index():
    a, b = ShapesDataset(50, seed=3), ShapesDataset(50, seed=3)
    for i in (0, 17, 49):
        assert a[i].caption == b[i].caption and torch.equal(a[i].image, b[i].image)
    heldout = ShapesDataset(50, seed=3, split="heldout")
    other_seed = ShapesDataset(50, seed=4)
    assert any(not torch.equal(a[i].image, heldout[i].image) for i in range(10))
    assert any(not torch.equal(a[i].image, other_seed[i].image) for i in range(10))


def test_samples_cover_every_scene_and_look_right():
    dataset = ShapesDataset(600, seed=0)
    scenes = {tuple(dataset[i].shapes) for i in range(len(dataset))}
    assert len(scenes) == len(COLOURS) * len(SHAPES) * len(POSITIONS)
    item = dataset[0]
    assert item.image.shape == (3, 16, 16) and item.image.dtype == torch.float32
    assert item.image.min() == -1 and item.image.max() == 1  # black background, pure colour inside
    assert item.caption == caption(item.shapes) and parse_caption(item.caption) == item.shapes
    two = ShapesDataset(200, seed=0, max_shapes=2)
    counts = {len(two[i].shapes) for i in range(len(two))}
    assert counts == {1, 2}


def test_captions_round_trip_and_other_text_is_rejected():
    shapes = [Shape("red", "circle", "top left"), Shape("blue", "square", "bottom right")]
    text = caption(shapes)
    assert text == "a red circle at the top left and a blue square at the bottom right"
    assert parse_caption(text) == shapes
    for bad in ("", "a red circle", "a purple circle at the top left", "a red circle at the top left and",
                "a red circle at the top left."):
        assert parse_caption(bad) is None, bad


@pytest.mark.parametrize("image_size", [16, 32])
@pytest.mark.parametrize("max_shapes", [1, 2])
def test_detector_reads_rendered_images_exactly(image_size, max_shapes):
    """On ground-truth images (random sizes and jitter) the detector is always right."""
    dataset = ShapesDataset(300, seed=1, image_size=image_size, max_shapes=max_shapes)
    wrong = [(item.caption, detect_shapes(item.image)) for item in (dataset[i] for i in range(len(dataset)))
             if detect_shapes(item.image) != item.shapes]
    assert not wrong, wrong[:5]


def test_detector_reads_every_scene_at_the_extreme_sizes_and_offsets():
    """Smallest and largest shapes, pushed to every corner of the jitter range."""
    class Extreme(random.Random):
        def __init__(self, half, offset_y, offset_x):
            super().__init__(0)
            self.values = iter([half, offset_y, offset_x])  # render's draws, in its order

        def uniform(self, low, high):
            return next(self.values)

    for colour, shape, position in itertools.product(COLOURS, SHAPES, POSITIONS):
        scene = [Shape(colour, shape, position)]
        jitter = (-_CENTRE_JITTER, _CENTRE_JITTER)
        for extremes in itertools.product(_HALF_EXTENT, jitter, jitter):
            image = render(scene, 16, Extreme(*extremes))
            assert detect_shapes(image) == scene, (scene, extremes)


def test_detector_ignores_specks_and_sees_nothing_on_black():
    black = -torch.ones(3, 16, 16)
    assert detect_shapes(black) == []
    speck = black.clone()
    speck[:, 3, 3] = 1
    assert detect_shapes(speck) == []
    with pytest.raises(ValueError, match="image"):
        detect_shapes(torch.zeros(3, 16, 8))


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="colour"):
        Shape("purple", "circle", "top left")
    with pytest.raises(TypeError, match="Shape.colour: expected a str"):
        Shape(["red"], "circle", "top left")
    with pytest.raises(ValueError, match="image_size"):
        render([], 20)
    with pytest.raises(TypeError, match="image_size: expected an int"):
        render([], 16.0)
    with pytest.raises(TypeError, match=r"shapes\[0\]: expected a Shape, got str"):
        render(["a red circle"])
    with pytest.raises(TypeError, match="rng: expected None or a random.Random"):
        render([], 16, rng=3)
    with pytest.raises(ValueError, match="at most one shape per position"):
        render([Shape("red", "circle", "top left"), Shape("blue", "square", "top left")])
    with pytest.raises(ValueError, match="num_samples"):
        ShapesDataset(0)
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(5, split="test")
    with pytest.raises(ValueError, match="max_shapes"):
        ShapesDataset(5, max_shapes=3)
    for bad in (True, 1.0):
        with pytest.raises(TypeError, match="max_shapes: expected an int"):
            ShapesDataset(5, max_shapes=bad)
    for bad in (None, 1.5, "0"):  # seed 1.5 would draw scenes of its own, silently
        with pytest.raises(TypeError, match="seed: expected an int"):
            ShapesDataset(5, seed=bad)
    with pytest.raises(IndexError):
        ShapesDataset(5)[5]
    with pytest.raises(TypeError, match="index: expected an int, got 1.5"):
        ShapesDataset(5)[1.5]
    with pytest.raises(ValueError, match="heldout_data"):
        heldout_set("shapes", "heldout.jsonl")
    with pytest.raises(TypeError, match="data: expected"):
        heldout_set(None)
    with pytest.raises(TypeError, match="text: expected a str"):
        parse_caption(None)
    with pytest.raises(TypeError, match="image: expected a float tensor"):
        detect_shapes(torch.zeros(3, 16, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match="image: expected a square RGB image"):
        detect_shapes(torch.zeros(3, 0, 0))


def test_longest_caption_is_the_longest_any_scene_draws():
    assert ShapesDataset(5).longest_caption_bytes == len("a yellow triangle at the bottom right")
    two = ShapesDataset(5, max_shapes=2).longest_caption_bytes
    assert two == len("a yellow triangle at the bottom left and a yellow triangle at the bottom right")
    drawn = ShapesDataset(200, max_shapes=2)
    assert max(len(drawn[i].caption) for i in range(len(drawn))) <= two


def test_detector_on_images_of_a_few_pixels_and_the_render_size_bound():
    assert detect_shapes(torch.ones(3, 1, 1)) == []  # one pixel: no moments to read a shape from
    with pytest.raises(ValueError, match=r"image_size: expected an int in \[16, 1024\], got 2048"):
        render([], 2048)
    with pytest.raises(ValueError, match="image_size"):
        ShapesDataset(1, image_size=2**70)


def test_detector_reads_nan_pixels_as_background():
    image = render([Shape("red", "circle", "top left")])
    image[:, 8:, :] = float("nan")
    assert detect_shapes(image) == [Shape("red", "circle", "top left")]
    assert detect_shapes(torch.full((3, 16, 16), float("nan"))) == []


# ----------------------------------------------------------------------------------------------
# User data
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def user_data(tmp_path):
    """A JSONL file over a folder: two good images (one not square), a corrupt, a truncated, a missing one."""
    image_module = pytest.importorskip("PIL.Image")
    folder = tmp_path / "images"
    folder.mkdir()
    image_module.new("RGB", (40, 40), (255, 0, 0)).save(folder / "red.png")
    wide = image_module.new("RGB", (60, 30), (0, 0, 255))
    wide.paste((0, 255, 0), (0, 0, 10, 30))  # a green strip that the centre crop (x in [15, 45)) cuts away
    wide.save(folder / "wide.jpg", quality=95)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    full = folder / "red.png"
    (folder / "truncated.png").write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    lines = [
        {"image": "images/red.png", "caption": "red"},
        {"image": "images/corrupt.png", "caption": "corrupt"},
        {"image": "images/wide.jpg", "caption": "blue"},
        {"image": "images/missing.png", "caption": "missing"},
        {"image": "images/truncated.png", "caption": "truncated"},
    ]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    return jsonl


def test_user_data_skips_and_counts_unreadable_images(user_data):
    with pytest.warns(UserWarning, match="skipping unreadable image") as caught:
        data = CaptionedImageFolder(user_data, image_size=16)
    assert len(caught) == 3
    assert [line for line, _ in data.skipped] == [2, 4, 5]
    assert "missing.png" in data.skipped[1][1]
    assert len(data) == 2 and [data[i].caption for i in range(2)] == ["red", "blue"]
    red, blue = data[0].image, data[1].image
    assert red.shape == blue.shape == (3, 16, 16)
    torch.testing.assert_close(red, torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 16, 16))
    # Centre crop of the 60x30 image: the green strip is cut, blue remains.
    assert (blue[2] > 0.9).all() and (blue[1] < -0.9).all()


def test_user_data_bad_manifest_lines_raise_with_their_line(tmp_path):
    pytest.importorskip("PIL")
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"image": "a.png", "caption": "x"}\nnot json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not JSON"), pytest.warns(UserWarning):
        CaptionedImageFolder(jsonl)
    jsonl.write_text('{"image": "a.png"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: expected an object"):
        CaptionedImageFolder(jsonl)
    jsonl.write_text('{"image": "a.png", "caption": "x"}\n')
    with pytest.raises(DataError, match="no readable image"), pytest.warns(UserWarning):
        CaptionedImageFolder(jsonl)
    with pytest.raises(MissingDataError, match=r"nowhere.jsonl: no such file") as caught:
        CaptionedImageFolder(tmp_path / "nowhere.jsonl")
    assert isinstance(caught.value, FileNotFoundError) and isinstance(caught.value, ValueError)
    with pytest.raises(TypeError, match="jsonl_path: expected a str or os.PathLike"):
        CaptionedImageFolder(None)


@pytest.fixture
def one_image(tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    image_module.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "red.png")
    return tmp_path


def _jsonl(folder, *lines, raw=None):
    path = folder / "data.jsonl"
    path.write_bytes(raw if raw is not None else ("\n".join(lines) + "\n").encode())
    return path


@pytest.mark.parametrize("content, message", [
    (b'{"image": "red.png", "caption": "a"}\n{"image": "red.png", "caption": "caf\xe9"}\n',
     r"data.jsonl:2: not UTF-8 \(byte 0xe9 at column 37\)"),
    (b'{"image": "red.png\\u0000x", "caption": "a"}\n', r"data.jsonl:1: 'image' contains a NUL byte"),
    (b'{"image": "", "caption": "a"}\n', r"data.jsonl:1: 'image' is an empty path"),
    (b'{"image": "red.png", "caption": "\\ud800"}\n', r"data.jsonl:1: 'caption' holds a lone surrogate"),
    (b'{"image": "red\\udfff.png", "caption": "a"}\n', r"data.jsonl:1: 'image' holds a lone surrogate"),
    (b'{"image": "red.png", "caption": "a", "caption": "b"}\n', r"data.jsonl:1: not JSON \(key 'caption' appears"),
    (b'\n\n{"image": "red.png", "caption": 3}\n', r"data.jsonl:3: expected an object with string"),
    (b'{"image": "red.png", "caption": "a"}\n{"image": "red.png", "capt', r"data.jsonl:2: not JSON"),
    (b"[" * 100_000, r"data.jsonl:1: not JSON"),
])
def test_every_bad_line_is_a_data_error_naming_file_and_line(one_image, content, message):
    with pytest.raises(DataError, match=message) as caught:
        CaptionedImageFolder(_jsonl(one_image, raw=content))
    assert "\n" not in str(caught.value) and isinstance(caught.value, ValueError)


def test_lines_split_on_newline_only(one_image):
    """Valid JSON with a raw U+2028, U+0085 or CR in a caption is one line; a BOM and CRLF endings are fine."""
    captions = ["a\u2028b", "c\u0085d", "e\x0cf", "tab\tand\u2029"]
    lines = [json.dumps({"image": "red.png", "caption": c}, ensure_ascii=False) for c in captions]
    path = _jsonl(one_image, raw=b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    data = CaptionedImageFolder(path, image_size=4)
    assert [data[i].caption for i in range(len(data))] == captions and data.lines == [1, 2, 3, 4]


def test_captions_too_long_for_a_training_row_are_named_and_counted_at_load_time(one_image):
    lines = [json.dumps({"image": "red.png", "caption": c}) for c in ("short", "x" * 30, "fits", "y" * 41)]
    path = _jsonl(one_image, *lines)
    with pytest.raises(DataError, match=r"data.jsonl:2: caption of 30 bytes, more than the 20 .* "
                                        r"\(2 such lines; the longest has 41 bytes\)"):
        CaptionedImageFolder(path, image_size=4, max_caption_bytes=20)
    assert len(CaptionedImageFolder(path, image_size=4, max_caption_bytes=41)) == 4
    with pytest.raises(TypeError, match="max_caption_bytes"):
        CaptionedImageFolder(path, max_caption_bytes=2.5)


def test_fingerprint_follows_the_jsonl_and_the_image_files(one_image):
    image_module = pytest.importorskip("PIL.Image")
    path = _jsonl(one_image, json.dumps({"image": "red.png", "caption": "red"}),
                  json.dumps({"image": "gone.png", "caption": "gone"}))
    with pytest.warns(UserWarning, match="gone.png"):
        first = CaptionedImageFolder(path, image_size=4).fingerprint
    assert first["bytes"] == path.stat().st_size + (one_image / "red.png").stat().st_size
    with pytest.warns(UserWarning):
        assert CaptionedImageFolder(path, image_size=4).fingerprint == first
    image_module.new("RGB", (8, 8), (254, 0, 0)).save(one_image / "red.png")  # same name, other pixels
    with pytest.warns(UserWarning):
        replaced = CaptionedImageFolder(path, image_size=4).fingerprint
    assert replaced["sha256"] != first["sha256"]
    image_module.new("RGB", (8, 8), (254, 0, 0)).save(one_image / "gone.png")  # a missing image appears
    assert CaptionedImageFolder(path, image_size=4).fingerprint["sha256"] != replaced["sha256"]


def test_index_of_user_data_is_checked(one_image):
    data = CaptionedImageFolder(_jsonl(one_image, json.dumps({"image": "red.png", "caption": "red"})))
    with pytest.raises(IndexError):
        data[1]
    with pytest.raises(TypeError, match="index"):
        data["0"]
