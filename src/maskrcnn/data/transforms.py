"""Joint augmentation of ``(image, target)`` samples, built on ``torchvision.transforms.v2``.

A sample is ``(image, target)``: ``image`` a ``tv_tensors.Image`` ``(3, H, W)`` (uint8, or float
in [0, 1] after ``to_float``); ``target`` a dict with ``boxes`` (``tv_tensors.BoundingBoxes``
float32 ``(N, 4)`` XYXY), ``labels`` int64 ``(N,)``, ``masks`` (``tv_tensors.Mask`` uint8
``(N, H, W)``), ``iscrowd`` int64 ``(N,)``, ``area`` float32 ``(N,)`` and ``image_id`` int.

After every geometric transform the boxes are refitted to the masks (tight box, pixel-edge
coordinates) and instances whose mask became empty are dropped from every per-instance field.
All randomness comes from torch's global RNG, so ``torch.manual_seed`` makes pipelines repeatable.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

Target = dict[str, Any]
Sample = tuple[tv_tensors.Image, Target]
SampleTransform = Callable[[tv_tensors.Image, Target], Sample]

PER_INSTANCE_KEYS = ("boxes", "labels", "masks", "iscrowd", "area")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def masks_to_tight_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes of non-empty masks.

    masks: (N, H, W), every mask non-empty. Returns (N, 4) float32 XYXY in pixel-edge
    coordinates: a mask covering columns 3..7 gives x1 = 3, x2 = 8 (the COCO convention).
    """
    n, height, width = masks.shape
    if n == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    occupied = masks != 0
    rows = occupied.any(dim=2).to(torch.uint8)  # (N, H)
    cols = occupied.any(dim=1).to(torch.uint8)  # (N, W)
    # argmax returns the first maximum: the first occupied row/column.
    y1 = rows.argmax(dim=1)
    y2 = height - rows.flip(1).argmax(dim=1)
    x1 = cols.argmax(dim=1)
    x2 = width - cols.flip(1).argmax(dim=1)
    return torch.stack([x1, y1, x2, y2], dim=1).to(torch.float32)


def refit_instances(image: torch.Tensor, target: Target) -> Target:
    """Drops instances with empty masks; recomputes ``boxes`` and ``area`` from ``masks``.

    Returns a new dict; ``area`` becomes the mask's pixel count.
    """
    keep = (target["masks"] != 0).flatten(1).any(dim=1)
    out = dict(target)
    for key in PER_INSTANCE_KEYS:
        if key in out:
            out[key] = out[key][keep]
    kept = tv_tensors.Mask(out["masks"])
    out["masks"] = kept
    height, width = image.shape[-2:]
    out["boxes"] = tv_tensors.BoundingBoxes(
        masks_to_tight_boxes(kept), format="XYXY", canvas_size=(height, width)
    )
    if "area" in out:
        out["area"] = kept.flatten(1).sum(dim=1).to(torch.float32)
    return out


class Geometric:
    """Applies a v2 transform to image, boxes and masks together, then refits the instances."""

    def __init__(self, op: Callable[..., Any]) -> None:
        self.op = op

    def __call__(self, image: tv_tensors.Image, target: Target) -> Sample:
        if "masks" not in target:
            raise KeyError("geometric transforms need target['masks'] to refit the boxes")
        # v2 moves only what it recognises: plain tensors would silently stay put.
        image = tv_tensors.Image(image) if not isinstance(image, tv_tensors.Image) else image
        if not isinstance(target["masks"], tv_tensors.Mask):
            target = {**target, "masks": tv_tensors.Mask(target["masks"])}
        image, target = self.op(image, target)
        return image, refit_instances(image, target)

    def __repr__(self) -> str:
        return f"Geometric({self.op!r})"


