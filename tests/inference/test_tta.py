"""Test-time augmentation: views, their inverses (boxes and masks), merging, equivariance."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from maskrcnn import MaskRCNN, ModelConfig
from maskrcnn.inference.predictor import Predictor
from maskrcnn.inference.tta import (
    TTAConfig,
    View,
    average_mask_probs,
    flip_boxes,
    merge_nms,
    merge_views,
    merge_wbf,
    run_view,
    tta_predict,
)
from maskrcnn.model.postprocess import paste_masks
from maskrcnn.structures.detections import Detections

H, W = 70, 90  # not square, so that a swapped axis shows
VIEWS = {
    "hflip": View(hflip=True),
    "vflip": View(vflip=True),
    "both": View(hflip=True, vflip=True),
    "scale0.75": View(scale=0.75),
    "scale1.33": View(scale=1.33),
    "hflip+scale0.75": View(hflip=True, scale=0.75),
    "vflip+scale1.33": View(vflip=True, scale=1.33),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> MaskRCNN:
    torch.manual_seed(0)
    cfg = ModelConfig(
        num_classes=4,
        backbone="resnet18",
        fpn_channels=32,
        min_size=64,
        max_size=96,
        anchor_sizes=(16, 32, 64, 128, 256),
        rpn_pre_nms_top_n_test=100,
        rpn_post_nms_top_n_test=30,
        box_detections_per_img=10,
    )
    return MaskRCNN(cfg).eval()


def _images() -> list[Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.rand(3, H, W, generator=g), torch.rand(3, 64, 64, generator=g)]


def _l_shape() -> tuple[Tensor, Tensor]:
    """An (H, W) bool "L" (asymmetric in both axes) and its (1, 4) box."""
    y, x = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    x1, y1, x2, y2 = 14, 9, 64, 49
    mask = (x >= x1) & (y >= y1) & (x < x2) & (y < y2) & ((x < 30) | (y >= 35))
    return mask, torch.tensor([[x1, y1, x2, y2]], dtype=torch.float32)


def _box_of(mask: Tensor) -> Tensor:
    ys, xs = torch.where(mask)
    return torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()


def _within_one_pixel(a: Tensor, b: Tensor) -> bool:
    """Every pixel where the (H, W) bool masks differ is within one pixel of b's boundary."""
    grown = F.max_pool2d(b[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0
    shrunk = -F.max_pool2d(-b[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0
    border = grown & ~shrunk
    return bool(((a ^ b) & ~border).sum() == 0)


def _iou(a: Tensor, b: Tensor) -> float:
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


def test_views_of_a_config() -> None:
    views = TTAConfig(hflip=True, vflip=True, scales=(0.75, 1.0, 1.25)).views()
    assert len(views) == 12 and len(set(views)) == 12
    assert View() in views and View(True, True, 1.25) in views
    assert TTAConfig(hflip=False).views() == [View()]
    with pytest.raises(ValueError, match="merge"):
        TTAConfig(merge="mean")
    with pytest.raises(ValueError, match="scales"):
        TTAConfig(scales=(1.0, 0.0))


def test_identity_view_alone_equals_the_plain_model(model: MaskRCNN) -> None:
    images = _images()
    with torch.inference_mode():
        plain = model.predict(images)
        tta = tta_predict(model, images, TTAConfig(hflip=False))
    assert plain[0]["boxes"].shape[0] > 0
    for p, t in zip(plain, tta, strict=True):
        assert set(p) == set(t)
        for key in p:
            assert torch.equal(p[key], t[key]), key
    a = Predictor(model, score_thresh=0.0)(images, batch_size=2, return_probs=True)
    b = Predictor(model, score_thresh=0.0, tta=TTAConfig(hflip=False))(
        images, batch_size=2, return_probs=True
    )
    assert isinstance(a, list) and isinstance(b, list)
    for pa, pb in zip(a, b, strict=True):
        for key in ("boxes", "labels", "scores", "masks", "mask_probs"):
            assert torch.equal(getattr(pa, key), getattr(pb, key)), key


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_identity_view_follows_the_fast_inference_path(model: MaskRCNN, precision: str) -> None:
    """With BatchNorm folded, channels-last and autocast, TTA runs the network as
    ``model.predict`` does: the identity view alone still equals it exactly."""
    fast = copy.deepcopy(model).optimize_for_inference(precision=precision)
    images = _images()
    with torch.inference_mode():
        plain = fast.predict(images)
        tta = tta_predict(fast, images, TTAConfig(hflip=False))
        flipped = tta_predict(fast, images, TTAConfig(hflip=True))
    for p, t, f in zip(plain, tta, flipped, strict=True):
        for key in p:
            assert torch.equal(p[key], t[key]), key
        assert f["masks"].dtype == f["boxes"].dtype == torch.float32


@pytest.mark.parametrize("name", list(VIEWS))
def test_box_and_mask_come_back_through_the_view(model: MaskRCNN, name: str) -> None:
    """Draw an L, push the image through the view as the predictor does (flip, the
    model's resize at the view's size), then back: the box through ``boxes_from_view``, the
    mask as the mask head sees it (28x28 RoIAlign in the view) through ``masks_from_view``
    and ``paste_masks``. Both come back to within one pixel."""
    view = VIEWS[name]
    mask, box = _l_shape()
    image = mask.float().expand(3, H, W)
    batch = view.prepare(model, [image])
    vh, vw = batch.image_sizes[0]
    mean, std = model.cfg.image_mean[0], model.cfg.image_std[0]
    in_view = batch.tensor[0, 0, :vh, :vw] * std + mean  # the red channel, un-normalised
    view_box = view.boxes_to_view(box, (H, W), (vh, vw))
    assert torch.allclose(view_box[0], _box_of(in_view > 0.5), atol=1.0)
    assert torch.allclose(view.boxes_from_view(view_box, (vh, vw), (H, W)), box, atol=1e-3)

    # aligned=True: the model's own RoIAlign (aligned=False, as torchvision's) samples half a
    # view pixel off in every view; that is the model's convention, not the view's inverse.
    seen = roi_align(in_view[None, None], [view_box], 28, 1.0, sampling_ratio=2, aligned=True)
    back = paste_masks(view.masks_from_view(seen), box, (H, W))[0, 0] > 0.5
    assert _within_one_pixel(back, mask), name
    if view.hflip or view.vflip:  # without the un-flip the mask is wrong: the test can fail
        wrong = paste_masks(seen, box, (H, W))[0, 0] > 0.5
        assert _iou(wrong, mask) < 0.6


def test_flip_boxes_is_its_own_inverse_and_matches_tensor_flip() -> None:
    box = torch.tensor([[3.0, 5.0, 10.0, 20.0]])
    flipped = flip_boxes(box, (30, 40), hflip=True, vflip=True)
    assert flipped.tolist() == [[30.0, 10.0, 37.0, 25.0]]
    assert torch.equal(flip_boxes(flipped, (30, 40), True, True), box)
    mask = torch.zeros(30, 40, dtype=torch.bool)
    mask[5:20, 3:10] = True
    assert torch.equal(_box_of(mask.flip(-1, -2)), flipped[0])


def test_a_mask_predicted_in_a_vflipped_view_is_flipped_back_on_the_same_axis() -> None:
    probs = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    seen = probs.flip(-2)  # the object upside down inside its mirrored box
    assert torch.equal(View(vflip=True).masks_from_view(seen), probs)
    assert not torch.allclose(View(hflip=True).masks_from_view(seen), probs)
    both = probs.flip(-1).flip(-2)
    assert torch.equal(View(hflip=True, vflip=True, scale=1.33).masks_from_view(both), probs)


class _ImageRecorder(nn.Module):
    """Wraps a backbone and remembers which input produced which features (by the finest
    level, which RoIAlign receives as it is from an fp32 model)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.inputs: dict[int, Tensor] = {}

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        features: OrderedDict[str, Tensor] = self.inner(x)
        self.inputs[id(features["0"])] = x
        return features


def test_mask_stage_of_every_view_recovers_a_drawn_mask(model: MaskRCNN) -> None:
    """An oracle mask head that reads the (normalised) red channel under each box: averaged
    over flipped and scaled views and pasted at the original size, it gives back the drawn
    L. A wrong un-flip on any axis would average a mirrored L in."""
    mask, box = _l_shape()
    image = mask.float().expand(3, H, W)
    recorder = _ImageRecorder(model.backbone)
    oracle = MaskRCNN(model.cfg).eval()
    oracle.load_state_dict(model.state_dict())
    oracle.backbone = recorder  # type: ignore[assignment]

    half = (0.5 - model.cfg.image_mean[0]) / model.cfg.image_std[0]  # 0.5, normalised

    def mask_logits(
        features: OrderedDict[str, Tensor], boxes: list[Tensor], _sizes: object, _labels: object
    ) -> Tensor:
        x = recorder.inputs[id(features["0"])][:, :1]
        return (roi_align(x, boxes, 28, 1.0, sampling_ratio=2, aligned=True) - half) * 10.0

    oracle.roi_heads.mask_logits = mask_logits  # type: ignore[method-assign, assignment]
    views = TTAConfig(hflip=True, vflip=True, scales=(0.75, 1.33)).views()
    labels = [torch.tensor([1])]
    with torch.inference_mode():
        results = [run_view(oracle, [image], v) for v in views]
        for r in results:
            (probs,) = average_mask_probs(oracle, [r], [r.to_view([box])], labels)
            assert _within_one_pixel(paste_masks(probs, box, (H, W))[0, 0] > 0.5, mask), r.view
        (probs,) = average_mask_probs(oracle, results, [r.to_view([box]) for r in results], labels)
    assert _within_one_pixel(paste_masks(probs, box, (H, W))[0, 0] > 0.5, mask)


def _tta_parts(model: MaskRCNN, image: Tensor, cfg: TTAConfig) -> tuple[Tensor, ...]:
    """Merged boxes, scores, labels and the view-averaged 28x28 mask probabilities."""
    results = [run_view(model, [image], v) for v in cfg.views()]
    ((boxes, scores, labels),) = merge_views(results, cfg, max_detections=10)
    (probs,) = average_mask_probs(model, results, [r.to_view([boxes]) for r in results], [labels])
    return boxes, scores, labels, probs


@pytest.mark.parametrize("merge", ["nms", "wbf"])
def test_tta_is_equivariant_to_flips(model: MaskRCNN, merge: str) -> None:
    """The views of a flipped image are the views of the image, flipped: so the prediction
    for the flipped image must be the flipped prediction — boxes, and the box-relative mask
    probabilities on both axes. (Pasted masks differ by the paste's rounding of boxes to
    whole pixels, which is not symmetric; tested to one pixel elsewhere.)"""
    image = _images()[0]
    cfg = TTAConfig(hflip=True, vflip=True, scales=(0.8, 1.0), merge=merge)
    with torch.inference_mode():
        boxes, scores, labels, probs = _tta_parts(model, image, cfg)
        m_boxes, m_scores, m_labels, m_probs = _tta_parts(model, image.flip(-1, -2), cfg)
        (full,) = tta_predict(model, [image.flip(-1, -2)], cfg)
    assert boxes.shape[0] > 0 and (scores[:-1] >= scores[1:]).all()
    assert torch.equal(labels, m_labels)
    assert torch.allclose(scores, m_scores, atol=1e-5)
    assert torch.allclose(m_boxes, flip_boxes(boxes, (H, W), hflip=True, vflip=True), atol=1e-3)
    assert torch.allclose(m_probs, probs.flip(-1, -2), atol=1e-5)
    assert not torch.allclose(m_probs, probs, atol=1e-2)  # the masks are not symmetric
    assert torch.equal(full["boxes"], m_boxes) and torch.equal(full["scores"], m_scores)
    assert torch.equal(full["masks"], paste_masks(m_probs, m_boxes, (H, W)))


def test_tta_output_format(model: MaskRCNN) -> None:
    images = _images()
    cfg = TTAConfig(hflip=True, vflip=True, scales=(0.75, 1.33), merge="wbf")
    with torch.inference_mode():
        out = tta_predict(model, images, cfg)
    for o, im in zip(out, images, strict=True):
        n = o["boxes"].shape[0]
        assert 0 < n <= model.cfg.box_detections_per_img
        assert o["masks"].shape == (n, 1, *im.shape[-2:])
        assert float(o["masks"].min()) >= 0.0 and float(o["masks"].max()) <= 1.0
        assert (o["boxes"][:, 2:] <= torch.tensor([im.shape[2], im.shape[1]]) + 1e-3).all()
        assert (o["boxes"] >= -1e-3).all() and o["labels"].min() >= 1


def test_merge_nms_keeps_the_best_box_per_class() -> None:
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [1, 0, 11, 10], [50, 50, 60, 60]])
    scores = torch.tensor([0.6, 0.9, 0.8, 0.3])
    labels = torch.tensor([1, 1, 2, 1])
    b, s, lab = merge_nms(Detections(boxes, scores, labels), 0.5)
    assert s.tolist() == pytest.approx([0.9, 0.8, 0.3])
    assert lab.tolist() == [1, 2, 1] and torch.equal(b[0], boxes[1])


def test_merge_wbf_fuses_by_score_weight_and_penalises_lone_boxes() -> None:
    boxes = torch.tensor([[0.0, 0, 10, 10], [2, 0, 12, 10], [0, 0, 10, 10], [50, 50, 60, 60]])
    scores = torch.tensor([0.9, 0.6, 0.5, 0.8])
    labels = torch.tensor([1, 1, 2, 1])
    b, s, lab = merge_wbf(Detections(boxes, scores, labels), iou_thresh=0.5, num_views=2)
    # cluster {0, 1}: x1 = (0 * 0.9 + 2 * 0.6) / 1.5 = 0.8, score (0.9 + 0.6) / 2
    assert s.tolist() == pytest.approx([0.75, 0.4, 0.25])
    assert lab.tolist() == [1, 1, 2]
    assert b[0].tolist() == pytest.approx([0.8, 0.0, 10.8, 10.0])
    assert b[1].tolist() == [50.0, 50.0, 60.0, 60.0]
    none = Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    assert merge_wbf(none, 0.5, 2).boxes.shape == (0, 4)
