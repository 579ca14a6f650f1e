"""Overlays: mask tint and outline in the instance's colour, readable labels, layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.image_input import ImageInput
from maskrcnn.data.synthetic import make_synthetic_coco
from maskrcnn.data.transforms import build_transforms
from maskrcnn.engine.evaluation import save_overlays
from maskrcnn.utils.visualize import (
    ALPHA,
    draw_instances,
    instance_colors,
    save_overlay,
    side_by_side,
)

GREY = 100


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """WCAG relative luminance of (..., 3) uint8 colours."""
    c = rgb.astype(np.float64) / 255
    lin = np.where(c <= 0.03928, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return lin @ np.array([0.2126, 0.7152, 0.0722])


def _contrast(a: np.ndarray, b: np.ndarray) -> float:
    la, lb = float(_luminance(a)), float(_luminance(b))
    return (max(la, lb) + 0.05) / (min(la, lb) + 0.05)


def _two_instances() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masks: rectangles rows 20-39 x cols 10-29 and rows 50-69 x cols 60-89 in an 80x100
    image; boxes 5 px larger than the masks, so that box lines never cover mask pixels."""
    masks = torch.zeros(2, 1, 80, 100)
    masks[0, 0, 20:40, 10:30] = 0.9
    masks[1, 0, 50:70, 60:90] = 0.8
    boxes = torch.tensor([[5.0, 15.0, 35.0, 45.0], [55.0, 45.0, 95.0, 75.0]])
    return masks, boxes, torch.tensor([1, 2])


def test_mask_is_tinted_and_outlined_in_the_instance_colour() -> None:
    image = np.full((80, 100, 3), GREY, dtype=np.uint8)
    masks, boxes, labels = _two_instances()
    out = np.asarray(draw_instances(image, boxes, labels, None, masks))
    colors = instance_colors(2)
    for k, (r0, c0) in enumerate([(20, 10), (50, 60)]):
        color = np.array(colors[k], dtype=np.float64)
        tint = np.round((1 - ALPHA) * GREY + ALPHA * color)
        assert np.array_equal(out[r0 + 10, c0 + 10], tint), k  # inside the mask
        assert np.array_equal(out[r0 + 10, c0], color), k  # left edge of the mask: outline
        assert np.array_equal(out[r0, c0 + 10], color), k  # top edge: outline
        assert np.array_equal(out[r0 + 10, c0 - 2], [GREY] * 3), k  # just outside, untouched
    assert np.array_equal(out[30, 5], colors[0])  # the left side of box 0
    assert np.array_equal(out[2, 98], [GREY] * 3)  # far from everything


def test_masks_as_bool_and_probabilities_below_threshold() -> None:
    image = torch.full((3, 80, 100), GREY / 255)
    masks, boxes, labels = _two_instances()
    as_bool = draw_instances(image, boxes, labels, None, masks[:, 0] > 0.5)
    as_probs = draw_instances(image, boxes, labels, None, masks)
    assert np.array_equal(np.asarray(as_bool), np.asarray(as_probs))
    faint = draw_instances(image, boxes, labels, None, masks * 0.5)  # all below 0.5
    assert np.asarray(faint)[30, 20].tolist() == [GREY] * 3


@pytest.mark.parametrize(
    "image",
    [
        np.full((80, 100), GREY, dtype=np.uint8),
        np.full((80, 100, 3), GREY / 255, dtype=np.float32),
        np.full((80, 100, 4), GREY, dtype=np.uint8),
        torch.full((1, 80, 100), GREY, dtype=torch.uint8),
        torch.full((1, 80, 100), GREY / 255),
        Image.new("L", (100, 80), GREY),
    ],
    ids=["grey array", "float array", "rgba array", "grey tensor", "grey float tensor", "pil L"],
)
def test_every_image_form_gives_the_overlay_of_the_rgb_picture(image: ImageInput) -> None:
    """The forms the Predictor takes: grey (H, W) arrays keep their shape, float arrays in
    [0, 1] their brightness, (1, H, W) tensors work with masks."""
    masks, boxes, labels = _two_instances()
    reference = draw_instances(np.full((80, 100, 3), GREY, np.uint8), boxes, labels, None, masks)
    out = draw_instances(image, boxes, labels, None, masks)
    assert out.size == (100, 80) and out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.asarray(reference))
    assert np.asarray(out)[2, 98].tolist() == [GREY] * 3


def test_save_overlay_replaces_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "o" / "a.png"
    save_overlay(Image.new("RGB", (4, 3), (255, 0, 0)), path)
    save_overlay(Image.new("RGB", (5, 2), (0, 0, 255)), path)
    assert Image.open(path).size == (5, 2) and Image.open(path).getpixel((0, 0)) == (0, 0, 255)
    assert [f.name for f in path.parent.iterdir()] == ["a.png"]  # no temporary file left
    with pytest.raises(ValueError, match=r"a\.xyz: unknown image extension"):
        save_overlay(Image.new("RGB", (4, 3)), tmp_path / "a.xyz")


