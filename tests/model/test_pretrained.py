"""Weights by name (torch hub cache, download, offline error) and starting a model from a
trained detector, with the rows of shared classes carried over. No test downloads: files of
the right layout are written under a temporary TORCH_HOME and the download is replaced."""

from __future__ import annotations

import dataclasses
import urllib.error
from pathlib import Path

import pytest
import torch
from torchvision.models import resnet18
from torchvision.models.detection import maskrcnn_resnet50_fpn

from maskrcnn.cli.main import main
from maskrcnn.config import ModelConfig
from maskrcnn.engine.build import build_model, model_from_checkpoint
from maskrcnn.engine.checkpoint import load_checkpoint
from maskrcnn.model import weights
from maskrcnn.model.mask_rcnn import MaskRCNN
from maskrcnn.model.pretrained import Source, class_rows, load_detector, source_of
from maskrcnn.model.weights import WeightsError, fetch, lookup

CPU = torch.device("cpu")
SMALL = {"backbone": "resnet18", "fpn_channels": 32, "min_size": 96, "max_size": 96}


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache; any download attempt fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_download(url: str, destination: Path, hash_prefix: str | None) -> None:
        pytest.fail(f"downloaded {url}")

    monkeypatch.setattr(weights, "download", no_download)
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    return folder


def test_names_and_aliases_resolve_through_torchvision() -> None:
    coco = lookup("COCO")
    assert coco is not None and coco is lookup("torchvision:maskrcnn_resnet50_fpn.COCO_V1")
    assert coco.file_name == "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"
    assert coco.categories[:2] == ["__background__", "person"] and len(coco.categories) == 91
    assert "mask_map 34.6" in coco.summary()
    assert lookup("nonsense") is None


