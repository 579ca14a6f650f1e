"""Anchors, box coder, matcher, sampler and mask predictor on hand-computed cases and
torchvision's."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from maskrcnn.model.anchors import AnchorGenerator, cell_anchors
from maskrcnn.model.box_coder import BoxCoder
from maskrcnn.model.mask_head import MaskPredictor
from maskrcnn.model.matcher import Matcher
from maskrcnn.model.sampler import BalancedSampler


def test_cell_anchors_by_hand() -> None:
    # size 32: ratio h/w = 0.5 → w = 32*sqrt(2) = 45.25, h = 22.63 → half-extents round(22.6, 11.3)
    a = cell_anchors(32, (0.5, 1.0, 2.0))
    assert a.tolist() == [
        [-23.0, -11.0, 23.0, 11.0],
        [-16.0, -16.0, 16.0, 16.0],
        [-11.0, -23.0, 11.0, 23.0],
    ]


def test_anchor_grid_matches_torchvision() -> None:
    sizes, ratios = (32, 64), (0.5, 1.0, 2.0)
    ours = AnchorGenerator(sizes, ratios)
    feats = [torch.zeros(1, 8, 16, 20), torch.zeros(1, 8, 8, 10)]
    got = torch.cat(ours((64, 80), [(16, 20), (8, 10)], torch.float32, torch.device("cpu")))
    ref_gen = TVAnchorGenerator(tuple((s,) for s in sizes), (ratios,) * 2)
    ref = ref_gen(ImageList(torch.zeros(1, 3, 64, 80), [(64, 80)]), feats)[0]
    assert torch.equal(got, ref)
    # stride 4 on level 0: the second position's anchors are the first's moved by 4 px in x
    assert torch.equal(got[3:6] - got[0:3], torch.tensor([[4.0, 0, 4, 0]] * 3))


def test_box_coder_round_trip_and_known_values() -> None:
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    ref = torch.tensor([[0.0, 0, 10, 10], [5, 5, 25, 45]])
    gt = torch.tensor([[1.0, 2, 13, 10], [0, 0, 20, 40]])
    deltas = coder.encode(gt, ref)
    # first box: centre moves (2, 1) on a 10-px box, width ×1.2, height ×0.8
    torch.testing.assert_close(
        deltas[0], torch.tensor([10 * 0.2, 10 * 0.1, 5 * math.log(1.2), 5 * math.log(0.8)])
    )
    decoded = coder.decode(deltas, ref)
    assert decoded.shape == (2, 1, 4)
    torch.testing.assert_close(decoded[:, 0], gt)


def test_box_coder_clamps_huge_scales() -> None:
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    out = coder.decode(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), torch.tensor([[0.0, 0, 16, 16]]))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 0, 2] - out[0, 0, 0], torch.tensor(1000.0))


def test_matcher_thresholds_and_low_quality_matches() -> None:
    iou = torch.tensor([[0.9, 0.5, 0.2, 0.1], [0.1, 0.6, 0.25, 0.05]])
    strict = Matcher(0.7, 0.3)(iou)
    assert strict.tolist() == [0, -2, -1, -1]
    lenient = Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou)
    # prediction 1 is ground truth 1's best match (0.6): it stays matched despite 0.6 < 0.7
    assert lenient.tolist() == [0, 1, -1, -1]


def test_sampler_respects_budget_and_fraction() -> None:
    torch.manual_seed(0)
    labels = torch.tensor([1] * 30 + [0] * 100 + [-1] * 10)
    pos, neg = BalancedSampler(40, 0.25)([labels])
    assert int(pos[0].sum()) == 10 and int(neg[0].sum()) == 30
    assert bool((labels[pos[0]] >= 1).all()) and bool((labels[neg[0]] == 0).all())
    # few positives: negatives fill the budget
    pos, neg = BalancedSampler(40, 0.5)([torch.tensor([1, 1] + [0] * 100)])
    assert int(pos[0].sum()) == 2 and int(neg[0].sum()) == 38


@pytest.mark.parametrize("channels_last", [False, True])
def test_mask_logits_of_one_class_per_roi_equal_the_full_predictor(channels_last: bool) -> None:
    torch.manual_seed(0)
    predictor = MaskPredictor(16, 8, num_masks=5).eval()
    torch.nn.init.normal_(predictor.mask_fcn_logits.bias)
    x = torch.randn(6, 16, 7, 7)
    if channels_last:
        predictor = predictor.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    with torch.no_grad():
        full = predictor(x)
        ours = predictor.logits_of(x, labels)
    assert ours.shape == (6, 1, 14, 14)
    assert torch.allclose(ours[:, 0], full[torch.arange(6), labels], atol=1e-5)
    agnostic = MaskPredictor(16, 8, num_masks=1).eval()
    with torch.no_grad():
        assert torch.equal(agnostic.logits_of(x, labels), agnostic(x))
