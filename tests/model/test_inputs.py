"""Wrong inputs give a ValueError that names the image and the problem."""

from __future__ import annotations

import copy

import pytest
import torch

from maskrcnn import LossWeights, MaskRCNN, ModelConfig

CFG = ModelConfig(backbone="resnet18", num_classes=5, min_size=128, max_size=192)


@pytest.fixture(scope="module")
def model() -> MaskRCNN:
    torch.manual_seed(0)
    return MaskRCNN(CFG)


def _target(**over: torch.Tensor) -> dict[str, torch.Tensor]:
    masks = torch.zeros(1, 64, 80, dtype=torch.uint8)
    masks[0, 10:30, 10:40] = 1
    t = {"boxes": torch.tensor([[10.0, 10, 40, 30]]), "labels": torch.tensor([2]), "masks": masks}
    t.update(over)
    return t


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ([], "non-empty list"),
        (torch.rand(2, 3, 64, 64), "single tensor"),
        ([torch.rand(64, 64)], "image 0: expected shape"),
        ([torch.rand(3, 64, 64), torch.rand(4, 64, 64)], "image 1: expected shape"),
        ([torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)], "image 0: expected a float"),
        ([torch.rand(3, 64, 64, dtype=torch.float64)], "image 0: expected float32 .*float64"),
    ],
)
def test_bad_images(model: MaskRCNN, images: object, message: str) -> None:
    model.eval()
    with pytest.raises(ValueError, match=message):
        model(images)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (
            _target(boxes=torch.tensor([10.0, 10, 40, 30])),
            r"target 1: boxes must have shape \(N, 4\)",
        ),
        (_target(boxes=torch.tensor([[40.0, 10, 10, 30]])), "target 1: box 0 .* degenerate"),
        (_target(boxes=torch.tensor([[10.0, 30, 40, 30]])), "target 1: box 0 .* degenerate"),
        (
            _target(masks=torch.zeros(1, 32, 80, dtype=torch.uint8)),
            r"target 1: masks must have shape",
        ),
        (_target(labels=torch.tensor([5])), r"target 1: labels must be in \[1, 4\]"),
        (_target(labels=torch.tensor([0])), r"target 1: labels must be in \[1, 4\]"),
        ({"boxes": torch.zeros(0, 4)}, "target 1: missing 'labels'"),
        (_target(labels=torch.tensor([2.0])), "target 1: labels must be int64 .*float32"),
        (_target(labels=torch.tensor([2], dtype=torch.uint8)), "target 1: labels must be int64"),
    ],
)
def test_bad_targets(model: MaskRCNN, target: dict[str, torch.Tensor], message: str) -> None:
    model.train()
    images = [torch.rand(3, 64, 80), torch.rand(3, 64, 80)]
    with pytest.raises(ValueError, match=message):
        model(images, [_target(), target])


def test_integer_boxes_give_the_losses_of_float_boxes(model: MaskRCNN) -> None:
    """Integer boxes (as COCO annotations often have them) are resized as floats: scaled in
    their own dtype, a ratio of 0.64 would truncate every box to 0."""
    model.train()
    image = [torch.rand(3, 200, 200, generator=torch.Generator().manual_seed(0))]
    masks = torch.zeros(1, 200, 200, dtype=torch.uint8)
    masks[0, 20:120, 30:150] = 1
    losses = []
    for boxes in (torch.tensor([[30, 20, 150, 120]]), torch.tensor([[30.0, 20, 150, 120]])):
        torch.manual_seed(1)
        target = {"boxes": boxes, "labels": torch.tensor([2]), "masks": masks}
        losses.append(model(image, [target]))
    assert all(torch.isfinite(v) for v in losses[0].values())
    for name, value in losses[1].items():
        assert torch.equal(losses[0][name], value), name


def test_training_without_targets_is_explained(model: MaskRCNN) -> None:
    model.train()
    with pytest.raises(ValueError, match="needs targets"):
        model([torch.rand(3, 64, 80)])


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'resnet51'"):
        ModelConfig(backbone="resnet51")
    with pytest.raises(ValueError, match="background"):
        ModelConfig(num_classes=1)


def test_loss_weights_scale_each_loss() -> None:
    images, targets = [torch.rand(3, 64, 80)], [_target()]
    losses = {}
    for weights in (LossWeights(), LossWeights(mask=3.0, objectness=0.5)):
        torch.manual_seed(0)
        model = MaskRCNN(
            ModelConfig(
                backbone="resnet18", num_classes=5, min_size=128, max_size=192, loss_weights=weights
            )
        ).train()
        torch.manual_seed(1)
        losses[weights.mask] = model(images, targets)
    plain, weighted = losses[1.0], losses[3.0]
    torch.testing.assert_close(weighted["loss_mask"], 3.0 * plain["loss_mask"])
    torch.testing.assert_close(weighted["loss_objectness"], 0.5 * plain["loss_objectness"])
    torch.testing.assert_close(weighted["loss_classifier"], plain["loss_classifier"])


def test_class_agnostic_masks() -> None:
    torch.manual_seed(0)
    model = MaskRCNN(
        ModelConfig(
            backbone="resnet18",
            num_classes=5,
            min_size=128,
            max_size=192,
            class_agnostic_masks=True,
            box_score_thresh=0.0,
        )
    )
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 1
    model.train()
    assert model([torch.rand(3, 64, 80)], [_target()])["loss_mask"] > 0
    out = model.infer([torch.rand(3, 64, 80)])[0]
    assert out["masks"].shape[1:] == (1, 64, 80) and out["masks"].shape[0] == out["boxes"].shape[0]
    assert model.training  # infer() restores the mode


def test_roi_scales_do_not_depend_on_the_first_image() -> None:
    # torchvision infers RoIAlign's scales from the first batch and keeps them: a 37x300
    # first image would give 1/2 instead of 1/4 for the finest level.
    torch.manual_seed(0)
    model = MaskRCNN(
        ModelConfig(
            backbone="resnet18", num_classes=5, min_size=128, max_size=400, box_score_thresh=0.0
        )
    ).eval()
    fresh = copy.deepcopy(model)
    image = torch.rand(3, 96, 128)
    with torch.no_grad():
        model([torch.rand(3, 37, 300)])
        after_odd = model([image])[0]
        reference = fresh([image])[0]
    assert model.roi_heads.box_roi_pool.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    torch.testing.assert_close(after_odd["boxes"], reference["boxes"])
    torch.testing.assert_close(after_odd["masks"], reference["masks"])
