"""read_image / read_image_size: modes, EXIF orientation and broken files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskrcnn.data.errors import DatasetError
from maskrcnn.data.image_io import read_image, read_image_size

_ORIENTATION = 0x0112


def test_rgb_png_round_trips_exactly(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    image = read_image(tmp_path / "x.png")
    assert image.dtype == torch.uint8 and image.shape == (3, 5, 7) and image.is_contiguous()
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), pixels)


def test_grey_rgba_and_palette_become_rgb(tmp_path: Path) -> None:
    Image.fromarray(np.full((2, 3), 90, dtype=np.uint8)).save(tmp_path / "grey.png")
    assert read_image(tmp_path / "grey.png")[:, 1, 2].tolist() == [90, 90, 90]

    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[...] = (200, 100, 50, 0)  # fully transparent: alpha is dropped, colour kept
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert read_image(tmp_path / "rgba.png")[:, 0, 0].tolist() == [200, 100, 50]

    palette = Image.frombytes("P", (2, 1), bytes([0, 1]))
    palette.putpalette([0, 0, 0, 10, 220, 30] + [0] * 762)
    palette.save(tmp_path / "pal.png")
    assert read_image(tmp_path / "pal.png")[:, 0, 1].tolist() == [10, 220, 30]


def test_cmyk_is_converted(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (2, 2), (255, 0, 0, 0))  # full cyan = no red
    cmyk.save(tmp_path / "c.tiff")
    assert read_image(tmp_path / "c.tiff")[:, 0, 0].tolist() == [0, 255, 255]


def test_16_bit_grey_keeps_the_top_byte(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    image = read_image(tmp_path / "deep.png")
    assert image[0].tolist() == [[0, 100, 255]]
    assert image[2].tolist() == [[0, 100, 255]]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # Stored 2 rows x 3 columns, red in the top-left; orientation 6 means "rotate 90 degrees
    # clockwise to display": the display is 3x2 with red in the top-right.
    pixels = np.zeros((2, 3, 3), dtype=np.uint8)
    pixels[0, 0] = (255, 0, 0)
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[_ORIENTATION] = 6
    img.save(tmp_path / "rot.png", exif=exif)
    image = read_image(tmp_path / "rot.png")
    assert image.shape == (3, 3, 2)
    assert image[:, 0, 1].tolist() == [255, 0, 0]
    assert read_image_size(tmp_path / "rot.png") == (3, 2)


def test_read_image_size_is_height_width(tmp_path: Path) -> None:
    Image.new("RGB", (40, 30)).save(tmp_path / "x.jpg")
    assert read_image_size(tmp_path / "x.jpg") == (30, 40)


def _broken_file(directory: Path, kind: str) -> Path:
    path = directory / f"{kind}.png"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("hello")
    elif kind == "truncated":
        noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(noise).save(path)
        path.write_bytes(path.read_bytes()[:-2000])
    return path


@pytest.mark.parametrize(
    ("kind", "pattern"),
    [
        ("absent", "not found"),
        ("empty", r"empty \(0 bytes\)"),
        ("text", "not an image"),
        ("truncated", "cannot decode"),
    ],
)
def test_broken_files_raise_dataset_error_naming_the_path(tmp_path: Path, kind: str,
                                                          pattern: str) -> None:
    path = _broken_file(tmp_path, kind)
    with pytest.raises(DatasetError, match=pattern) as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_header_read_rejects_non_images(tmp_path: Path) -> None:
    (tmp_path / "t.jpg").write_text("not really")
    with pytest.raises(DatasetError, match=r"t\.jpg: not an image"):
        read_image_size(tmp_path / "t.jpg")
