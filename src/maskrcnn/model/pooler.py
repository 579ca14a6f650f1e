"""RoIAlign over the FPN levels: each box pooled from the level that matches its size.

The values of torchvision's ``MultiScaleRoIAlign`` (same level rule, same ``roi_align``),
with two differences that matter on a CPU: the levels are converted once to the layout the
CPU kernel reads (float32, NCHW), and, since that kernel runs on one thread, the boxes are
split into one batch per thread and pooled in parallel when no gradient is needed.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align
from torchvision.ops.poolers import initLevelMapper

FEATURE_NAMES = ["0", "1", "2", "3"]
SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]  # the FPN's strides, known up front

_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _executor(workers: int) -> ThreadPoolExecutor:
    with _pools_lock:
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="maskrcnn-roialign")
        return _pools[workers]


def poolable(features: OrderedDict[str, Tensor]) -> OrderedDict[str, Tensor]:
    """The pooled levels as float32 in NCHW layout, the only form torchvision's CPU
    ``roi_align`` reads without converting. Done once per image batch for the box and mask
    branches, instead of in every call: reduced-precision channels-last features would
    otherwise be converted four times, and the finest level is large."""
    out = OrderedDict()
    for name in FEATURE_NAMES:
        x = features[name]
        if x.device.type == "cpu":
            x = x.to(dtype=torch.float32, memory_format=torch.contiguous_format)
        out[name] = x
    return out


def rois_of(boxes: list[Tensor]) -> Tensor:
    """(sum N_i, 5) rows ``(image index, x1, y1, x2, y2)`` from per-image (N_i, 4) boxes."""
    index = [torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)]
    return torch.cat([torch.cat(index), torch.cat(boxes)], dim=1)


class MultiLevelRoIAlign(nn.Module):
    """(R, C, size, size) features of the boxes given per image (xyxy, input pixels)."""

    def __init__(self, output_size: int, sampling_ratio: int = 2) -> None:
        super().__init__()
        self.output_size = (output_size, output_size)
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
        result = first.new_zeros((rois.shape[0], first.shape[1], *self.output_size))
        jobs = []
        for level, (name, scale) in enumerate(zip(FEATURE_NAMES, self.scales, strict=True)):
            idx = torch.where(level_of == level)[0]
            jobs.append((levels[name], idx, scale))
        threads = torch.get_num_threads()
        if first.device.type != "cpu" or threads < 2 or torch.is_grad_enabled():
            for feature, idx, scale in jobs:
                result[idx] = self._align(feature, rois[idx], scale)
            return result
        # The CPU kernel is single-threaded: pool each level's boxes in ``threads`` batches.
        inference = torch.is_inference_mode_enabled()
        futures = []
        for feature, idx, scale in jobs:
            for part in idx.tensor_split(threads):
                if part.numel():
                    job = _executor(threads).submit(
                        self._align_in_thread, feature, rois[part], scale, inference
                    )
                    futures.append((part, job))
        for part, job in futures:
            result[part] = job.result()
        return result

    def _align(self, feature: Tensor, rois: Tensor, scale: float) -> Tensor:
        return roi_align(feature, rois, self.output_size, scale, self.sampling_ratio, False)

    def _align_in_thread(
        self, feature: Tensor, rois: Tensor, scale: float, inference: bool
    ) -> Tensor:
        # Grad and inference modes are per thread: carry the caller's over.
        with torch.inference_mode(inference), torch.no_grad():
            return self._align(feature, rois, scale)
