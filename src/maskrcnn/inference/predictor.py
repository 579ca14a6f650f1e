"""The Predictor: images in any common form → detections with binary masks.

Separate from the model (as in segment-anything): the model is an ``nn.Module`` with
torchvision's interface; the Predictor reads and converts inputs, batches them, picks the
device, runs the model (optionally with test-time augmentation) under ``inference_mode`` and
turns its output into :class:`Prediction` objects.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from maskrcnn.data.image_input import ImageInput, to_float_image, to_image_tensor
from maskrcnn.engine.build import model_from_checkpoint
from maskrcnn.engine.coco_results import prediction_to_coco
from maskrcnn.inference.sliced import (
    TileConfig,
    model_full_pass,
    model_tile_predictor,
    sliced_predict,
)
from maskrcnn.inference.tta import TTAConfig, tta_predict
from maskrcnn.model.mask_rcnn import MaskRCNN
from maskrcnn.model.validation import check_images
from maskrcnn.structures.local_masks import LocalMasks


@dataclass
class Prediction:
    """Detections of one image, best score first, in the image's pixels.

    boxes: (N, 4) float xyxy; labels: (N,) int64 (0 is the background, never predicted);
    class_names: N names; scores: (N,) float; masks: (N, H, W) bool, the mask probability
    above the predictor's ``mask_threshold``, or with sliced prediction (``tile``) a
    :class:`LocalMasks`: each mask over its own box, since N × H × W does not fit for large
    images (``masks.to_dense()`` gives the tensor where it does); mask_probs: (N, H, W)
    float, kept only with ``return_probs=True`` (not with sliced prediction).
    """

    boxes: Tensor
    labels: Tensor
    class_names: list[str]
    scores: Tensor
    masks: Tensor | LocalMasks
    mask_probs: Tensor | None = None

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the image the prediction is for."""
        if isinstance(self.masks, LocalMasks):
            return self.masks.image_size
        return int(self.masks.shape[-2]), int(self.masks.shape[-1])

    def dense_masks(self) -> Tensor:
        """(N, H, W) bool masks, built from box-local ones if need be."""
        return self.masks.to_dense() if isinstance(self.masks, LocalMasks) else self.masks

    def to_numpy(self) -> dict[str, Any]:
        """Arrays: boxes (N, 4) float32, labels (N,) int64, scores (N,) float32, masks
        (N, H, W) bool, mask_probs (N, H, W) float32 or None; class_names a list."""
        probs = self.mask_probs
        return {
            "boxes": self.boxes.cpu().numpy(),
            "labels": self.labels.cpu().numpy(),
            "class_names": list(self.class_names),
            "scores": self.scores.cpu().numpy(),
            "masks": self.dense_masks().cpu().numpy(),
            "mask_probs": None if probs is None else probs.cpu().numpy(),
        }

    def to_coco(
        self, image_id: int, label_to_cat_id: Mapping[int, int] | None = None
    ) -> list[dict[str, Any]]:
        """COCO results dicts (``image_id``, ``category_id``, ``bbox`` xywh, ``score``,
        ``segmentation`` compressed RLE); labels map through ``label_to_cat_id`` (None:
        labels are category ids)."""
        fields = {"boxes": self.boxes, "labels": self.labels, "scores": self.scores}
        return prediction_to_coco({**fields, "masks": self.masks}, image_id, label_to_cat_id)


def pick_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"``: CUDA when available, else the CPU. A ValueError for a name
    PyTorch does not know or a CUDA device this machine does not have."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        picked = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r}: not a device name (cpu, cuda, cuda:1, ...)") from None
    if picked.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device!r}: PyTorch sees no CUDA device on this machine")
        if picked.index is not None and picked.index >= count:
            raise ValueError(f"device {device!r}: this machine has {count} CUDA device(s)")
    return picked


