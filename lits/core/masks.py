"""Pure numpy/cv2 label-mask maths: slice categories, the seeded slice filter and decoding
("inverting") the colour-mapped masks of the converted image dataset back to labels. The
post-processing of predicted label volumes (3-D connected components) is lits.core.postprocess.

Masks are uint8 (H, W) with labels 0 background, 1 liver, 2 tumour; volumes are (Z, H, W).
"""

from __future__ import annotations

import cv2
import numpy as np

from lits.core.errors import BadInputError
from lits.core.schema import CATEGORY_LIVER, CATEGORY_TUMOUR


def categorise(labels: np.ndarray) -> np.ndarray:
    """Category of each slice of a (Z, H, W) label volume: 0 empty, 1 liver only, 2 with tumour.

    A slice's category is its largest label, because tumour lies inside liver (a tumour label
    without any liver label still counts as a tumour slice).

    Returns:
        int8 (Z,).
    """
    if labels.ndim != 3:
        raise ValueError(f"labels must be (Z, H, W), got shape {labels.shape}")
    if labels.shape[0] == 0:
        return np.zeros(0, dtype=np.int8)
    return labels.max(axis=(1, 2)).astype(np.int8)


def select_slices(categories: np.ndarray, keep_liver: float, keep_empty: float, rng: np.random.Generator) -> np.ndarray:
    """Which slices to keep: every tumour slice, a seeded fraction of liver-only and of empty ones.

    Args:
        categories: int8 (Z,) from `categorise`.
        keep_liver, keep_empty: keep probabilities for categories 1 and 0.
        rng: the only source of randomness; one draw per slice, so the decision for slice z
            does not depend on the fractions chosen.
    Returns:
        bool (Z,).
    """
    draws = rng.random(categories.shape[0])
    keep = np.where(categories == CATEGORY_TUMOUR, 1.0, np.where(categories == CATEGORY_LIVER, keep_liver, keep_empty))
    return draws < keep


# --- Colour-mask decoding -------------------------------------------------------------------
# The converted dataset rendered each mask through a sequential colormap auto-scaled to that
# mask's own label range: liver-only masks show liver at the colormap's far end, liver+tumour
# masks show liver at the middle and tumour at the far end. Sequential colormaps have monotonic
# lightness, and JPEG keeps lightness at full resolution (chroma is subsampled), so colours are
# clustered in CIELAB and ordered by their lightness distance from the background.

_FLAT_TOLERANCE = 24  # max per-channel spread (uint8) of a one-colour (empty) mask after JPEG
_MODE_RADIUS = 10.0  # CIELAB distance within which a pixel belongs to a colour cluster
_MIN_CLUSTER = 9  # pixels; a cluster must also keep pixels after a 3x3 erosion (not a JPEG halo)
_MIN_SMALL = 3  # pixels of a colour beyond all solid ones in lightness (a tiny tumour)
_MAX_UNEXPLAINED = 0.05  # fraction of pixels far from every cluster that makes a mask undecodable
# Chroma counts less than lightness: JPEG stores chroma at half resolution, so small regions
# keep their lightness but bleed their hue. Distances below are in this weighted CIELAB.
_CHROMA_WEIGHT = np.array([1.0, 0.25, 0.25], dtype=np.float32)
_BIN = np.array([4.0, 6.0, 6.0], dtype=np.float32)  # CIELAB histogram bin size (L, a, b)


def _to_rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 4:
        return np.ascontiguousarray(image[..., :3])
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    raise BadInputError(f"mask image has shape {image.shape}; expected (H, W), (H, W, 3) or (H, W, 4)")


def _colour_table(rgb: np.ndarray):
    """Per-pixel colour ids and the table of colours present (6 bits per channel).

    Returns:
        (ids (H, W) int32 into the table, lab (U, 3) float32 chroma-weighted CIELAB, count (U,) int64).
    """
    q = (rgb >> 2).astype(np.int32)
    keys = (q[..., 0] << 12) | (q[..., 1] << 6) | q[..., 2]
    counts = np.bincount(keys.reshape(-1), minlength=1 << 18)
    present = np.nonzero(counts)[0]
    index = np.zeros(1 << 18, dtype=np.int32)
    index[present] = np.arange(present.size, dtype=np.int32)
    table_rgb = np.stack([(present >> 12) & 63, (present >> 6) & 63, present & 63], axis=-1) * 4 + 2
    lab = cv2.cvtColor((table_rgb.astype(np.float32) / 255.0)[:, None, :], cv2.COLOR_RGB2Lab)[:, 0, :]
    return index[keys], lab * _CHROMA_WEIGHT, counts[present]


