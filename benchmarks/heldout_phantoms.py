#!/usr/bin/env python
"""Held-out abdominal CT phantoms in the LiTS17 format, for evaluation only.

    python benchmarks/heldout_phantoms.py --output DIR --volumes N [--size 256] [--slices 64] [--seed S]
        [--first-id K] [--picture PNG]

Writes volume-N.nii.gz (int16 HU) and segmentation-N.nii.gz (uint8: 0 background, 1 liver, 2 tumour) for
N = K .. K+volumes-1, arrays (X, Y, Z) with affine diag(-sx, -sy, sz): X from the patient's right to left,
Y from anterior to posterior, Z from inferior to superior. Volume N draws from default_rng([seed, N]), so a
seed gives the same files on every run. This generator was written independently of lits.core.synthetic
(without reading it) so that a model trained on those phantoms meets shapes and textures it never saw.
See docs/heldout-phantoms.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import heldout_shapes as shp  # noqa: E402

# HU ranges per contrast phase; liver 50..130 across phases, vessels darker than liver only unenhanced.
PHASES = {
    "plain": dict(liver=(50, 65), portal=(35, 45), hepatic=(32, 44), aorta=(35, 50), ivc=(35, 50),
                  spleen=(40, 55), cortex=(30, 40), medulla=(28, 38), wall=(35, 45), blood=(35, 50)),
    "arterial": dict(liver=(65, 85), portal=(110, 160), hepatic=(45, 65), aorta=(250, 400), ivc=(60, 100),
                     spleen=(90, 140), cortex=(180, 260), medulla=(70, 110), wall=(70, 110), blood=(220, 350)),
    "portal": dict(liver=(100, 130), portal=(150, 200), hepatic=(140, 190), aorta=(150, 200), ivc=(120, 170),
                   spleen=(110, 140), cortex=(150, 200), medulla=(130, 180), wall=(70, 100), blood=(140, 190)),
    "delayed": dict(liver=(80, 100), portal=(100, 130), hepatic=(100, 130), aorta=(110, 140), ivc=(100, 130),
                    spleen=(85, 110), cortex=(130, 160), medulla=(140, 180), wall=(55, 80), blood=(110, 140)),
}
TUMOUR_KINDS = ("hypodense", "hyperdense", "rim", "cystic")


@dataclass(frozen=True)
class PhantomSpec:
    """Array size of every volume: size x size pixels in plane, `slices` slices."""

    size: int = 256
    slices: int = 64


@dataclass(frozen=True)
class Layout:
    """One patient's drawn-from-rng anatomy, in mm on `grid` (see heldout_shapes for the axes)."""

    grid: shp.Grid
    phase: str
    hu: dict  # organ -> HU drawn from PHASES[phase]
    centre: tuple  # body centre (x, y)
    half_w: float
    half_d: float
    dome_right: float  # z of the right diaphragm dome's top (the liver's top)
    dome_left: float
    liver_h: float  # cranio-caudal liver height
    spine: tuple  # vertebral body centre x, y and half-axes rx, ry


@dataclass(frozen=True)
class Phantom:
    hu: np.ndarray  # (X, Y, Z) int16
    labels: np.ndarray  # (X, Y, Z) uint8: 0 background, 1 liver, 2 tumour
    affine: np.ndarray  # (4, 4) float64, voxel index -> RAS mm
    notes: str  # phase, spacing and tumours, for the picture