class Photometric:
    """Applies a transform to the image only; the target passes through unchanged."""

    def __init__(self, op: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.op = op

    def __call__(self, image: tv_tensors.Image, target: Target) -> Sample:
        return tv_tensors.wrap(self.op(image), like=image), target

    def __repr__(self) -> str:
        return f"Photometric({self.op!r})"


class Compose:
    """Runs sample transforms in order."""

    def __init__(self, transforms: Sequence[SampleTransform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: tv_tensors.Image, target: Target) -> Sample:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class _ExactMasks(v2.Transform):
    """Base for v2 resizing transforms: masks are resized with NEAREST_EXACT.

    v2 resizes masks with NEAREST, which for a downscale by ``s`` reads source pixel
    ``floor(i * s)`` instead of the one under output pixel ``i``'s centre: the mask drifts
    about ``(s - 1) / (2 s)`` pixels down and right of the (centre-aligned) image.
    """

    def _call_kernel(self, functional: Callable[..., Any], inpt: Any, *args: Any,
                     **kwargs: Any) -> Any:
        if isinstance(inpt, tv_tensors.Mask) and "interpolation" in kwargs:
            kwargs["interpolation"] = v2.InterpolationMode.NEAREST_EXACT
        return super()._call_kernel(functional, inpt, *args, **kwargs)


class _ShortestSize(_ExactMasks, v2.RandomShortestSize):
    """v2's ``RandomShortestSize`` with pixel-centre mask sampling."""


class _ScaleJitterResize(_ExactMasks, v2.ScaleJitter):
    """v2's ``ScaleJitter`` with pixel-centre mask sampling."""


class RandomCropResize(v2.RandomResizedCrop):
    """v2's ``RandomResizedCrop`` with pixel-centre mask sampling; with ``size=None`` the crop
    is kept at its own size."""

    def __init__(
        self, size: int | None, scale: tuple[float, float], ratio: tuple[float, float]
    ) -> None:
        super().__init__(size if size is not None else 1, scale=scale, ratio=ratio)
        self.crop_only = size is None

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if self.crop_only:
            return F.crop(inpt, **params)
        if isinstance(inpt, tv_tensors.Mask):
            # v2's resized_crop ignores the interpolation for masks: crop, then resize.
            return F.resize(F.crop(inpt, **params), self.size,
                            interpolation=v2.InterpolationMode.NEAREST_EXACT)
        return super().transform(inpt, params)


def _to_float(image: torch.Tensor) -> torch.Tensor:
    return F.to_dtype(image, torch.float32, scale=True)


def _normalize_image(image: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    return F.normalize(_to_float(image), mean=mean, std=std)


def _maybe(op: Callable[..., Any], p: float) -> Callable[..., Any]:
    return op if p >= 1.0 else v2.RandomApply([op], p=p)


# One builder per spec name; the keyword arguments are the spec's valid keys.
def _hflip(p: float = 0.5) -> SampleTransform:
    return Geometric(v2.RandomHorizontalFlip(p=p))


def _vflip(p: float = 0.5) -> SampleTransform:
    return Geometric(v2.RandomVerticalFlip(p=p))


def _rotate(degrees: float | Sequence[float] = 10.0, p: float = 1.0) -> SampleTransform:
    """Angle uniform in [-degrees, degrees] (or in [lo, hi] for a pair)."""
    angles = degrees if isinstance(degrees, (int, float)) else [float(d) for d in degrees]
    op = v2.RandomRotation(angles, interpolation=v2.InterpolationMode.BILINEAR, expand=False)
    return Geometric(_maybe(op, p))


def _random_resized_crop(
    scale: Sequence[float] = (0.5, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    size: int | None = None,
    p: float = 1.0,
) -> SampleTransform:
    op = RandomCropResize(size, scale=(scale[0], scale[1]), ratio=(ratio[0], ratio[1]))
    return Geometric(_maybe(op, p))


def _scale_jitter(size: int, min_scale: float = 0.8, max_scale: float = 1.25) -> SampleTransform:
    # Copy-Paste paper: resize the longer side to size * U(min, max), then crop/pad to size².
    resize = _ScaleJitterResize(target_size=(size, size), scale_range=(min_scale, max_scale))
    canvas = v2.RandomCrop(size, pad_if_needed=True, fill=0)
    return Geometric(v2.Compose([resize, canvas]))


def _large_scale_jitter(
    size: int, min_scale: float = 0.1, max_scale: float = 2.0
) -> SampleTransform:
    return _scale_jitter(size, min_scale=min_scale, max_scale=max_scale)


def _resize(min_size: int | Sequence[int] = 800, max_size: int = 1333) -> SampleTransform:
    sizes = [min_size] if isinstance(min_size, int) else list(min_size)
    return Geometric(_ShortestSize(sizes, max_size=max_size))


def _color_jitter(
    brightness: float = 0.2,
    contrast: float = 0.2,
    saturation: float = 0.2,
    hue: float = 0.0,
    p: float = 0.8,
) -> SampleTransform:
    op = v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)
    return Photometric(_maybe(op, p))


def _normalize(
    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> SampleTransform:
    return Photometric(functools.partial(_normalize_image, mean=list(mean), std=list(std)))


def _to_float_builder() -> SampleTransform:
    return Photometric(_to_float)


BUILDERS: dict[str, Callable[..., SampleTransform]] = {
    "hflip": _hflip,
    "vflip": _vflip,
    "rotate": _rotate,
    "random_resized_crop": _random_resized_crop,
    "scale_jitter": _scale_jitter,
    "large_scale_jitter": _large_scale_jitter,
    "resize": _resize,
    "color_jitter": _color_jitter,
    "normalize": _normalize,
    "to_float": _to_float_builder,
}
RANDOM_NAMES = frozenset(BUILDERS) - {"resize", "normalize", "to_float"}


def default_train_spec() -> list[dict[str, Any]]:
    """torchvision's detection reference recipe: horizontal flip, then float in [0, 1]."""
    return [{"name": "hflip", "p": 0.5}, {"name": "to_float"}]


def default_eval_spec() -> list[dict[str, Any]]:
    """Only the conversion to float32 in [0, 1]; the model resizes and normalises itself."""
    return [{"name": "to_float"}]


def _is_random(entry: dict[str, Any]) -> bool:
    sizes = entry.get("min_size")
    multi_size = isinstance(sizes, (list, tuple)) and len(sizes) > 1
    name = entry.get("name")
    return name in RANDOM_NAMES or (name == "resize" and multi_size)


def build_transform(entry: dict[str, Any]) -> SampleTransform:
    """One spec entry, e.g. ``{"name": "rotate", "degrees": 10}``, to a sample transform."""
    if "name" not in entry:
        raise ValueError(f"transform spec entry {entry!r} has no 'name'")
    name = entry["name"]
    if name not in BUILDERS:
        raise ValueError(f"unknown transform {name!r}; valid names: {sorted(BUILDERS)}")
    builder = BUILDERS[name]
    params = inspect.signature(builder).parameters
    kwargs = {k: v for k, v in entry.items() if k != "name"}
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(f"transform {name!r}: unknown keys {unknown}; valid keys: {list(params)}")
    missing = [k for k, p in params.items() if p.default is p.empty and k not in kwargs]
    if missing:
        raise ValueError(f"transform {name!r}: missing required keys {missing}")
    return builder(**kwargs)


def build_transforms(spec: list[dict[str, Any]] | None, train: bool) -> Compose:
    """A spec list to one ``(image, target) -> (image, target)`` callable.

    ``spec=None`` picks ``default_train_spec()`` or ``default_eval_spec()``. A ``to_float``
    step is appended when the spec has none, so the output image is always float32. With
    ``train=False`` random entries raise ValueError: evaluation must be deterministic.
    """
    if spec is None:
        spec = default_train_spec() if train else default_eval_spec()
    for entry in spec:
        if not isinstance(entry, dict):
            raise ValueError(f"transform entry {entry!r} must be a mapping with a 'name', e.g. "
                             "{name: hflip, p: 0.5}")
    if not train:
        random_entries = [e for e in spec if _is_random(e)]
        if random_entries:
            raise ValueError(f"random transforms in an eval pipeline: {random_entries}")
    transforms = [build_transform(entry) for entry in spec]
    if not any(entry.get("name") == "to_float" for entry in spec):
        transforms.append(_to_float_builder())
    return Compose(transforms)
