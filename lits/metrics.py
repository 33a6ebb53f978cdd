"""Overlap counts and Dice / IoU from them (pure numpy), per slice and aggregated per volume.

Rule for empty masks: when prediction and reference are both empty, Dice and IoU are 1 (nothing
to find, nothing found); when exactly one is empty they are 0.
"""

from __future__ import annotations

import numpy as np


def overlap_counts(pred: np.ndarray, ref: np.ndarray, classes=(1, 2)) -> np.ndarray:
    """Per-sample, per-class (intersection, pred size, ref size).

    Liver follows LiTS: a class c region is label >= c for liver (tumour counts as liver) and
    label == 2 for tumour.

    Args:
        pred, ref: (N, H, W) integer label arrays.
    Returns:
        int64 (N, len(classes), 3).
    """
    out = np.zeros((pred.shape[0], len(classes), 3), dtype=np.int64)
    for k, c in enumerate(classes):
        p = pred >= c if c == 1 else pred == c
        r = ref >= c if c == 1 else ref == c
        out[:, k, 0] = np.logical_and(p, r).reshape(len(p), -1).sum(1)
        out[:, k, 1] = p.reshape(len(p), -1).sum(1)
        out[:, k, 2] = r.reshape(len(r), -1).sum(1)
    return out


def dice_iou(counts: np.ndarray):
    """Dice and IoU from (..., 3) counts, with the empty-mask rule; returns two float arrays."""
    inter, p, r = counts[..., 0].astype(float), counts[..., 1].astype(float), counts[..., 2].astype(float)
    both_empty = (p + r) == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(both_empty, 1.0, 2 * inter / np.maximum(p + r, 1))
        iou = np.where(both_empty, 1.0, inter / np.maximum(p + r - inter, 1))
    return dice, iou
