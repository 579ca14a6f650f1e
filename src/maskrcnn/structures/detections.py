"""Box detections of one image, by name instead of by position."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class Detections(NamedTuple):
    """boxes: (D, 4) float xyxy; scores: (D,) float; labels: (D,) int64 (1..C-1). A named
    tuple, so ``boxes, scores, labels = dets`` works too."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor

    def select(self, index: slice | Tensor) -> Detections:
        """The detections at ``index`` (a slice, an index tensor or a boolean mask)."""
        return Detections(self.boxes[index], self.scores[index], self.labels[index])
