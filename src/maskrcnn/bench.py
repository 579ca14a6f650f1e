"""``maskrcnn bench``: our model against torchvision's, same weights, same inputs, one process.

Every measurement alternates between the contenders after a warm-up and reports the median,
so that a slow moment of the machine hits both alike.
"""

from __future__ import annotations

import copy
import json
import multiprocessing as mp
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.models import resnet50
from torchvision.models.detection import MaskRCNN as TVMaskRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops import FrozenBatchNorm2d, box_iou

from maskrcnn import malloc
from maskrcnn.config import ModelConfig
from maskrcnn.model.mask_rcnn import MaskRCNN
from maskrcnn.model.postprocess import paste_masks
from maskrcnn.precision import autocast, cpu_supports_bf16


def build_models(
    weights: str | None = None, seed: int = 0, resize: tuple[int, int] = (800, 1333)
) -> tuple[MaskRCNN, TVMaskRCNN]:
    """Ours and torchvision's ResNet-50-FPN with identical weights (random unless a
    torchvision-layout state dict or one of our checkpoints is given), score threshold 0 so
    that each image yields the full 100 detections; ``resize``: (min_size, max_size)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        backbone="resnet50", box_score_thresh=0.0, min_size=resize[0], max_size=resize[1]
    )
    ours = MaskRCNN(cfg)
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        ours.load_state_dict(state.get("model", state))
    theirs = TVMaskRCNN(
        _resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3),
        91,
        box_score_thresh=0.0,
        min_size=resize[0],
        max_size=resize[1],
    )
    theirs.load_state_dict(ours.state_dict())
    return ours.eval(), theirs.eval()


def alternate(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per call of each function, called in turn."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_inference(
    ours: MaskRCNN, theirs: TVMaskRCNN, size: tuple[int, int], repeats: int, fast_precision: str
) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds per image for torchvision, ours as is, ours exact (fp32 fast path) and ours
    fast; and how far the fast outputs are from the exact ones."""
    image = [torch.rand(3, *size, generator=torch.Generator().manual_seed(1))]
    exact = copy.deepcopy(ours).optimize_for_inference("fp32")
    fast = copy.deepcopy(ours).optimize_for_inference(fast_precision)
    models: dict[str, Any] = {
        "torchvision": theirs,
        "ours": ours,
        "ours_exact": exact,
        "ours_fast": fast,
    }

    def call(model: Any) -> Callable[[], object]:
        return lambda: model(image)

    with torch.inference_mode():
        times = alternate({k: call(m) for k, m in models.items()}, repeats)
        agreement = compare(exact(image)[0], fast(image)[0])
    return times, agreement


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


def _train_inputs(size: tuple[int, int]) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
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
        images.append(torch.rand(3, h, w, generator=g))
        targets.append(
            {"boxes": boxes, "labels": torch.randint(1, 91, (5,), generator=g), "masks": masks}
        )
    return images, targets


def bench_training(
    ours: MaskRCNN, theirs: TVMaskRCNN, size: tuple[int, int], repeats: int, precision: str
) -> dict[str, float]:
    """Seconds per SGD step (forward, backward, update) on a batch of 2 images."""
    images, targets = _train_inputs(size)
    # Channels-last, as ``maskrcnn train`` runs on a CPU.
    ours_fp32 = copy.deepcopy(ours).train().to(memory_format=torch.channels_last)
    ours_fast = copy.deepcopy(ours).train().to(memory_format=torch.channels_last)
    tv = copy.deepcopy(theirs).train()

    def step(model: torch.nn.Module, prec: str) -> Callable[[], None]:
        opt = torch.optim.SGD(
            [p for p in model.parameters() if p.requires_grad], lr=1e-5, momentum=0.9
        )

        def run() -> None:
            with autocast(prec, torch.device("cpu")):
                loss = sum(model(images, targets).values())
            assert isinstance(loss, Tensor)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return run

    return alternate(
        {
            "torchvision": step(tv, "fp32"),
            "ours_fp32": step(ours_fp32, "fp32"),
            f"ours_{precision}": step(ours_fast, precision),
        },
        repeats,
    )


