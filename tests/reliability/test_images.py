"""Image files as they come: broken, in odd modes, rotated by EXIF, tiny or huge.

Every file either decodes to a ``(3, H, W)`` uint8 RGB tensor or raises ``DatasetError``
naming the file; a dataset agrees with ``maskrcnn data check`` about EXIF-rotated images.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskrcnn.config import ModelConfig
from maskrcnn.data.checks import check_dataset
from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.errors import DatasetError
from maskrcnn.data.image_io import MAX_IMAGE_PIXELS, read_image, read_image_size
from maskrcnn.model.mask_rcnn import MaskRCNN

_ORIENTATION = 0x0112
RED = (220, 30, 40)


def _noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _save(img: Image.Image, path: Path, **kwargs: object) -> Path:
    img.save(path, **kwargs)
    return path


# --- broken files --------------------------------------------------------------------------


def _truncated_jpeg(path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(_noise(64, 64)).save(buf, format="JPEG", quality=95)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


BROKEN = {
    "truncated.jpg": (_truncated_jpeg, "cannot decode"),
    "empty.jpg": (lambda p: p.write_bytes(b""), r"empty \(0 bytes\)"),
    "notes.png": (lambda p: p.write_text("not an image, a text file"), "not an image"),
    "header_only.jpg": (lambda p: p.write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 20),
                        "not an image|cannot decode"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_a_broken_file_raises_dataset_error_naming_it(tmp_path: Path, name: str) -> None:
    make, pattern = BROKEN[name]
    path = tmp_path / name
    make(path)
    with pytest.raises(DatasetError, match=pattern) as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_a_broken_file_in_a_dataset_names_the_image_id_too(tmp_path: Path) -> None:
    _truncated_jpeg(tmp_path / "t.jpg")
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({
        "images": [{"id": 41, "file_name": "t.jpg", "height": 64, "width": 64}],
        "annotations": [], "categories": [{"id": 1, "name": "x"}],
    }))
    with pytest.raises(DatasetError, match=r"image id 41: .*t\.jpg: cannot decode") as info:
        CocoDataset(ann, tmp_path)[0]
    assert "search_subfolders" not in str(info.value)  # that hint is for missing files


# --- modes -------------------------------------------------------------------------------


def _palette_with_transparency() -> Image.Image:
    img = Image.frombytes("P", (4, 3), bytes([1] * 12))
    img.putpalette([0, 0, 0, *RED] + [0] * 762)
    img.info["transparency"] = 0
    return img


# file name -> (image to save, the RGB value expected at pixel (0, 0), tolerance)
MODES = {
    "grey.jpg": (lambda: Image.new("L", (5, 4), 128), (128, 128, 128), 2),
    "grey_alpha.png": (lambda: Image.new("LA", (5, 4), (90, 0)), (90, 90, 90), 0),
    "rgba.png": (lambda: Image.new("RGBA", (5, 4), (*RED, 7)), RED, 0),
    "palette.png": (lambda: _palette_with_transparency(), RED, 0),
    "sixteen_bit.png": (lambda: Image.fromarray(np.full((4, 5), 257 * 200, np.uint16)),
                        (200, 200, 200), 0),
    "cmyk.jpg": (lambda: Image.new("CMYK", (16, 16), (0, 255, 255, 0)), (255, 0, 0), 6),
    "binary.png": (lambda: Image.new("1", (5, 4), 1), (255, 255, 255), 0),
    "rgb.webp": (lambda: Image.new("RGB", (5, 4), RED), RED, 8),
}


@pytest.mark.parametrize("name", list(MODES))
def test_every_mode_becomes_8_bit_rgb(tmp_path: Path, name: str) -> None:
    make, colour, tolerance = MODES[name]
    img = make()
    path = _save(img, tmp_path / name)
    if name == "cmyk.jpg":  # the file really is CMYK, not converted on saving
        with Image.open(path) as check:
            assert check.mode == "CMYK"
    image = read_image(path)
    assert image.dtype == torch.uint8 and image.shape == (3, img.height, img.width)
    assert image.is_contiguous()
    np.testing.assert_allclose(image[:, 0, 0].numpy(), colour, atol=tolerance)


# --- EXIF orientation ----------------------------------------------------------------------

# As displayed: 60 rows x 40 columns, a red block at rows 10..29 x columns 5..19.
DISPLAY_H, DISPLAY_W = 60, 40
BLOCK = (5, 10, 20, 30)  # x0, y0, x1, y1 in displayed pixels


def _rotated_jpeg(path: Path) -> None:
    """A JPEG whose stored pixels are the display turned sideways, with orientation 6
    ("rotate 90 degrees clockwise to display"), as phone cameras write them."""
    displayed = np.full((DISPLAY_H, DISPLAY_W, 3), 255, dtype=np.uint8)
    x0, y0, x1, y1 = BLOCK
    displayed[y0:y1, x0:x1] = RED
    # PIL's exif_transpose undoes orientation 6 with ROTATE_270; store the inverse.
    stored = Image.fromarray(displayed).transpose(Image.Transpose.ROTATE_90)
    assert stored.size == (DISPLAY_H, DISPLAY_W)  # (width, height) of the stored pixels
    exif = stored.getexif()
    exif[_ORIENTATION] = 6
    stored.save(path, format="JPEG", quality=98, subsampling=0, exif=exif)


def _rotated_dataset(tmp_path: Path, height: int, width: int) -> Path:
    _rotated_jpeg(tmp_path / "phone.jpg")
    x0, y0, x1, y1 = BLOCK
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({
        "images": [{"id": 5, "file_name": "phone.jpg", "height": height, "width": width}],
        "annotations": [{"id": 1, "image_id": 5, "category_id": 1, "iscrowd": 0,
                         "bbox": [x0, y0, x1 - x0, y1 - y0],
                         "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]}],
        "categories": [{"id": 1, "name": "block"}],
    }))
    return ann


def test_exif_rotation_is_applied_and_annotations_refer_to_the_displayed_image(
    tmp_path: Path,
) -> None:
    ann = _rotated_dataset(tmp_path, DISPLAY_H, DISPLAY_W)
    # The header read (used by the checker and the converters) and the decoder agree.
    assert read_image_size(tmp_path / "phone.jpg") == (DISPLAY_H, DISPLAY_W)
    assert check_dataset(ann, tmp_path).ok
    image, target = CocoDataset(ann, tmp_path)[0]
    assert image.shape == (3, DISPLAY_H, DISPLAY_W)
    mask = target["masks"][0].numpy().astype(bool)
    red = (np.abs(image.permute(1, 2, 0).numpy().astype(int) - RED).sum(-1) < 60)
    # The mask sits on the red block (JPEG blurs its border by a pixel or so).
    assert (mask & red).sum() / (mask | red).sum() > 0.9
    assert target["boxes"].tolist() == [[5.0, 10.0, 20.0, 30.0]]


def test_annotations_of_the_stored_pixels_are_refused_with_a_hint(tmp_path: Path) -> None:
    # A tool that ignored the EXIF tag annotated the 40x60 stored array.
    ann = _rotated_dataset(tmp_path, DISPLAY_W, DISPLAY_H)
    with pytest.raises(DatasetError, match=r"height and width are swapped.*EXIF"):
        CocoDataset(ann, tmp_path)[0]
    assert [f.code for f in check_dataset(ann, tmp_path).errors] == ["size_mismatch"]


# --- tiny and huge ---------------------------------------------------------------------------


def test_a_tiny_image_trains_and_predicts(tmp_path: Path) -> None:
    Image.fromarray(_noise(8, 8)).save(tmp_path / "tiny.png")
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "tiny.png", "height": 8, "width": 8}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1,
                         "segmentation": [[1, 1, 6, 1, 6, 7, 1, 7]]}],
        "categories": [{"id": 1, "name": "dot"}],
    }))
    image, target = CocoDataset(ann, tmp_path)[0]
    assert image.shape == (3, 8, 8) and target["boxes"].tolist() == [[1.0, 1.0, 6.0, 7.0]]
    torch.manual_seed(0)
    model = MaskRCNN(ModelConfig(num_classes=2, backbone="resnet18", min_size=64, max_size=64,
                                 box_score_thresh=0.0))
    x = image.as_subclass(torch.Tensor).float() / 255
    targets = [{"boxes": target["boxes"].as_subclass(torch.Tensor), "labels": target["labels"],
                "masks": target["masks"].as_subclass(torch.Tensor)}]
    losses = model([x], targets)
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        out = model([x])[0]
    assert out["masks"].shape[1:] == (1, 8, 8)
    assert (out["boxes"][:, 2:] <= 8).all()


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares ``width x height`` RGB pixels but holds one row of them: enough
    for any reader that trusts the header to try allocating the whole image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * (1 + 3 * width))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
                     + chunk(b"IEND", b""))


def _jpeg_header_only(path: Path, width: int, height: int) -> None:
    """A small JPEG whose frame header is patched to declare ``width x height``."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("make", [_png_header_only, _jpeg_header_only])
