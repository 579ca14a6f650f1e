"""``maskrcnn bench``: our model against torchvision's, same weights, same inputs, one process.

Every measurement alternates between the contenders after a warm-up and reports the median,
so that a slow moment of the machine hits both alike. On a GPU (``device="cuda"``) each call
is timed up to ``torch.cuda.synchronize()``, the fast mode runs in fp16, and torchvision is
also timed under fp16 autocast (``torchvision_amp``) to show what autocast alone gives.
"""

from __future__ import annotations

import copy
import json
import multiprocessing as mp
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.models import resnet50
from torchvision.models.detection import MaskRCNN as TVMaskRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops import FrozenBatchNorm2d, box_iou

from maskrcnn.config import ModelConfig
from maskrcnn.model.fast import default_fast_precision
from maskrcnn.model.mask_rcnn import MaskRCNN
from maskrcnn.model.postprocess import paste_masks
from maskrcnn.utils import malloc
from maskrcnn.utils.atomic import write_text_atomic
from maskrcnn.utils.precision import autocast, grad_scaler


def build_models(
    weights: str | None = None, seed: int = 0, resize: tuple[int, int] = (800, 1333)
) -> tuple[MaskRCNN, TVMaskRCNN]:
    """Ours and torchvision's ResNet-50-FPN with identical weights (random unless a
    torchvision-layout state dict or one of our checkpoints is given; a checkpoint's number
    of classes is kept), score threshold 0 so that each image yields the full 100
    detections; ``resize``: (min_size, max_size)."""
    torch.manual_seed(seed)
    state, num_classes = _load_weights(weights) if weights else (None, 91)
    cfg = ModelConfig(
        backbone="resnet50",
        num_classes=num_classes,
        box_score_thresh=0.0,
        min_size=resize[0],
        max_size=resize[1],
    )
    ours = MaskRCNN(cfg)
    if state is not None:
        try:
            ours.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"{weights} is not a ResNet-50-FPN Mask R-CNN: {err}") from None
    theirs = TVMaskRCNN(
        _resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3),
        num_classes,
        box_score_thresh=0.0,
        min_size=resize[0],
        max_size=resize[1],
    )
    theirs.load_state_dict(ours.state_dict())
    return ours.eval(), theirs.eval()


def _load_weights(path: str) -> tuple[dict[str, Tensor], int]:
    """The state dict in ``path`` (a state dict, or a checkpoint of ``maskrcnn train``) and
    the number of classes of the model it belongs to."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"weights file not found: {path}") from None
    except Exception as err:  # any unreadable file: say which one
        raise ValueError(f"{path} is not a readable state dict or checkpoint: {err}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    model = state.get("config", {}).get("model", {}) if "model" in state else {}
    if model.get("backbone", "resnet50") != "resnet50" or model.get("class_agnostic_masks"):
        raise ValueError(
            f"{path} is a {model.get('backbone')} model"
            f"{' with class-agnostic masks' if model.get('class_agnostic_masks') else ''}: "
            "the bench compares ResNet-50-FPN models with torchvision's"
        )
    weights = state.get("model", state)
    head = weights.get("roi_heads.box_predictor.cls_score.weight")
    return weights, int(head.shape[0]) if isinstance(head, Tensor) else 91


def _no_sync() -> None:
    pass


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What waits for the device's queued work: CUDA kernels run asynchronously."""
    return torch.cuda.synchronize if device.type == "cuda" else _no_sync


