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
    with pytest.raises(ValueError, match="image_size"):
        render([], 20)
    with pytest.raises(ValueError, match="at most one shape per position"):
        render([Shape("red", "circle", "top left"), Shape("blue", "square", "top left")])
    with pytest.raises(ValueError, match="num_samples"):
        ShapesDataset(0)
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(5, split="test")
    with pytest.raises(ValueError, match="max_shapes"):
        ShapesDataset(5, max_shapes=3)
    with pytest.raises(IndexError):
        ShapesDataset(5)[5]
    with pytest.raises(ValueError, match="heldout_data"):
        heldout_set("shapes", "heldout.jsonl")


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
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not JSON"), pytest.warns(UserWarning):
        CaptionedImageFolder(jsonl)
    jsonl.write_text('{"image": "a.png"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected an object"):
        CaptionedImageFolder(jsonl)
    jsonl.write_text('{"image": "a.png", "caption": "x"}\n')
    with pytest.raises(ValueError, match="no readable image"), pytest.warns(UserWarning):
        CaptionedImageFolder(jsonl)
    with pytest.raises(FileNotFoundError, match="jsonl_path"):
        CaptionedImageFolder(tmp_path / "nowhere.jsonl")
