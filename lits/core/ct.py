"""Pure numpy/cv2 CT image maths: HU windows, frequency-histogram scaling, 2.5-D stacking, resize.

Functions take arrays and return new arrays; they never modify inputs and do no I/O. Slice
arrays are (H, W); volumes are canonical (Z, H, W) (see lits.core.schema).
"""

from __future__ import annotations

from typing import Iterator

import cv2
import numpy as np

from lits.core.schema import FREQHIST_BINS, WINDOW_CUSTOM, WINDOW_LIVER


def window(hu: np.ndarray, width: float, level: float) -> np.ndarray:
    """Map HU to uint8 through a (width, level) window, as fastai's ``windowed`` + ``*255 .byte()``.

    Values below ``level - width//2`` become 0, above ``level + width//2`` become 255; in between
    the scale is linear and truncated (not rounded), like the original's conversion.

    Args:
        hu: any-shape array of Hounsfield units (integer or float).
        width, level: the window, HU.
    Returns:
        uint8 array of hu's shape.
    """
    lo = level - width // 2
    hi = level + width // 2
    scaled = (np.asarray(hu, dtype=np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.clip(scaled, 0.0, 255.0).astype(np.uint8)


# Voxels per histogram piece: a piece's temporaries stay small, and cv2's float32 bin counts
# stay exact (each below 2^24).
HIST_PIECE = 1 << 22


def _pieces(values: np.ndarray) -> Iterator[np.ndarray]:
    """Every element of `values` once, as 1-D pieces of at most ~HIST_PIECE elements, in an
    unspecified order (for histograms). Views of one contiguous block when `values` is a permuted
    or flipped view of one (a canonical volume of a file array); otherwise each piece is a copy
    of a few slices, never of the whole array."""
    dense = values
    for axis in range(dense.ndim):
        if dense.strides[axis] < 0:
            dense = np.flip(dense, axis)
    dense = dense.transpose(np.argsort(dense.strides, kind="stable")[::-1])
    if dense.flags.c_contiguous:
        flat = dense.reshape(-1)
        for start in range(0, flat.size, HIST_PIECE):
            yield flat[start:start + HIST_PIECE]
        return
    rows = values if values.ndim > 1 else values[None]
    step = max(1, HIST_PIECE // max(1, int(np.prod(rows.shape[1:]))))
    for start in range(0, rows.shape[0], step):
        yield rows[start:start + step].reshape(-1)


def _int16_counts(values: np.ndarray) -> np.ndarray:
    """int64 (65536,) counts of every int16 value (index: value + 32768)."""
    counts = np.zeros(1 << 16, dtype=np.int64)
    for piece in _pieces(values):
        # int16 -> uint16 by flipping the sign bit keeps the order. cv2.calcHist counts 16-bit
        # keys ~3x faster than np.bincount (which widens every key to int64 first); its float32
        # counts are exact below 2^24, hence the pieces.
        keys = piece.view(np.uint16) ^ np.uint16(0x8000)
        counts += cv2.calcHist([keys.reshape(1, -1)], [0], None, [1 << 16], [0, 1 << 16]).reshape(-1).astype(np.int64)
    return counts


def freqhist_breaks(hu: np.ndarray, n_bins: int = FREQHIST_BINS) -> np.ndarray:
    """fastai's ``freqhist_bins`` over a whole volume: breaks holding equal numbers of voxels.

    The sorted voxel values are read at fractions 0.001, (i + 0.5) / n_bins for i < n_bins, and
    0.999; duplicates are dropped. Sorting a 30 M-voxel volume is slow and doubles its memory,
    so the order statistics come exactly from an integer histogram built a chunk at a time
    (float HU are floored to whole HU first: the breaks are used at 1 HU resolution). The voxels'
    order does not matter: a canonical view and its file-order array give the same breaks.

    Args:
        hu: (Z, H, W) or any-shape HU array.
        n_bins: number of equal-frequency bins.
    Returns:
        float32 1-D array of unique, increasing break values.
    """
    hu = np.asarray(hu)
    if hu.dtype == np.int16:
        counts = _int16_counts(hu)
        present = np.flatnonzero(counts)
        lo, hi = int(present[0]) - 0x8000, int(present[-1]) - 0x8000
        counts = counts[present[0]:present[-1] + 1]
    else:
        lo = int(np.floor(np.min(hu)))
        hi = int(np.floor(np.max(hu)))
        counts = np.zeros(hi - lo + 1, dtype=np.int64)
        for part in _pieces(hu):
            ints = np.floor(part).astype(np.int64) if part.dtype.kind == "f" else part.astype(np.int64)
            ints -= lo
            counts += np.bincount(ints, minlength=counts.size)
    total = int(counts.sum())
    fractions = np.concatenate([[0.001], np.arange(n_bins) / n_bins + 1 / (2 * n_bins), [0.999]])
    ranks = (total * fractions).astype(np.int64)
    values = np.searchsorted(np.cumsum(counts), ranks, side="right") + lo
    return np.unique(values).astype(np.float32)


def hist_scaled(hu: np.ndarray, breaks: np.ndarray) -> np.ndarray:
    """Equalise HU through frequency-histogram breaks to uint8 (fastai ``hist_scaled`` * 255).

    Integer HU go through a lookup table holding np.interp's values at every integer in the
    slice's range (identical results, ~8x faster on a 512x512 slice); float HU are
    interpolated directly.

    Args:
        hu: any-shape HU array.
        breaks: increasing break values from `freqhist_breaks`.
    Returns:
        uint8 array of hu's shape.
    """
    if len(breaks) == 1:
        return np.zeros(hu.shape, dtype=np.uint8)
    ys = np.linspace(0.0, 1.0, len(breaks), dtype=np.float64)
    hu = np.asarray(hu)
    if hu.dtype.kind in "iu" and hu.size:
        lo, hi = int(hu.min()), int(hu.max())
        levels = np.arange(lo, hi + 1, dtype=np.float32)
        lut = (np.clip(np.interp(levels, breaks, ys) * 255.0, 0.0, 255.0)).astype(np.uint8)
        return lut[hu.astype(np.int64) - lo] if lo < 0 else lut[hu - lo]
    scaled = np.interp(np.asarray(hu, dtype=np.float32), breaks, ys) * 255.0
    return np.clip(scaled, 0.0, 255.0).astype(np.uint8)


def slice_image(hu: np.ndarray, z: int, breaks: np.ndarray, context: int = 0) -> np.ndarray:
    """The 3-channel uint8 image of canonical slice z.

    context 0: (liver window W150/L30, custom window W200/L60, volume-equalised full range).
    context 1 (2.5-D): the liver window of slices z-1, z, z+1, edges repeated.

    Args:
        hu: canonical (Z, H, W) HU volume.
        z: slice index.
        breaks: `freqhist_breaks(hu)` (ignored for context 1).
        context: 0 or 1.
    Returns:
        uint8 (H, W, 3), C-contiguous.
    """
    n = hu.shape[0]
    if context == 0:
        s = hu[z]
        channels = (window(s, *WINDOW_LIVER), window(s, *WINDOW_CUSTOM), hist_scaled(s, breaks))
    elif context == 1:
        channels = tuple(window(hu[min(max(k, 0), n - 1)], *WINDOW_LIVER) for k in (z - 1, z, z + 1))
    else:
        raise ValueError(f"context must be 0 or 1, got {context}")
    return np.ascontiguousarray(np.stack(channels, axis=-1))


# Slices copied together when a volume's canonical slices are scattered in memory (model_inputs).
GATHER_SLICES = 32


def model_inputs(hu: np.ndarray, zs, breaks: np.ndarray, context: int, size: int) -> np.ndarray:
    """The model's input images of canonical slices `zs`: `slice_image` resized to size x size.

    What prepare stores and what inference feeds the model: one implementation.

    Args:
        hu: canonical (Z, H, W) HU.
        zs: slice indices.
        breaks: `freqhist_breaks(hu)` (ignored for context 1).
    Returns:
        uint8 (len(zs), size, size, 3).
    """
    zs = np.asarray(list(zs) if not isinstance(zs, np.ndarray) else zs, dtype=np.intp)
    out = np.empty((len(zs), size, size, 3), np.uint8)
    if context == 0 and hu.ndim == 3 and abs(hu.strides[2]) != hu.itemsize:
        # A file stored with another axis last (S-P-L, P-L-S...) scatters each canonical slice's
        # voxels; copying GATHER_SLICES of them into one block first makes this ~6x faster on a
        # 512^2 S-P-L volume (same values, so the same images).
        for start in range(0, len(zs), GATHER_SLICES):
            block = hu[zs[start:start + GATHER_SLICES]]
            for i in range(block.shape[0]):
                out[start + i] = resize_image(slice_image(block, i, breaks, context), size)
        return out
    for i, z in enumerate(zs):
        out[i] = resize_image(slice_image(hu, int(z), breaks, context), size)
    return out


def stack_context(channel0: np.ndarray, z: int) -> np.ndarray:
    """2.5-D image from one channel per slice: channel0[z-1], [z], [z+1], edges repeated.

    Args:
        channel0: (Z, H, W) uint8, e.g. the liver-window channel of a converted image series.
        z: slice index.
    Returns:
        uint8 (H, W, 3).
    """
    n = channel0.shape[0]
    return np.ascontiguousarray(np.stack([channel0[min(max(k, 0), n - 1)] for k in (z - 1, z, z + 1)], axis=-1))


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize an (H, W, C) uint8 image to (size, size, C) with area interpolation."""
    if image.shape[:2] == (size, size):
        return np.ascontiguousarray(image)
    out = cv2.resize(np.ascontiguousarray(image), (size, size), interpolation=cv2.INTER_AREA)
    return out if out.ndim == 3 else out[..., None]


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize an (H, W) uint8 label mask to (size, size) with nearest neighbour (labels stay labels)."""
    if mask.shape == (size, size):
        return np.ascontiguousarray(mask)
    return cv2.resize(np.ascontiguousarray(mask), (size, size), interpolation=cv2.INTER_NEAREST)