def bench_paste(size: tuple[int, int], repeats: int) -> dict[str, float]:
    """Pasting 100 28x28 masks into an image of ``size``."""
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(100, 1, 28, 28, generator=g)
    h, w = size
    xy = torch.rand(100, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
    boxes = torch.cat([xy, xy + torch.rand(100, 2, generator=g) * 200 + 10], 1)
    return alternate(
        {
            "torchvision": lambda: paste_masks_in_image(masks, boxes, size),
            "ours": lambda: paste_masks(masks, boxes, size),
        },
        repeats,
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
    model: Any = {"torchvision": theirs, "ours": ours}.get(kind)
    if model is None:
        model = ours.optimize_for_inference("fp32" if kind == "ours_exact" else precision)
    del theirs
    image = [torch.rand(3, *size)]
    with torch.inference_mode():
        model(image)  # warm-up: allocator caches, one-time buffers
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current size
        before = _vm("VmRSS")
        model(image)
        queue.put(_vm("VmHWM") - before)


def bench_peak_memory(size: tuple[int, int], precision: str) -> dict[str, float]:
    """Peak resident memory (MiB) an inference adds, each contender in a fresh process."""
    ctx = mp.get_context("spawn")
    out = {}
    for kind in ("torchvision", "ours", "ours_exact", "ours_fast"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_peak_child, args=(kind, size, precision, queue))
        proc.start()
        out[kind] = queue.get(timeout=600) / 2**20
        proc.join()
    return out


def machine() -> str:
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
) -> dict[str, Any]:
    """All measurements; returns the JSON-able report (seconds, ratios vs torchvision).
    ``resize`` is the models' (min_size, max_size), torchvision's default unless testing."""
    precision = "bf16" if cpu_supports_bf16() else "fp32"
    ours, theirs = build_models(weights, resize=resize)
    report: dict[str, Any] = {
        "machine": machine(),
        "image_size": list(size),
        "fast_precision": precision,
        "weights": weights or "random",
        "malloc": malloc.setting(),
    }
    if "inference" not in skip:
        times, agreement = bench_inference(ours, theirs, size, repeats, precision)
        report["inference_s_per_image"] = times
        report["fast_vs_exact"] = agreement
    if "train" not in skip:
        report["train_s_per_step_batch2"] = bench_training(ours, theirs, size, repeats, precision)
    if "paste" not in skip:
        report["paste_100_masks_s"] = bench_paste(size, repeats * 3)
    if "loading" not in skip:
        report["loading_s_per_sample"] = bench_loading(loading_images, 512, repeats)
    if "memory" not in skip:
        report["inference_peak_mib"] = bench_peak_memory(size, precision)
    if "onnx" not in skip:
        from maskrcnn.export import bench_onnxruntime

        report["onnxruntime_vs_fast"] = bench_onnxruntime(copy.deepcopy(ours), None, size, repeats)
    return report


MALLOC_NOTES = {
    "retained": "reused by the process (see maskrcnn.malloc; MASKRCNN_MALLOC=system to compare)",
    "system": "returned to the OS by malloc (the C library's default)",
}


def format_report(report: dict[str, Any]) -> str:
    """A table: each contender's figure and its speed-up over torchvision."""
    lines = [
        f"machine: {report['machine']}",
        f"image: {report['image_size']}, fast mode precision: {report['fast_precision']}",
        f"freed memory: {MALLOC_NOTES[report.get('malloc', 'system')]}",
        "",
    ]
    lines.append(f"{'measurement':34}{'contender':16}{'value':>12}{'vs torchvision':>16}")
    for section, unit in (
        ("inference_s_per_image", "s"),
        ("train_s_per_step_batch2", "s"),
        ("paste_100_masks_s", "s"),
        ("loading_s_per_sample", "s"),
        ("inference_peak_mib", "MiB"),
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
            lines.append(f"{section:34}{name:16}{v:>10.4f} {unit:3}{ratio:>16}")
    if "onnxruntime_vs_fast" in report:
        o = report["onnxruntime_vs_fast"]
        lines.append(
            f"onnxruntime {o['onnxruntime']:.4f} s vs PyTorch fast "
            f"{o['pytorch_fast']:.4f} s per image (ratio {o['ratio']:.2f})"
        )
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
                "bf16, so this agreement says little; pass --weights, or compare AP with "
                "`maskrcnn eval --fast`)"
            )
    return "\n".join(lines)


def main(
    size: tuple[int, int],
    repeats: int,
    weights: str | None,
    skip: tuple[str, ...],
    json_path: str | None,
) -> int:
    report = run(size, repeats, weights, skip)
    print(format_report(report))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2))
    return 0
