"""Geometry for benchmarks/heldout_phantoms.py: coordinate grids, smooth random fields, wobbly ellipsoids,
lobulated lumps, branching tubes and bones.

Axis order everywhere: arrays are (X, Y, Z), as LiTS files store them; X runs from the patient's right to
left, Y from anterior to posterior, Z from inferior to superior. Grid coordinates are mm from the in-plane
centre (x, y) and from the first slice (z). Every function is pure: randomness comes in as an explicit
np.random.Generator and no input is modified.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Grid:
    """Voxel-centre coordinates in mm, broadcastable: x (X,1,1), y (1,Y,1), z (1,1,Z), float32."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    spacing: tuple  # (sx, sy, sz) mm

    @property
    def shape(self) -> tuple:
        return (self.x.shape[0], self.y.shape[1], self.z.shape[2])

    def crop(self, box: tuple) -> "Grid":
        """The sub-grid of a box (three slices, as box_around returns)."""
        return Grid(self.x[box[0]], self.y[:, box[1]], self.z[:, :, box[2]], self.spacing)

    def mm(self, index) -> np.ndarray:
        """The mm coordinates (3,) of a voxel index (i, j, k)."""
        return np.array([self.x.ravel()[index[0]], self.y.ravel()[index[1]], self.z.ravel()[index[2]]])


def make_grid(size: int, slices: int, pixel_mm: float, slice_mm: float) -> Grid:
    """A size x size x slices grid with square pixels of pixel_mm and slices slice_mm apart."""
    xy = ((np.arange(size) - (size - 1) / 2) * pixel_mm).astype(np.float32)
    z = (np.arange(slices) * slice_mm).astype(np.float32)
    return Grid(xy.reshape(-1, 1, 1), xy.reshape(1, -1, 1), z.reshape(1, 1, -1), (pixel_mm, pixel_mm, slice_mm))


def box_around(grid: Grid, centre, half_mm) -> tuple | None:
    """Index slices of the voxels within half_mm (per axis) of centre, clipped to the grid; None if it misses."""
    box = []
    for coords, c, h in zip((grid.x, grid.y, grid.z), centre, half_mm):
        idx = np.flatnonzero(np.abs(coords.ravel() - c) <= h)
        if idx.size == 0:
            return None
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)


def _spread(n: int, cells: int) -> np.ndarray:
    """(n, cells) float32 weights that spread `cells` evenly spaced values smoothly over n voxels (Gaussian
    kernels of 0.75 cell, each row summing to one)."""
    pos = np.linspace(0, cells - 1, n)[:, None]
    w = np.exp(-0.5 * ((pos - np.arange(cells)[None, :]) / 0.75) ** 2)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def smooth_field(rng: np.random.Generator, shape: tuple, cells: tuple) -> np.ndarray:
    """Low-frequency noise of `shape` (float32, std 1): a coarse Gaussian grid of `cells` points spread
    smoothly over the voxels axis by axis, so its wavelength is about shape / cells voxels along each axis."""
    coarse = rng.standard_normal(tuple(max(2, int(c)) for c in cells)).astype(np.float32)
    field = np.tensordot(_spread(shape[0], coarse.shape[0]), coarse, (1, 0))  # (X, cy, cz)
    field = np.tensordot(field, _spread(shape[1], coarse.shape[1]), (1, 1))  # (X, cz, Y)
    field = np.tensordot(field, _spread(shape[2], coarse.shape[2]), (1, 1))  # (X, Y, Z)
    return ((field - field.mean()) / (field.std() + 1e-6)).astype(np.float32)


def fine_texture(rng: np.random.Generator, shape: tuple, sigma_vox: float) -> np.ndarray:
    """Grainy texture (float32, std 1): white noise blurred by sigma_vox voxels in plane."""
    grain = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), (sigma_vox, sigma_vox, 0.5))
    return grain / (grain.std() + 1e-6)


def radial_wobble(rng: np.random.Generator, amplitude: float, terms: int = 4) -> tuple:
    """A smooth random radial function r(theta, t) = 1 + sum_k a_k(t) cos(k theta + phi_k), k = 2..terms+1,
    whose coefficients drift linearly from one draw to another as t goes 0 -> 1 (along z): an outline that
    changes from slice to slice. Returns (k, a (2, terms), phi) for wobble_radius."""
    k = np.arange(2, terms + 2)
    a = rng.uniform(-amplitude, amplitude, (2, terms)) / np.sqrt(k - 1)
    return k, a, rng.uniform(0, 2 * np.pi, terms)


