"""``maskrcnn predict`` and ``maskrcnn eval`` on a checkpoint of a tiny training run."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

from maskrcnn.cli.main import main
from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.transforms import build_transforms
from maskrcnn.engine.evaluation import evaluate
from maskrcnn.inference import files as predict_files
from maskrcnn.inference.files import find_images, overlay_names
from maskrcnn.inference.predictor import Prediction, Predictor

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def folder(run: Path, tmp_path: Path) -> Path:
    """Three valid images (one in a subfolder), a truncated JPEG, a 0-byte file, a text file."""
    pngs = sorted((run / "data" / "val").glob("*.png"))[:3]
    root = tmp_path / "images"
    (root / "nested").mkdir(parents=True)
    shutil.copy(pngs[0], root / "a.png")
    shutil.copy(pngs[1], root / "c.png")
    shutil.copy(pngs[2], root / "nested" / "d.png")
    Image.open(pngs[0]).save(tmp_path / "whole.jpg", quality=95)
    data = (tmp_path / "whole.jpg").read_bytes()
    (root / "b_truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    return root


def test_predict_skips_bad_images_and_names_them(
    run: Path, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["predict", str(run / "last.pth"), str(folder), "--out", str(out), "--overlays",
            "--score-thresh", "0.0", "--batch-size", "2"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    data = json.loads((out / "predictions.json").read_text())
    names = [Path(im["file_name"]).name for im in data["images"]]
    assert names == ["a.png", "c.png", "d.png"]  # sorted; ids follow the sorted file list
    assert [im["id"] for im in data["images"]] == [1, 3, 5]
    assert all(im["height"] == im["width"] == 64 for im in data["images"])
    skipped = {Path(s["file_name"]).name: s["reason"] for s in data["skipped"]}
    assert set(skipped) == {"b_truncated.jpg", "empty.jpg"}
    assert "0 bytes" in skipped["empty.jpg"] and "decode" in skipped["b_truncated.jpg"]
    summary = captured.out
    assert "predicted 3 images, skipped 2" in summary and "s per image" in summary
    for name in ("b_truncated.jpg", "empty.jpg"):
        assert name in summary and name in captured.err
    annotations = data["annotations"]
    assert annotations and {a["image_id"] for a in annotations} <= {1, 3, 5}
    assert {"bbox", "score", "category_id", "segmentation"} <= set(annotations[0])
    assert annotations[0]["segmentation"]["size"] == [64, 64]
    assert [c["name"] for c in data["categories"]] == ["circle", "rectangle", "triangle"]
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["a.png", "c.png", "d.png"]


def test_predict_results_equal_the_predictor(run: Path, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["predict", str(run / "last.pth"), str(folder / "a.png"), "--out", str(out)]) == 0
    data = json.loads((out / "predictions.json").read_text())
    pred = Predictor.from_checkpoint(run / "last.pth")(folder / "a.png")
    assert not isinstance(pred, list)
    expected = pred.to_coco(1, {1: 1, 2: 2, 3: 3})
    assert [a["score"] for a in data["annotations"]] == [r["score"] for r in expected]
    assert [a["segmentation"] for a in data["annotations"]] == [r["segmentation"] for r in expected]


def test_predict_exit_code_when_nothing_can_be_read(
    run: Path, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = str(run / "last.pth")
    bad = [str(folder / "empty.jpg"), str(tmp_path / "nowhere" / "*.png")]
    assert main(["predict", ckpt, *bad, "--out", str(tmp_path / "o")]) == 1
    out = capsys.readouterr().out
    assert "predicted 0 images, skipped 2" in out and "nowhere" in out
    assert main(["predict", str(tmp_path / "none.pth"), str(folder), "--out", "x"]) == 1
    assert "checkpoint not found" in capsys.readouterr().err


def test_find_images_takes_files_folders_and_globs(folder: Path) -> None:
    files, unmatched = find_images([str(folder / "*.png"), str(folder / "nested"),
                                    str(folder / "a.png"), str(folder / "zz*.png")])
    assert [p.name for p in files] == ["a.png", "c.png", "d.png"]
    assert [u.file_name for u in unmatched] == [str(folder / "zz*.png")]
    recursive, _ = find_images([str(folder / "**" / "*.png")])
    assert len(recursive) == 3
    names = overlay_names([Path("x/a.png"), Path("y/a.png"), Path("y/b.jpg")])
    assert list(names.values()) == ["a_1.png", "a_2.png", "b.png"]


def test_overlay_names_never_collide() -> None:
    """a.jpg and a.png would both be numbered, a.jpg as a_1.png: a_1.png's own name."""
    files = [Path("a.jpg"), Path("a.png"), Path("a_1.png")]
    assert list(overlay_names(files).values()) == ["a_2.png", "a_3.png", "a_1.png"]
    # Names that differ only in case are one file on macOS and Windows.
    cased = overlay_names([Path("A.png"), Path("x/a.png"), Path("A_1.png")])
    assert len({n.casefold() for n in cased.values()}) == 3


