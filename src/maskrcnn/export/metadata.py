"""The metadata stored with an exported model: class names, label → category id map, input
and output conventions, thresholds."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from maskrcnn.model.mask_rcnn import MaskRCNN

METADATA_KEY = "maskrcnn"  # the whole record as JSON, in ONNX metadata_props
INPUT_DOC = "image: float32 (3, H, W), RGB, values in [0, 1], any H and W; one image per run"
OUTPUT_DOC = (
    "boxes: float32 (N, 4) xyxy in input pixels; labels: int64 (N,), 1..K, class_names[label];"
    " scores: float32 (N,), best first; masks: float32 (N, 1, H, W) probabilities at the input"
    " size (binary mask: masks > mask_threshold); N may be 0"
)


@dataclass(frozen=True)
class ExportMetadata:
    """What a deployed model needs besides its graph. ``class_names[label]`` names a label
    (index 0: the background); ``label_to_cat_id`` maps labels to COCO category ids;
    ``box_score_thresh`` is applied inside the graph, ``score_thresh`` and
    ``mask_threshold`` are the suggested thresholds for the caller."""

    class_names: list[str] | None
    label_to_cat_id: dict[int, int] | None
    box_score_thresh: float
    score_thresh: float
    mask_threshold: float
    min_size: int
    max_size: int
    input: str = INPUT_DOC
    outputs: str = OUTPUT_DOC
    format_version: int = 1

    def to_json(self) -> str:
        """The fields as a JSON object (``label_to_cat_id``'s keys become strings)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ExportMetadata:
        data = json.loads(text)
        if data.get("label_to_cat_id") is not None:
            data["label_to_cat_id"] = {int(k): int(v) for k, v in data["label_to_cat_id"].items()}
        return cls(**data)

    def onnx_props(self) -> dict[str, str]:
        """``metadata_props`` of the ONNX file: each field as text (JSON for lists and maps)
        and the whole record as JSON under ``maskrcnn``."""
        props = {k: v if isinstance(v, str) else json.dumps(v) for k, v in asdict(self).items()}
        return {**props, METADATA_KEY: self.to_json()}


def make_metadata(
    model: MaskRCNN,
    class_names: Sequence[str] | None,
    label_to_cat_id: Mapping[int, int] | None,
    score_thresh: float,
) -> ExportMetadata:
    """The metadata of ``model`` with the given names, category map and score threshold."""
    cfg = model.cfg
    return ExportMetadata(
        class_names=list(class_names) if class_names is not None else None,
        label_to_cat_id=dict(label_to_cat_id) if label_to_cat_id is not None else None,
        box_score_thresh=cfg.box_score_thresh,
        score_thresh=score_thresh,
        mask_threshold=cfg.mask_threshold,
        min_size=cfg.min_sizes[-1],
        max_size=cfg.max_size,
    )