def wobble_radius(wobble: tuple, theta: np.ndarray, t: np.ndarray) -> np.ndarray:
    """r(theta, t) of a radial_wobble, broadcast over theta's and t's shapes."""
    k, a, phi = wobble
    r = np.ones(np.broadcast_shapes(theta.shape, t.shape), np.float32)
    for i in range(len(k)):
        r += ((1 - t) * a[0, i] + t * a[1, i]) * np.cos(k[i] * theta + phi[i])
    return r


def ellipsoid(grid: Grid, centre, radii, wobble: tuple | None = None) -> np.ndarray:
    """Normalised radius rho (float32, the grid's shape): < 1 inside the ellipsoid, its in-plane outline
    scaled by a radial_wobble that drifts from the bottom (t=0) to the top (t=1) of the ellipsoid."""
    dx = (grid.x - centre[0]) / radii[0]
    dy = (grid.y - centre[1]) / radii[1]
    dz = (grid.z - centre[2]) / radii[2]
    rho = np.sqrt(dx * dx + dy * dy + dz * dz)
    if wobble is not None:
        rho = rho / wobble_radius(wobble, np.arctan2(dy, dx), np.clip((dz + 1) / 2, 0, 1))
    return rho.astype(np.float32)


def superellipse(grid: Grid, centre, half_w, half_d, power, back_power, wobble) -> np.ndarray:
    """In-plane superellipse rho (X, Y, Z) float32, (|dx/a|^p + |dy/b|^p)^(1/p), with a larger exponent
    behind the centre (a back flattened on the table); half_w, half_d may vary along z (arrays (1,1,Z))."""
    dx = (grid.x - centre[0]) / half_w
    dy = (grid.y - centre[1]) / half_d
    p = np.where(dy > 0, back_power, power)
    rho = (np.abs(dx) ** p + np.abs(dy) ** p) ** (1.0 / p)
    t = grid.z / max(float(grid.z.max()), 1e-3)
    return (rho / wobble_radius(wobble, np.arctan2(dy, dx), t)).astype(np.float32)


def depth_in(mask: np.ndarray, spacing: tuple) -> np.ndarray:
    """Distance in mm from each voxel of mask (X, Y, Z) bool to the nearest voxel outside it, slice by slice
    (float32; 0 outside)."""
    depth = np.zeros(mask.shape, np.float32)
    for k in range(mask.shape[2]):
        depth[:, :, k] = ndimage.distance_transform_edt(mask[:, :, k], sampling=spacing[:2])
    return depth


def lobulated_lump(rng: np.random.Generator, grid: Grid, centre, diameter: float) -> tuple | None:
    """A lesion-like lump about `diameter` mm across: one to four overlapping ellipsoids whose surface is
    roughened by low-frequency noise. Returns (box, inside (box shape, bool), rho (box shape)), or None when
    the lump misses the grid."""
    r = diameter / 2
    box = box_around(grid, centre, (1.8 * r,) * 3)
    if box is None:
        return None
    sub = grid.crop(box)
    rho = ellipsoid(sub, centre, r * rng.uniform(0.7, 1.0, 3))
    for _ in range(int(rng.integers(0, 4))):
        direction = rng.standard_normal(3)
        offset = np.asarray(centre) + direction / np.linalg.norm(direction) * r * rng.uniform(0.3, 0.65)
        rho = np.minimum(rho, ellipsoid(sub, offset, r * rng.uniform(0.3, 0.6, 3)))
    cells = tuple(min(4, s) for s in rho.shape)
    rho = rho + rng.uniform(0.03, 0.15) * smooth_field(rng, rho.shape, cells)
    return box, rho < 1, rho


def branch_tree(rng: np.random.Generator, root, direction, length: float, radius: float, levels: int) -> list:
    """Centre lines of a random branching tree: [(start (3,), end (3,), radius)] in mm; every branch splits in
    two, each child about 0.7 the length and 0.7 the radius, turned by a random angle."""
    segments, todo = [], [(np.asarray(root, float), np.asarray(direction, float), length, radius, levels)]
    while todo:
        start, d, span, r, left = todo.pop()
        d = d / np.linalg.norm(d)
        end = start + d * span
        segments.append((start, end, r))
        if left > 0:
            for _ in range(2):
                todo.append((end, d + rng.normal(0, 0.55, 3), span * rng.uniform(0.55, 0.8), r * 0.7, left - 1))
    return segments


