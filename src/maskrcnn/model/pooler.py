"""RoIAlign over the FPN levels: each box pooled from the level that matches its size.

The values of torchvision's ``MultiScaleRoIAlign`` (same level rule, same sampling), with
two paths on a CPU:

- channels-last levels (the fast inference path, training in reduced precision) are pooled
  where they lie as weighted row gathers (``roi_align_gather``): each output bin is a
  weighted sum of 16 feature vectors, which ``embedding_bag`` computes vectorised over the
  channels and on all threads, forward and backward;
- NCHW levels with torchvision's ``roi_align`` kernels (bit-identical values): the levels
  are converted once to the layout that kernel reads (float32, NCHW), and, since it runs
  on one thread, the work is split into one batch per thread — boxes in the forward pass,
  images (or boxes of one image) in the backward pass — and run in parallel.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx
from torchvision.ops import roi_align
from torchvision.ops.poolers import initLevelMapper

FEATURE_NAMES = ["0", "1", "2", "3"]
SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]  # the FPN's strides, known up front

_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()
# A forked child inherits the pools but not their threads: it starts its own.
os.register_at_fork(after_in_child=_pools.clear)


def _run_parallel(fn: Callable[..., Tensor], jobs: Sequence[tuple[Any, ...]]) -> list[Tensor]:
    """``[fn(*job) for job in jobs]`` on a pool of ``torch.get_num_threads()`` threads (the
    kernels release the GIL), without gradients or autocast, as the kernels run."""
    workers = torch.get_num_threads()
    if workers < 2 or len(jobs) < 2:
        return [fn(*job) for job in jobs]
    with _pools_lock:
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="maskrcnn-roialign")
        pool = _pools[workers]
    return [f.result() for f in [pool.submit(_no_grad, fn, *job) for job in jobs]]


def _no_grad(fn: Callable[..., Tensor], *args: Any) -> Tensor:
    with torch.no_grad():
        return fn(*args)


def gathers(features: OrderedDict[str, Tensor]) -> bool:
    """Whether the levels are pooled by ``roi_align_gather``: channels-last CPU tensors
    (judged on the finest level; a coarse one may be too small to tell)."""
    first = features[FEATURE_NAMES[0]]
    return first.device.type == "cpu" and first.is_contiguous(memory_format=torch.channels_last)


def poolable(features: OrderedDict[str, Tensor]) -> OrderedDict[str, Tensor]:
    """The pooled levels in the form their pooling reads: channels-last CPU levels as they
    are (see ``gathers``; as float32 when they need a gradient, so that the gradients of
    overlapping boxes add up in float32), others as float32 in NCHW layout, the only form
    torchvision's ``roi_align`` reads without converting (its CUDA kernel makes the input
    contiguous, and under autocast casts it to float32, in every call). Done once per image
    batch for the box and mask branches, instead of in every call: the finest level is
    large."""
    gather = gathers(features)
    out = OrderedDict()
    for name in FEATURE_NAMES:
        x = features[name]
        if gather:
            if x.requires_grad and torch.is_grad_enabled():
                x = x.float()  # keeps the layout
        else:
            x = x.to(dtype=torch.float32, memory_format=torch.contiguous_format)
        out[name] = x
    return out


def _samples(
    start: Tensor, extent: Tensor, bins: int, ratio: int, length: int
) -> tuple[Tensor, Tensor]:
    """Along one axis, for each RoI: the two neighbouring pixels of each of the ``ratio``
    samples of each of ``bins`` bins, and their bilinear weights — (R, bins, 2 * ratio)
    indices and weights, with the sample positions and edge rules of torchvision's CPU
    kernel (a sample more than one pixel outside weighs nothing; one within clamps)."""
    step = (extent / bins)[:, None, None]
    p = torch.arange(bins, dtype=start.dtype, device=start.device)[None, :, None]
    i = torch.arange(ratio, dtype=start.dtype, device=start.device) + 0.5
    pos = (start[:, None, None] + p * step + i * step / ratio).flatten(1)
    valid = (pos >= -1.0) & (pos <= length)
    pos = pos.clamp(min=0)
    low = pos.floor().long()
    edge = low >= length - 1
    low = torch.where(edge, length - 1, low)
    high = torch.where(edge, low, low + 1)
    frac = torch.where(edge, 0.0, pos - low)
    weight = torch.stack([1 - frac, frac], -1) * valid[..., None]
    index = torch.stack([low, high], -1)
    return index.view(-1, bins, 2 * ratio), weight.view(-1, bins, 2 * ratio)


def roi_align_gather(feature: Tensor, rois: Tensor, size: int, scale: float, ratio: int) -> Tensor:
    """``roi_align(feature, rois, size, scale, ratio, aligned=False)`` (``ratio`` >= 1),
    read from the (B*H*W, C) rows of an NHWC ``feature`` in its own dtype. Bilinear sampling
    is separable: each bin's ``ratio``² samples x 4 neighbours are products of per-row and
    per-column indices and weights, and the bin is their weighted sum — one
    ``embedding_bag`` over all bins, whose gradient scatters back the same way. Returns
    (R, C, size, size) in channels-last layout."""
    c, h, w = feature.shape[1:]
    table = feature.permute(0, 2, 3, 1).reshape(-1, c)  # a view when channels-last
    r = rois.to(torch.float32)
    x0, y0 = r[:, 1] * scale, r[:, 2] * scale
    rows, wy = _samples(y0, (r[:, 4] * scale - y0).clamp(min=1.0), size, ratio, h)
    cols, wx = _samples(x0, (r[:, 3] * scale - x0).clamp(min=1.0), size, ratio, w)
    first = (r[:, 0].long() * (h * w))[:, None, None, None, None]
    index = first + rows[:, :, None, :, None] * w + cols[:, None, :, None, :]
    weight = wy[:, :, None, :, None] * wx[:, None, :, None, :] / (ratio * ratio)
    k = (2 * ratio) ** 2
    pooled = F.embedding_bag(
        index.reshape(-1, k),
        table,
        mode="sum",
        per_sample_weights=weight.reshape(-1, k).to(table.dtype),
    )
    return pooled.view(-1, size, size, c).permute(0, 3, 1, 2)


def rois_of(boxes: list[Tensor]) -> Tensor:
    """(sum N_i, 5) rows ``(image index, x1, y1, x2, y2)`` from per-image (N_i, 4) boxes."""
    index = [torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)]
    return torch.cat([torch.cat(index), torch.cat(boxes)], dim=1)


class ParallelRoIAlign(torch.autograd.Function):
    """torchvision's CPU ``roi_align`` (aligned=False) and its gradient, on all threads."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, feature: Tensor, rois: Tensor, size: int, scale: float, ratio: int
    ) -> Tensor:
        ctx.save_for_backward(rois)
        ctx.meta = (feature.shape, size, scale, ratio)  # type: ignore[attr-defined]
        parts = rois.tensor_split(torch.get_num_threads())
        jobs = [(feature, p, (size, size), scale, ratio, False) for p in parts if len(p)]
        out = _run_parallel(roi_align, jobs)
        return torch.cat(out) if out else feature.new_zeros((0, feature.shape[1], size, size))

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        (rois,) = ctx.saved_tensors  # type: ignore[attr-defined]
        shape, size, scale, ratio = ctx.meta  # type: ignore[attr-defined]
        b, c, h, w = shape
        # Boxes of different images write to different images' gradients: one job per
        # image, and an image's boxes split further while there are threads to spare.
        jobs, owners = [], []
        split = max(1, torch.get_num_threads() // b)
        image = rois[:, 0].long()
        for i in range(b):
            idx = torch.where(image == i)[0]
            for part in idx.tensor_split(split):
                if len(part):
                    local = rois[part].clone()
                    local[:, 0] = 0
                    jobs.append(
                        (
                            grad[part].contiguous(),
                            local,
                            scale,
                            size,
                            size,
                            1,
                            c,
                            h,
                            w,
                            ratio,
                            False,
                        )
                    )
                    owners.append(i)
        parts = _run_parallel(torch.ops.torchvision._roi_align_backward, jobs)
        per_image: list[Tensor | None] = [None] * b
        for i, g in zip(owners, parts, strict=True):
            prev = per_image[i]
            per_image[i] = g if prev is None else prev + g
        zero = grad.new_zeros((1, c, h, w))
        grad_in = torch.cat([zero if g is None else g for g in per_image])
        return grad_in, None, None, None, None


class MultiLevelRoIAlign(nn.Module):
    """(R, C, size, size) features of the boxes given per image (xyxy, input pixels)."""

    def __init__(self, output_size: int, sampling_ratio: int = 2) -> None:
        super().__init__()
        if sampling_ratio < 1:
            raise ValueError(f"sampling_ratio must be at least 1, got {sampling_ratio}")
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self.scales = SCALES
        self.map_levels = initLevelMapper(2, 5)

    def forward(
        self,
        features: OrderedDict[str, Tensor],
        boxes: list[Tensor],
        image_sizes: list[tuple[int, int]] | None = None,
    ) -> Tensor:
        levels = poolable(features)
        rois = rois_of(boxes)
        level_of = self.map_levels(boxes)
        first = levels[FEATURE_NAMES[0]]
        size = self.output_size
        gather = gathers(levels)
        result = first.new_zeros((rois.shape[0], first.shape[1], size, size))
        if gather:  # bins are written channels-last, the layout the heads read
            result = result.contiguous(memory_format=torch.channels_last)
        # The boxes of each level, found with one read of the counts by the host (a GPU
        # waits once per call instead of once per level).
        order = torch.argsort(level_of, stable=True)
        counts = torch.bincount(level_of, minlength=len(FEATURE_NAMES)).tolist()
        by_level = order.split(counts)
        for name, scale, idx in zip(FEATURE_NAMES, self.scales, by_level, strict=True):
            feature = levels[name]
            if gather:
                pooled = roi_align_gather(feature, rois[idx], size, scale, self.sampling_ratio)
            elif feature.device.type == "cpu":
                pooled = ParallelRoIAlign.apply(
                    feature, rois[idx], size, scale, self.sampling_ratio
                )
            else:
                pooled = roi_align(feature, rois[idx], size, scale, self.sampling_ratio, False)
            result[idx] = pooled
        return result