def draw_layout(rng: np.random.Generator, spec: PhantomSpec) -> Layout:
    """Spacing, body size and organ levels. In-plane spacing is 0.6..1.0 mm at 512 pixels, scaled by 512/size;
    slices are 1..5 mm apart, thicker where a short stack would otherwise not reach past the liver: the liver
    spans at most 2/3 of the stack."""
    pixel = rng.uniform(0.6, 1.0) * 512 / spec.size
    fov = pixel * spec.size
    liver_h = rng.uniform(140, 200)
    slice_mm = max(rng.uniform(1.0, 5.0), 1.5 * liver_h / spec.slices)
    extent = slice_mm * spec.slices
    grid = shp.make_grid(spec.size, spec.slices, pixel, slice_mm)
    half_w = min(rng.uniform(135, 190), 0.45 * fov)
    half_d = min(half_w * rng.uniform(0.62, 0.8), 0.36 * fov)
    centre = (rng.uniform(-0.03, 0.03) * fov, rng.uniform(-0.08, -0.02) * fov)
    dome_right = extent * rng.uniform(0.82, 0.95)
    phase = str(rng.choice(list(PHASES), p=[0.15, 0.2, 0.5, 0.15]))
    hu = {k: rng.uniform(*v) for k, v in PHASES[phase].items()}
    rx = rng.uniform(17, 23)
    spine = (centre[0] + rng.uniform(-3, 3), centre[1] + half_d - rng.uniform(55, 70), rx, rx * rng.uniform(0.8, 0.9))
    return Layout(grid, phase, hu, centre, half_w, half_d, dome_right, dome_right - rng.uniform(10, 30),
                  liver_h, spine)


def _paint_body(rng, lay: Layout, hu: np.ndarray) -> tuple:
    """Table, skin, subcutaneous fat, muscle wall, paraspinal muscles, ribs and the mottled visceral fat of the
    cavity into hu (the caller's canvas). Returns (body, cavity): masks (X, Y, Z) bool."""
    g, (cx, cy) = lay.grid, lay.centre
    table_y = cy + lay.half_d + rng.uniform(0, 8) - 0.03 * (g.x - cx) ** 2 / lay.half_w
    in_table = (g.y > table_y) & (g.y < table_y + rng.uniform(12, 22)) & (np.abs(g.x - cx) < 1.3 * lay.half_w)
    shell = in_table & ((g.y < table_y + 2) | (g.y > table_y + 10))
    hu[np.broadcast_to(in_table, hu.shape)] = rng.uniform(-350, -150)
    hu[np.broadcast_to(shell, hu.shape)] = rng.uniform(100, 300)
    taper = 1 + rng.uniform(-0.06, 0.06) * (g.z / max(float(g.z.max()), 1) - 0.5)
    rho = shp.superellipse(g, lay.centre, lay.half_w * taper, lay.half_d * taper, rng.uniform(2.2, 3.0),
                           rng.uniform(3.5, 5.0), shp.radial_wobble(rng, 0.03))
    body = rho < 1
    depth = shp.depth_in(body, g.spacing)
    front = np.clip(-(g.y - cy) / lay.half_d, 0, 1)
    wobble = 1 + 0.25 * shp.smooth_field(rng, hu.shape, (5, 5, 2))
    fat_t = rng.uniform(8, 30) * (0.7 + 0.8 * front) * np.clip(wobble, 0.5, 1.5)
    wall_t = rng.uniform(6, 14) * (1 + 0.4 * np.abs(g.x - cx) / lay.half_w)
    cavity = depth > fat_t + wall_t
    hu[body] = rng.uniform(-120, -60) + 8 * shp.smooth_field(rng, hu.shape, (6, 6, 3))[body]
    wall = body & (depth > fat_t) & ~cavity
    hu[wall] = rng.uniform(40, 60)
    hu[body & (depth < 1.5)] = rng.uniform(10, 40)  # skin
    mesentery = 1 / (1 + np.exp(-3 * (shp.smooth_field(rng, hu.shape, (10, 10, 5)) - 0.8)))
    visceral = rng.uniform(-110, -70)
    hu[cavity] = (visceral + (rng.uniform(20, 50) - visceral) * mesentery)[cavity]
    sx, sy = lay.spine[0], lay.spine[1]
    for side in (-1, 1):
        back = shp.ellipsoid(g, (sx + side * rng.uniform(28, 38), sy + 45, 0), (rng.uniform(22, 30), 22, 1e6))
        hu[(back < 1) & body] = rng.uniform(40, 55)
    rib_hu = shp.ribs(rng, g, lay.centre, depth, fat_t + 0.5 * wall_t, lay.dome_right - lay.liver_h - 10)
    has_rib = ~np.isnan(rib_hu) & body
    hu[has_rib] = rib_hu[has_rib]
    return body, cavity


