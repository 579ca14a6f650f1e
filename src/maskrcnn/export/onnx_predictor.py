"""Run an ONNX file written by ``maskrcnn.export.export_onnx`` under onnxruntime, with the
interface of :class:`maskrcnn.inference.predictor.Predictor` (same inputs, same ``Prediction``s)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor

from maskrcnn.data.image_input import ImageInput, to_float_image
from maskrcnn.export.metadata import METADATA_KEY, ExportMetadata
from maskrcnn.inference.predictor import Prediction


class OnnxPredictor:
    """Predictions from an exported ONNX model, one image per onnxruntime run.

    ``score_thresh`` and ``mask_threshold`` default to the values stored in the file's
    metadata; at most ``max_detections`` are kept per image. ``providers``: onnxruntime
    execution providers (default: the CPU one); ``num_threads``: intra-op threads (default:
    onnxruntime's choice). ``class_names``, ``label_to_cat_id`` and ``metadata`` come from
    the file.
    """

    def __init__(
        self,
        path: str | Path,
        score_thresh: float | None = None,
        max_detections: int = 100,
        mask_threshold: float | None = None,
        providers: Sequence[str] | None = None,
        num_threads: int | None = None,
    ) -> None:
        import onnxruntime as ort  # optional dependency: pip install maskrcnn[export]

        options = ort.SessionOptions()
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=list(providers or ["CPUExecutionProvider"])
            )
        except Exception as err:  # onnxruntime's errors derive from Exception only
            raise ValueError(f"{path}: onnxruntime cannot load it: {err}") from None
        props = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in props:
            raise ValueError(f"{path}: not an ONNX file written by maskrcnn export (no metadata)")
        self.metadata = ExportMetadata.from_json(props[METADATA_KEY])
        self.class_names = self.metadata.class_names
        self.label_to_cat_id = self.metadata.label_to_cat_id
        self.score_thresh = self.metadata.score_thresh if score_thresh is None else score_thresh
        self.mask_threshold = (
            self.metadata.mask_threshold if mask_threshold is None else mask_threshold
        )
        self.max_detections = max_detections

    def run(self, image: Tensor | np.ndarray) -> dict[str, Tensor]:
        """The graph's raw outputs for one (3, H, W) float32 image in [0, 1]: ``boxes``
        (N, 4), ``labels`` (N,), ``scores`` (N,), ``masks`` (N, 1, H, W) probabilities."""
        array = image.detach().cpu().numpy() if isinstance(image, Tensor) else image
        outputs = self.session.run(None, {"image": np.ascontiguousarray(array, np.float32)})
        names = ("boxes", "labels", "scores", "masks")
        arrays = [cast(np.ndarray, v) for v in outputs]
        return {k: torch.from_numpy(v) for k, v in zip(names, arrays, strict=True)}

    def __call__(
        self, inputs: ImageInput | Sequence[ImageInput], batch_size: int = 1,
        return_probs: bool = False,
    ) -> Prediction | list[Prediction]:
        """Predictions for one image (→ a Prediction) or a list (→ a list); inputs as for
        ``Predictor``: paths, PIL images, numpy arrays, (3, H, W) tensors. ``batch_size``
        is accepted for the Predictor's interface; images always run one at a time."""
        single = not isinstance(inputs, (list, tuple))
        items = [cast(ImageInput, inputs)] if single else list(cast(Sequence[Any], inputs))
        out = self.predict_batch([to_float_image(x) for x in items], return_probs)
        return out[0] if single else out

    def predict_batch(self, images: list[Tensor], return_probs: bool = False) -> list[Prediction]:
        """Predictions for (3, H, W) float images in [0, 1], each run on its own."""
        return [self._to_prediction(self.run(im), return_probs) for im in images]

    def _to_prediction(self, output: dict[str, Tensor], return_probs: bool) -> Prediction:
        # The same selection as Predictor._to_prediction, so both give the same Prediction.
        keep = torch.where(output["scores"] >= self.score_thresh)[0]
        keep = keep[output["scores"][keep].argsort(descending=True, stable=True)]
        keep = keep[: self.max_detections]
        probs = output["masks"][keep, 0].float()
        labels = output["labels"][keep]
        return Prediction(
            boxes=output["boxes"][keep].float(),
            labels=labels,
            class_names=[self.name(int(v)) for v in labels],
            scores=output["scores"][keep].float(),
            masks=probs > self.mask_threshold,
            mask_probs=probs if return_probs else None,
        )

    def name(self, label: int) -> str:
        """The class name of ``label`` (its number as text when unknown)."""
        names = self.class_names
        return names[label] if names is not None and 0 <= label < len(names) else str(label)
