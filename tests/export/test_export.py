"""Export to ONNX and torch.export: dynamic image sizes, zero detections, metadata, the
onnxruntime predictor and ``maskrcnn predict --backend onnxruntime``.

One tiny training run and one ``torch.export`` (shared by the ONNX file and the .pt2
archive) for the whole module: exporting is the slow part.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.export import ExportedProgram

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import maskrcnn.export.api as export_module
from maskrcnn.bench import bench_onnxruntime
from maskrcnn.cli.inference import load_onnx_predictor
from maskrcnn.cli.main import main
from maskrcnn.data.image_io import read_image
from maskrcnn.engine.build import model_from_checkpoint
from maskrcnn.engine.trainer import Trainer
from maskrcnn.export import (
    OnnxPredictor,
    export_program,
    export_torch,
    image_to_input,
    load_torch_export,
)
from maskrcnn.export.graph import ExportableMaskRCNN
from maskrcnn.inference.predictor import Predictor
from maskrcnn.model.mask_rcnn import MaskRCNN
from tiny_run import tiny_config

NAMES = ("boxes", "labels", "scores", "masks")
SIZES = [(50, 90), (120, 100), (33, 47)]  # the export traced a 64 x 80 image


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Exported:
    run: Path
    model: MaskRCNN
    onnx: Path
    pt2: Path


@pytest.fixture(scope="module")
def exported(one_thread: None, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """A 40-iteration tiny run with a narrow FPN (a few seconds); its ONNX file written by
    ``maskrcnn export --score-thresh 0.3`` and its .pt2 by ``export_torch``, from one
    ``torch.export``."""
    run = tmp_path_factory.mktemp("run")
    overrides = ("solver.max_iter=40", "model.fpn_channels=32", "run.num_overlays=0")
    Trainer(tiny_config(run, *overrides), show_progress=False).train()
    out = tmp_path_factory.mktemp("exported")
    checkpoint = run / "last.pth"
    trained = model_from_checkpoint(checkpoint)
    model, names, label_map = trained.model, trained.class_names, trained.label_to_cat_id
    program = export_program(model)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export_module, "export_program", lambda _model: program)
        argv = ["export", str(checkpoint), "--out", str(out / "model.onnx")]
        assert main([*argv, "--score-thresh", "0.3"]) == 0
    pt2 = export_torch(model, out / "model.pt2", names, label_map, program=program)
    return Exported(run, model.eval(), out / "model.onnx", pt2)


def val_images(run: Path) -> list[Tensor]:
    return [read_image(p).float() / 255 for p in sorted((run / "data" / "val").glob("*.png"))]


def resized(image: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(image[None], size=size, mode="bilinear")[0].clamp(0, 1)


def cases(exported: Exported) -> list[Tensor]:
    """Images at three sizes the export never saw, and one on which the model finds nothing."""
    images = val_images(exported.run)
    stripes = (torch.arange(64) % 2).float()
    flat = [torch.full((3, 64, 64), v) for v in (0.0, 0.5, 1.0)] + [
        stripes[:, None].expand(3, 64, 64).clone(),  # fine textures no shape has
        stripes[None, :].expand(3, 64, 64).clone(),
        (stripes[:, None] + stripes[None, :]).remainder(2).expand(3, 64, 64).clone(),
    ]
    empty = [im for im in images + flat if len(exported.model.infer([im])[0]["boxes"]) == 0]
    assert empty, "the tiny model should find nothing on some validation image"
    found = [im for im in images if len(exported.model.infer([im])[0]["boxes"]) > 0]
    return [resized(found[i % len(found)], s) for i, s in enumerate(SIZES)] + [empty[0]]


def mask_iou(a: Tensor, b: Tensor) -> Tensor:
    """Per-detection IoU of (N, 1, H, W) probabilities binarised at 0.5."""
    a, b = a[:, 0] > 0.5, b[:, 0] > 0.5
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def assert_same(reference: dict[str, Tensor], outputs: dict[str, Tensor], size: tuple[int, int]
                ) -> None:
    n = len(reference["boxes"])
    assert outputs["boxes"].shape == (n, 4) and outputs["boxes"].dtype == torch.float32
    assert outputs["labels"].shape == (n,) and outputs["labels"].dtype == torch.int64
    assert outputs["scores"].shape == (n,) and outputs["masks"].shape == (n, 1, *size)
    assert torch.equal(outputs["labels"], reference["labels"])
    torch.testing.assert_close(outputs["boxes"], reference["boxes"], atol=1e-3, rtol=0)
    torch.testing.assert_close(outputs["scores"], reference["scores"], atol=1e-4, rtol=0)
    assert bool((mask_iou(outputs["masks"], reference["masks"]) >= 0.99).all())


def test_onnx_equals_pytorch_at_new_sizes_and_with_zero_detections(exported: Exported) -> None:
    predictor = OnnxPredictor(exported.onnx, num_threads=1)
    counts = []
    for image in cases(exported):
        reference = exported.model.infer([image])[0]
        assert_same(reference, predictor.run(image), tuple(image.shape[-2:]))
        counts.append(len(reference["boxes"]))
    assert all(c > 0 for c in counts[:-1]) and counts[-1] == 0


def test_onnx_predicts_very_wide_and_tall_images(exported: Exported) -> None:
    """Resized, their short side would be 0 pixels: the graph keeps it at 1, as the model."""
    predictor = OnnxPredictor(exported.onnx, num_threads=1)
    image = val_images(exported.run)[1]
    for size in [(1, 300), (300, 2)]:
        x = resized(image, size)
        assert_same(exported.model.infer([x])[0], predictor.run(x), size)


def test_predict_takes_the_score_thresh_of_the_onnx_file(exported: Exported) -> None:
    def args(score_thresh: float | None) -> argparse.Namespace:
        return argparse.Namespace(checkpoint=str(exported.onnx), score_thresh=score_thresh,
                                  tta=False, fast=False)

    default = load_onnx_predictor(args(None))  # `maskrcnn predict` without --score-thresh
    assert default is not None and default.score_thresh == 0.3
    given = load_onnx_predictor(args(0.1))
    assert given is not None and given.score_thresh == 0.1


def export_program_stub() -> ExportedProgram:
    """A stand-in for an ExportedProgram, for a patched exporter that never reads it."""
    return cast(ExportedProgram, object())


def test_opsets_the_exporter_cannot_write_are_refused(
    exported: Exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Asked for opset 17, torch's exporter wrote opset 18 and only printed a traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "x.pth", "--out", str(tmp_path / "m.onnx"), "--opset", "17"])
    assert exit_info.value.code == 2
    assert "17 is too low: the exporter writes opset 18 or later" in capsys.readouterr().err
    with pytest.raises(ValueError, match="opset 17 is not supported"):
        export_module.export_onnx(exported.model, tmp_path / "m.onnx", opset=17)
    # An opset the exporter silently does not honour: checked before anything is written.
    produced = SimpleNamespace(model=SimpleNamespace(opset_imports={"": 18}))
    monkeypatch.setattr(torch.onnx, "export", lambda *args, **kwargs: produced)
    path = tmp_path / "m.onnx"
    program = export_program_stub()
    with pytest.raises(ValueError, match="asked for opset 19 but the exporter produced opset 18"):
        export_module.export_onnx(exported.model, path, opset=19, program=program)
    assert not path.exists()


def test_torch_export_round_trips(exported: Exported) -> None:
    module, metadata = load_torch_export(exported.pt2)
    assert metadata.class_names == ["__background__", "circle", "rectangle", "triangle"]
    assert metadata.label_to_cat_id == {1: 1, 2: 2, 3: 3}
    for image in cases(exported):
        with torch.no_grad():
            outputs = dict(zip(NAMES, module(image), strict=True))
        assert_same(exported.model.infer([image])[0], outputs, tuple(image.shape[-2:]))


def test_onnx_metadata(exported: Exported) -> None:
    import onnx

    props = {p.key: p.value for p in onnx.load(str(exported.onnx)).metadata_props}
    assert json.loads(props["class_names"]) == ["__background__", "circle", "rectangle",
                                                "triangle"]
    assert json.loads(props["label_to_cat_id"]) == {"1": 1, "2": 2, "3": 3}
    assert float(props["score_thresh"]) == 0.3
    assert float(props["box_score_thresh"]) == exported.model.cfg.box_score_thresh
    assert "(3, H, W)" in props["input"] and "[0, 1]" in props["input"]
    metadata = OnnxPredictor(exported.onnx).metadata
    assert metadata.min_size == 96 and metadata.mask_threshold == 0.5


def test_onnx_predictor_equals_predictor_on_uint8_hwc(exported: Exported) -> None:
    path = sorted((exported.run / "data" / "val").glob("*.png"))[1]
    array = np.asarray(Image.open(path).convert("RGB").resize((90, 70)))
    ours = OnnxPredictor(exported.onnx, score_thresh=0.0, num_threads=1)
    checkpoint = exported.run / "last.pth"
    reference = Predictor.from_checkpoint(checkpoint, score_thresh=0.0, device="cpu")(array)
    prediction = ours(array)
    assert not isinstance(prediction, list) and not isinstance(reference, list)
    assert len(prediction) == len(reference) > 0
    assert prediction.class_names == reference.class_names
    torch.testing.assert_close(prediction.boxes, reference.boxes, atol=1e-3, rtol=0)
    run = ours.run(torch.from_numpy(image_to_input(array)))
    torch.testing.assert_close(run["boxes"], prediction.boxes, atol=0, rtol=0)
    with pytest.raises(ValueError, match="uint8"):
        image_to_input(array.astype(np.float32))


def test_predict_backend_onnxruntime_writes_the_same_json(
    exported: Exported, tmp_path: Path
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for k, image in enumerate(cases(exported)):
        Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy()).save(
            folder / f"{k}.png"
        )
    common = [str(folder), "--score-thresh", "0.0", "--out"]
    checkpoint = str(exported.run / "last.pth")
    assert main(["predict", checkpoint, *common, str(tmp_path / "pt")]) == 0
    onnx = str(exported.onnx)
    assert main(["predict", onnx, *common, str(tmp_path / "ort"), "--backend", "onnxruntime"]) == 0
    pt = json.loads((tmp_path / "pt" / "predictions.json").read_text())
    ort = json.loads((tmp_path / "ort" / "predictions.json").read_text())
    assert ort["images"] == pt["images"] and ort["categories"] == pt["categories"]
    assert len(ort["annotations"]) == len(pt["annotations"]) > 0
    for a, b in zip(ort["annotations"], pt["annotations"], strict=True):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        np.testing.assert_allclose(a["bbox"], b["bbox"], atol=1e-2)
        assert a["segmentation"]["size"] == b["segmentation"]["size"]


def test_cli_errors_name_the_problem(
    exported: Exported, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "m.onnx")]) == 1
    assert "missing.pth" in capsys.readouterr().err
    image = str(exported.run / "data" / "val")
    argv = ["predict", str(exported.run / "last.pth"), image, "--out", str(tmp_path / "o"),
            "--backend", "onnxruntime"]
    assert main(argv) == 1
    assert "onnxruntime cannot load" in capsys.readouterr().err
    assert main([argv[0], str(exported.onnx), *argv[2:], "--tta"]) == 1
    capsys.readouterr()
    checkpoint = str(exported.run / "last.pth")
    assert main(["export", checkpoint, "--out", str(tmp_path)]) == 1  # before the slow export
    assert f"{tmp_path} is a folder" in capsys.readouterr().err
    assert main(["export", checkpoint, "--out", str(exported.onnx / "m.onnx")]) == 1
    assert "cannot create its folder" in capsys.readouterr().err
    (tmp_path / "bogus.pt2").write_text("not an archive")
    with pytest.raises(ValueError, match=r"bogus\.pt2: not a torch\.export archive"):
        load_torch_export(tmp_path / "bogus.pt2")


def test_export_graph_equals_the_eager_model_exactly(exported: Exported) -> None:
    """Without folding or exporting: the graph's code computes what the model computes, bit
    for bit, also for extreme aspect ratios (a pyramid level of size 1). Mask probabilities
    sum the same terms, the graph over whole image rows, the model over box windows, so they
    may differ in the last bit."""
    graph = ExportableMaskRCNN(exported.model).eval()
    image = val_images(exported.run)[1]
    for size in [(64, 64), (37, 300), (400, 30), (20, 20), (1, 300)]:
        x = resized(image, size)
        reference = exported.model.infer([x])[0]
        with torch.no_grad():
            outputs = dict(zip(NAMES, graph(x), strict=True))
        for name in NAMES:
            if name == "masks":
                assert torch.allclose(outputs[name], reference[name], rtol=0, atol=1e-6), size
            else:
                assert torch.equal(outputs[name], reference[name]), (size, name)


def test_bench_onnxruntime_reports_both(exported: Exported) -> None:
    row = bench_onnxruntime(exported.model, exported.onnx, size=(64, 64), repeats=1, threads=1)
    assert row["onnxruntime"] > 0 and row["pytorch_fast"] > 0 and row["threads"] == 1
    assert row["ratio"] == pytest.approx(row["onnxruntime"] / row["pytorch_fast"])