def alternate(
    fns: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    sync: Callable[[], None] = _no_sync,
) -> dict[str, float]:
    """Median seconds per call of each function, called in turn; ``sync`` waits for the
    device before a clock is read."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _warmups(device: torch.device) -> int:
    return 3 if device.type == "cuda" else 1  # CUDA: kernels loaded, cuDNN plans chosen


INFERENCE_CONTENDERS = ("torchvision", "ours", "ours_exact", "ours_fast")


def contender(kind: str, ours: MaskRCNN, theirs: TVMaskRCNN, fast_precision: str) -> Any:
    """The model an inference contender runs: torchvision's, ours as is, or a copy of ours
    on the fast path (``ours_exact`` in fp32, ``ours_fast`` in ``fast_precision``)."""
    if kind == "torchvision":
        return theirs
    if kind == "ours":
        return ours
    precision = "fp32" if kind == "ours_exact" else fast_precision
    return copy.deepcopy(ours).optimize_for_inference(precision)


def bench_image(size: tuple[int, int], device: torch.device) -> list[Tensor]:
    """The one random image every inference measurement runs on."""
    return [torch.rand(3, *size, generator=torch.Generator().manual_seed(1)).to(device)]


def bench_inference(
    ours: MaskRCNN, theirs: TVMaskRCNN, size: tuple[int, int], repeats: int, fast_precision: str
) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds per image for torchvision, ours as is, ours exact (fp32 fast path) and ours
    fast (and on CUDA torchvision under autocast); how far the fast outputs are from the
    exact ones."""
    device = next(ours.parameters()).device
    image = bench_image(size, device)
    models = {k: contender(k, ours, theirs, fast_precision) for k in INFERENCE_CONTENDERS}
    exact, fast = models["ours_exact"], models["ours_fast"]

    def call(model: Any) -> Callable[[], object]:
        return lambda: model(image)

    calls = {k: call(m) for k, m in models.items()}
    if device.type == "cuda":

        def theirs_amp() -> object:
            with autocast(fast_precision, device):
                return theirs(image)

        calls["torchvision_amp"] = theirs_amp
    with torch.inference_mode():
        times = alternate(calls, repeats, _warmups(device), synchronizer(device))
        agreement = compare(exact(image)[0], fast(image)[0])
    return times, agreement


def bench_int8(
    ours: MaskRCNN, theirs: TVMaskRCNN, size: tuple[int, int], repeats: int, fast_precision: str
) -> dict[str, Any]:
    """CPU: seconds per image of torchvision, our fast path and our int8 path (backbone and
    FPN in int8, calibrated on 4 other random images of the same size), alternating; the
    time to quantize and of the first call (which compiles for the input size); int8 against
    exact outputs. ``{"skipped": why}`` without torchao."""
    from maskrcnn.model.int8 import Int8Error

    image = bench_image(size, torch.device("cpu"))
    calibration = [torch.rand(3, *size, generator=torch.Generator().manual_seed(seed))
                   for seed in range(2, 6)]
    start = time.perf_counter()
    try:
        int8 = copy.deepcopy(ours).optimize_for_inference("int8", calibration=calibration)
    except Int8Error as err:
        return {"skipped": str(err)}
    quantize_s = time.perf_counter() - start
    fast = contender("ours_fast", ours, theirs, fast_precision)
    exact = contender("ours_exact", ours, theirs, fast_precision)
    with torch.inference_mode():
        start = time.perf_counter()
        int8(image)
        first_s = time.perf_counter() - start
        times = alternate({"torchvision": lambda: theirs(image), "ours_fast": lambda: fast(image),
                           "ours_int8": lambda: int8(image)}, repeats)
        agreement = compare(exact(image)[0], int8(image)[0])
    return {"s_per_image": times, "quantize_s": quantize_s, "first_call_s": first_s,
            "int8_vs_exact": agreement}


def compare(ref: dict[str, Tensor], other: dict[str, Tensor]) -> dict[str, float]:
    """Each reference detection matched to the other's best-overlapping one of the same
    label: mean box IoU, mean mask IoU (binarised at 0.5) and mean |score difference|."""
    if len(ref["boxes"]) == 0 or len(other["boxes"]) == 0:
        return {
            "box_iou": float(len(ref["boxes"]) == len(other["boxes"])),
            "mask_iou": 0.0,
            "score_diff": 0.0,
        }
    iou = box_iou(ref["boxes"], other["boxes"])
    iou[ref["labels"][:, None] != other["labels"][None, :]] = 0
    best, idx = iou.max(dim=1)
    a = ref["masks"][:, 0] > 0.5
    b = other["masks"][idx, 0] > 0.5
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float().clamp(min=1)
    return {
        "box_iou": best.mean().item(),
        "mask_iou": (inter / union).mean().item(),
        "score_diff": (ref["scores"] - other["scores"][idx]).abs().mean().item(),
    }


