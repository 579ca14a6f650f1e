"""Finding and reading image files: uint8 RGB tensors, or just their sizes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from maskrcnn.data.errors import DatasetError

# EXIF orientations 5-8 rotate by 90 or 270 degrees, so the displayed image has width and
# height swapped with respect to the stored pixel array.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112
# The default pixel limit of read_image: PIL's own warning threshold (about 9459x9459, 268 MB
# as RGB), so that everything PIL would warn about is refused with a clear message instead.
MAX_IMAGE_PIXELS = 89_478_485


def is_file(path: Path) -> bool:
    """``path.is_file()``, False where the OS cannot even look (e.g. a name longer than the
    file system allows); ``read_image`` says why."""
    try:
        return path.is_file()
    except OSError:
        return False


def _check_file(path: Path) -> None:
    try:
        exists, is_file = path.exists(), path.is_file()
        size = path.stat().st_size if is_file else 0
    except OSError as e:  # e.g. a path longer than the OS allows
        raise DatasetError(f"{path}: cannot access the image file ({e.strerror})") from e
    if not exists:
        raise DatasetError(f"{path}: image file not found")
    if not is_file:
        raise DatasetError(f"{path}: not a regular file")
    if size == 0:
        raise DatasetError(f"{path}: image file is empty (0 bytes)")


def upright(img: Image.Image) -> Image.Image:
    """``img`` as it is displayed: turned by its EXIF orientation (a transposed copy), or
    ``img`` itself when it has none."""
    if img.getexif().get(_EXIF_ORIENTATION_TAG, 1) != 1:
        return ImageOps.exif_transpose(img)
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Converts any PIL mode to 8-bit RGB.

    16-bit and 32-bit integer grey images keep their top 8 bits (65535 -> 255) instead of
    being clipped, which is what PIL's own ``convert`` would do. Alpha is dropped, as
    torchvision's ``read_image(..., ImageReadMode.RGB)`` does.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        grey = np.asarray(img).astype(np.int64)
        grey8 = (np.clip(grey, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(grey8).convert("RGB")
    if img.mode == "F":
        grey8 = np.clip(np.asarray(img), 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey8).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def read_image(path: str | Path, max_pixels: int | None = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Reads an image file as RGB.

    EXIF orientation is applied, so the result is upright as an image viewer shows it.
    Grayscale, RGBA, palette, CMYK and 16-bit images are converted to 8-bit RGB.

    An image of more than ``max_pixels`` pixels (width x height from the header) is refused
    before any pixel is decoded: a 12000x9000 file would take 324 MB as uint8 and four times
    that as float. ``None`` lifts the limit, up to PIL's own decompression-bomb limit
    (``PIL.Image.MAX_IMAGE_PIXELS``, twice of which PIL refuses by itself).

    Returns:
        ``(3, H, W)`` uint8 tensor, contiguous.

    Raises:
        DatasetError: naming the path, for a missing, empty, truncated, too large or non-image
            file.
    """
    path = Path(path)
    _check_file(path)
    with _pil_errors(path, "cannot decode image"), Image.open(path) as img:
        _check_pixels(path, img.size, max_pixels)
        # load() inside the guard: a truncated file opens fine and fails only on decoding.
        img.load()
        array = np.array(to_rgb(upright(img)), dtype=np.uint8)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@contextmanager
def _pil_errors(path: Path, failure: str) -> Iterator[None]:
    """PIL's exceptions while reading ``path`` as DatasetErrors naming it; ``failure`` says
    what could not be done (for other errors than not-an-image and too-large)."""
    try:
        yield
    except UnidentifiedImageError as e:
        raise DatasetError(f"{path}: not an image file PIL can read") from e
    except Image.DecompressionBombError as e:
        raise DatasetError(f"{path}: image too large: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path}: {failure} ({e})") from e


def too_large(width: int, height: int, max_pixels: int | None) -> str | None:
    """Why an image of ``width`` x ``height`` is refused, or None when within the limit."""
    if max_pixels is None or width * height <= max_pixels:
        return None
    return (
        f"image too large: {width}x{height} (WxH) is {width * height / 1e6:.1f} megapixels, "
        f"more than the loader's limit of {max_pixels / 1e6:.1f}; downscale the file or raise "
        "the limit (data.max_image_pixels)"
    )


def _check_pixels(path: Path, size: tuple[int, int], max_pixels: int | None) -> None:
    problem = too_large(*size, max_pixels)
    if problem is not None:
        raise DatasetError(f"{path}: {problem}")


def decode_notes(path: str | Path) -> list[str]:
    """Decodes every pixel of ``path`` (what ``read_image`` will do) and returns what a user
    may want to know about how it is read: an animated file (first frame only), CMYK (converted
    to RGB without a colour profile), more than 8 bits a channel (the top 8 kept).

    Raises:
        DatasetError: naming the path, for truncated or corrupt pixel data, or a non-image.
    """
    path = Path(path)
    _check_file(path)
    notes = []
    with _pil_errors(path, "cannot decode image"), Image.open(path) as img:
        frames = getattr(img, "n_frames", 1)
        mode = img.mode
        img.load()  # a truncated or corrupt pixel stream fails here, not on open
    if frames > 1:
        notes.append(f"animated ({frames} frames): only the first frame is used")
    if mode == "CMYK":
        notes.append("CMYK: converted to RGB without its colour profile")
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        notes.append(f"{mode} pixels (more than 8 bits): the top 8 bits are kept")
    return notes


def read_image_size(path: str | Path) -> tuple[int, int]:
    """Reads an image's ``(height, width)`` from its header, after EXIF orientation.

    Only the header is parsed, no pixel data is decoded, so this is cheap even for large
    images. A truncated pixel stream is therefore *not* detected here; ``read_image`` does.

    Raises:
        DatasetError: naming the path, for a missing, empty or non-image file.
    """
    path = Path(path)
    _check_file(path)
    with _pil_errors(path, "cannot read image header"), Image.open(path) as img:
        width, height = img.size
        orientation = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    if orientation in _TRANSPOSING_ORIENTATIONS:
        return width, height
    return height, width


def swapped_hint(file_size: tuple[int, int], json_size: tuple[int, int]) -> str:
    """An explanation to append to a size-mismatch message when height and width are swapped.

    The usual cause is an EXIF orientation tag: ``read_image`` applies it, but some annotation
    tools annotate the stored, unrotated pixels.
    """
    if file_size[0] != file_size[1] and file_size == json_size[::-1]:
        return ("; height and width are swapped: the file's EXIF orientation (applied when "
                "reading) may differ from what the annotation tool used")
    return ""


def index_by_basename(root: Path) -> dict[str, list[Path]]:
    """Every regular file under ``root`` (recursively), keyed by its basename; paths sorted."""
    index: dict[str, list[Path]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if is_file(path):  # not pipes, sockets, devices or broken links
                index.setdefault(name, []).append(path)
    return index