def _clusters(ids: np.ndarray, lab: np.ndarray, count: np.ndarray) -> np.ndarray:
    """The solid colours of a colour-mapped mask, as CIELAB centres (k, 3), most populous first.

    A cluster is a colour-histogram peak with at least _MIN_CLUSTER pixels within _MODE_RADIUS
    whose pixels, eroded by 3x3, still leave a core: the thin rings of in-between colours that
    JPEG leaves along region edges never qualify. A smaller peak counts too when its lightness
    lies beyond all solid colours (a halo never does). Works on the table of colours present
    (`_colour_table`), so its cost is one pass over the pixels plus a little per colour.
    """
    q = np.floor(lab / _BIN).astype(np.int64)
    q -= q.min(axis=0)
    span = q.max(axis=0) + 1
    keys = (q[:, 0] * span[1] + q[:, 1]) * span[2] + q[:, 2]
    weight = count.astype(np.float64)
    kernel = np.ones((3, 3), np.uint8)
    solid, small = [], []
    for _ in range(12):
        binned = np.bincount(keys, weights=weight, minlength=int(span.prod()))
        best = int(np.argmax(binned))
        if binned[best] < _MIN_SMALL:
            break
        in_bin = (keys == best) & (weight > 0)
        centre = np.average(lab[in_bin], axis=0, weights=weight[in_bin])
        for _refine in range(3):
            near = (weight > 0) & (np.sum((lab - centre) ** 2, axis=1) < _MODE_RADIUS ** 2)
            centre = np.average(lab[near], axis=0, weights=weight[near])
        near = (weight > 0) & (np.sum((lab - centre) ** 2, axis=1) < _MODE_RADIUS ** 2)
        pixels = float(weight[near].sum())
        weight[near | in_bin] = 0.0
        core = pixels >= _MIN_CLUSTER and cv2.erode(near[ids].astype(np.uint8), kernel, borderType=cv2.BORDER_REPLICATE).any()
        (solid if core else small).append((centre, pixels))
        if not weight.any():
            break
    centres = [c for c, _ in _drop_jpeg_doubles(solid)]
    if len(centres) >= 2 and small:
        # A region too small for a 3x3 core (a tumour of a few pixels) is still a colour of the
        # mask when its lightness lies beyond every solid colour: JPEG halos are mixtures of
        # their neighbours and always lie between them.
        lightness = [float(c[0]) for c in centres]
        beyond = [(p, c) for c, p in small
                  if float(c[0]) > max(lightness) + 2 * _MODE_RADIUS or float(c[0]) < min(lightness) - 2 * _MODE_RADIUS]
        if beyond:
            centres.append(max(beyond, key=lambda pc: pc[0])[1])
    return np.array(centres, dtype=np.float32).reshape(-1, 3)


def _drop_jpeg_doubles(solid):
    """Solid (centre, pixels) clusters without JPEG doubles, when there are more than three.

    A small region of one colour beside a large region of the same colour (a lesion of a few
    pixels beside a large one) can come out of JPEG as its own solid cluster: chroma is stored
    at half resolution, so its hue bleeds towards the surrounding colour and its centre lands
    just beyond _MODE_RADIUS from the large region's. Such a double is dropped (its pixels then
    go to the nearest colour left) when it is within 2 * _MODE_RADIUS of a cluster at least
    eight times its size. Only a mask that would otherwise be refused for too many colours is
    touched, so no mask that decoded before decodes differently.
    """
    if len(solid) <= 3:
        return solid
    solid = sorted(solid, key=lambda cp: -cp[1])
    while len(solid) > 3:
        for i in range(len(solid) - 1, 0, -1):  # smallest first
            centre, pixels = solid[i]
            if any(float(np.sum((centre - c) ** 2)) < (2 * _MODE_RADIUS) ** 2 and p >= 8 * pixels for c, p in solid[:i]):
                del solid[i]
                break
        else:
            break
    return solid


