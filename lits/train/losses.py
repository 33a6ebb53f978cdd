"""Losses of the two tasks, on logits.

- tumour (binary, the original's): BCE + (1 - Dice), Dice smoothed by 1 over the batch.
- liver-tumour (3-class): cross-entropy + (1 - mean soft Dice over liver and tumour).

Shapes: logits (N, C, H, W) float; target (N, H, W) int64 labels (0/1/2) or, for the binary
task, (N, H, W) {0, 1}.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SMOOTH = 1.0


def soft_dice(probs: torch.Tensor, target: torch.Tensor, smooth: float = SMOOTH) -> torch.Tensor:
    """Soft Dice over the whole batch: (2 sum(p t) + s) / (sum p + sum t + s). Inputs any shape."""
    inter = (probs * target).sum()
    return (2 * inter + smooth) / (probs.sum() + target.sum() + smooth)


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary task: logits (N, 1, H, W), target (N, H, W) in {0, 1}."""
    logits = logits[:, 0].float()
    target = target.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    return bce + (1 - soft_dice(torch.sigmoid(logits), target))


def ce_dice_loss(logits: torch.Tensor, target: torch.Tensor, dice_classes=(1, 2)) -> torch.Tensor:
    """3-class task: logits (N, 3, H, W), target (N, H, W) int64 labels."""
    logits = logits.float()
    ce = F.cross_entropy(logits, target)
    probs = torch.softmax(logits, dim=1)
    dice = torch.stack([soft_dice(probs[:, c], (target == c).float()) for c in dice_classes]).mean()
    return ce + (1 - dice)
