"""Export to ONNX or a ``torch.export`` archive (one graph: pre-processing, model,
post-processing), the metadata stored with it, and a predictor that runs the ONNX file."""

from maskrcnn.export.api import (
    export_onnx,
    export_program,
    export_torch,
    image_to_input,
    load_torch_export,
)
from maskrcnn.export.metadata import ExportMetadata
from maskrcnn.export.onnx_predictor import OnnxPredictor

__all__ = [
    "ExportMetadata",
    "OnnxPredictor",
    "export_onnx",
    "export_program",
    "export_torch",
    "image_to_input",
    "load_torch_export",
]