def _diaphragm(rng, lay: Layout) -> np.ndarray:
    """z (mm) of the diaphragm over the plane, (X, Y, 1): two domes (the right higher) that fall towards the
    sides and deepest at the back, so the lung bases wrap around the liver's top."""
    g, (cx, cy) = lay.grid, lay.centre
    domes = []
    for side, top in ((-1, lay.dome_right), (1, lay.dome_left)):
        u = (g.x - cx - side * 0.4 * lay.half_w) / lay.half_w
        v = (g.y - cy) / lay.half_d
        domes.append(top - rng.uniform(50, 80) * (u ** 2 + 0.5 * v ** 2) - 35 * np.clip(v, 0, None) ** 2)
    return np.maximum(domes[0], domes[1]).astype(np.float32)


def _paint_thorax(rng, lay: Layout, hu: np.ndarray, cavity: np.ndarray) -> np.ndarray:
    """Lung bases with vessel dots, the heart and the diaphragm above z_d; returns the abdominal cavity below."""
    g = lay.grid
    z_d = _diaphragm(rng, lay)
    above = cavity & (g.z > z_d)
    dots = shp.fine_texture(rng, hu.shape, 0.8) > 2.5
    hu[above] = rng.uniform(-880, -820) + 15 * shp.smooth_field(rng, hu.shape, (4, 4, 2))[above]
    hu[above & dots] = rng.uniform(-50, 40)
    heart = shp.ellipsoid(g, (lay.centre[0] + 0.12 * lay.half_w, lay.centre[1] - 0.25 * lay.half_d,
                              lay.dome_left + 45), (rng.uniform(50, 65), rng.uniform(40, 55), 60))
    hu[above & (heart < 1.15)] = rng.uniform(-100, -70)
    hu[above & (heart < 1)] = lay.hu["blood"]
    hu[above & (heart < 1) & (heart > 0.8)] = rng.uniform(40, 60)
    hu[cavity & (np.abs(g.z - z_d + 2) < 2.5)] = rng.uniform(40, 60)
    return cavity & (g.z < z_d - 4)


def _paint_retroperitoneum(rng, lay: Layout, hu: np.ndarray, body: np.ndarray, below: np.ndarray) -> np.ndarray:
    """Spine, psoas, kidneys, aorta (sometimes calcified) and IVC; returns their union (not liver)."""
    g, (sx, sy, rx, ry) = lay.grid, lay.spine
    spine_hu, bone = shp.vertebra(rng, g, (sx, sy), (rx, ry))
    bone &= body
    hu[bone] = spine_hu[bone]
    zb = lay.dome_right - lay.liver_h
    occupied = bone.copy()
    for side in (-1, 1):
        grow = np.clip((zb + 0.3 * lay.liver_h - g.z) / 120, 0, 1)
        psoas = np.hypot(g.x - sx - side * (rx + 10), g.y - sy + 4) < 6 + 14 * grow
        hu[psoas & below] = rng.uniform(40, 55)
        kz = zb + rng.uniform(-10, 15) + (0 if side < 0 else rng.uniform(10, 25))
        kc = (sx + side * rng.uniform(55, 75), sy + rng.uniform(-10, 10), kz)
        kr = (rng.uniform(25, 32), rng.uniform(20, 26), rng.uniform(45, 60))
        rho = shp.ellipsoid(g, kc, kr)
        medial = -side * (g.x - kc[0]) / kr[0]
        sinus = (rho < 0.9) & (medial > 0.2) & (np.abs(g.y - kc[1]) < 0.45 * kr[1])
        hu[below & (rho < 1.25)] = rng.uniform(-110, -80)  # perirenal fat
        hu[below & (rho < 1)] = lay.hu["cortex"]
        hu[below & (rho < 0.75)] = lay.hu["medulla"]
        hu[below & sinus] = rng.uniform(-90, -40)
        occupied |= below & (rho < 1)
    wander = 4 * np.sin(g.z / 70 + rng.uniform(0, 6))
    ar = rng.uniform(9, 13)
    aorta = np.hypot(g.x - sx - rng.uniform(5, 15) - wander, g.y - (sy - ry - ar - 3)) < ar
    hu[aorta & body] = lay.hu["aorta"]
    if rng.random() < 0.4:
        plaque = aorta & ~(np.hypot(g.x - sx - 10 - wander, g.y - (sy - ry - ar - 3)) < ar - 2) & (g.y > sy - ry - ar)
        hu[plaque & body & (g.z % 40 < 12)] = rng.uniform(400, 800)
    ivc = shp.ellipsoid(g, (sx - rng.uniform(18, 28), sy - ry - 13, 0), (rng.uniform(12, 16), rng.uniform(8, 12), 1e6))
    hu[(ivc < 1) & body] = lay.hu["ivc"]
    return occupied | (aorta & body) | ((ivc < 1) & body)