@pytest.fixture()
def odd_folder(run: Path, tmp_path: Path) -> Path:
    """a.png, poison.png (40 x 50: the size the patched model fails on), strip.png (1 x 300:
    its resized short side would be 0 pixels), z.png."""
    png = sorted((run / "data" / "val").glob("*.png"))[0]
    root = tmp_path / "odd"
    root.mkdir()
    shutil.copy(png, root / "a.png")
    shutil.copy(png, root / "z.png")
    Image.new("RGB", (50, 40), (90, 90, 90)).save(root / "poison.png")
    strip = np.random.default_rng(0).integers(0, 256, (1, 300, 3), dtype=np.uint8)
    Image.fromarray(strip).save(root / "strip.png")
    return root


def _fail_on_poison(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    """Patches Predictor.predict_batch to raise ``error`` for a batch with a 40 x 50 image."""
    original = Predictor.predict_batch

    def predict_batch(self: Predictor, images: list[Tensor], return_probs: bool = False
                      ) -> list[Prediction]:
        if any(tuple(im.shape) == (3, 40, 50) for im in images):
            raise error
        return original(self, images, return_probs)

    monkeypatch.setattr(Predictor, "predict_batch", predict_batch)


def test_a_failing_batch_is_retried_image_by_image(
    run: Path, odd_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _fail_on_poison(monkeypatch, RuntimeError("boom"))

    def save_overlay(picture: Image.Image, path: Path) -> Path:
        if path.name == "z.png":
            raise OSError("disk full")
        return original_save(picture, path)

    original_save = predict_files.save_overlay
    monkeypatch.setattr(predict_files, "save_overlay", save_overlay)
    out = tmp_path / "out"
    argv = ["predict", str(run / "last.pth"), str(odd_folder), "--out", str(out), "--overlays",
            "--batch-size", "2", "--score-thresh", "0.0"]
    assert main(argv) == 0
    data = json.loads((out / "predictions.json").read_text())
    sizes = {Path(im["file_name"]).name: (im["height"], im["width"]) for im in data["images"]}
    assert sizes == {"a.png": (64, 64), "strip.png": (1, 300)}
    # a.png, in the batch that failed, was predicted on its own.
    skipped = {Path(s["file_name"]).name: s["reason"] for s in data["skipped"]}
    assert skipped == {"poison.png": "prediction failed (RuntimeError: boom)",
                       "z.png": "writing its results failed (OSError: disk full)"}
    assert {a["image_id"] for a in data["annotations"]} <= {1, 3}  # none of z.png's
    err = capsys.readouterr().err
    assert "poison.png" in err and "z.png" in err
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["a.png", "strip.png"]


def test_results_so_far_are_written_when_the_run_stops(
    run: Path, odd_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fail_on_poison(monkeypatch, KeyboardInterrupt())
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        main(["predict", str(run / "last.pth"), str(odd_folder), "--out", str(out)])
    data = json.loads((out / "predictions.json").read_text())
    assert [Path(im["file_name"]).name for im in data["images"]] == ["a.png"]
    skipped = {Path(s["file_name"]).name: s["reason"] for s in data["skipped"]}
    assert set(skipped) == {"poison.png", "strip.png", "z.png"}
    assert skipped["z.png"] == "not predicted: the run stopped early (KeyboardInterrupt)"
    assert [p.name for p in out.iterdir()] == ["predictions.json"]  # no temporary file


def test_out_must_be_a_folder_and_old_results_are_announced(
    run: Path, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, image = str(run / "last.pth"), str(folder / "a.png")
    a_file = tmp_path / "results.txt"
    a_file.write_text("x")
    assert main(["predict", ckpt, image, "--out", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out ") and "results.txt is a file" in err
    assert "Traceback" not in err
    out = tmp_path / "out"
    assert main(["predict", ckpt, image, "--out", str(out), "--overlays"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["predict", ckpt, str(folder / "c.png"), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {out / 'overlays'} already holds 1 file of an earlier run" in err


def test_score_thresh_defaults_to_none_so_onnx_metadata_can_apply(tmp_path: Path) -> None:
    """None: the ONNX file's own score_thresh (tested in test_export.py), else 0.5 (the
    Predictor's default, which test_predict_results_equal_the_predictor relies on)."""
    from maskrcnn.cli.main import build_parser

    args = build_parser().parse_args(["predict", "m.onnx", "x.png", "--out", str(tmp_path)])
    assert args.score_thresh is None


def _self_labelled(run: Path, out: Path) -> Path:
    """The val set re-labelled with the model's own top-3 detections per image, so that AP
    is far from 0 and a mix-up of ids, labels or mask sizes would show."""
    predictor = Predictor.from_checkpoint(run / "last.pth", score_thresh=0.0)
    coco = json.loads((run / "data" / "val.json").read_text())
    annotations: list[dict[str, Any]] = []
    for image in coco["images"]:
        pred = predictor(run / "data" / image["file_name"])
        assert not isinstance(pred, list)
        for k, result in enumerate(pred.to_coco(image["id"])[:3]):
            area = float(pred.masks[k].sum())
            if area > 0:
                del result["score"]
                annotations.append({**result, "id": len(annotations) + 1, "area": area,
                                    "iscrowd": 0})
    coco["annotations"] = annotations
    (out / "self.json").write_text(json.dumps(coco))
    return out / "self.json"


def test_eval_reports_ap_and_writes_metrics(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval"
    val = _self_labelled(run, tmp_path)
    argv = ["eval", str(run / "last.pth"), "--data", str(val), "--images", str(run / "data"),
            "--out", str(out), "--batch-size", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "AP50" in printed and "s per image" in printed and "bbox" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("pr_curve_bbox.png", "pr_curve_segm.png"):
        assert (out / name).is_file()
    assert metrics["bbox"]["AP50"] > 0.3 and metrics["segm"]["AP50"] > 0.3
    # The same numbers as the trainer's evaluation of the same weights.
    predictor = Predictor.from_checkpoint(run / "last.pth")
    dataset = CocoDataset(val, run / "data", transforms=build_transforms(None, train=False))
    reference = evaluate(predictor.model, dataset, torch.device("cpu"), batch_size=2)
    for iou_type in ("bbox", "segm"):
        for key in ("AP", "AP50", "AR100"):
            assert metrics[iou_type][key] == pytest.approx(reference[iou_type][key], abs=1e-9)


def test_eval_matches_categories_by_name_or_refuses_other_classes(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    val = _self_labelled(run, tmp_path)
    ckpt = str(run / "last.pth")
    args = ["--images", str(run / "data"), "--batch-size", "2"]
    assert main(["eval", ckpt, "--data", str(val), *args, "--out", str(tmp_path / "a")]) == 0
    reference = json.loads((tmp_path / "a" / "metrics.json").read_text())
    coco = json.loads(val.read_text())
    shifted = {c["id"]: c["id"] + 10 for c in coco["categories"]}  # same names, other ids
    for c in coco["categories"]:
        c["id"] = shifted[c["id"]]
    for a in coco["annotations"]:
        a["category_id"] = shifted[a["category_id"]]
    (tmp_path / "shifted.json").write_text(json.dumps(coco))
    capsys.readouterr()
    assert main(["eval", ckpt, "--data", str(tmp_path / "shifted.json"), *args,
                 "--out", str(tmp_path / "b")]) == 0
    assert "category ids differ from the checkpoint's; matched by name" in (
        capsys.readouterr().err
    )
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert reference["segm"]["AP"] > 0.1
    assert metrics["segm"]["AP"] == pytest.approx(reference["segm"]["AP"], abs=1e-9)
    coco["categories"][0]["name"] = "something else"
    (tmp_path / "renamed.json").write_text(json.dumps(coco))
    assert main(["eval", ckpt, "--data", str(tmp_path / "renamed.json"), *args,
                 "--out", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert "renamed.json: its categories" in err and "are not the checkpoint's" in err
    assert not (tmp_path / "c" / "metrics.json").exists()


def test_eval_with_tta_reports_both_side_by_side(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval"
    argv = ["eval", str(run / "last.pth"), "--data", str(run / "data" / "val.json"),
            "--out", str(out), "--tta", "--tta-vflip", "--tta-merge", "wbf"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if "AP50" in line)
    assert header.split()[-1] == "s/img"
    rows = [line.split()[:2] for line in lines if line.startswith(("bbox", "segm"))]
    assert [r[:2] if r[1] == "TTA" else r[:1] for r in rows] == [
        ["bbox"], ["bbox", "TTA"], ["segm"], ["segm", "TTA"]
    ]
    assert (out / "metrics.json").is_file() and (out / "tta" / "metrics.json").is_file()
    assert (out / "tta" / "pr_curve_segm.png").is_file()


def test_eval_with_fast_reports_exact_and_fast_side_by_side(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval"
    argv = ["eval", str(run / "last.pth"), "--data", str(run / "data" / "val.json"),
            "--out", str(out), "--fast", "--fast-precision", "fp32"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {tuple(line.split()[:2]): line.split() for line in lines
            if line.startswith(("bbox", "segm"))}
    assert set(rows) >= {("segm", "fast"), ("bbox", "fast")}
    exact = json.loads((out / "metrics.json").read_text())
    fast = json.loads((out / "fast" / "metrics.json").read_text())
    for iou_type in ("bbox", "segm"):  # fp32 folding changes float rounding only
        assert fast[iou_type]["AP"] == pytest.approx(exact[iou_type]["AP"], abs=1e-3)


def test_fast_is_refused_with_onnxruntime(run: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["predict", str(tmp_path / "m.onnx"), str(run / "data" / "val"), "--out",
            str(tmp_path / "o"), "--backend", "onnxruntime", "--fast"]
    assert main(argv) == 1
    assert "--fast is not available" in capsys.readouterr().err


def test_usage_mistakes_are_one_line_errors_before_any_work(
    run: Path, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = str(run / "last.pth")
    a_file = tmp_path / "results.txt"
    a_file.write_text("x")
    data = str(run / "data" / "val.json")
    assert main(["eval", ckpt, "--data", data, "--out", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert "results.txt is a file" in err and "Traceback" not in err
    assert main(["predict", ckpt, str(folder), "--out", str(tmp_path / "o"), "--device",
                 "gpu"]) == 1
    assert "device 'gpu': not a device name" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", ckpt, str(folder), "--out", str(tmp_path / "o"), "--tta",
              "--tta-scales", "0.8,abc"])
    assert exit_info.value.code == 2
    assert "argument --tta-scales: 'abc' is not a number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict", ckpt, str(folder), "--out", str(tmp_path / "o"), "--tta",
              "--tta-scales", "1,inf"])
    assert "finite and above 0, got inf" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict", ckpt, str(folder), "--out", str(tmp_path / "o"), "--batch-size", "x"])
    assert "argument --batch-size: 'x' is not a whole number" in capsys.readouterr().err
    for bad in ("nan", "inf", "1.5", "-0.1"):
        with pytest.raises(SystemExit) as exit_info:
            main(["predict", ckpt, str(folder), "--out", str(tmp_path / "o"),
                  "--score-thresh", bad])
        assert exit_info.value.code == 2
        assert f"--score-thresh: must be a number in [0, 1], got {bad}" in (
            capsys.readouterr().err
        )
    with pytest.raises(SystemExit):
        main(["export", ckpt, "--out", str(tmp_path / "m.onnx"), "--score-thresh", "nan"])
    assert "--score-thresh: must be a number in [0, 1], got nan" in capsys.readouterr().err


def test_inputs_matching_nothing_leave_earlier_results_alone(
    run: Path, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "p"
    ckpt = str(run / "last.pth")
    assert main(["predict", ckpt, str(folder), "--out", str(out)]) == 0
    before = (out / "predictions.json").read_text()
    assert json.loads(before)["images"]
    capsys.readouterr()
    assert main(["predict", ckpt, str(tmp_path / "nothing*.jpg"), "--out", str(out)]) == 1
    assert "no image to predict" in capsys.readouterr().err
    assert (out / "predictions.json").read_text() == before


def test_a_folder_without_images_is_reported(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no pictures here")
    files, skipped = find_images([str(tmp_path / "empty")])
    assert files == []
    assert [s.file_name for s in skipped] == [str(tmp_path / "empty")]
    assert "holds no image files" in skipped[0].reason


def test_an_out_folder_that_cannot_be_written_is_refused_before_any_work(
    run: Path, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A read-only folder (as a user sees it; root ignores permissions, so the probe file's
    creation is made to fail as a read-only mount fails it)."""

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    predicted = []
    monkeypatch.setattr(predict_files.tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr(Predictor, "predict_batch", lambda *a, **k: predicted.append(1) or [])
    out = tmp_path / "out"
    assert main(["predict", str(run / "last.pth"), str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: --out {out}: cannot write there (Read-only file system)"
    assert predicted == []


def test_a_full_disk_at_the_end_of_predict_is_one_line(
    run: Path, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(predict_files, "write_text_atomic", full)
    out = tmp_path / "out"
    assert main(["predict", str(run / "last.pth"), str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: {out / 'predictions.json'}: cannot write it (No space left on device)" in err
    assert "Traceback" not in err


def test_eval_lists_the_images_it_skipped_in_metrics_json(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "images"
    shutil.copytree(run / "data", images)
    coco = json.loads((run / "data" / "val.json").read_text())
    broken = coco["images"][1]
    (images / broken["file_name"]).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    out = tmp_path / "eval"
    argv = ["eval", str(run / "last.pth"), "--data", str(run / "data" / "val.json"),
            "--images", str(images), "--out", str(out)]
    assert main(argv) == 0
    listed = json.loads((out / "metrics.json").read_text())["skipped_images"]
    assert [s["image_id"] for s in listed] == [broken["id"]]
    assert broken["file_name"] in listed[0]["reason"]
    assert f"skipped image id {broken['id']}" in capsys.readouterr().out


def test_predict_writes_polygons_and_labelme_files_that_convert_back(
    trained_tiny: Path, tmp_path: Path
) -> None:
    """Every instance with a mask comes back from polygons (and from LabelMe files through
    `data convert labelme`) with IoU >= 0.98; an instance whose mask is empty has no
    polygon, so none comes back."""
    from pycocotools import mask as mask_utils

    from maskrcnn.data.converters import labelme_to_coco

    folder = tmp_path / "images"
    folder.mkdir()
    train = sorted((trained_tiny / "data").rglob("*.png"))
    shutil.copy(train[0], folder / "a.png")
    shutil.copy(train[1], folder / "c.png")
    images = [str(folder / "a.png"), str(folder / "c.png")]
    common = ["predict", str(trained_tiny / "last.pth"), *images, "--score-thresh", "0.3"]
    assert main([*common, "--out", str(tmp_path / "rle")]) == 0
    assert main([*common, "--out", str(tmp_path / "poly"), "--format", "coco-polygon"]) == 0
    assert main([*common, "--out", str(tmp_path / "lm"), "--format", "labelme"]) == 0
    rle = json.loads((tmp_path / "rle" / "predictions.json").read_text())["annotations"]
    poly = json.loads((tmp_path / "poly" / "predictions.json").read_text())["annotations"]
    assert len(rle) == len(poly) > 0
    poly = [p for p, r in zip(poly, rle, strict=True) if mask_utils.area(r["segmentation"])]
    rle = [r for r in rle if mask_utils.area(r["segmentation"])]
    assert rle
    files = sorted(p.name for p in (tmp_path / "lm" / "labelme").iterdir())
    assert files == ["a.json", "c.json"]
    record = json.loads((tmp_path / "lm" / "labelme" / "a.json").read_text())
    assert (tmp_path / "lm" / "labelme" / record["imagePath"]).resolve() == Path(images[0])
    with pytest.warns(UserWarning, match="the images lie outside"):
        coco = json.loads(labelme_to_coco(tmp_path / "lm" / "labelme",
                                          tmp_path / "back.json").read_text())
    assert len(coco["annotations"]) == len(rle)
    by_image = {img["id"]: Path(img["file_name"]).name for img in coco["images"]}
    order = {"a.png": 1, "c.png": 2}
    for ours, back in zip(rle, sorted(coco["annotations"],
                                      key=lambda a: (order[by_image[a["image_id"]]], a["id"])),
                          strict=True):
        h, w = ours["segmentation"]["size"]
        target = mask_utils.decode(ours["segmentation"]) > 0
        again = mask_utils.decode(mask_utils.merge(
            mask_utils.frPyObjects(back["segmentation"], h, w))) > 0
        assert (target & again).sum() / max((target | again).sum(), 1) >= 0.98
    for a, b in zip(rle, poly, strict=True):
        h, w = a["segmentation"]["size"]
        target = mask_utils.decode(a["segmentation"]) > 0
        drawn = mask_utils.decode(mask_utils.merge(
            mask_utils.frPyObjects(b["segmentation"], h, w))) > 0
        assert (target & drawn).sum() / max((target | drawn).sum(), 1) >= 0.98


def test_tiled_predict_and_eval_match_the_plain_run_when_one_tile_holds_the_image(
    trained_tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--tile`` larger than the image: one tile, the plain prediction, so predictions.json
    (RLE and polygons) and the AP are the plain run's; a smaller tile runs and writes masks
    of the image's size."""
    image = sorted((trained_tiny / "data" / "val").glob("*.png"))[0]
    common = ["predict", str(trained_tiny / "last.pth"), str(image), "--score-thresh", "0.1"]
    for fmt in ("coco-rle", "coco-polygon"):
        assert main([*common, "--out", str(tmp_path / f"plain_{fmt}"), "--format", fmt]) == 0
        assert main([*common, "--out", str(tmp_path / f"tiled_{fmt}"), "--format", fmt,
                     "--tile", "256"]) == 0
        plain = json.loads((tmp_path / f"plain_{fmt}" / "predictions.json").read_text())
        tiled = json.loads((tmp_path / f"tiled_{fmt}" / "predictions.json").read_text())
        assert plain["annotations"] and tiled["annotations"] == plain["annotations"]
    tiled = [*common, "--tile", "32", "--tile-overlap", "0.5"]
    assert main([*tiled, "--out", str(tmp_path / "all"), "--max-detections", "1000"]) == 0
    found = len(json.loads((tmp_path / "all" / "predictions.json").read_text())["annotations"])
    assert found >= 2
    with pytest.warns(UserWarning, match=f"reached the cap of {found - 1} detections"):
        assert main([*tiled, "--out", str(tmp_path / "small"), "--overlays",
                     "--max-detections", str(found - 1)]) == 0
    small = json.loads((tmp_path / "small" / "predictions.json").read_text())
    assert len(small["annotations"]) == found - 1
    h, w = Image.open(image).size[::-1]
    assert all(a["segmentation"]["size"] == [h, w] for a in small["annotations"])
    assert len(list((tmp_path / "small" / "overlays").iterdir())) == 1
    val = trained_tiny / "data" / "val.json"
    argv = ["eval", str(trained_tiny / "last.pth"), "--data", str(val)]
    assert main([*argv, "--out", str(tmp_path / "e1")]) == 0
    assert main([*argv, "--out", str(tmp_path / "e2"), "--tile", "256"]) == 0
    one = json.loads((tmp_path / "e1" / "metrics.json").read_text())
    two = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    assert one["segm"]["AP"] == two["segm"]["AP"] and one["bbox"]["AP"] == two["bbox"]["AP"]
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "bad"), "--tile", "32",
                 "--tile-overlap", "1"]) == 2
    assert "overlap" in capsys.readouterr().err
