"""Pure numpy/cv2/scipy maths of predicted label volumes: model-size probabilities to labels at the
slice size, 3-D connected components, keeping the liver, dropping tumour specks.

Volumes are canonical (Z, H, W) uint8 labels 0 background, 1 liver, 2 tumour (lits.core.schema). Every
function here returns a new array, except where it takes an explicit `out` (which may be its
input: the volume task post-processes its one label buffer in place, saving a 131 MB copy).
"""

from __future__ import annotations

from typing import Optional, Tuple

import cv2
import numpy as np

from lits.core.schema import LIVER, TUMOUR

# 26-connectivity (faces, edges and corners) in 3-D: a lesion touching another only at a corner
# is the same lesion, as in the LiTS evaluation's connected components.
CONNECTIVITY_3D = np.ones((3, 3, 3), dtype=bool)


# --- model output to labels ----------------------------------------------------------------------

def argmax3(probs: np.ndarray) -> np.ndarray:
    """np.argmax(probs, axis=-1) for 3 classes (ties to the lower class), ~3x faster.

    Args:
        probs: uint8 (..., 3).
    Returns:
        uint8 of probs.shape[:-1].
    """
    p0, p1, p2 = probs[..., 0], probs[..., 1], probs[..., 2]
    two = (p2 > p0) & (p2 > p1)
    out = (p1 > p0).view(np.uint8)
    return np.maximum(out, two.view(np.uint8) << 1)


def probs_to_labels(probs: np.ndarray, shape: Tuple[int, int], task: str) -> np.ndarray:
    """Labels of slices at `shape` from model-size probabilities: bilinear resize, then argmax.

    Probabilities, not labels, are resized: nearest-neighbour upsampling of a 128-pixel label map
    leaves 4-pixel stairs on every boundary at 512 pixels.

    Args:
        probs: uint8 (n, S, S, K), probability * 255 (K = 3 softmax, or 1: tumour).
        shape: the (H, W) to answer at.
        task: 'liver-tumour' (argmax of 3) or 'tumour' (tumour where p > 0.5).
    Returns:
        uint8 (n, H, W) labels.
    """
    h, w = shape
    out = np.empty((len(probs), h, w), np.uint8)
    for i, p in enumerate(probs):
        up = p if p.shape[:2] == (h, w) else cv2.resize(np.ascontiguousarray(p), (w, h), interpolation=cv2.INTER_LINEAR)
        if task == "liver-tumour":
            out[i] = argmax3(up.reshape(h, w, -1))
        else:
            out[i] = np.where(up.reshape(h, w) > 127, TUMOUR, 0)
    return out


# --- connected components ------------------------------------------------------------------------

