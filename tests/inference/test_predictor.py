"""The Predictor: inputs of every kind, batching, thresholds, outputs, checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision.ops import FrozenBatchNorm2d

from maskrcnn.data.errors import DatasetError
from maskrcnn.data.image_input import ImageInput, to_float_image
from maskrcnn.data.image_io import read_image
from maskrcnn.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from maskrcnn.export.metadata import make_metadata
from maskrcnn.inference.predictor import Prediction, Predictor
from maskrcnn.inference.tta import TTAConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def predictor(run: Path) -> Predictor:
    return Predictor.from_checkpoint(run / "last.pth", score_thresh=0.0)


def _images(run: Path) -> list[Path]:
    return sorted((run / "data" / "val").glob("*.png"))


def _single(p: Prediction | list[Prediction]) -> Prediction:
    assert isinstance(p, Prediction)
    return p


def _many(p: Prediction | list[Prediction]) -> list[Prediction]:
    assert isinstance(p, list)
    return p


def test_from_checkpoint_carries_names_and_category_ids(predictor: Predictor) -> None:
    assert predictor.class_names == ["__background__", "circle", "rectangle", "triangle"]
    assert predictor.label_to_cat_id == {1: 1, 2: 2, 3: 3}
    assert not predictor.model.training
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert predictor.device.type == expected
    assert next(predictor.model.parameters()).device.type == expected


def test_every_input_type_gives_the_same_prediction(run: Path, predictor: Predictor) -> None:
    path = _images(run)[0]
    uint8 = read_image(path)
    inputs: dict[str, ImageInput] = {
        "path": path,
        "str": str(path),
        "pil": Image.open(path),
        "numpy": np.asarray(Image.open(path).convert("RGB")),
        "uint8 tensor": uint8,
        "float tensor": uint8.float() / 255,
    }
    preds = {name: _single(predictor(x)) for name, x in inputs.items()}
    ref = preds["path"]
    assert len(ref) > 0
    for name, p in preds.items():
        for key in ("boxes", "labels", "scores", "masks"):
            assert torch.equal(getattr(p, key), getattr(ref, key)), (name, key)
        assert p.class_names == ref.class_names


def test_grey_and_rgba_arrays_become_rgb() -> None:
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = to_float_image(grey)
    assert out.shape == (3, 3, 4) and torch.equal(out[0], out[2])
    rgba = np.zeros((3, 4, 4), dtype=np.uint8)
    rgba[..., 1] = 255
    assert to_float_image(rgba)[1].min() == 1.0 and to_float_image(rgba).shape[0] == 3
    grey_tensor = torch.from_numpy(grey)[None]  # (1, H, W): as the (H, W) array
    assert torch.equal(to_float_image(grey_tensor), out)


def test_16_bit_grey_pil_image_keeps_its_top_8_bits_as_a_path_does(tmp_path: Path) -> None:
    values = np.array([[0, 0x8000, 0x80FF, 0xFFFF]], dtype=np.uint16).repeat(2, axis=0)
    Image.fromarray(values).save(tmp_path / "grey16.png")
    pil = Image.open(tmp_path / "grey16.png")
    assert pil.mode.startswith("I")
    from_pil = to_float_image(pil)
    assert torch.equal(from_pil, to_float_image(tmp_path / "grey16.png"))
    # PIL's convert("RGB") would clip every value above 255 to white.
    assert from_pil[0, 0].tolist() == pytest.approx([0.0, 128 / 255, 128 / 255, 1.0])


def test_a_pil_image_is_turned_upright_as_a_path_is(tmp_path: Path) -> None:
    """Orientation 6 (a phone held upright): stored 2x3, displayed 3x2; the prediction of
    the opened PIL image must be in the coordinates of the path's."""
    pixels = np.zeros((2, 3, 3), dtype=np.uint8)
    pixels[0, 0] = (255, 0, 0)
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "rot.png", exif=exif)
    from_pil = to_float_image(Image.open(tmp_path / "rot.png"))
    assert from_pil.shape == (3, 3, 2) and from_pil[:, 0, 1].tolist() == [1.0, 0.0, 0.0]
    assert torch.equal(from_pil, to_float_image(tmp_path / "rot.png"))


def test_a_list_is_batched_and_matches_single_images(run: Path, predictor: Predictor) -> None:
    paths = _images(run)[:3]
    batched = _many(predictor(paths, batch_size=2))
    assert len(batched) == 3
    for path, b in zip(paths, batched, strict=True):
        one = _single(predictor(path))
        assert torch.equal(b.labels, one.labels)
        assert torch.allclose(b.boxes, one.boxes, atol=1e-3)
        assert torch.allclose(b.scores, one.scores, atol=1e-5)
        assert b.image_size == one.image_size == (64, 64)