def tubes(grid: Grid, segments: list, within: np.ndarray) -> np.ndarray:
    """Voxels (grid shape, bool) of `within` closer to a segment's centre line than its radius: one distance
    transform over within's bounding box, each voxel taking the radius of its nearest centre-line point."""
    found = ndimage.find_objects(within.astype(np.uint8))
    out = np.zeros(grid.shape, bool)
    if not found:
        return out
    box = found[0]
    sub = grid.crop(box)
    origin = np.array([sub.x.ravel()[0], sub.y.ravel()[0], sub.z.ravel()[0]])
    step = np.asarray(grid.spacing)
    seeds = np.ones(sub.shape, np.uint8)
    radius = np.zeros(sub.shape, np.float32)
    for start, end, r in segments:
        n = int(np.linalg.norm(end - start) / (0.5 * step.min())) + 2
        points = start + np.linspace(0, 1, n)[:, None] * (end - start)
        idx = np.rint((points - origin) / step).astype(int)
        idx = idx[np.all((idx >= 0) & (idx < np.array(sub.shape)), axis=1)]
        seeds[idx[:, 0], idx[:, 1], idx[:, 2]] = 0
        radius[idx[:, 0], idx[:, 1], idx[:, 2]] = np.maximum(radius[idx[:, 0], idx[:, 1], idx[:, 2]], r)
    if seeds.all():
        return out
    dist, nearest = ndimage.distance_transform_edt(seeds, sampling=grid.spacing, return_indices=True)
    out[box] = (dist <= radius[nearest[0], nearest[1], nearest[2]]) & within[box]
    return out


def vertebra(rng: np.random.Generator, grid: Grid, centre_xy, half_xy) -> tuple:
    """A lumbar/thoracic spine along z: vertebral bodies (cortex ring, cancellous core) with discs between,
    spinal canal, laminae, spinous and transverse processes. Returns (hu, bone) with hu float32 (NaN where the
    spine is absent) and bone the (X, Y, Z) mask of everything drawn (the canal included)."""
    cx, cy = centre_xy
    rx, ry = half_xy
    dx, dy = grid.x - cx, grid.y - cy
    rho = np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2)
    level = rng.uniform(26, 32)
    disc = ((grid.z - rng.uniform(0, level)) % level) < rng.uniform(5, 9)  # (1, 1, Z)
    hu = np.full(grid.shape, np.nan, np.float32)
    cancellous, cortex = rng.uniform(150, 300), rng.uniform(400, 900)
    body = np.broadcast_to(rho < 1, grid.shape)
    hu[body] = cancellous
    hu[np.broadcast_to((rho < 1) & (rho > 1 - 2.0 / min(rx, ry)), grid.shape)] = cortex
    hu[body & np.broadcast_to(disc, grid.shape)] = rng.uniform(70, 100)
    canal_y, canal_r = cy + ry + 10, rng.uniform(8, 10)
    dc = np.sqrt(dx ** 2 + (grid.y - canal_y) ** 2)
    arch = ((dc > canal_r) & (dc < canal_r + 5) & (grid.y > canal_y - 2)) \
        | ((np.abs(dx) < 4) & (grid.y > canal_y) & (grid.y < canal_y + canal_r + 30)) \
        | ((np.abs(grid.y - canal_y) < 5) & (np.abs(dx) > canal_r) & (np.abs(dx) < canal_r + 25))
    posterior = np.broadcast_to(arch & ~disc, grid.shape)
    hu[posterior] = 0.7 * cortex
    canal = np.broadcast_to(dc <= canal_r, grid.shape)
    hu[canal] = rng.uniform(5, 20)
    return hu, ~np.isnan(hu)


def ribs(rng: np.random.Generator, grid: Grid, centre_xy, depth, rib_depth, z_low: float) -> np.ndarray:
    """Rib cross-sections (X, Y, Z) float32 HU, NaN elsewhere: bands in the chest wall at rib_depth (mm under
    the skin, (X, Y, Z)) that descend obliquely from the back towards the front, so each slice cuts short
    arcs around the periphery; none near the spine and the sternum nor below z_low (+30 mm at the front)."""
    theta = np.arctan2(grid.y - centre_xy[1], grid.x - centre_xy[0])  # +pi/2 posterior
    from_back = np.abs(np.angle(np.exp(1j * (theta - np.pi / 2))))  # 0 at the spine, pi at the sternum
    period, height = rng.uniform(28, 34), rng.uniform(10, 14)
    band = ((grid.z + rng.uniform(35, 55) * from_back - rng.uniform(0, period)) % period) < height
    along = (from_back > 0.4) & (from_back < np.pi - 0.5) & (grid.z > z_low + 30 * from_back / np.pi)
    off = np.abs(depth - rib_depth)
    thick = rng.uniform(3, 4.5)
    hu = np.full(grid.shape, np.nan, np.float32)
    inside = band & along & (off < thick)
    hu[inside] = rng.uniform(200, 300)
    hu[inside & (off > thick - 1.5)] = rng.uniform(550, 900)
    return hu