def bounding_box(mask: np.ndarray) -> Tuple[slice, ...]:
    """The smallest box (one slice per axis) holding every True voxel of a non-empty mask."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.nonzero(mask.any(axis=other))[0]
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def pad_box(box: Tuple[slice, ...], shape: Tuple[int, ...], pad: int = 1) -> Tuple[slice, ...]:
    """`box` grown by `pad` voxels on every side, clipped to `shape`."""
    return tuple(slice(max(0, s.start - pad), min(n, s.stop + pad)) for s, n in zip(box, shape))


def label_components(mask: np.ndarray) -> Tuple[np.ndarray, int]:
    """3-D connected components (26-connectivity) of a boolean (Z, H, W) mask.

    Returns:
        (int32 component ids of mask's shape, 0 outside; number of components).
    """
    from scipy import ndimage

    ids, count = ndimage.label(mask, structure=CONNECTIVITY_3D)
    return ids.astype(np.int32, copy=False), int(count)


def component_sizes(mask: np.ndarray) -> np.ndarray:
    """Voxel counts of the 3-D connected components of `mask`, largest first (int64)."""
    if not mask.any():
        return np.zeros(0, dtype=np.int64)
    box = bounding_box(mask)
    ids, count = label_components(mask[box])
    return np.sort(np.bincount(ids.reshape(-1), minlength=count + 1)[1:])[::-1]


def _largest_in_box(mask: np.ndarray) -> Optional[Tuple[Tuple[slice, ...], np.ndarray]]:
    """(box of mask's True voxels, bool box-sized mask of its largest component), or None when empty."""
    if not mask.any():
        return None
    box = bounding_box(mask)
    ids, count = label_components(mask[box])
    largest = 1 + int(np.argmax(np.bincount(ids.reshape(-1), minlength=count + 1)[1:]))
    return box, ids == largest


def largest_component(mask: np.ndarray) -> np.ndarray:
    """bool mask of the largest 3-D connected component (26-connectivity) of a boolean mask."""
    out = np.zeros(mask.shape, bool)
    found = _largest_in_box(mask)
    if found is not None:
        out[found[0]] = found[1]
    return out


# --- post-processing -----------------------------------------------------------------------------

def postprocess(labels: np.ndarray) -> np.ndarray:
    """Keep the largest connected liver component (tumour counts as liver) and tumour inside it.

    A liver is one organ: islands of "liver" or "tumour" elsewhere (spleen, heart, bowel) are the
    commonest false positives of slice-wise models. Labelling runs inside the bounding box of
    the predicted liver, so its int32 ids cost box-sized, not volume-sized, memory.

    Args:
        labels: uint8 (Z, H, W) with values 0, 1, 2.
    Returns:
        uint8 (Z, H, W): a new array; every voxel outside the kept component is 0.
    """
    return np.where(largest_component(labels >= 1), labels, 0).astype(labels.dtype, copy=False)


def guided_keep(coarse: np.ndarray) -> Optional[Tuple[Tuple[slice, ...], np.ndarray]]:
    """The region the full-resolution post-processing keeps, found on the model-resolution labels.

    The largest liver component of `coarse`, grown by one coarse voxel (26-connectivity). Both
    steps run inside the component's bounding box padded by one voxel: growing by one voxel
    reaches no further, so this equals dilating the whole volume.

    Returns:
        (padded box, bool box-sized mask of the grown component), or None without liver.
    """
    from scipy import ndimage

    found = _largest_in_box(coarse >= 1)
    if found is None:
        return None
    outer, component = found
    inner = bounding_box(component)  # the component's own box: other islands' slices are skipped
    box = tuple(slice(o.start + i.start, o.start + i.stop) for o, i in zip(outer, inner))
    component = component[inner]
    padded = pad_box(box, coarse.shape)
    keep = np.zeros(tuple(s.stop - s.start for s in padded), bool)
    keep[tuple(slice(b.start - p.start, b.stop - p.start) for b, p in zip(box, padded))] = component
    return padded, ndimage.binary_dilation(keep, structure=CONNECTIVITY_3D)


def apply_keep(labels: np.ndarray, kept, coarse_hw: Tuple[int, int], out: Optional[np.ndarray] = None) -> np.ndarray:
    """`labels` where `kept` (a `guided_keep` answer at the coarse size `coarse_hw`), resized by
    nearest neighbour to the full in-plane size, holds; 0 elsewhere.

    `postprocess` for a full-resolution label volume whose component was chosen on the coarse one:
    only a full-resolution island within one coarse voxel of the kept component survives where
    `postprocess` would drop it.

    Args:
        labels: uint8 (Z, H, W) full-resolution labels.
        kept: `guided_keep(coarse)` for the uint8 (Z, h, w) labels of the same slices.
        coarse_hw: (h, w).
        out: where to write (may be `labels` itself: in place); None: a new array.
    Returns:
        uint8 (Z, H, W): `out`, or a new array."""
    if out is None:
        out = np.zeros_like(labels)
    elif out is not labels:
        out[...] = 0
    h, w = labels.shape[1:]
    kept_z = range(0) if kept is None else range(kept[0][0].start, kept[0][0].stop)
    if kept is not None:
        box, keep = kept
        slab = np.zeros(coarse_hw, np.uint8)
        for i, z in enumerate(kept_z):
            slab[box[1:]] = keep[i]
            full = cv2.resize(slab, (w, h), interpolation=cv2.INTER_NEAREST)
            np.multiply(labels[z], full, out=out[z])
    if out is labels:  # slices the kept component never reaches
        for z in range(len(labels)):
            if z not in kept_z:
                out[z] = 0
    return out


def full_box(box: Tuple[slice, ...], coarse_shape: Tuple[int, ...], shape: Tuple[int, ...]) -> Tuple[slice, ...]:
    """A full-resolution box holding everything `apply_keep` can keep from the coarse `box`: its
    slices, and its rows and columns scaled to the full size with a one-pixel margin."""
    out = [box[0]]
    for s, small, big in zip(box[1:], coarse_shape[1:], shape[1:]):
        scale = big / small
        out.append(slice(max(0, int(s.start * scale) - 1), min(big, int(np.ceil(s.stop * scale)) + 1)))
    return tuple(out)


def drop_small_tumours(labels: np.ndarray, voxel_ml: float, min_ml: float, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Relabel tumour components (26-connected) smaller than `min_ml` millilitres as liver.

    Specks of a few voxels are the commonest false lesions of a slice-wise model; a real lesion
    below the limit is lost with them, so the limit stays below what the evaluation counts.

    Args:
        labels: uint8 (Z, H, W) labels.
        out: None (a new array when anything changes, else `labels`) or `labels` (in place).
    Returns:
        uint8 labels.
    """
    tumour = labels == TUMOUR
    if not min_ml or not tumour.any():
        return labels
    box = bounding_box(tumour)
    ids, count = label_components(tumour[box])
    sizes = np.bincount(ids.reshape(-1), minlength=count + 1)
    small = (sizes * voxel_ml < min_ml)
    small[0] = False
    if not small.any():
        return labels
    out = labels.copy() if out is None else out
    out[box][small[ids]] = LIVER
    return out