class Predictor:
    """Runs ``model`` on images given in any common form; see :meth:`__call__`.

    The model is moved to ``device`` (None: CUDA when available, else CPU) and put in eval
    mode. Detections scoring below ``score_thresh`` are dropped (the model's own
    ``box_score_thresh`` applies first), at most ``max_detections`` are kept per image (None:
    the model's ``box_detections_per_img``, 100 by default; a larger value raises the
    model's own cap while the predictor runs it, so a model shared between
    threads needs a predictor each; a warning says when the cap cut detections), and
    masks are binarised at ``mask_threshold`` (None: the model config's ``mask_threshold``,
    which an ONNX export of the model stores in its metadata too). ``tta``: a
    :class:`TTAConfig` to predict with test-time augmentation, or None. ``tile``: a
    :class:`TileConfig` to predict large images tile by tile (sliced prediction, masks
    merged across tiles and kept box-local), or None.
    ``class_names[label]`` names a label (index 0 is the background); ``label_to_cat_id``
    maps labels to COCO category ids. ``optimize``: None runs the model as it is
    (torchvision's arithmetic); a precision (``auto``, ``fp32``, ``bf16``, ``fp16``,
    ``int8`` with ``calibration`` images) switches it, in place, to the fast inference path
    of :meth:`MaskRCNN.optimize_for_inference`.
    """

    def __init__(
        self,
        model: MaskRCNN,
        class_names: Sequence[str] | None = None,
        label_to_cat_id: Mapping[int, int] | None = None,
        device: str | torch.device | None = None,
        score_thresh: float = 0.5,
        max_detections: int | None = None,
        mask_threshold: float | None = None,
        tta: TTAConfig | None = None,
        optimize: str | None = None,
        tile: TileConfig | None = None,
        calibration: Sequence[ImageInput] | None = None,
    ) -> None:
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        if optimize is not None:
            images = None if calibration is None else [to_float_image(c) for c in calibration]
            self.model.optimize_for_inference(optimize, calibration=images)
        self.class_names = list(class_names) if class_names is not None else None
        self.label_to_cat_id = dict(label_to_cat_id) if label_to_cat_id is not None else None
        self.score_thresh = score_thresh
        if max_detections is None:
            max_detections = self.model.roi_heads.detections_per_img
        if max_detections < 1:
            raise ValueError(f"max_detections must be >= 1, got {max_detections}")
        self.max_detections = max_detections
        self.mask_threshold = model.cfg.mask_threshold if mask_threshold is None else mask_threshold
        self.tta = tta
        self.tile = tile

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        score_thresh: float = 0.5,
        max_detections: int | None = None,
        mask_threshold: float | None = None,
        tta: TTAConfig | None = None,
        optimize: str | None = None,
        tile: TileConfig | None = None,
        calibration: Sequence[ImageInput] | None = None,
    ) -> Predictor:
        """A predictor for a checkpoint written by the trainer (read with
        ``weights_only=True``); raises :class:`CheckpointError` if it is not one."""
        trained = model_from_checkpoint(path)
        return cls(
            trained.model,
            class_names=trained.class_names,
            label_to_cat_id=trained.label_to_cat_id,
            device=device,
            score_thresh=score_thresh,
            max_detections=max_detections,
            mask_threshold=mask_threshold,
            tta=tta,
            optimize=optimize,
            tile=tile,
            calibration=calibration,
        )

    @classmethod
    def from_pretrained(cls, name: str | Path, **options: Any) -> Predictor:
        """:meth:`from_checkpoint` that also takes a weights name: ``coco`` (torchvision's
        COCO-trained Mask R-CNN, from the torch hub cache; see ``maskrcnn weights list``) or a
        training checkpoint's path. ``options`` are those of :meth:`from_checkpoint`."""
        return cls.from_checkpoint(name, **options)

    def __call__(
        self,
        inputs: ImageInput | Sequence[ImageInput],
        batch_size: int = 1,
        return_probs: bool = False,
    ) -> Prediction | list[Prediction]:
        """Predictions for one image (→ a :class:`Prediction`) or a list (→ a list).

        Each input is a path, a PIL image, a numpy (H, W, 3) uint8 array or a (3, H, W)
        tensor, uint8 or float in [0, 1]. Images are read and run ``batch_size`` at a time.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        single = not isinstance(inputs, (list, tuple))
        items = [cast(ImageInput, inputs)] if single else list(cast(Sequence[ImageInput], inputs))
        out: list[Prediction] = []
        # Sliced prediction keeps uint8 images as they are: it converts tile by tile.
        convert = to_image_tensor if self.tile is not None else to_float_image
        for start in range(0, len(items), batch_size):
            images = [convert(x) for x in items[start : start + batch_size]]
            out += self.predict_batch(images, return_probs)
        return out[0] if single else out

    def predict_batch(self, images: list[Tensor], return_probs: bool = False) -> list[Prediction]:
        """Predictions for (3, H, W) float images in [0, 1], run as one batch (with
        ``tile``: image by image, uint8 taken too, tiles batched)."""
        if self.tile is not None:
            if return_probs:
                raise ValueError("return_probs is not available with sliced prediction")
            with self._model_cap():
                return [self._predict_sliced(im) for im in images]
        images = [im.to(self.device) for im in check_images(images)]
        with torch.inference_mode(), self._model_cap():
            if self.tta is None:
                outputs = self.model.predict(images)
            else:
                outputs = tta_predict(self.model, images, self.tta)
        # Selected outside inference mode: the copies are ordinary tensors that callers
        # may modify in place.
        return [self._to_prediction(o, return_probs) for o in outputs]

    @contextmanager
    def _model_cap(self) -> Iterator[None]:
        """The model's own cap on detections per image raised to ``max_detections`` while
        the predictor runs it (restored after: the model may be shared)."""
        heads = self.model.roi_heads
        before = heads.detections_per_img
        heads.detections_per_img = max(before, self.max_detections)
        try:
            yield
        finally:
            heads.detections_per_img = before

    def _predict_sliced(self, image: Tensor) -> Prediction:
        assert self.tile is not None
        if image.dtype != torch.uint8:
            image = check_images([image])[0]
        # The image stays where it is (a large one on the CPU): tiles go to the device one
        # batch at a time.
        tiles = model_tile_predictor(self.model, self.mask_threshold, self.tta)
        full = model_full_pass(self.model, self.mask_threshold, self.tta)
        with torch.inference_mode():
            dets, masks = sliced_predict(image, tiles, self.tile,
                                         full if self.tile.full_pass else None)
        keep = self._kept(dets.scores, cut_by_model=False)
        labels = dets.labels[keep].cpu()
        return Prediction(
            boxes=dets.boxes[keep].float().cpu().clone(),
            labels=labels.clone(),
            class_names=[self.name(int(v)) for v in labels],
            scores=dets.scores[keep].float().cpu().clone(),
            masks=masks.select(keep),
        )

    def _kept(self, scores: Tensor, cut_by_model: bool) -> Tensor:
        """Indices of the detections to keep, best first; warns when the cap cut some:
        more than ``max_detections`` passed the threshold, or (``cut_by_model``) the model
        stopped at its cap and all of those passed."""
        keep = torch.where(scores >= self.score_thresh)[0]
        keep = keep[scores[keep].argsort(descending=True, stable=True)]
        if keep.numel() > self.max_detections or (
            cut_by_model and keep.numel() == self.max_detections
        ):
            warnings.warn(
                f"an image reached the cap of {self.max_detections} detections scoring at "
                f"least {self.score_thresh:g}; there are more (raise max_detections, "
                "--max-detections)",
                stacklevel=3,
            )
        return keep[: self.max_detections]

    def _to_prediction(self, output: dict[str, Tensor], return_probs: bool) -> Prediction:
        cap = max(self.model.roi_heads.detections_per_img, self.max_detections)
        keep = self._kept(output["scores"], cut_by_model=len(output["scores"]) >= cap)
        probs = output["masks"][keep, 0].float().cpu()
        labels = output["labels"][keep].cpu()
        return Prediction(
            boxes=output["boxes"][keep].float().cpu(),
            labels=labels,
            class_names=[self.name(int(v)) for v in labels],
            scores=output["scores"][keep].float().cpu(),
            masks=probs > self.mask_threshold,
            mask_probs=probs if return_probs else None,
        )

    def name(self, label: int) -> str:
        """The class name of ``label`` (its number as text when unknown)."""
        names = self.class_names
        return names[label] if names is not None and 0 <= label < len(names) else str(label)
