"""Balanced sampling of positive and negative training candidates."""

from __future__ import annotations

import torch
from torch import Tensor


class BalancedSampler:
    """Keeps at most ``batch_size_per_image`` candidates per image, of which at most
    ``positive_fraction`` are positives (label >= 1); negatives (label == 0) fill the rest.
    Candidates labelled -1 are never sampled.
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float) -> None:
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def __call__(self, labels: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """``labels``: per image (P,) ints → per image boolean masks (P,) of sampled
        positives and sampled negatives."""
        pos_masks, neg_masks = [], []
        for labels_per_image in labels:
            positive = torch.where(labels_per_image >= 1)[0]
            negative = torch.where(labels_per_image == 0)[0]
            num_pos = int(self.batch_size_per_image * self.positive_fraction)
            num_pos = min(positive.numel(), num_pos)
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
            # randperm for both, in this order, consumes the RNG exactly as torchvision does.
            perm_pos = torch.randperm(positive.numel(), device=positive.device)[:num_pos]
            perm_neg = torch.randperm(negative.numel(), device=negative.device)[:num_neg]
            pos_mask = torch.zeros_like(labels_per_image, dtype=torch.bool)
            neg_mask = torch.zeros_like(labels_per_image, dtype=torch.bool)
            pos_mask[positive[perm_pos]] = True
            neg_mask[negative[perm_neg]] = True
            pos_masks.append(pos_mask)
            neg_masks.append(neg_mask)
        return pos_masks, neg_masks