@pytest.mark.parametrize("background", [0, 255], ids=["black", "white"])
def test_label_plates_are_dark_and_readable_on_any_background(background: int) -> None:
    """Ten instances in a grid; above each box its label sits on a dark plate, and its
    brightest text pixels contrast with the plate by at least 4.5:1 (WCAG AA)."""
    image = np.full((300, 420, 3), background, dtype=np.uint8)
    corners = [(x, y) for y in (40, 140, 240) for x in (10, 110, 210, 310)][:10]
    boxes = torch.tensor([[x, y, x + 60.0, y + 50.0] for x, y in corners])
    labels = torch.arange(10) % 3 + 1
    names = ["__background__", "cat", "dog", "bird"]
    out = np.asarray(draw_instances(image, boxes, labels, torch.full((10,), 0.87), None, names))
    for k, (x, y) in enumerate(corners):
        plate = out[y - 11 : y - 1, x : x + 28].reshape(-1, 3)
        dark = np.all(plate == 0, axis=1)
        assert dark.mean() > 0.5, (k, dark.mean())  # mostly plate, not background
        text = plate[np.argmax(_luminance(plate))]
        assert not np.all(text == 0), k  # there is text on the plate
        assert _contrast(text, np.zeros(3)) >= 4.5, (k, text.tolist())


def test_caption_names_the_class_and_score() -> None:
    image = np.full((60, 120, 3), 255, dtype=np.uint8)
    box = torch.tensor([[10.0, 30.0, 60.0, 55.0]])
    with_score = draw_instances(image, box, torch.tensor([2]), torch.tensor([0.9]), None,
                                ["bg", "a", "bb"])
    without = draw_instances(image, box, torch.tensor([2]), None, None, ["bg", "a", "bb"])
    # "bb 0.90" needs a wider plate than "bb"
    width = [int(np.all(np.asarray(im)[20:29] == 0, axis=2).any(axis=0).sum())
             for im in (with_score, without)]
    assert width[0] > width[1] > 0


def test_captions_of_a_large_picture_stay_the_size_of_its_small_objects() -> None:
    """A fortieth of the short side would be 75-px letters on 3,000 px; they stop at 40."""
    image = np.full((3000, 3000, 3), 255, dtype=np.uint8)
    box = torch.tensor([[1000.0, 1000.0, 1060.0, 1050.0]])
    out = np.asarray(draw_instances(image, box, torch.tensor([1]), torch.tensor([0.9]), None,
                                    ["bg", "a"]))
    plate_rows = np.all(out[900:1000, 1000:1010] == 0, axis=2).any(axis=1)
    assert 30 < plate_rows.sum() <= 40 + 4


def test_side_by_side_layout() -> None:
    left = Image.new("RGB", (50, 40), (255, 0, 0))
    right = Image.new("RGB", (30, 60), (0, 0, 255))
    out = side_by_side(left, right, ("gt", "pred"))
    assert out.size == (50 + 8 + 30, 60 + 24)
    px = np.asarray(out)
    assert px[24, 0].tolist() == [255, 0, 0] and px[24 + 39, 49].tolist() == [255, 0, 0]
    assert px[24 + 41, 10].tolist() == [255, 255, 255]  # below the shorter left picture
    assert px[24, 58].tolist() == [0, 0, 255] and px[24 + 59, 58 + 29].tolist() == [0, 0, 255]
    assert px[30, 53].tolist() == [255, 255, 255]  # the gap between the two


def test_a_label_near_the_right_edge_stays_inside_the_image() -> None:
    """The plate moves left rather than run off the picture (the caption would be cut)."""
    image = np.full((80, 160, 3), 255, dtype=np.uint8)
    boxes = torch.tensor([[130.0, 40.0, 158.0, 70.0]])
    names = ["__background__", "rectangle"]
    out = np.asarray(draw_instances(image, boxes, torch.tensor([1]), torch.tensor([0.87]), None,
                                    names))
    font = ImageFont.load_default(size=10)
    left, _, right, _ = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox(
        (0, 0), "rectangle 0.87", font=font
    )
    plate_columns = np.all(out[30:39] == 0, axis=2).any(axis=0)
    assert plate_columns.sum() >= right - left  # the whole caption's width is visible


def test_float_images_above_one_are_refused_as_the_predictor_refuses_them() -> None:
    masks, boxes, labels = _two_instances()
    with pytest.raises(ValueError, match="divide 0-255 values by 255"):
        draw_instances(torch.full((3, 80, 100), 200.0), boxes, labels, None, masks)


def test_validation_overlays_of_normalised_images_show_their_visible_range(
    tmp_path: Path,
) -> None:
    """``normalize`` in a validation pipeline gives values outside [0, 1]: the overlays of
    an evaluation draw them clipped, instead of failing the training run."""
    ann = make_synthetic_coco(tmp_path, num_images=2, size=64, seed=0, split_name="val")
    spec = [{"name": "to_float"}, {"name": "normalize"}]
    dataset = CocoDataset(ann, tmp_path, transforms=build_transforms(spec, train=False))
    image_id = dataset.image_ids[0]
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "scores": torch.zeros(0), "masks": torch.zeros(0, 1, 64, 64)}
    paths = save_overlays(dataset, {image_id: empty}, tmp_path / "overlays", count=1)
    assert [p.name for p in paths] == [f"{image_id}.png"]
    picture = np.asarray(Image.open(paths[0]))
    assert picture.min() == 0 and picture.max() == 255  # values beyond the range, clipped
