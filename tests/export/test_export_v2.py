"""The v2 architecture (BatchNorm in the FPN and heads) through the export: its graph equals
the eager model, and the ONNX file (norms folded) gives the same detections."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from maskrcnn.config import ModelConfig
from maskrcnn.export import OnnxPredictor, export_onnx
from maskrcnn.export.graph import ExportableMaskRCNN
from maskrcnn.model.mask_rcnn import MaskRCNN

NAMES = ("boxes", "labels", "scores", "masks")


@pytest.fixture(scope="module")
def model() -> MaskRCNN:
    torch.manual_seed(0)
    cfg = ModelConfig(num_classes=4, backbone="resnet18", arch="v2", fpn_channels=32,
                      min_size=96, max_size=96, box_score_thresh=0.2, box_detections_per_img=10,
                      rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=50)
    net = MaskRCNN(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):  # the FPN's and heads': give them statistics
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))  # type: ignore[union-attr]
                m.running_var.copy_(1 + 0.2 * torch.rand(m.num_features, generator=g))  # type: ignore[union-attr]
        # A classifier that is sure of some class somewhere: detections to compare.
        net.roi_heads.box_predictor.cls_score.weight.mul_(20)
    return net.eval()


def _image() -> torch.Tensor:
    torch.manual_seed(3)
    image = torch.rand(3, 72, 88) * 0.3
    image[:, 20:50, 30:70] += 0.6
    return image.clamp(0, 1)


def test_v2_graph_equals_the_eager_model(model: MaskRCNN) -> None:
    image = _image()
    reference = model.infer([image])[0]
    assert len(reference["boxes"]) > 0
    with torch.no_grad():
        outputs = dict(zip(NAMES, ExportableMaskRCNN(model).eval()(image), strict=True))
    for name in ("boxes", "labels", "scores"):
        assert torch.equal(outputs[name], reference[name]), name
    assert torch.allclose(outputs["masks"], reference["masks"], rtol=0, atol=1e-6)


def test_v2_onnx_equals_pytorch(model: MaskRCNN, tmp_path: Path) -> None:
    path = export_onnx(model, tmp_path / "v2.onnx")
    image = _image()
    reference = model.infer([image])[0]
    outputs = OnnxPredictor(path, num_threads=1).run(image)
    assert torch.equal(outputs["labels"], reference["labels"])
    torch.testing.assert_close(outputs["boxes"], reference["boxes"], atol=1e-3, rtol=0)
    torch.testing.assert_close(outputs["scores"], reference["scores"], atol=1e-4, rtol=0)
    torch.testing.assert_close(outputs["masks"], reference["masks"], atol=1e-3, rtol=0)