def test_thresholds_limits_and_output_fields(run: Path) -> None:
    path = _images(run)[0]
    p = Predictor.from_checkpoint(run / "last.pth", score_thresh=0.0, mask_threshold=0.3)
    full = _single(p(path, return_probs=True))
    assert full.mask_probs is not None and full.mask_probs.dtype == torch.float32
    assert full.masks.dtype == torch.bool and full.masks.shape == (len(full), 64, 64)
    assert torch.equal(full.masks, full.mask_probs > 0.3)
    assert (full.scores[:-1] >= full.scores[1:]).all()
    assert full.class_names == [p.class_names[int(v)] for v in full.labels]  # type: ignore[index]
    assert _single(p(path)).mask_probs is None
    cut = float(full.scores[len(full) // 2])
    p.score_thresh, p.max_detections = cut, 100
    above = _single(p(path))
    assert len(above) == int((full.scores >= cut).sum()) and (above.scores >= cut).all()
    p.score_thresh, p.max_detections = 0.0, 2
    assert torch.equal(_single(p(path)).scores, full.scores[:2])


@pytest.mark.parametrize("shape", [(1, 300), (300, 2), (3, 3000)])
def test_very_wide_or_tall_images_predict_at_their_own_size(
    predictor: Predictor, shape: tuple[int, int]
) -> None:
    """Their short side, resized, would be 0 pixels (aspect ratio above max / min size)."""
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    tta = TTAConfig(hflip=True, vflip=True, scales=(0.5, 1.0))
    for p in (predictor, Predictor(predictor.model, score_thresh=0.0, tta=tta)):
        pred = _single(p(image))
        assert pred.image_size == shape and pred.masks.shape == (len(pred), *shape)
        limits = torch.tensor([shape[1], shape[0]] * 2, dtype=torch.float32)
        assert bool(((pred.boxes >= 0) & (pred.boxes <= limits)).all())


def test_mask_threshold_defaults_to_the_model_config_as_in_the_export(
    run: Path, tmp_path: Path
) -> None:
    state = load_checkpoint(run / "last.pth")
    state["config"]["model"]["mask_threshold"] = 0.3
    save_checkpoint(state, tmp_path / "mt03.pth")
    p = Predictor.from_checkpoint(tmp_path / "mt03.pth", score_thresh=0.0)
    assert p.mask_threshold == 0.3 == make_metadata(p.model, None, None, 0.5).mask_threshold
    pred = _single(p(_images(run)[0], return_probs=True))
    assert pred.mask_probs is not None
    between = (pred.mask_probs > 0.3) & (pred.mask_probs <= 0.5)
    assert bool(between.any())  # pixels that a hard-coded 0.5 would leave out
    assert torch.equal(pred.masks, pred.mask_probs > 0.3)
    assert Predictor(p.model, mask_threshold=0.6).mask_threshold == 0.6


def test_optimize_switches_to_the_fast_path(run: Path, predictor: Predictor) -> None:
    fast = Predictor.from_checkpoint(run / "last.pth", score_thresh=0.0, optimize="fp32")
    assert fast.model.channels_last and fast.model.inference_precision == "fp32"
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in fast.model.modules())
    path = _images(run)[0]
    ref, out = _single(predictor(path)), _single(fast(path))
    assert torch.equal(out.labels, ref.labels)
    assert torch.allclose(out.boxes, ref.boxes, atol=1e-2)
    assert torch.allclose(out.scores, ref.scores, atol=1e-4)


def test_outputs_are_ordinary_cpu_tensors(run: Path, predictor: Predictor) -> None:
    pred = _single(predictor(_images(run)[0]))
    assert pred.boxes.device.type == "cpu"
    pred.boxes[:, 0] += 1  # inference-mode tensors would refuse this
    assert not pred.masks.requires_grad


def test_to_numpy_and_to_coco(run: Path, predictor: Predictor) -> None:
    pred = _single(predictor(_images(run)[0]))
    arrays = pred.to_numpy()
    assert arrays["boxes"].shape == (len(pred), 4) and arrays["masks"].dtype == np.bool_
    assert arrays["mask_probs"] is None and arrays["class_names"] == pred.class_names
    results = pred.to_coco(7, {1: 10, 2: 20, 3: 30})
    assert len(results) == len(pred)
    first = results[0]
    assert first["image_id"] == 7 and first["category_id"] == 10 * int(pred.labels[0])
    x1, y1, x2, y2 = pred.boxes[0].tolist()
    assert first["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
    decoded = mask_utils.decode(first["segmentation"])
    assert np.array_equal(decoded.astype(bool), arrays["masks"][0])


def test_bad_inputs_are_named(tmp_path: Path, predictor: Predictor) -> None:
    with pytest.raises(ValueError, match="divide 0-255 values by 255"):
        predictor(torch.full((3, 8, 8), 200.0))
    with pytest.raises(ValueError, match="list of images"):
        predictor(torch.rand(2, 3, 8, 8))
    with pytest.raises(TypeError, match="unsupported image type"):
        predictor(3)  # type: ignore[arg-type]
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(DatasetError, match=r"empty\.jpg"):
        predictor([empty])


def test_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        Predictor.from_checkpoint(tmp_path / "missing.pth")
    save_checkpoint({"model": {}}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="not a maskrcnn training checkpoint"):
        Predictor.from_checkpoint(tmp_path / "partial.pth")
    config = {"model": {"num_classes": 3, "backbone": "resnet18", "fpn_channels": 32}}
    save_checkpoint({"model": {"x": torch.zeros(1)}, "config": config}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="weights do not fit"):
        Predictor.from_checkpoint(tmp_path / "bad.pth")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_devices_the_machine_lacks_are_named() -> None:
    from maskrcnn.inference.predictor import pick_device

    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="'gpu': not a device name"):
        pick_device("gpu")
    with pytest.raises(ValueError, match="'cuda:1': PyTorch sees no CUDA device"):
        pick_device("cuda:1")
