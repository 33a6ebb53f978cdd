"""The liver's interior for the abdomen phantoms (lits.core.anatomy): vessel trees and tumours.

Arrays are canonical (Z, H, W). Positions are mm in the phantom's frame: x towards the patient's
left, y posterior, z superior, as `Frame` holds them for the voxel centres.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import cv2
import numpy as np
from scipy import ndimage

Box = Tuple[slice, slice, slice]
TUMOUR_KINDS = ("hypodense", "hyperdense", "rim", "lobulated", "cluster")
_KIND_WEIGHTS = (0.35, 0.15, 0.15, 0.2, 0.15)


@dataclass(frozen=True)
class Frame:
    """Voxel-centre coordinates in mm, broadcastable to (Z, H, W).

    Attributes:
        z: float32 (Z, 1, 1), increasing (inferior -> superior).
        y: float32 (1, H, 1), increasing (anterior -> posterior).
        x: float32 (1, 1, W), increasing (patient right -> left).
        spacing: (x, y, z) mm.
    """

    z: np.ndarray
    y: np.ndarray
    x: np.ndarray
    spacing: Tuple[float, float, float]

    @property
    def shape(self) -> Tuple[int, int, int]:
        return self.z.shape[0], self.y.shape[1], self.x.shape[2]

    def box(self, centre: Sequence[float], radius: float) -> Box:
        """Index slices of the voxels within `radius` mm (per axis) of centre (x, y, z)."""
        out = []
        for axis, c in ((self.z.ravel(), centre[2]), (self.y.ravel(), centre[1]), (self.x.ravel(), centre[0])):
            lo = int(np.searchsorted(axis, c - radius))
            hi = int(np.searchsorted(axis, c + radius, side="right"))
            out.append(slice(lo, max(lo, hi)))
        return tuple(out)

    def local(self, box: Box) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x, y, z) coordinates of `box`, broadcastable to its shape."""
        return self.x[:, :, box[2]], self.y[:, box[1], :], self.z[box[0], :, :]


def smooth_field(rng: np.random.Generator, frame: Frame, cell_mm: float) -> np.ndarray:
    """float32 (Z, H, W) smooth noise in [-1, 1] varying over about `cell_mm` mm.

    Cubic in-plane, smoothstep-weighted between coarse planes along z: a few coarse draws, so the
    cost is the upsampling, not the randomness.
    """
    zs, hs, ws = frame.shape
    sx, _, sz = frame.spacing
    cy, cx = (max(2, int(round(n * sx / cell_mm)) + 2) for n in (hs, ws))
    cz = max(2, int(round(zs * sz / cell_mm)) + 2)
    coarse = rng.uniform(-1.0, 1.0, size=(cz, cy, cx)).astype(np.float32)
    planes = np.stack([cv2.resize(c, (ws, hs), interpolation=cv2.INTER_CUBIC) for c in coarse])
    t = np.linspace(0.0, cz - 1.0, zs, dtype=np.float32)
    i = np.minimum(t.astype(int), cz - 2)
    f = t - i
    f = (f * f * (3.0 - 2.0 * f))[:, None, None]
    return (planes[i] * (1.0 - f) + planes[i + 1] * f).clip(-1.0, 1.0)


def _capsule(frame: Frame, a: np.ndarray, b: np.ndarray, radius: float) -> Tuple[Box, np.ndarray]:
    """(box, bool mask over the box) of the voxels within `radius` mm of segment a-b ((x, y, z) mm)."""
    centre = (a + b) / 2.0
    box = frame.box(centre, float(np.linalg.norm(b - a)) / 2.0 + radius)
    x, y, z = frame.local(box)
    d = b - a
    t = ((x - a[0]) * d[0] + (y - a[1]) * d[1] + (z - a[2]) * d[2]) / max(float(d @ d), 1e-6)
    t = np.clip(t, 0.0, 1.0)
    dist2 = (x - a[0] - t * d[0]) ** 2 + (y - a[1] - t * d[1]) ** 2 + (z - a[2] - t * d[2]) ** 2
    return box, dist2 < radius ** 2


def _turn(rng: np.random.Generator, direction: np.ndarray, degrees: float) -> np.ndarray:
    """`direction` turned by `degrees` about a random perpendicular axis (unit vectors)."""
    v = rng.standard_normal(3)
    w = v - (v @ direction) * direction
    w /= max(np.linalg.norm(w), 1e-6)
    angle = np.radians(degrees)
    return np.cos(angle) * direction + np.sin(angle) * w


def vessel_tree(rng: np.random.Generator, frame: Frame, start: Sequence[float], direction: Sequence[float],
                radius: float, generations: int) -> np.ndarray:
    """bool (Z, H, W): a branching tree of tubes from `start` ((x, y, z) mm) along `direction`,
    each branch splitting in two with radius x0.7 for `generations` generations."""
    mask = np.zeros(frame.shape, dtype=bool)
    d0 = np.asarray(direction, dtype=np.float64)
    stack = [(np.asarray(start, dtype=np.float64), d0 / np.linalg.norm(d0), radius, 0)]
    while stack:
        p, d, r, k = stack.pop()
        q = p + d * r * rng.uniform(4.0, 8.0)
        box, tube = _capsule(frame, p, q, r)
        mask[box] |= tube
        if k < generations and r * 0.7 >= 1.0:
            for _ in range(2):
                stack.append((q, _turn(rng, d, rng.uniform(20.0, 45.0)), r * 0.7, k + 1))
    return mask


