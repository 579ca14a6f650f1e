"""Export a :class:`MaskRCNN` to ONNX or to a ``torch.export`` archive, with dynamic image
sizes, pre- and post-processing inside the graph, and metadata.

Both formats hold one graph, :class:`~maskrcnn.export.graph.ExportableMaskRCNN`:

    image (3, H, W) float32 RGB in [0, 1], any H and W
      → boxes (N, 4) float32 xyxy in input pixels, labels (N,) int64, scores (N,) float32
        (best first, at least the model's ``box_score_thresh``), masks (N, 1, H, W) float32
        probabilities pasted at the input size; N may be 0.

One image per run: run it once per image to predict a batch. FrozenBatchNorm is folded into
the convolutions before export (the values change only by float rounding).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.export import Dim, ExportedProgram

from maskrcnn.export.graph import ExportableMaskRCNN
from maskrcnn.export.metadata import ExportMetadata, make_metadata
from maskrcnn.model.fast import fold_batchnorm
from maskrcnn.model.mask_rcnn import MaskRCNN
from maskrcnn.utils.atomic import atomic_write

DEFAULT_OPSET = 18
# The lowest opset the graph can be written in: the NMS translation is onnxscript opset-18
# code and torch's exporter writes opset 18 natively; asked for less, its down-conversion
# fails (no adapter for Pad) and it quietly keeps opset 18.
MIN_OPSET = 18
METADATA_FILE = "maskrcnn_metadata.json"  # the extra file of a torch.export archive
INPUT_NAMES = ["image"]
OUTPUT_NAMES = ["boxes", "labels", "scores", "masks"]


def exportable(model: MaskRCNN) -> ExportableMaskRCNN:
    """The export graph of a CPU, eval-mode copy of ``model`` with FrozenBatchNorm folded
    into the convolutions (``model`` itself is left as it is)."""
    copy_ = copy.deepcopy(model).cpu().float().eval()
    fold_batchnorm(copy_)  # the backbone's norms, and in v2 those of the FPN and heads
    return ExportableMaskRCNN(copy_).eval()


@contextlib.contextmanager
def quiet_exporters() -> Iterator[None]:
    """Silence the exporters' deprecation warnings (torchvision's nms fake kernel) and the
    ONNX optimiser's INFO lines (hundreds, under ``maskrcnn``'s INFO logging)."""
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript")]
    levels = [log.level for log in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for log in loggers:
            log.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for log, level in zip(loggers, levels, strict=True):
                log.setLevel(level)


def _nms_first_onnx(boxes: Any, scores: Any, iou_threshold: float, k: int) -> Any:
    """ONNX for ``maskrcnn::nms_first``: NonMaxSuppression stopping after ``k`` boxes."""
    from onnxscript import opset18

    op: Any = opset18  # traced by the exporter; onnxscript's static types do not apply
    selected = op.NonMaxSuppression(
        op.Unsqueeze(boxes, [0]), op.Unsqueeze(scores, [0, 1]), k, iou_threshold
    )  # (K, 3): batch, class, box index
    return op.Reshape(op.Slice(selected, [2], [3], [1]), [-1])


def export_program(model: MaskRCNN) -> ExportedProgram:
    """``torch.export`` of ``model``'s single-image graph with dynamic H and W."""
    graph = exportable(model)
    example = (torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(0)),)
    dims = {"image": {1: Dim("height", min=2), 2: Dim("width", min=2)}}
    with quiet_exporters():
        return torch.export.export(graph, example, dynamic_shapes=dims, strict=False)


def export_torch(
    model: MaskRCNN,
    path: str | Path,
    class_names: Sequence[str] | None = None,
    label_to_cat_id: Mapping[int, int] | None = None,
    score_thresh: float = 0.5,
    program: ExportedProgram | None = None,
) -> Path:
    """Write ``model`` as a ``torch.export`` archive (``.pt2``) with the metadata as its
    extra file ``maskrcnn_metadata.json``; ``program``: a ready ``export_program(model)``."""
    path = writable(path)
    program = program if program is not None else export_program(model)
    metadata = make_metadata(model, class_names, label_to_cat_id, score_thresh)
    with atomic_write(path, suffix=".tmp.pt2") as tmp:  # torch.export insists on .pt2
        torch.export.save(program, tmp, extra_files={METADATA_FILE: metadata.to_json()})
    return path


def load_torch_export(
    path: str | Path,
) -> tuple[Callable[[Tensor], tuple[Tensor, Tensor, Tensor, Tensor]], ExportMetadata]:
    """The callable module of a ``.pt2`` written by :func:`export_torch` —
    ``module(image) -> (boxes, labels, scores, masks)`` — and its metadata."""
    extra = {METADATA_FILE: ""}
    try:
        program = torch.export.load(path, extra_files=extra)
    except FileNotFoundError:
        raise
    except Exception as err:  # a zip error, a foreign archive: name the file
        raise ValueError(f"{path}: not a torch.export archive ({err})") from None
    if not extra[METADATA_FILE]:
        raise ValueError(f"{path}: no {METADATA_FILE}; not written by maskrcnn export")
    return program.module(), ExportMetadata.from_json(extra[METADATA_FILE])


def export_onnx(
    model: MaskRCNN,
    path: str | Path,
    class_names: Sequence[str] | None = None,
    label_to_cat_id: Mapping[int, int] | None = None,
    opset: int = DEFAULT_OPSET,
    score_thresh: float = 0.5,
    program: ExportedProgram | None = None,
) -> Path:
    """Write ``model`` as an ONNX file (torch's dynamo exporter, ``onnxscript`` needed) with
    input ``image`` (3, H, W), outputs ``boxes``, ``labels``, ``scores``, ``masks`` and the
    metadata in ``metadata_props``; ``program``: a ready ``export_program(model)``.

    Raises ValueError, before writing anything, for an ``opset`` under ``MIN_OPSET`` or one
    the exporter did not produce."""
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is not supported: the export needs opset {MIN_OPSET} "
                         "or later")
    path = writable(path)
    program = program if program is not None else export_program(model)
    with quiet_exporters():
        onnx_program = torch.onnx.export(
            program,
            input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES,
            opset_version=opset,
            dynamo=True,
            verbose=False,
            custom_translation_table={torch.ops.maskrcnn.nms_first.default: _nms_first_onnx},
        )
    assert onnx_program is not None
    written = onnx_program.model.opset_imports.get("")
    if written != opset:
        raise ValueError(f"{path}: asked for opset {opset} but the exporter produced opset "
                         f"{written}; nothing was written (opset {DEFAULT_OPSET} is supported)")
    props = make_metadata(model, class_names, label_to_cat_id, score_thresh).onnx_props()
    onnx_program.model.metadata_props.update(props)
    with atomic_write(path) as tmp:
        onnx_program.save(tmp)
    return path


def writable(path: str | Path) -> Path:
    """``path`` as a Path, checked before a slow export: a ValueError if it is a folder or its
    folder cannot be made (a file is in the way)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give the file to write, e.g. {path / 'model'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{path}: cannot create its folder ({err.strerror})") from None
    return path


def image_to_input(image: np.ndarray) -> np.ndarray:
    """An (H, W, 3) uint8 RGB array (as ``np.asarray(PIL.Image.open(f).convert("RGB"))``)
    → the graph's input, (3, H, W) float32 in [0, 1]."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32) / np.float32(255)
