"""Losses of the two tasks, on logits.

- tumour (binary, the original's): BCE + (1 - Dice), Dice smoothed by 1 over the batch.
- liver-tumour (3-class): cross-entropy + (1 - mean soft Dice over liver and tumour).
- either, with `lesion_weight` w > 0: + w * (1 - the mean per-lesion Dice of the tumour), the
  "blob loss" of Kofler et al. 2023 (instance-imbalance-aware losses): each 8-connected tumour
  component of each patch is scored on its own, against the prediction with the other components
  masked out, so a 3-pixel lesion weighs as much as a 300-pixel one. Batch Dice and cross-entropy
  are dominated by the large lesions and the background; a lesion of a few pixels barely moves them.

Shapes: logits (N, C, H, W) float; target (N, H, W) int64 labels (0/1/2) or, for the binary
task, (N, H, W) {0, 1}.
"""

from __future__ import annotations

from typing import Optional, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

SMOOTH = 1.0


def soft_dice(probs: torch.Tensor, target: torch.Tensor, smooth: float = SMOOTH) -> torch.Tensor:
    """Soft Dice over the whole batch: (2 sum(p t) + s) / (sum p + sum t + s). Inputs any shape."""
    inter = (probs * target).sum()
    return (2 * inter + smooth) / (probs.sum() + target.sum() + smooth)


def lesion_components(tumour: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The 8-connected components of each sample's tumour, numbered 1..K across the batch.

    Labelled on the host (cv2): one copy of an (N, H, W) byte mask per step.

    Args:
        tumour: (N, H, W) bool or {0, 1}.
    Returns:
        (components int64 (N, H, W), 0 outside tumour; sample int64 (K,): each component's sample),
        both on tumour's device.
    """
    host = tumour.detach().to("cpu", torch.uint8).numpy()
    out = np.zeros(host.shape, np.int64)
    samples = []
    for i, mask in enumerate(host):
        if not mask.any():
            continue
        n, labels = cv2.connectedComponents(np.ascontiguousarray(mask), connectivity=8)
        out[i] = np.where(labels > 0, labels.astype(np.int64) + len(samples), 0)
        samples.extend([i] * (n - 1))
    device = tumour.device
    return torch.from_numpy(out).to(device), torch.as_tensor(samples, dtype=torch.int64).to(device)


def lesion_dice(probs: torch.Tensor, tumour: torch.Tensor, smooth: float = SMOOTH) -> Optional[torch.Tensor]:
    """Mean soft Dice over the tumour's components (blob loss); None when the batch holds no tumour.

    Component k of sample n: (2 sum_k p + s) / (sum_k p + sum of p on sample n's non-tumour pixels
    + |k| + s): the prediction on the other components of the batch is masked out, so finding one
    lesion is not paid for by another, and false positives in the lesion's own sample count.

    Args:
        probs: (N, H, W) tumour probabilities.
        tumour: (N, H, W) bool or {0, 1} reference.
    """
    components, sample = lesion_components(tumour)
    k = int(sample.numel())
    if k == 0:
        return None
    flat = components.reshape(-1)
    p = probs.reshape(-1)
    own = torch.zeros(k + 1, dtype=p.dtype, device=p.device).scatter_add(0, flat, p)[1:]
    size = torch.bincount(flat, minlength=k + 1)[1:].to(p.dtype)
    outside = (probs * (components == 0)).flatten(1).sum(1)
    return ((2 * own + smooth) / (outside[sample] + own + size + smooth)).mean()


def _with_lesions(loss: torch.Tensor, probs: torch.Tensor, tumour: torch.Tensor, lesion_weight: float) -> torch.Tensor:
    if lesion_weight <= 0:
        return loss
    dice = lesion_dice(probs, tumour)
    return loss if dice is None else loss + lesion_weight * (1 - dice)


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor, lesion_weight: float = 0.0) -> torch.Tensor:
    """Binary task: logits (N, 1, H, W), target (N, H, W) in {0, 1}."""
    logits = logits[:, 0].float()
    target = target.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    probs = torch.sigmoid(logits)
    return _with_lesions(bce + (1 - soft_dice(probs, target)), probs, target > 0, lesion_weight)


def ce_dice_loss(logits: torch.Tensor, target: torch.Tensor, dice_classes=(1, 2),
                 lesion_weight: float = 0.0) -> torch.Tensor:
    """3-class task: logits (N, 3, H, W), target (N, H, W) int64 labels."""
    logits = logits.float()
    ce = F.cross_entropy(logits, target)
    probs = torch.softmax(logits, dim=1)
    dice = torch.stack([soft_dice(probs[:, c], (target == c).float()) for c in dice_classes]).mean()
    return _with_lesions(ce + (1 - dice), probs[:, 2], target == 2, lesion_weight)