def _paint_viscera(rng, lay: Layout, hu: np.ndarray, below: np.ndarray) -> np.ndarray:
    """Bowel loops (air, fluid, oral contrast or faeces), the stomach with wall and air-fluid level, and a
    crescent spleen; returns the union of stomach and spleen (bowel under the liver is painted over)."""
    g, (cx, cy), a, b = lay.grid, lay.centre, lay.half_w, lay.half_d
    zb = lay.dome_right - lay.liver_h
    for _ in range(int(rng.integers(6, 15))):
        r = rng.uniform(10, 22)
        c = (cx + rng.uniform(-0.6, 0.6) * a, cy + rng.uniform(-0.7, 0.2) * b, rng.uniform(0, zb + 0.4 * lay.liver_h))
        rho = shp.ellipsoid(g, c, (r, r * rng.uniform(0.7, 1.2), r * rng.uniform(1, 2.5)), shp.radial_wobble(rng, 0.1))
        content = rng.choice(["air", "fluid", "contrast", "faeces"], p=[0.35, 0.3, 0.15, 0.2])
        inner = below & (rho < 1 - 2.5 / r)
        hu[below & (rho < 1)] = lay.hu["wall"]
        if content == "faeces":
            hu[inner] = np.where(shp.fine_texture(rng, hu.shape, 1.0) > 0.5, -700, 30)[inner]
        else:
            hu[inner] = {"air": -930, "fluid": 15, "contrast": rng.uniform(150, 350)}[content]
    sc = (cx + rng.uniform(0.3, 0.45) * a, cy - rng.uniform(0.15, 0.35) * b, lay.dome_left - rng.uniform(45, 70))
    sr = (rng.uniform(40, 60), rng.uniform(30, 45), rng.uniform(45, 65))
    rho = shp.ellipsoid(g, sc, sr, shp.radial_wobble(rng, 0.12))
    stomach = below & (rho < 1)
    hu[stomach] = lay.hu["wall"]
    lumen = below & (rho < 1 - 4 / min(sr))
    hu[lumen] = rng.uniform(0, 50) + 10 * shp.fine_texture(rng, hu.shape, 2.0)[lumen]
    hu[lumen & (g.y < sc[1] - sr[1] * rng.uniform(0.0, 0.6))] = -950
    spc = (cx + rng.uniform(0.55, 0.68) * a, cy + rng.uniform(0.25, 0.4) * b, lay.dome_left - rng.uniform(40, 60))
    spr = (rng.uniform(0.16, 0.22) * a, rng.uniform(0.28, 0.38) * b, rng.uniform(45, 60))
    bite = shp.ellipsoid(g, (spc[0] - 0.7 * spr[0], spc[1] - 0.3 * spr[1], spc[2]), (0.8 * spr[0], 0.9 * spr[1], spr[2]))
    spleen = below & (shp.ellipsoid(g, spc, spr, shp.radial_wobble(rng, 0.08)) < 1) & (bite > 1)
    mottle = 25 if lay.phase == "arterial" else 4
    hu[spleen] = lay.hu["spleen"] + mottle * shp.smooth_field(rng, hu.shape, (8, 8, 4))[spleen]
    return stomach | spleen


