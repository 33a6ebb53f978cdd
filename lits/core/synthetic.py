"""Seeded LiTS-like CT phantoms, as NIfTI pairs or as the converted image dataset.

Each volume is built in the canonical (Z, H, W) layout (see lits.core.schema) and written in a file
orientation drawn per volume (flipped and, now and then, permuted axes), so every reader path
has to undo a non-identity affine. Intensities follow abdominal CT: air -1000 (-1024 padding outside the circular field of view), fat about -100,
soft tissue 20..60 with texture, bone 300..1000, contrast-enhanced liver 60..120, hypo- and
hyper-dense tumours of 3..30 mm, Gaussian noise of sigma 10..20 HU. Liver covers only part of
the slices, so empty, liver-only and tumour slices all occur. That is the "simple" anatomy;
SynthConfig.anatomy "abdomen" draws lits.core.anatomy's domain-randomised phantoms instead
(docs/phantoms.md).
"""

from __future__ import annotations

import logging
import os
from typing import List, Tuple

import cv2
import numpy as np

from lits.core import ct, masks, storage, volumes
from lits.core.anatomy import Phantom, make_abdomen
from lits.core.config import SynthConfig

log = logging.getLogger(__name__)

# File orientations drawn per volume, with weights: LiTS files are mostly LPS-like with the
# axial axis last, some flipped along z; a few permuted layouts exercise the general path.
ORIENTATIONS = (("LPS", 0.3), ("LPI", 0.2), ("RAS", 0.15), ("LAS", 0.1), ("RPI", 0.1), ("PLS", 0.1), ("SPL", 0.05))
_AXIS = {"L": (0, -1), "R": (0, 1), "P": (1, -1), "A": (1, 1), "S": (2, 1), "I": (2, -1)}


