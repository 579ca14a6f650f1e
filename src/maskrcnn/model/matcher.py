"""Assignment of each prediction (anchor or proposal) to its best ground-truth box."""

from __future__ import annotations

import torch
from torch import Tensor

BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


class Matcher:
    """IoU matcher: index of the matched ground truth per prediction, or -1 (background) /
    -2 (ignored, IoU between the two thresholds).

    With ``allow_low_quality_matches`` every ground truth keeps the predictions it overlaps
    best, even below ``high_threshold`` (the RPN needs this for small objects).
    """

    def __init__(
        self, high_threshold: float, low_threshold: float, allow_low_quality_matches: bool = False
    ) -> None:
        if low_threshold > high_threshold:
            raise ValueError(f"low_threshold {low_threshold} > high_threshold {high_threshold}")
        self.high_threshold = high_threshold
        self.low_threshold = low_threshold
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, quality: Tensor) -> Tensor:
        """``quality``: (G, P) IoU of G ground truths with P predictions → (P,) int64."""
        if quality.numel() == 0:
            raise ValueError("cannot match against zero ground-truth boxes or zero predictions")
        matched_vals, matches = quality.max(dim=0)
        all_matches = matches.clone() if self.allow_low_quality_matches else matches
        matches = torch.where(matched_vals < self.low_threshold, BELOW_LOW_THRESHOLD, matches)
        between = (matched_vals >= self.low_threshold) & (matched_vals < self.high_threshold)
        matches = torch.where(between, BETWEEN_THRESHOLDS, matches)
        if self.allow_low_quality_matches:
            best_per_gt = quality.max(dim=1, keepdim=True).values
            is_best = (quality == best_per_gt).any(dim=0)
            matches = torch.where(is_best, all_matches, matches)
        return matches