def _paint_liver(rng, lay: Layout, hu: np.ndarray, free: np.ndarray) -> np.ndarray:
    """The liver: a right lobe, a left lobe reaching across the midline in front and the caudate lobe by the
    IVC, each a wobbly ellipsoid, their union roughened by low-frequency noise, kept in `free` (below the
    diaphragm, inside the cavity, clear of other organs); its largest connected piece. Paints its texture,
    portal and hepatic veins (liver) and a gallbladder (not liver). Returns the liver mask (X, Y, Z) bool."""
    g, (cx, cy), a, b, h, top = lay.grid, lay.centre, lay.half_w, lay.half_d, lay.liver_h, lay.dome_right
    sx, sy, _, ry = lay.spine
    u = rng.uniform
    # The right lobe's centre sits high so the diaphragm, not the ellipsoid, shapes the dome on top.
    lobes = [((cx - u(0.35, 0.48) * a, cy + u(-0.1, 0.1) * b, top - 0.2 * h),
              (u(0.35, 0.48) * a, u(0.5, 0.7) * b, 0.8 * h), 0.12),
             ((cx + u(-0.05, 0.15) * a, cy - u(0.3, 0.45) * b, top - u(0.25, 0.4) * h),
              (u(0.25, 0.4) * a, u(0.2, 0.3) * b, u(0.25, 0.35) * h), 0.15),
             ((sx - u(15, 30), sy - ry - u(15, 25), top - 0.4 * h), (u(18, 25), u(15, 22), 0.2 * h), 0.1)]
    rho = np.full(hu.shape, np.inf, np.float32)
    for centre, radii, amplitude in lobes:
        rho = np.minimum(rho, shp.ellipsoid(g, centre, radii, shp.radial_wobble(rng, amplitude)))
    rho += 0.06 * shp.smooth_field(rng, hu.shape, (5, 5, 4))
    liver = (rho < 1) & free
    pieces, count = ndimage.label(liver)
    if count > 1:
        liver = pieces == 1 + int(np.argmax(np.bincount(pieces.ravel())[1:]))
    base = lay.hu["liver"]
    texture = 5 * shp.smooth_field(rng, hu.shape, (6, 6, 3)) + 3 * shp.fine_texture(rng, hu.shape, 1.2)
    hu[liver] = (base + texture)[liver]
    zb = top - h
    hilum = (cx - u(0.15, 0.25) * a, cy + u(-0.1, 0.05) * b, zb + u(0.35, 0.5) * h)
    portal = shp.branch_tree(rng, hilum, (-1, 0.1, 0.25), u(25, 40), u(5, 7), 4)
    portal += shp.branch_tree(rng, hilum, (1, -0.8, 0.2), u(25, 35), u(4, 5), 3)
    hepatic = []
    for direction in ((-1, -0.3, -0.3), (-0.2, -1, -0.3), (0.6, -1, -0.2)):
        hepatic += shp.branch_tree(rng, (sx - 20, sy - ry - 13, top - 15), direction, u(30, 45), u(3.5, 5), 3)
    hu[shp.tubes(g, portal, liver)] = lay.hu["portal"]
    hu[shp.tubes(g, hepatic, liver)] = lay.hu["hepatic"]
    if rng.random() < 0.75:
        gc = (cx - u(0.1, 0.25) * a, cy - u(0.05, 0.25) * b, zb + u(0.15, 0.35) * h)
        gb_rho = shp.ellipsoid(g, gc, (u(12, 20), u(12, 20), u(25, 40)))
        gallbladder = (gb_rho < 1) & free
        hu[gallbladder] = lay.hu["wall"]
        hu[gallbladder & (gb_rho < 0.85)] = u(0, 25)
        liver &= ~gallbladder
    return liver


