"""maskrcnn: Mask R-CNN instance segmentation, a drop-in for torchvision's model.

The names below are imported on first use, so that ``import maskrcnn`` (and the
``maskrcnn`` command's ``--help``) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from maskrcnn.config import LossWeights, ModelConfig
    from maskrcnn.inference.predictor import Predictor
    from maskrcnn.inference.tta import TTAConfig
    from maskrcnn.model.mask_rcnn import MaskRCNN

_EXPORTS = {
    "LossWeights": "maskrcnn.config",
    "MaskRCNN": "maskrcnn.model.mask_rcnn",
    "ModelConfig": "maskrcnn.config",
    "Predictor": "maskrcnn.inference.predictor",
    "TTAConfig": "maskrcnn.inference.tta",
}
__all__ = ["LossWeights", "MaskRCNN", "ModelConfig", "Predictor", "TTAConfig"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'maskrcnn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