@pytest.mark.parametrize(("width", "height"), [(12_000, 9_000), (20_000, 10_000)])
def test_a_huge_image_is_refused_before_decoding(tmp_path: Path, make: object, width: int,
                                                 height: int) -> None:
    # 12000 x 9000 is over our limit but under PIL's own error threshold; 20000 x 10000 is
    # over both (PIL raises DecompressionBombError, which must not escape as such).
    path = tmp_path / "huge.img"
    make(path, width, height)  # type: ignore[operator]
    before = _rss_mb()
    with pytest.raises(DatasetError, match="image too large") as info:
        read_image(path)
    assert str(path) in str(info.value)
    assert _rss_mb() - before < 100  # decoding would take 324 MB or more
    if width * height < 2 * MAX_IMAGE_PIXELS:
        assert read_image_size(path) == (height, width)  # the header is still readable
        assert "megapixels" in str(info.value)
    else:
        with pytest.raises(DatasetError, match="image too large"):
            read_image_size(path)


def test_the_pixel_limit_is_configurable(tmp_path: Path) -> None:
    Image.fromarray(_noise(100, 120)).save(tmp_path / "a.png")
    with pytest.raises(DatasetError, match=r"120x100 \(WxH\).*limit of 0\.0"):
        read_image(tmp_path / "a.png", max_pixels=11_999)
    assert read_image(tmp_path / "a.png", max_pixels=12_000).shape == (3, 100, 120)
    assert read_image(tmp_path / "a.png", max_pixels=None).shape == (3, 100, 120)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({
        "images": [{"id": 3, "file_name": "a.png", "height": 100, "width": 120}],
        "annotations": [], "categories": [{"id": 1, "name": "x"}],
    }))
    with pytest.raises(DatasetError, match=r"image id 3: .*image too large"):
        CocoDataset(ann, tmp_path, max_image_pixels=10_000)[0]
    assert CocoDataset(ann, tmp_path)[0][0].shape == (3, 100, 120)