def _paint_tumours(rng, lay: Layout, hu: np.ndarray, liver: np.ndarray) -> tuple:
    """0 (one volume in five) to 5 lesions, 3..50 mm across (log-uniform), lobulated, a third centred on the
    liver's surface, each clipped to the liver: hypodense, hyperdense, rim-enhancing with a necrotic centre,
    or cystic. Returns (tumour mask (X, Y, Z) bool, ["kind size", ...] of those that reached a voxel)."""
    g, base = lay.grid, lay.hu["liver"]
    tumour, kinds = np.zeros(liver.shape, bool), []
    count = 0 if rng.random() < 0.2 else int(rng.integers(1, 6))
    if count == 0 or not liver.any():
        return tumour, kinds
    core = np.flatnonzero(liver)
    edge = np.flatnonzero(liver & ~ndimage.binary_erosion(liver))
    for _ in range(count):
        kind = str(rng.choice(TUMOUR_KINDS, p=[0.4, 0.2, 0.25, 0.15]))
        pool = edge if rng.random() < 0.33 and edge.size else core
        centre = g.mm(np.unravel_index(pool[rng.integers(pool.size)], liver.shape))
        diameter = float(np.exp(rng.uniform(np.log(3), np.log(50))))
        lump = shp.lobulated_lump(rng, g, centre, diameter)
        if lump is None:
            continue
        box, inside, rho = lump
        inside &= liver[box]
        if not inside.any():
            continue
        texture = 6 * shp.smooth_field(rng, inside.shape, (3, 3, 3))
        if kind == "hypodense":
            value = base - rng.uniform(10, 50) + texture
        elif kind == "hyperdense":
            value = base + rng.uniform(15, 60) + texture
        elif kind == "cystic":
            value = np.full(inside.shape, rng.uniform(0, 20))
        else:
            rim = rho > 1 - min(0.5, rng.uniform(2, 4) / (diameter / 2))
            value = np.where(rim, base + rng.uniform(20, 50), rng.uniform(10, 35)) + texture
        canvas = hu[box]  # a view: writes land in hu
        canvas[inside] = value[inside]
        tumour[box] |= inside
        kinds.append(f"{kind} {diameter:.0f}mm")
    return tumour, kinds


def _finish(rng, hu: np.ndarray, body: np.ndarray) -> np.ndarray:
    """The scanner's look: low-frequency inhomogeneity in the body, partial-volume blur, slightly correlated
    Gaussian noise of sigma 5..25 HU; rounded and clipped to -1024..3071, int16."""
    out = hu + np.where(body, 8 * shp.smooth_field(rng, hu.shape, (3, 3, 2)), 0)
    blur = rng.uniform(0.5, 0.9)
    out = ndimage.gaussian_filter(out, (blur, blur, rng.uniform(0.2, 0.5)))
    out += rng.uniform(5, 25) * shp.fine_texture(rng, hu.shape, 0.6)
    return np.clip(np.rint(out), -1024, 3071).astype(np.int16)


def draw_phantom(rng: np.random.Generator, spec: PhantomSpec) -> Phantom:
    """One patient: layout, body, thorax, retroperitoneum, viscera, liver, tumours, scanner; in that order,
    later organs painted over earlier ones on one float32 HU canvas. Labels are never blurred."""
    lay = draw_layout(rng, spec)
    hu = np.full(lay.grid.shape, -1000.0, np.float32)
    body, cavity = _paint_body(rng, lay, hu)
    below = _paint_thorax(rng, lay, hu, cavity)
    occupied = _paint_retroperitoneum(rng, lay, hu, body, below)
    occupied |= _paint_viscera(rng, lay, hu, below & ~occupied)
    liver = _paint_liver(rng, lay, hu, below & ~occupied)
    tumour, kinds = _paint_tumours(rng, lay, hu, liver)
    labels = liver.astype(np.uint8)
    labels[tumour] = 2
    sx, sy, sz = lay.grid.spacing
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = (sx * (spec.size - 1) / 2, sy * (spec.size - 1) / 2, -rng.uniform(200, 600))
    notes = f"{lay.phase}, {sx:.2f}x{sz:.1f}mm, " + (", ".join(kinds) if kinds else "no tumour")
    return Phantom(_finish(rng, hu, body), labels, affine, notes)


def write_pair(phantom: Phantom, output: str, number: int) -> None:
    """volume-N.nii.gz and segmentation-N.nii.gz in output, each saved under a temporary name and renamed,
    so an interrupted run leaves no half-written file under a final name."""
    import nibabel as nib

    for name, data in (("volume", phantom.hu), ("segmentation", phantom.labels)):
        image = nib.Nifti1Image(data, phantom.affine)
        image.header.set_xyzt_units("mm")
        image.set_qform(phantom.affine, code=1)
        image.set_sform(phantom.affine, code=1)
        partial = os.path.join(output, f".{name}-{number}.partial.nii.gz")
        nib.save(image, partial)
        os.replace(partial, os.path.join(output, f"{name}-{number}.nii.gz"))