def _blob(rng: np.random.Generator, frame: Frame, centre: np.ndarray, radius: float,
          roughness: float) -> Tuple[Box, np.ndarray]:
    """(box, mask over it): a sphere whose radius is perturbed by `roughness` (0: smooth) with a few
    random low-order waves over direction, so lesions come out lobulated rather than round."""
    box = frame.box(centre, radius * (1.0 + roughness) + 1.0)
    x, y, z = frame.local(box)
    dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
    dist = np.sqrt(dx * dx + dy * dy + dz * dz) + 1e-6
    wave = np.zeros_like(dist)
    for _ in range(3):
        f = rng.standard_normal(3) * rng.uniform(1.0, 3.0)
        wave += np.cos((dx * f[0] + dy * f[1] + dz * f[2]) / dist + rng.uniform(0, 2 * np.pi))
    return box, dist < radius * (1.0 + roughness * wave / 3.0)


def _centre(rng: np.random.Generator, frame: Frame, depth: np.ndarray, radius: float, edge: bool) -> np.ndarray:
    """(x, y, z) mm of a liver voxel: at most radius/2 deep when `edge` (the lesion reaches the
    liver's surface), else as deep as the lesion's radius where the liver allows."""
    if edge:
        candidates = np.flatnonzero((depth > 0) & (depth <= max(0.5 * radius, frame.spacing[0])))
    else:
        candidates = np.flatnonzero(depth >= min(0.8 * radius, 0.6 * float(depth.max())))
    k, i, j = np.unravel_index(candidates[int(rng.integers(len(candidates)))], depth.shape)
    return np.array([frame.x[0, 0, j], frame.y[0, i, 0], frame.z[k, 0, 0]], dtype=np.float64)


def _lesion_parts(rng: np.random.Generator, kind: str, centre: np.ndarray, radius: float) -> List[Tuple[np.ndarray, float, float]]:
    """[(centre, radius, roughness)] making up one lesion of `kind`."""
    if kind == "lobulated":
        parts = [(centre, radius * 0.8, rng.uniform(0.15, 0.35))]
        for _ in range(int(rng.integers(1, 4))):
            offset = rng.standard_normal(3)
            parts.append((centre + offset / np.linalg.norm(offset) * radius * rng.uniform(0.4, 0.7),
                          radius * rng.uniform(0.4, 0.7), rng.uniform(0.1, 0.3)))
        return parts
    if kind == "cluster":
        parts = []
        for _ in range(int(rng.integers(3, 7))):
            offset = rng.standard_normal(3)
            parts.append((centre + offset / np.linalg.norm(offset) * rng.uniform(0.0, 25.0),
                          float(np.exp(rng.uniform(np.log(1.5), np.log(7.5)))), rng.uniform(0.0, 0.15)))
        return parts
    return [(centre, radius, rng.uniform(0.0, 0.12))]


def _lesion_hu(rng: np.random.Generator, kind: str, liver_hu: float) -> Tuple[float, float, float]:
    """(core HU, rim HU, rim thickness mm) for one lesion; rim thickness 0 without a rim.

    Contrast against the liver is drawn per lesion, a third of them subtle (10..20 HU)."""
    contrast = rng.uniform(10.0, 20.0) if rng.random() < 0.3 else rng.uniform(20.0, 80.0)
    if kind == "hyperdense" or (kind in ("lobulated", "cluster") and rng.random() < 0.2):
        return liver_hu + contrast, 0.0, 0.0
    core = max(liver_hu - contrast, rng.uniform(-5.0, 20.0))  # cyst-like floor: fluid, not fat
    if kind == "rim":
        return min(core, rng.uniform(0.0, 30.0)), liver_hu + rng.uniform(10.0, 50.0), rng.uniform(1.5, 5.0)
    return core, 0.0, 0.0


def tumours(rng: np.random.Generator, frame: Frame, liver: np.ndarray, liver_hu: float) -> Tuple[np.ndarray, np.ndarray]:
    """0..6 tumours inside `liver` (bool (Z, H, W)), a share of volumes tumour-free.

    Diameters 3..50 mm (log-uniform); kinds TUMOUR_KINDS; a quarter reach the liver's surface.
    Returns:
        (mask bool (Z, H, W), hu float32 (Z, H, W) meaningful where mask), mask within `liver`.
    """
    mask = np.zeros(frame.shape, dtype=bool)
    hu = np.zeros(frame.shape, dtype=np.float32)
    count = 0 if rng.random() < 0.2 else int(rng.integers(1, 7))
    if count == 0 or not liver.any():
        return mask, hu
    sx, _, sz = frame.spacing
    depth = ndimage.distance_transform_edt(liver, sampling=(sz, sx, sx))
    for _ in range(count):
        kind = TUMOUR_KINDS[int(rng.choice(len(TUMOUR_KINDS), p=_KIND_WEIGHTS))]
        radius = float(np.exp(rng.uniform(np.log(3.0), np.log(50.0)))) / 2.0
        centre = _centre(rng, frame, depth, radius, edge=rng.random() < 0.25)
        core_hu, rim_hu, rim_mm = _lesion_hu(rng, kind, liver_hu)
        texture = rng.uniform(0.0, 12.0)
        for part_centre, part_radius, roughness in _lesion_parts(rng, kind, centre, radius):
            box, blob = _blob(rng, frame, part_centre, part_radius, roughness)
            blob &= liver[box]
            if not blob.any():
                continue
            value = np.full(blob.shape, core_hu, dtype=np.float32)
            if rim_mm > 0:
                inside = ndimage.distance_transform_edt(np.pad(blob, 1), sampling=(sz, sx, sx))[1:-1, 1:-1, 1:-1]
                value[inside < rim_mm] = rim_hu
            value += texture * ndimage.gaussian_filter(rng.standard_normal(blob.shape).astype(np.float32), 1.0)
            hu[box][blob] = value[blob]
            mask[box] |= blob
    return mask, hu