def training_batch(
    size: tuple[int, int], device: torch.device
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Two images of ``size`` with 5 random boxes each (their masks fill the boxes), on
    ``device``; the same for every call."""
    g = torch.Generator().manual_seed(2)
    images, targets = [], []
    for _ in range(2):
        h, w = size
        xy = torch.rand(5, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = torch.rand(5, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3]) + 32
        boxes = torch.cat([xy, xy + wh], 1).round()
        masks = torch.zeros(5, h, w, dtype=torch.uint8)
        for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
            masks[k, y1:y2, x1:x2] = 1
        images.append(torch.rand(3, h, w, generator=g).to(device))
        labels = torch.randint(1, 91, (5,), generator=g)
        targets.append(
            {"boxes": boxes.to(device), "labels": labels.to(device), "masks": masks.to(device)}
        )
    return images, targets


def bench_training(
    ours: MaskRCNN, theirs: TVMaskRCNN, size: tuple[int, int], repeats: int, precision: str
) -> dict[str, float]:
    """Seconds per SGD step (forward, backward, update) on a batch of 2 images; fp16 steps
    scale the loss as ``maskrcnn train`` does. On CUDA also torchvision under autocast and
    ours in both memory layouts."""
    device = next(ours.parameters()).device
    images, targets = training_batch(size, device)

    def step(model: torch.nn.Module, prec: str, channels_last: bool = True) -> Callable[[], None]:
        model = copy.deepcopy(model).train()
        if channels_last:
            model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(
            [p for p in model.parameters() if p.requires_grad], lr=1e-5, momentum=0.9
        )
        scaler = grad_scaler(prec, device)

        def run() -> None:
            with autocast(prec, device):
                loss = sum(model(images, targets).values())
            assert isinstance(loss, Tensor)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)

        return run

    steps = {
        "torchvision": step(theirs, "fp32", channels_last=False),
        "ours_fp32": step(ours, "fp32"),
        f"ours_{precision}": step(ours, precision),
    }
    if device.type == "cuda":
        steps["torchvision_amp"] = step(theirs, precision, channels_last=False)
        # The layout ``maskrcnn train`` keeps on a GPU (channels-last only pays on a CPU).
        steps[f"ours_{precision}_nchw"] = step(ours, precision, channels_last=False)
    return alternate(steps, repeats, _warmups(device), synchronizer(device))


CPU = torch.device("cpu")


def bench_paste(
    size: tuple[int, int], repeats: int, device: torch.device = CPU
) -> dict[str, float]:
    """Pasting 100 28x28 masks into an image of ``size``."""
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(100, 1, 28, 28, generator=g)
    h, w = size
    xy = torch.rand(100, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
    boxes = torch.cat([xy, xy + torch.rand(100, 2, generator=g) * 200 + 10], 1)
    masks, boxes = masks.to(device), boxes.to(device)
    return alternate(
        {
            "torchvision": lambda: paste_masks_in_image(masks, boxes, size),
            "ours": lambda: paste_masks(masks, boxes, size),
        },
        repeats,
        _warmups(device),
        synchronizer(device),
    )


def bench_loading(num_images: int, image_size: int, repeats: int) -> dict[str, float]:
    """Seconds per sample, decoded to a float image with boxes, labels and masks: our COCO
    dataset with its eval transforms, and torchvision's ``CocoDetection`` wrapped for
    transforms v2 with ``ToImage`` + ``ToDtype(float32, scale=True)``."""
    from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
    from torchvision.transforms import v2

    from maskrcnn.data.coco import CocoDataset
    from maskrcnn.data.synthetic import make_synthetic_coco
    from maskrcnn.data.transforms import build_transforms

    tmp = Path(tempfile.mkdtemp(prefix="maskrcnn-bench-"))
    ann = make_synthetic_coco(tmp, num_images, size=image_size, seed=0)
    ours = CocoDataset(ann, tmp, transforms=build_transforms(None, train=False))
    root = tmp / "train" if (tmp / "train" / ours.image_info(0)["file_name"]).is_file() else tmp
    to_float = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    tv = wrap_dataset_for_transforms_v2(
        CocoDetection(str(root), str(ann), transforms=to_float),
        target_keys=("boxes", "labels", "masks", "image_id"),
    )

    def read_all(ds: Any) -> None:
        for i in range(len(ds)):
            ds[i]

    times = alternate(
        {"torchvision": lambda: read_all(tv), "ours": lambda: read_all(ours)}, repeats
    )
    return {k: v / num_images for k, v in times.items()}


def _vm(field: str) -> int:
    """A field of /proc/self/status in bytes (VmRSS: now, VmHWM: peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_child(kind: str, size: tuple[int, int], precision: str, queue: Any) -> None:
    ours, theirs = build_models()
    model = contender(kind, ours, theirs, precision)
    del ours, theirs
    image = [torch.rand(3, *size)]
    with torch.inference_mode():
        model(image)  # warm-up: allocator caches, one-time buffers
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current size
        before = _vm("VmRSS")
        model(image)
        queue.put(_vm("VmHWM") - before)


def bench_peak_cuda_memory(
    ours: MaskRCNN, theirs: TVMaskRCNN, size: tuple[int, int], precision: str
) -> dict[str, float]:
    """Peak GPU memory (MiB) an inference allocates beyond what is held before it (weights,
    input), from PyTorch's CUDA allocator statistics."""
    image = bench_image(size, next(ours.parameters()).device)
    out = {}
    for kind in INFERENCE_CONTENDERS:
        model = contender(kind, ours, theirs, precision)
        with torch.inference_mode():
            model(image)  # warm-up
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            model(image)
            torch.cuda.synchronize()
            out[kind] = (torch.cuda.max_memory_allocated() - before) / 2**20
        del model
    return out


def bench_peak_memory(size: tuple[int, int], precision: str) -> dict[str, float]:
    """Peak resident memory (MiB) an inference adds, each contender in a fresh process."""
    ctx = mp.get_context("spawn")
    out = {}
    for kind in INFERENCE_CONTENDERS:
        queue = ctx.Queue()
        proc = ctx.Process(target=_peak_child, args=(kind, size, precision, queue))
        proc.start()
        out[kind] = queue.get(timeout=600) / 2**20
        proc.join()
    return out


def machine(device: torch.device = CPU) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return f"{name}, CUDA {torch.version.cuda}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def run(
    size: tuple[int, int] = (800, 1088),
    repeats: int = 3,
    weights: str | None = None,
    skip: tuple[str, ...] = (),
    resize: tuple[int, int] = (800, 1333),
    loading_images: int = 32,
    device: str = "cpu",
) -> dict[str, Any]:
    """All measurements; returns the JSON-able report (seconds, ratios vs torchvision).
    ``resize`` is the models' (min_size, max_size), torchvision's default unless testing.
    On ``cuda`` data loading (CPU work) and the onnxruntime comparison are left out, and
    peak memory is the GPU's."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: PyTorch sees no CUDA device on this machine")
        skip = (*skip, "loading", "onnx")
    precision = default_fast_precision(dev)
    ours, theirs = build_models(weights, resize=resize)
    ours, theirs = ours.to(dev), theirs.to(dev)
    report: dict[str, Any] = {
        "machine": machine(dev),
        "device": dev.type,
        "image_size": list(size),
        "fast_precision": precision,
        "weights": weights or "random",
        "malloc": malloc.setting(),
    }
    if "inference" not in skip:
        _progress("inference", repeats)
        times, agreement = bench_inference(ours, theirs, size, repeats, precision)
        report["inference_s_per_image"] = times
        report["fast_vs_exact"] = agreement
    if "int8" not in skip and dev.type == "cpu":
        _progress("int8 (quantize, compile for the size, then alternate)", repeats)
        report["int8"] = bench_int8(ours, theirs, size, repeats, precision)
    if "train" not in skip:
        _progress("training step", repeats)
        report["train_s_per_step_batch2"] = bench_training(ours, theirs, size, repeats, precision)
    if "paste" not in skip:
        _progress("mask paste", repeats * 3)
        report["paste_100_masks_s"] = bench_paste(size, repeats * 3, dev)
    if "loading" not in skip:
        _progress("data loading", repeats)
        report["loading_s_per_sample"] = bench_loading(loading_images, 512, repeats)
    if "memory" not in skip:
        _progress("peak memory (each contender in a fresh process)", 1)
        if dev.type == "cuda":
            report["inference_peak_gpu_mib"] = bench_peak_cuda_memory(ours, theirs, size,
                                                                      precision)
        else:
            report["inference_peak_mib"] = bench_peak_memory(size, precision)
    if "onnx" not in skip:
        _progress("onnxruntime (export, then the same image)", repeats)
        report["onnxruntime_vs_fast"] = bench_onnxruntime(copy.deepcopy(ours), None, size, repeats)
    return report


def bench_onnxruntime(
    model: MaskRCNN,
    onnx_path: str | Path | None = None,
    size: tuple[int, int] = (800, 1088),
    repeats: int = 3,
    threads: int | None = None,
    precision: str = "auto",
) -> dict[str, Any]:
    """Seconds per image of ``model`` exported to ONNX under onnxruntime (CPU EP) and of
    ``model`` in PyTorch's fast mode (``optimize_for_inference(precision)``), on the same
    random (3, *size) image, alternating after a warm-up, medians; both with ``threads``
    threads (default: torch's). ``onnx_path``: the model's ONNX file, or None to export it
    first.

    Returns ``{"onnxruntime": s, "pytorch_fast": s, "ratio": onnxruntime / pytorch_fast,
    "pytorch_precision": "bf16" | "fp32" | ..., "detections": [n_onnxruntime, n_pytorch],
    "threads": n, "size": [h, w]}``."""
    from maskrcnn.export.api import export_onnx
    from maskrcnn.export.onnx_predictor import OnnxPredictor

    if onnx_path is None:
        with tempfile.TemporaryDirectory() as folder:
            path = export_onnx(model, Path(folder) / "model.onnx")
            return bench_onnxruntime(model, path, size, repeats, threads, precision)
    threads = threads or torch.get_num_threads()
    image = torch.rand(3, *size, generator=torch.Generator().manual_seed(1))
    fast = copy.deepcopy(model).cpu().optimize_for_inference(precision)
    ort = OnnxPredictor(onnx_path, num_threads=threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            runs = {"onnxruntime": lambda: ort.run(image), "pytorch_fast": lambda: fast([image])}
            times = alternate(runs, repeats)
            found = [len(ort.run(image)["boxes"]), len(fast([image])[0]["boxes"])]
    finally:
        torch.set_num_threads(previous)
    return {
        **times,
        "ratio": times["onnxruntime"] / times["pytorch_fast"],
        "pytorch_precision": fast.inference_precision,
        "detections": found,
        "threads": threads,
        "size": list(size),
    }


def _progress(section: str, repeats: int) -> None:
    """One line on stderr as each section starts: a full run takes minutes."""
    print(f"bench: {section}, {repeats} timed run(s) of each contender...", file=sys.stderr,
          flush=True)


MALLOC_NOTES = {
    "retained": "reused by the process (see maskrcnn.utils.malloc; MASKRCNN_MALLOC=system "
    "to compare)",
    "system": "returned to the OS by malloc (the C library's default)",
}


IMAGES_PER_CALL = {"inference_s_per_image": 1, "train_s_per_step_batch2": 2}


def format_report(report: dict[str, Any]) -> str:
    """A table: each contender's figure, images per second where that means something, and
    its speed-up over torchvision."""
    lines = [
        f"machine: {report['machine']}",
        f"image: {report['image_size']}, fast mode precision: {report['fast_precision']}",
    ]
    if report.get("device", "cpu") == "cpu":
        lines.append(f"freed memory: {MALLOC_NOTES[report.get('malloc', 'system')]}")
    lines.append("")
    lines.append(
        f"{'measurement':34}{'contender':18}{'value':>12}{'images/s':>10}{'vs torchvision':>16}"
    )
    for section, unit in (
        ("inference_s_per_image", "s"),
        ("train_s_per_step_batch2", "s"),
        ("paste_100_masks_s", "s"),
        ("loading_s_per_sample", "s"),
        ("inference_peak_mib", "MiB"),
        ("inference_peak_gpu_mib", "MiB"),
    ):
        if section not in report:
            continue
        values = report[section]
        ref = values["torchvision"]
        for name, v in values.items():
            if unit == "s":
                ratio = f"{ref / v:.2f}x faster" if name != "torchvision" else ""
            else:
                ratio = f"{v / ref:.2f}x memory" if name != "torchvision" else ""
            n = IMAGES_PER_CALL.get(section)
            rate = f"{n / v:.1f}" if n else ""
            lines.append(f"{section:34}{name:18}{v:>8.4f} {unit:3}{rate:>10}{ratio:>16}")
    if "onnxruntime_vs_fast" in report:
        o = report["onnxruntime_vs_fast"]
        lines.append(
            f"onnxruntime {o['onnxruntime']:.4f} s vs PyTorch fast "
            f"{o['pytorch_fast']:.4f} s per image (ratio {o['ratio']:.2f})"
        )
    if "int8" in report:
        q = report["int8"]
        lines.append("")
        if "skipped" in q:
            lines.append(f"int8: skipped ({q['skipped']})")
        else:
            t = q["s_per_image"]
            int8 = t["ours_int8"]
            lines.append(
                f"int8: {int8:.4f} s per image, {t['torchvision'] / int8:.2f}x torchvision fp32 "
                f"({t['torchvision']:.4f} s), {t['ours_fast'] / int8:.2f}x our "
                f"{report['fast_precision']} fast path ({t['ours_fast']:.4f} s); quantizing "
                f"{q['quantize_s']:.1f} s, first call (compiles for the size) "
                f"{q['first_call_s']:.1f} s"
            )
            a = q["int8_vs_exact"]
            lines.append(f"  int8 vs exact outputs: box IoU {a['box_iou']:.4f}, mask IoU "
                         f"{a['mask_iou']:.4f}, |score diff| {a['score_diff']:.5f}")
    if "fast_vs_exact" in report:
        a = report["fast_vs_exact"]
        lines.append("")
        lines.append(
            f"fast vs exact outputs: box IoU {a['box_iou']:.4f}, mask IoU "
            f"{a['mask_iou']:.4f}, |score diff| {a['score_diff']:.5f}"
        )
        if report.get("weights", "random") == "random":
            lines.append(
                "  (random weights: near-equal scores of an untrained model reorder under "
                f"{report['fast_precision']}, so this agreement says little; pass --weights, "
                "or compare AP with `maskrcnn eval --fast`)"
            )
    return "\n".join(lines)


def main(
    size: tuple[int, int],
    repeats: int,
    weights: str | None,
    skip: tuple[str, ...],
    json_path: str | None,
    device: str = "cpu",
) -> int:
    if json_path and (Path(json_path).is_dir() or not Path(json_path).parent.is_dir()):
        raise ValueError(f"--json {json_path}: not a file in an existing folder")
    report = run(size, repeats, weights, skip, device=device)
    print(format_report(report))
    if json_path:
        write_text_atomic(json_path, json.dumps(report, indent=2))
    return 0