def picture_tile(phantom: Phantom, title: str, width: int = 256) -> np.ndarray:
    """A (width + 28, width, 3) uint8 BGR tile: the liver's middle slice (the slice with most tumour when there
    is one), windowed -100..200 HU, shown radiologically (patient's right on the left, anterior up), liver
    outline green, tumour red, title and notes underneath."""
    import cv2

    area = phantom.labels.astype(bool).sum(axis=(0, 1))
    tumour_area = (phantom.labels == 2).sum(axis=(0, 1))
    liver_z = np.flatnonzero(area)
    if tumour_area.any():
        k = int(np.argmax(tumour_area))
    else:
        k = int(liver_z[len(liver_z) // 2]) if liver_z.size else phantom.hu.shape[2] // 2
    gray = np.clip((phantom.hu[:, :, k].T.astype(np.float32) + 100) / 300 * 255, 0, 255).astype(np.uint8)
    tile = cv2.cvtColor(cv2.resize(gray, (width, width), interpolation=cv2.INTER_AREA), cv2.COLOR_GRAY2BGR)
    for value, colour in ((1, (60, 220, 60)), (2, (40, 40, 255))):
        mask = cv2.resize((phantom.labels[:, :, k].T >= value).astype(np.uint8), (width, width),
                          interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(tile, contours, -1, colour, 1)
    band = np.zeros((28, width, 3), np.uint8)
    for row, text in enumerate((f"{title}, slice {k}", phantom.notes.split(", ", 2)[-1])):
        cv2.putText(band, text[:46], (3, 11 + 13 * row), cv2.FONT_HERSHEY_SIMPLEX, 0.33, (255, 255, 255), 1,
                    cv2.LINE_AA)
    return np.vstack([tile, band])


def save_montage(tiles: list, path: str) -> None:
    """Tiles side by side, two to a row (a blank tile pads an odd count), as a PNG at path."""
    import cv2

    if len(tiles) % 2 and len(tiles) > 1:
        tiles = tiles + [np.zeros_like(tiles[0])]
    rows = [np.hstack(tiles[i:i + 2]) for i in range(0, len(tiles), 2)]
    if not cv2.imwrite(path, np.vstack(rows), [cv2.IMWRITE_PNG_COMPRESSION, 9]):
        raise SystemExit(f"could not write the picture {path}: check the folder exists and is writable")


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description="Held-out LiTS-format CT phantoms (evaluation only).")
    parser.add_argument("--output", required=True, help="folder for volume-N.nii.gz / segmentation-N.nii.gz")
    parser.add_argument("--volumes", type=int, default=4)
    parser.add_argument("--size", type=int, default=256, help="pixels per side in plane")
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--first-id", type=int, default=0, help="N of the first volume-N")
    parser.add_argument("--picture", help="PNG montage of the first four volumes' liver slices")
    args = parser.parse_args(argv)
    if args.size < 32 or args.slices < 8:
        parser.error(f"--size {args.size} --slices {args.slices}: use at least --size 32 --slices 8")
    if args.volumes < 1 or args.seed < 0 or args.first_id < 0:
        parser.error("--volumes must be >= 1, --seed and --first-id >= 0")
    if args.picture and not args.picture.lower().endswith(".png"):
        parser.error(f"--picture {args.picture}: name a .png file")
    os.makedirs(args.output, exist_ok=True)
    spec, tiles = PhantomSpec(args.size, args.slices), []
    for number in range(args.first_id, args.first_id + args.volumes):
        phantom = draw_phantom(np.random.default_rng([args.seed, number]), spec)
        write_pair(phantom, args.output, number)
        liver, tumour = (phantom.labels == 1).mean(), (phantom.labels == 2).mean()
        print(f"volume-{number}: liver {liver:.2%}, tumour {tumour:.3%}; {phantom.notes}")
        if args.picture and len(tiles) < 4:
            tiles.append(picture_tile(phantom, f"volume-{number}"))
    if args.picture:
        save_montage(tiles, args.picture)
    return 0


if __name__ == "__main__":
    sys.exit(main())