def decode_colour_mask(image: np.ndarray, name: str = "mask") -> np.ndarray:
    """Invert a colour-mapped mask image to labels 0/1/2, for any sequential colormap.

    Background is the colour of most border pixels; one other colour is liver; with two others,
    the one nearer the background in lightness is liver and the farther one tumour. A flat image
    is an empty mask.

    Args:
        image: uint8 (H, W, 3) RGB, (H, W, 4) RGBA or (H, W) grey mask image (JPEG or PNG).
        name: how errors name the input.
    Returns:
        uint8 (H, W) labels.
    Raises:
        BadInputError: more than three solid colours, colours off a sequential colormap (lightness
            not monotonic from background), a "liver" that touches the background nowhere (walled
            in by "tumour": swapped palette or all-tumour outline, indistinguishable), or too many
            pixels that belong to no colour (not a colour-mapped label mask).
    """
    rgb = _to_rgb(np.asarray(image))
    if rgb.dtype != np.uint8:
        raise BadInputError(f"{name}: mask image has dtype {rgb.dtype}; expected 8-bit")
    h, w = rgb.shape[:2]
    spread = rgb.reshape(-1, 3).max(axis=0).astype(int) - rgb.reshape(-1, 3).min(axis=0).astype(int)
    if spread.max() <= _FLAT_TOLERANCE:
        return np.zeros((h, w), dtype=np.uint8)
    ids, lab, count = _colour_table(rgb)
    centres = _clusters(ids, lab, count)
    if len(centres) > 3:
        raise BadInputError(
            f"{name}: {len(centres)} solid colours; a colour-mapped LiTS mask has at most 3 (background, liver, tumour)"
        )
    if len(centres) == 0:
        raise BadInputError(f"{name}: no solid colour regions; not a colour-mapped label mask")
    d2 = ((lab[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2)
    unexplained = float(count[d2.min(axis=1) > (3 * _MODE_RADIUS) ** 2].sum() / count.sum())
    if unexplained > _MAX_UNEXPLAINED:
        raise BadInputError(
            f"{name}: {unexplained:.0%} of pixels match none of its solid colours; not a colour-mapped label mask"
        )
    nearest = d2.argmin(axis=1)[ids]
    border = np.concatenate([nearest[0], nearest[-1], nearest[:, 0], nearest[:, -1]])
    background = int(np.bincount(border, minlength=len(centres)).argmax())
    others = [k for k in range(len(centres)) if k != background]
    others.sort(key=lambda k: abs(float(centres[k, 0] - centres[background, 0])))
    if len(others) == 2:
        l_bg, l_mid, l_far = (float(centres[k, 0]) for k in (background, *others))
        if not (min(l_bg, l_far) + 2.0 < l_mid < max(l_bg, l_far) - 2.0):
            raise BadInputError(
                f"{name}: its three colours are not ordered along a sequential colormap "
                f"(lightness {l_bg:.0f}, {l_mid:.0f}, {l_far:.0f}); cannot tell liver from tumour"
            )
    lut = np.zeros(len(centres), dtype=np.uint8)
    for label, k in enumerate(others, start=1):
        lut[k] = label
    labels = lut[nearest]
    if len(others) == 2 and _liver_walled_in(labels):
        raise BadInputError(
            f"{name}: the colour decoded as liver lies wholly inside the one decoded as tumour and touches the "
            "background nowhere; either tumour covers the liver's whole outline or the colormap is not sequential "
            "(liver and tumour colours swapped), and the image cannot tell which"
        )
    return labels


def _liver_walled_in(labels: np.ndarray) -> bool:
    """True when no solid part of the decoded liver (label 1) comes within 2 px of the background.

    The one geometric doubt left once lightness has ordered the colours. Tumour may border
    background (lesions on the liver surface) and may border liver along most of its outline
    (several or large lesions), so neither says anything; a liver of which no part reaches the
    background is what a non-sequential palette that swaps liver and tumour also produces. A
    solid part survives a 3x3 erosion, so the one- or two-pixel rings of in-between colours
    that JPEG leaves along a tumour's edge with the background never count as liver here.
    """
    kernel = np.ones((3, 3), np.uint8)
    core = cv2.erode((labels == 1).astype(np.uint8), kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    if not core.any():
        return False
    near_background = cv2.dilate((labels == 0).astype(np.uint8), np.ones((5, 5), np.uint8))
    return not bool((core & near_background).any())


def render_colour_mask(labels: np.ndarray, colormap: str) -> np.ndarray:
    """Render labels the way the converted dataset did: a colormap auto-scaled to this mask.

    The forward model of `decode_colour_mask` (matplotlib's ``imsave(mask, cmap=...)``): the
    smallest label present maps to the colormap's start, the largest to its end.

    Args:
        labels: uint8 (H, W).
        colormap: a matplotlib colormap name, e.g. 'Blues', 'gray', 'viridis'.
    Returns:
        uint8 (H, W, 3) RGB.
    """
    import matplotlib

    lo, hi = int(labels.min()), int(labels.max())
    norm = np.zeros(labels.shape, dtype=np.float32) if hi == lo else (labels.astype(np.float32) - lo) / (hi - lo)
    rgba = matplotlib.colormaps[colormap](norm, bytes=True)
    return np.ascontiguousarray(rgba[..., :3])
