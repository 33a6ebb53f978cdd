"""Segmentation metrics (pure numpy/scipy): overlap counts and Dice / IoU per slice (training),
and the LiTS challenge's whole-volume metrics (evaluation).

Rule for empty masks: when prediction and reference are both empty, Dice and IoU are 1 (nothing
to find, nothing found); when exactly one is empty they are 0. Rules for the other metrics are
stated with them below.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from lits.core.postprocess import bounding_box, label_components


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


# --- Whole-volume metrics, LiTS challenge conventions ---------------------------------------------
# Liver is label >= 1 (tumour counts as liver), tumour is label 2. Distances are in mm with the
# reference's voxel spacing. Surfaces are the voxels of a mask that have a background neighbour
# across a face (6-connectivity), as in medpy and the LiTS evaluation; a mask's border with the
# outside of the volume counts as surface.
#
# Empty-mask rules (stated once, used everywhere):
# - Dice / Jaccard: both empty -> 1 (nothing to find, nothing found); one empty -> 0.
# - RVD: both empty -> 0; reference empty, prediction not -> NaN (undefined: division by 0).
# - ASSD / MSSD / RMSD: both empty -> 0; exactly one empty -> NaN (no surface to measure to),
#   counted apart in summaries so a missing prediction never improves a mean distance.

CLASSES = {"liver": 1, "tumour": 2}
DETECTION_IOU = 0.5  # a lesion is found when its matched prediction overlaps it with IoU > 0.5


def class_mask(labels: np.ndarray, name: str) -> np.ndarray:
    return labels >= 1 if name == "liver" else labels == 2


def _face_structure(ndim: int) -> np.ndarray:
    from scipy import ndimage

    return ndimage.generate_binary_structure(ndim, 1)


def surface(mask: np.ndarray) -> np.ndarray:
    """Boolean surface voxels of a boolean mask (voxels with a face-neighbour outside it)."""
    from scipy import ndimage

    if not mask.any():
        return np.zeros(mask.shape, bool)
    eroded = ndimage.binary_erosion(mask, structure=_face_structure(mask.ndim), border_value=0)
    return mask & ~eroded


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing) -> Tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from every surface voxel of pred to ref's surface, and from ref's to pred's.

    The distance transforms run only over the bounding box of both masks, padded by one voxel
    (all surface voxels, and hence all nearest surface voxels, lie inside it): on a liver in an
    abdominal CT that is a few percent of the volume.

    Args:
        pred, ref: boolean arrays of one shape, both non-empty.
        spacing: voxel size per axis of the arrays, mm.
    Returns:
        (float64 (n_pred_surface,), float64 (n_ref_surface,)).
    """
    from scipy import ndimage

    box = bounding_box(pred | ref)
    p = np.pad(pred[box], 1)
    r = np.pad(ref[box], 1)
    sp, sr = surface(p), surface(r)
    to_ref = ndimage.distance_transform_edt(~sr, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return to_ref[sp], to_pred[sr]


def _lesion_matches(pred: np.ndarray, ref: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every lesion's size and whether it is matched (the rule of `lesion_detection`).

    Args:
        pred, ref: boolean arrays of one shape.
    Returns:
        (reference sizes int64 (n_ref,) voxels, reference detected bool (n_ref,),
         predicted sizes int64 (n_pred,) voxels, predicted correct bool (n_pred,)).
    """
    def matched(a_ids: np.ndarray, n_a: int, b: np.ndarray, b_ids: np.ndarray) -> np.ndarray:
        found = np.zeros(n_a, bool)
        for k in range(1, n_a + 1):
            region = a_ids == k
            touching = np.unique(b_ids[region & b])
            touching = touching[touching > 0]
            if touching.size == 0:
                continue
            other = np.isin(b_ids, touching)
            inter = np.count_nonzero(region & other)
            union = np.count_nonzero(region | other)
            found[k - 1] = inter / union > DETECTION_IOU
        return found

    if not pred.any() and not ref.any():
        none = np.zeros(0, np.int64)
        return none, none.astype(bool), none, none.astype(bool)
    box = bounding_box(pred | ref)
    p, r = pred[box], ref[box]
    p_ids, n_p = label_components(p)
    r_ids, n_r = label_components(r)
    r_sizes = np.bincount(r_ids.ravel(), minlength=n_r + 1)[1:].astype(np.int64)
    p_sizes = np.bincount(p_ids.ravel(), minlength=n_p + 1)[1:].astype(np.int64)
    return r_sizes, matched(r_ids, n_r, p, p_ids), p_sizes, matched(p_ids, n_p, r, r_ids)


def lesion_detection(pred: np.ndarray, ref: np.ndarray) -> Dict[str, int]:
    """Lesion-wise detection counts from 3-D connected components (26-connectivity).

    A reference lesion is detected when the union of the predicted components touching it has
    IoU > 0.5 with it (so a lesion split in two by the model still counts); a predicted lesion is
    a true positive when the union of the reference components it touches has IoU > 0.5 with it
    (so one prediction covering two merged lesions counts once).

    Returns:
        {'ref_lesions', 'ref_detected', 'pred_lesions', 'pred_correct'}.
    """
    r_sizes, r_found, p_sizes, p_found = _lesion_matches(pred, ref)
    return {"ref_lesions": int(r_sizes.size), "ref_detected": int(r_found.sum()),
            "pred_lesions": int(p_sizes.size), "pred_correct": int(p_found.sum())}


# Lesion size buckets by equivalent-sphere diameter d (mm): d < 10, 10 <= d <= 20, d > 20.
SIZE_BUCKETS = (("lt10", "< 10 mm"), ("10to20", "10-20 mm"), ("gt20", "> 20 mm"))
DETECTION_COUNTS = ("ref_lesions", "ref_detected", "pred_lesions", "pred_correct")


def lesion_diameters(voxels: np.ndarray, spacing) -> np.ndarray:
    """Equivalent-sphere diameters (mm): d = (6 V / pi) ** (1/3), V = voxel count x voxel volume.

    Args:
        voxels: (n,) voxel counts of lesions.
        spacing: voxel size per axis, mm (its product is the voxel volume, in any axis order).
    Returns:
        float64 (n,).
    """
    volume = np.asarray(voxels, float) * float(np.prod(np.asarray(spacing, float)))
    return np.cbrt(6.0 * volume / np.pi)


def size_bucket(diameter: float) -> str:
    """The key of SIZE_BUCKETS a lesion of `diameter` mm falls in (< 10, 10-20 inclusive, > 20)."""
    return "lt10" if diameter < 10.0 else "10to20" if diameter <= 20.0 else "gt20"


def detection_ratios(counts: Dict[str, int]) -> Dict:
    """`counts` (DETECTION_COUNTS) with recall = ref_detected / ref_lesions and precision =
    pred_correct / pred_lesions added; None where the denominator is 0 (an empty bucket)."""
    out = {k: int(counts[k]) for k in DETECTION_COUNTS}
    out["recall"] = out["ref_detected"] / out["ref_lesions"] if out["ref_lesions"] else None
    out["precision"] = out["pred_correct"] / out["pred_lesions"] if out["pred_lesions"] else None
    return out


def lesion_detection_by_size(pred: np.ndarray, ref: np.ndarray, spacing) -> Dict:
    """Lesion detection (the rule of `lesion_detection`) split by lesion size, and false positives.

    Each lesion (3-D component, 26-connectivity) is bucketed by its own equivalent-sphere diameter
    (`lesion_diameters`, with the voxel `spacing`): reference lesions for recall, predicted lesions
    for precision. So a predicted lesion merging two reference lesions is one correct prediction in
    its own bucket, and each reference lesion it merges is detected only if it has IoU > 0.5 with it.
    A false-positive lesion is a predicted lesion that is not correct.

    Args:
        pred, ref: boolean arrays of one shape.
        spacing: voxel size per array axis, mm.
    Returns:
        {'ref_lesions', 'ref_detected', 'pred_lesions', 'pred_correct', 'fp_lesions',
         'buckets': {key of SIZE_BUCKETS: detection_ratios(...) of that bucket}}.
    """
    r_sizes, r_found, p_sizes, p_found = _lesion_matches(pred, ref)
    r_keys = [size_bucket(d) for d in lesion_diameters(r_sizes, spacing)]
    p_keys = [size_bucket(d) for d in lesion_diameters(p_sizes, spacing)]
    buckets = {}
    for key, _ in SIZE_BUCKETS:
        r_in = np.array([k == key for k in r_keys], bool)
        p_in = np.array([k == key for k in p_keys], bool)
        buckets[key] = detection_ratios({
            "ref_lesions": r_in.sum(), "ref_detected": (r_in & r_found).sum(),
            "pred_lesions": p_in.sum(), "pred_correct": (p_in & p_found).sum()})
    return {"ref_lesions": int(r_sizes.size), "ref_detected": int(r_found.sum()),
            "pred_lesions": int(p_sizes.size), "pred_correct": int(p_found.sum()),
            "fp_lesions": int(p_sizes.size - p_found.sum()), "buckets": buckets}


def _ratio(a: float, b: float, empty: float) -> float:
    return float(a / b) if b else empty


def class_metrics(pred: np.ndarray, ref: np.ndarray, spacing) -> Dict[str, float]:
    """Overlap, volume and surface metrics of one class (boolean masks, one shape).

    Returns:
        {'dice', 'jaccard', 'voe', 'rvd', 'assd', 'mssd', 'rmsd', 'intersection', 'pred_voxels',
        'ref_voxels'} (see the empty-mask rules above).
    """
    inter = int(np.count_nonzero(pred & ref))
    n_p, n_r = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    union = n_p + n_r - inter
    out = {"intersection": inter, "pred_voxels": n_p, "ref_voxels": n_r}
    out["dice"] = _ratio(2 * inter, n_p + n_r, 1.0)
    out["jaccard"] = _ratio(inter, union, 1.0)
    out["voe"] = 1.0 - out["jaccard"]
    out["rvd"] = _ratio(n_p - n_r, n_r, 0.0 if n_p == 0 else float("nan"))
    if n_p and n_r:
        d_p, d_r = surface_distances(pred, ref, spacing)
        pooled = np.concatenate([d_p, d_r])
        out["assd"] = float(pooled.mean())
        out["mssd"] = float(pooled.max())
        out["rmsd"] = float(np.sqrt(np.mean(pooled ** 2)))
    else:
        empty = 0.0 if not n_p and not n_r else float("nan")
        out.update(assd=empty, mssd=empty, rmsd=empty)
    return out


def slice_scores(pred: np.ndarray, ref: np.ndarray, smooth: float = 1.0) -> Dict[str, float]:
    """The original notebook's slice-level Dice and IoU (Keras metrics, smoothing 1).

    Per axial slice z of (Z, H, W) boolean masks: Dice (2 I + s) / (P + R + s) and IoU
    (I + s) / (P + R - I + s); averaged over the slices whose reference holds the class (the
    original's test slices all held tumour) and over all slices.
    """
    flat_p = pred.reshape(len(pred), -1)
    flat_r = ref.reshape(len(ref), -1)
    inter = np.count_nonzero(flat_p & flat_r, axis=1).astype(float)
    p = np.count_nonzero(flat_p, axis=1).astype(float)
    r = np.count_nonzero(flat_r, axis=1).astype(float)
    dice = (2 * inter + smooth) / (p + r + smooth)
    iou = (inter + smooth) / (p + r - inter + smooth)
    positive = r > 0
    return {
        "slice_dice": float(dice[positive].mean()) if positive.any() else float("nan"),
        "slice_iou": float(iou[positive].mean()) if positive.any() else float("nan"),
        "slice_dice_all": float(dice.mean()) if len(dice) else float("nan"),
        "slices_with_class": int(positive.sum()),
    }


def volume_metrics(pred_labels: np.ndarray, ref_labels: np.ndarray, spacing, axial_axis: int = 0) -> Dict:
    """Every per-volume LiTS metric of a predicted label volume against its reference.

    Args:
        pred_labels, ref_labels: uint8 label arrays of one shape (any axis order).
        spacing: voxel size per array axis, mm (the reference's).
        axial_axis: which array axis runs through axial slices (for the slice-level scores).
    Returns:
        {'liver': {...}, 'tumour': {... + lesion detection, 'fp_lesions', 'lesions_by_size'},
         'tumour_burden': {'pred', 'ref', 'error'}} ('lesions_by_size': lesion_detection_by_size's
        'buckets').
    """
    if pred_labels.shape != ref_labels.shape:
        raise ValueError(f"prediction shape {pred_labels.shape} differs from the reference's {ref_labels.shape}")
    out: Dict = {}
    for name in CLASSES:
        p, r = class_mask(pred_labels, name), class_mask(ref_labels, name)
        m = class_metrics(p, r, spacing)
        m.update(slice_scores(np.moveaxis(p, axial_axis, 0), np.moveaxis(r, axial_axis, 0)))
        if name == "tumour":
            lesions = lesion_detection_by_size(p, r, spacing)
            m["lesions_by_size"] = lesions.pop("buckets")
            m.update(lesions)
        out[name] = m
    burden_p = _ratio(out["tumour"]["pred_voxels"], out["liver"]["pred_voxels"], 0.0)
    burden_r = _ratio(out["tumour"]["ref_voxels"], out["liver"]["ref_voxels"], 0.0)
    out["tumour_burden"] = {"pred": burden_p, "ref": burden_r, "error": burden_p - burden_r}
    return out
