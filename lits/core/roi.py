"""The liver's box: where a cascade's second stage looks (pure numpy).

A cascade model segments whole slices at its image size first, then crops every slice to one
square box around that first stage's liver and segments the crops, at the volume's own
resolution or near it, with a second U-Net trained on such crops (nnU-Net's cascade does the same
in 3-D). A 128-pixel model sees a 512-pixel slice at a quarter of its resolution, where a 5 mm
lesion is two pixels across; it sees a liver box of about 250 pixels at half, and a 256-pixel
phantom's box at its own.

Prepare cuts training crops around the reference liver (`training_box`) with a drawn margin and
offset, so the second stage learns boxes that are a little too large, too small or off-centre, as
the first stage's are; inference uses `ROI_MARGIN` around the first stage's kept liver.

Boxes are canonical (Z, H, W) slices: (z, rows, columns).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from lits.core.postprocess import bounding_box

Box = Tuple[slice, slice, slice]

FIRST_STAGE = "first"  # the stage a cascade's first pass is sent to a model with (lits.model.streaming)

ROI_MARGIN = 0.15  # inference: fraction of the liver's larger in-plane extent added on each side
TRAIN_MARGINS = (0.05, 0.3)  # prepare draws the margin per volume from this range
TRAIN_SHIFT = 0.05  # ... and an offset of the box's centre, as a fraction of its side
Z_PAD = 2  # slices above and below the liver
MIN_SIDE = 16  # pixels: a box is never smaller (a speck of liver still gets context)


def liver_extent(liver: np.ndarray) -> Optional[Box]:
    """The smallest (z, rows, columns) box holding every True voxel, or None for an empty mask.

    Args:
        liver: bool (Z, H, W).
    """
    return bounding_box(liver) if liver.any() else None


def square_box(extent: Box, shape: Tuple[int, int, int], margin: float = ROI_MARGIN,
               shift: Tuple[float, float] = (0.0, 0.0), z_pad: int = Z_PAD) -> Box:
    """The crop around a liver `extent`: a square of side (1 + 2 * margin) x the extent's larger
    in-plane side (at least MIN_SIDE, at most the slice's smaller side), centred on the extent
    (moved by `shift` x side), moved inside the slice; slices `z_pad` beyond the extent's.

    Args:
        extent: `liver_extent`'s box.
        shape: the volume's canonical (Z, H, W).
        margin: >= 0.
        shift: (rows, columns) offset of the centre, in sides.
    Returns:
        (z, rows, columns) slices within `shape`; rows and columns of equal length.
    """
    zs, ys, xs = extent
    n, h, w = shape
    side = max(ys.stop - ys.start, xs.stop - xs.start)
    side = min(max(int(round(side * (1.0 + 2.0 * margin))), MIN_SIDE), h, w)

    def place(lo: int, hi: int, offset: float, limit: int) -> slice:
        start = int(round((lo + hi) / 2.0 + offset * side - side / 2.0))
        start = min(max(start, 0), limit - side)
        return slice(start, start + side)

    return (slice(max(0, zs.start - z_pad), min(n, zs.stop + z_pad)),
            place(ys.start, ys.stop, shift[0], h), place(xs.start, xs.stop, shift[1], w))


def training_box(labels: np.ndarray, rng: np.random.Generator) -> Optional[Box]:
    """Prepare's crop of one volume: `square_box` of the reference liver (labels > 0) with a margin
    drawn from TRAIN_MARGINS and a centre moved by up to TRAIN_SHIFT sides; None without liver.

    Args:
        labels: uint8 (Z, H, W) reference labels.
    """
    extent = liver_extent(labels > 0)
    if extent is None:
        return None
    margin = float(rng.uniform(*TRAIN_MARGINS))
    shift = tuple(float(s) for s in rng.uniform(-TRAIN_SHIFT, TRAIN_SHIFT, 2))
    return square_box(extent, labels.shape, margin, shift)


def offset_box(inner: Box, outer: Box) -> Box:
    """`inner`, a box within the sub-volume `outer`, in the whole volume's coordinates."""
    return tuple(slice(o.start + i.start, o.start + i.stop) for i, o in zip(inner, outer))


def as_list(box: Box) -> list:
    """[[z0, z1], [y0, y1], [x0, x1]]: a box for JSON (manifests, reports)."""
    return [[s.start, s.stop] for s in box]