def _smooth_field(rng: np.random.Generator, shape: Tuple[int, int], cells: int) -> np.ndarray:
    """Smooth noise in [-1, 1] of `shape` (H, W), varying over about `cells` cells per side."""
    coarse = rng.uniform(-1.0, 1.0, size=(cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC).clip(-1.0, 1.0)


def make_phantom(rng: np.random.Generator, size: int = 512, slices: int = 120) -> Phantom:
    """A LiTS-like abdominal CT phantom.

    Args:
        rng: the only source of randomness.
        size: in-plane matrix size; spacing is scaled by 512 / size so that the field of view
            stays that of a 512-matrix abdominal scan (in-plane spacing 0.6..0.9 mm at 512).
        slices: number of axial slices (slice spacing 0.7..5 mm).
    Returns:
        Phantom.
    """
    sx = float(rng.uniform(0.6, 0.9)) * 512.0 / size
    sz = float(rng.uniform(0.7, 5.0))
    h = w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ymm, xmm = (yy - h / 2) * sx, (xx - w / 2) * sx  # mm from the image centre; +y posterior, +x patient left
    fov = size * sx
    body_a, body_b = fov * rng.uniform(0.40, 0.45), fov * rng.uniform(0.28, 0.34)  # lateral, AP semi-axes
    fat = float(rng.uniform(8.0, 20.0))
    tissue_level = float(rng.uniform(30.0, 50.0))
    liver_hu = float(rng.uniform(60.0, 120.0))
    noise_sigma = float(rng.uniform(10.0, 20.0))
    texture = [_smooth_field(rng, (h, w), 12) for _ in range(2)]
    liver_shape = _smooth_field(rng, (h, w), 5)

    # Liver: an irregular ellipsoid on the patient's right (low x), in part of the slices.
    span = int(round(slices * rng.uniform(0.35, 0.6)))
    z0 = int(rng.integers(1, max(2, slices - span - 1)))
    zc, hz = z0 + span / 2.0, span / 2.0
    liver_c = (-fov * rng.uniform(0.12, 0.2), -fov * rng.uniform(0.0, 0.08))  # (x, y) mm
    liver_ax = (fov * rng.uniform(0.16, 0.22), fov * rng.uniform(0.14, 0.2))

    # Tumours: centres inside the liver's middle, diameters 3..30 mm (log-uniform; the first one
    # at least 12 mm so that every volume has tumour slices).
    tumours = []
    for k in range(int(rng.integers(1, 5))):
        diameter = float(np.exp(rng.uniform(np.log(12.0 if k == 0 else 3.0), np.log(30.0))))
        tz = zc + rng.uniform(-0.5, 0.5) * hz
        frac = np.sqrt(max(0.0, 1.0 - ((tz - zc) / hz) ** 2))
        angle, radius = rng.uniform(0, 2 * np.pi), rng.uniform(0.0, 0.55)
        tx = liver_c[0] + np.cos(angle) * radius * liver_ax[0] * frac
        ty = liver_c[1] + np.sin(angle) * radius * liver_ax[1] * frac
        contrast = float(rng.uniform(30.0, 60.0)) * (1 if rng.random() < 0.3 else -1)
        tumours.append((tz, ty, tx, diameter / 2.0, contrast))

    spine_c = (0.0, fov * 0.2)
    spine_r = float(rng.uniform(12.0, 18.0))
    ribs = [(np.cos(t) * body_a * 0.88, np.sin(t) * body_b * 0.88) for t in np.linspace(0.4, np.pi - 0.4, 6)]

    # Scanners reconstruct a circular field of view and pad outside it with one value (-1024 here),
    # which is also what makes real .nii.gz files compress the way they do.
    outside_fov = (yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2 > (min(h, w) / 2) ** 2
    hu = np.empty((slices, h, w), dtype=np.int16)
    labels = np.zeros((slices, h, w), dtype=np.uint8)
    for z in range(slices):
        wobble = 1.0 + 0.04 * np.sin(z / max(1, slices) * 2 * np.pi)
        r_body = (xmm / (body_a * wobble)) ** 2 + (ymm / (body_b * wobble)) ** 2
        inner = (xmm / (body_a * wobble - fat)) ** 2 + (ymm / (body_b * wobble - fat)) ** 2
        mix = z / max(1, slices - 1)
        tex = (1 - mix) * texture[0] + mix * texture[1]
        img = np.full((h, w), -1000.0, dtype=np.float32)
        img[r_body < 1] = -100.0 + 15.0 * tex[r_body < 1]
        soft = inner < 1
        img[soft] = tissue_level + 15.0 * tex[soft]
        for rx, ry in ribs:
            img[(xmm - rx) ** 2 + (ymm - ry) ** 2 < (spine_r * 0.45) ** 2] = 600.0
        spine_d = (xmm - spine_c[0]) ** 2 + (ymm - spine_c[1]) ** 2
        img[spine_d < spine_r ** 2] = 900.0
        img[spine_d < (spine_r * 0.7) ** 2] = 320.0
        label = labels[z]
        if abs(z + 0.5 - zc) < hz:
            frac = np.sqrt(1.0 - ((z + 0.5 - zc) / hz) ** 2)
            r_liver = ((xmm - liver_c[0]) / (liver_ax[0] * frac)) ** 2 + ((ymm - liver_c[1]) / (liver_ax[1] * frac)) ** 2
            liver = (r_liver + 0.25 * liver_shape < 1) & soft
            img[liver] = liver_hu + 5.0 * tex[liver]
            label[liver] = 1
            for tz, ty, tx, tr, contrast in tumours:
                dz = (z + 0.5 - tz) * sz
                if abs(dz) >= tr:
                    continue
                rr = np.sqrt(tr ** 2 - dz ** 2)
                tumour = liver & (((xmm - tx) / (rr * 1.1)) ** 2 + ((ymm - ty) / (rr * 0.9)) ** 2 < 1)
                img[tumour] = liver_hu + contrast
                label[tumour] = 2
        img += rng.standard_normal((h, w), dtype=np.float32) * noise_sigma
        img[outside_fov] = -1024.0
        hu[z] = np.clip(img, -1024, 3071).astype(np.int16)
    return Phantom(hu=hu, labels=labels, spacing=(sx, sx, sz))


def phantom_affine(rng: np.random.Generator, phantom: Phantom) -> Tuple[np.ndarray, Tuple[int, int, int]]:
    """Draw a file orientation and return (affine, file shape) that store `phantom` that way."""
    codes = [c for c, _ in ORIENTATIONS]
    weights = np.array([p for _, p in ORIENTATIONS])
    axcodes = codes[int(rng.choice(len(codes), p=weights / weights.sum()))]
    z, h, w = phantom.hu.shape
    size_of = {0: w, 1: h, 2: z}  # RAS axis -> canonical extent (x: W, y: H, z: Z)
    affine = np.eye(4)
    shape = []
    for i, code in enumerate(axcodes):
        ras_axis, sign = _AXIS[code]
        affine[ras_axis, i] = 0.0
        affine[:3, i] = 0.0
        affine[ras_axis, i] = sign * phantom.spacing[ras_axis]
        shape.append(size_of[ras_axis])
    affine[:3, 3] = rng.uniform(-200.0, 200.0, size=3)
    return affine, tuple(shape)


def phantom_to_file(phantom: Phantom, affine: np.ndarray, shape: Tuple[int, int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """(hu, labels) in file order for `affine`."""
    geometry = volumes.Geometry.from_affine(affine, shape)
    hu = np.ascontiguousarray(geometry.from_canonical(phantom.hu))
    labels = np.ascontiguousarray(geometry.from_canonical(phantom.labels))
    assert hu.shape == tuple(shape)
    return hu, labels


def write_nifti_pair(out_dir: str, index: int, phantom: Phantom, affine: np.ndarray, shape, compress: bool = True) -> List[str]:
    """Write volume-N and segmentation-N (int16 HU, uint8 labels) atomically; return their paths."""
    hu, labels = phantom_to_file(phantom, affine, shape)
    ext = ".nii.gz" if compress else ".nii"
    paths = [os.path.join(out_dir, f"volume-{index}{ext}"), os.path.join(out_dir, f"segmentation-{index}{ext}")]
    volumes.write_nifti(paths[0], hu, affine)
    volumes.write_nifti(paths[1], labels, affine)
    return paths


def write_image_series(out_dir: str, index: int, phantom: Phantom, affine: np.ndarray, shape, colormap: str = "Blues") -> int:
    """Write the converted-dataset form: images/volume-N/volume-N_slice_M.jpg (fastai's three
    windows) and masks/volume-N/volume-N_slice_M_mask.jpg (colour-mapped, auto-scaled per mask).

    M is the index along the file's axial axis, as the original conversion numbered slices.
    Returns the number of slices written.
    """
    geometry = volumes.Geometry.from_affine(affine, shape)
    breaks = ct.freqhist_breaks(phantom.hu)
    file_index = geometry.file_slice_index(np.arange(phantom.hu.shape[0]))
    vid = f"volume-{index}"
    for z in range(phantom.hu.shape[0]):
        m = int(file_index[z])
        image = ct.slice_image(phantom.hu, z, breaks, context=0)
        mask = masks.render_colour_mask(phantom.labels[z], colormap)
        for kind, array, suffix in (("images", image, ""), ("masks", mask, "_mask")):
            ok, buf = cv2.imencode(".jpg", cv2.cvtColor(array, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
            storage.write_bytes(os.path.join(out_dir, kind, vid, f"{vid}_slice_{m}{suffix}.jpg"), buf.tobytes())
    return phantom.hu.shape[0]


def synthesize(cfg: SynthConfig) -> List[str]:
    """Write cfg.volumes phantoms of cfg.anatomy under cfg.output; volume N is seeded with (seed, N).

    Returns:
        The volume ids written.
    """
    out = storage.normalise(cfg.output)
    ids = []
    for index in range(cfg.first_id, cfg.first_id + cfg.volumes):
        rng = np.random.default_rng([cfg.seed, index])
        make = make_abdomen if cfg.anatomy == "abdomen" else make_phantom
        phantom = make(rng, cfg.size, cfg.slices)
        affine, shape = phantom_affine(rng, phantom)
        if cfg.format == "nifti":
            write_nifti_pair(out, index, phantom, affine, shape, cfg.compress)
        else:
            write_image_series(out, index, phantom, affine, shape, cfg.colormap)
        ids.append(f"volume-{index}")
        log.info("synthesised volume-%d (%s, %s, %d slices)", index, cfg.anatomy, cfg.format, cfg.slices)
    return ids