def test_fetch_downloads_once_into_the_cache_with_the_hash(
    hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def fake(url: str, destination: Path, hash_prefix: str | None) -> None:
        calls.append((url, destination, hash_prefix))
        torch.save(resnet18().state_dict(), destination)

    monkeypatch.setattr(weights, "download", fake)
    entry = weights.imagenet("resnet18")
    path = fetch(entry)
    assert path == hub / "resnet18-f37072fd.pth" and path.is_file()
    assert calls == [(entry.url, path, "f37072fd")]
    assert fetch(entry) == path and len(calls) == 1  # cached: no second download


def test_offline_error_names_url_file_and_folder(
    hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(url: str, destination: Path, hash_prefix: str | None) -> None:
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(weights, "download", offline)
    entry = lookup("coco")
    assert entry is not None
    with pytest.raises(WeightsError) as err:
        fetch(entry)
    assert entry.url in str(err.value) and str(hub) in str(err.value)
    assert "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth is not in" in str(err.value)


def test_backbone_imagenet_loads_torchvisions_classification_file(hub: Path) -> None:
    torch.manual_seed(0)
    reference = resnet18()
    torch.save(reference.state_dict(), hub / "resnet18-f37072fd.pth")
    model = MaskRCNN(ModelConfig(**SMALL, backbone_weights="imagenet"))
    ours = model.backbone.body.layer4[1].conv2.weight
    assert torch.equal(ours, reference.layer4[1].conv2.weight)


def _coco_like_file(hub: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    reference = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    # The published file's backbone has FrozenBatchNorm2d: no num_batches_tracked.
    state = {k: v for k, v in reference.state_dict().items() if "num_batches" not in k}
    torch.save(state, hub / "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth")
    return state


def test_coco_by_name_loads_every_tensor_and_predicts(
    hub: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = _coco_like_file(hub)
    trained = model_from_checkpoint("coco")
    assert trained.class_names is not None and trained.class_names[1] == "person"
    assert trained.label_to_cat_id is not None and trained.label_to_cat_id[90] == 90
    assert 12 not in trained.label_to_cat_id  # "N/A": no COCO category has id 12
    ours = trained.model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in state.items())
    image = tmp_path / "image.png"
    from PIL import Image

    Image.new("RGB", (64, 48), (120, 80, 40)).save(image)
    assert main(["predict", "coco", str(image), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "predictions.json").is_file()


def test_coco_into_other_classes_copies_the_rows_of_shared_names(hub: Path) -> None:
    state = _coco_like_file(hub)
    names = ["__background__", "Person", "bike", "teapot"]
    cfg = ModelConfig(num_classes=4, weights="coco", class_map={"bike": "bicycle"})
    torch.manual_seed(1)
    model = build_model(cfg, CPU, names)
    ours = model.state_dict()
    cls = ours["roi_heads.box_predictor.cls_score.weight"]
    theirs = state["roi_heads.box_predictor.cls_score.weight"]
    assert torch.equal(cls[0], theirs[0]) and torch.equal(cls[1], theirs[1])  # person
    assert torch.equal(cls[2], theirs[2])  # bike ← bicycle (COCO label 2)
    assert not any(torch.equal(cls[3], row) for row in theirs)  # teapot: fresh
    box = ours["roi_heads.box_predictor.bbox_pred.weight"]
    assert torch.equal(box[4:8], state["roi_heads.box_predictor.bbox_pred.weight"][4:8])
    mask = ours["roi_heads.mask_predictor.mask_fcn_logits.weight"]
    assert torch.equal(mask[2], state["roi_heads.mask_predictor.mask_fcn_logits.weight"][2])
    assert torch.equal(ours["backbone.fpn.layer_blocks.0.0.weight"],
                       state["backbone.fpn.layer_blocks.0.0.weight"])


def test_class_rows_match_case_insensitively_and_check_the_map() -> None:
    theirs = ["__background__", "person", "car", "N/A"]
    assert class_rows(["bg", "CAR", "tree"], theirs, {}) == {0: 0, 1: 2}
    assert class_rows(["bg", "auto"], theirs, {"auto": "car"}) == {0: 0, 1: 2}
    with pytest.raises(WeightsError, match="maps 'auto' to 'lorry'"):
        class_rows(["bg", "auto"], theirs, {"auto": "lorry"})


def test_an_earlier_run_as_weights_carries_its_class_rows(trained_tiny: Path) -> None:
    """A model trained on circle / rectangle / triangle, started on a dataset of triangles
    and stars: the triangle rows come from the run, the star rows are fresh."""
    checkpoint = trained_tiny / "last.pth"
    source = source_of(str(checkpoint))
    assert source.class_names == ["__background__", "circle", "rectangle", "triangle"]
    saved = load_checkpoint(checkpoint)["model"]
    cfg = ModelConfig(**{**saved_model_config(checkpoint), "num_classes": 3})
    model = MaskRCNN(cfg)
    transfer = load_detector(model, source, cfg.backbone, ["__background__", "triangle", "star"])
    assert transfer.copied == {"triangle": "triangle"}
    cls = model.state_dict()["roi_heads.box_predictor.cls_score.bias"]
    assert torch.equal(cls[:2], saved["roi_heads.box_predictor.cls_score.bias"][[0, 3]])


def saved_model_config(checkpoint: Path) -> dict[str, object]:
    config = load_checkpoint(checkpoint)["config"]["model"]
    return {k: v for k, v in config.items() if k not in ("num_classes", "loss_weights")}


def test_weights_of_another_architecture_are_refused(hub: Path) -> None:
    small = MaskRCNN(ModelConfig(**SMALL))
    source = Source("x.pth", MaskRCNN(ModelConfig(**{**SMALL, "fpn_channels": 64})).state_dict(),
                    None)
    with pytest.raises(WeightsError, match="does not fit this model"):
        load_detector(small, source, "resnet18")
    with pytest.raises(WeightsError, match=r"set model\.backbone=resnet50$"):
        build_model(dataclasses.replace(ModelConfig(**SMALL), weights="coco"), CPU)
    with pytest.raises(WeightsError, match=r"set model\.arch=v2$"):
        load_detector(small, dataclasses.replace(source, arch="v2"), "resnet18")
    with pytest.raises(WeightsError, match="neither a file nor a known name"):
        source_of("cocoa")


def test_weights_cli_lists_and_locates(hub: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    assert "torchvision:maskrcnn_resnet50_fpn.COCO_V1 (coco)" in out and "mask_map 34.6" in out
    assert main(["weights", "path", "coco"]) == 1
    url = "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"
    assert url in capsys.readouterr().out
    (hub / "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth").write_bytes(b"")
    assert main(["weights", "path", "coco"]) == 0
    assert main(["weights", "path", "cocoa"]) == 2


def test_class_agnostic_masks_on_one_side_only_start_fresh(trained_tiny: Path) -> None:
    checkpoint = trained_tiny / "last.pth"
    cfg = ModelConfig(**{**saved_model_config(checkpoint), "num_classes": 3,
                         "class_agnostic_masks": True})
    model = MaskRCNN(cfg)
    transfer = load_detector(model, source_of(str(checkpoint)), cfg.backbone,
                             ["__background__", "triangle", "star"])
    assert "roi_heads.mask_predictor.mask_fcn_logits.weight" in transfer.fresh
    assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.shape[0] == 1


def test_files_that_are_not_weights_are_named(tmp_path: Path) -> None:
    junk = tmp_path / "model.onnx"
    junk.write_bytes(b"\x08\x07\x12\x04junk" * 100)
    with pytest.raises(WeightsError, match=r"model\.onnx\) is not a"):
        source_of(str(junk))
