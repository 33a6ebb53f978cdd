#!/usr/bin/env python
"""The abdomen phantoms beside the real series in tests/data: a yardstick table and a picture.

Loads tests/data/dicom-ct-series (HU, geometry) with lits.core.dicom and its TotalSegmentator liver
pseudo-reference, generates --volumes abdomen phantoms (seeds (--seed, N)) and prints one markdown
table: HU percentiles 5/25/50/75/95 inside the liver and of soft tissue (-200..300 HU) in the body
outside the liver, and the liver's share of the body's area per slice that shows liver. Writes
a montage (--picture): middle liver slices of the first 4 phantoms, windowed -100..200 HU, liver
(green) and tumour (red) contours, beside the real series' middle slice with its liver contour.
The real series is a yardstick only; nothing here trains on it.

    python benchmarks/phantom_picture.py [--size 256] [--slices 64] [--volumes 8] [--picture docs/phantoms-abdomen.png]
"""

from __future__ import annotations

import argparse
import os
import sys

import cv2
import nibabel as nib
import numpy as np
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lits.core import dicom  # noqa: E402
from lits.core.anatomy import make_abdomen  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data")
PERCENTILES = (5, 25, 50, 75, 95)


def real_series():
    """(hu float32 (Z, H, W), liver bool (Z, H, W)) of the real series, canonical."""
    [series], _ = dicom.discover_series(os.path.join(DATA, "dicom-ct-series"))
    hu, geometry, _ = dicom.read_series(series)
    ref = nib.load(os.path.join(DATA, "dicom-ct-series-liver.nii.gz"))
    ijk = np.argwhere(np.asarray(ref.dataobj) == 1)
    ours = (np.linalg.inv(geometry.affine_array) @ ref.affine @ np.c_[ijk, np.ones(len(ijk))].T)[:3].T
    liver = np.zeros(hu.shape, dtype=bool)
    liver[tuple(np.rint(ours).astype(int).T)] = True  # world coordinates agree (tests/test_dicom_read.py)
    return geometry.to_canonical(np.asarray(hu, dtype=np.float32)), geometry.to_canonical(liver)


def body_mask(hu: np.ndarray) -> np.ndarray:
    """bool (Z, H, W): per slice the largest region above -500 HU, holes filled (no table, no air)."""
    body = np.zeros(hu.shape, dtype=bool)
    for z in range(hu.shape[0]):
        regions, n = ndimage.label(hu[z] > -500)
        if n:
            largest = 1 + int(np.argmax(ndimage.sum(np.ones_like(regions), regions, range(1, n + 1))))
            body[z] = ndimage.binary_fill_holes(regions == largest)
    return body


def statistics(hus, livers):
    """(liver HU percentiles, outside soft tissue percentiles, median and 90th percentile over the
    slices that show liver of the liver's share of the body's area)."""
    inside, outside, shares = [], [], []
    for hu, liver in zip(hus, livers):
        body = body_mask(hu)
        rest = body & ~liver & (hu > -200) & (hu < 300)
        inside.append(hu[liver])
        outside.append(hu[rest])
        for z in np.flatnonzero(liver.any(axis=(1, 2))):
            shares.append(liver[z].sum() / max(1, body[z].sum()))
    return (np.percentile(np.concatenate(inside), PERCENTILES), np.percentile(np.concatenate(outside), PERCENTILES),
            np.percentile(shares, (50, 90)))


def panel(hu2d: np.ndarray, labels2d: np.ndarray, size: int, title: str) -> np.ndarray:
    """uint8 (size, size, 3) BGR: the slice windowed -100..200 HU with label contours and a title."""
    gray = np.clip((hu2d.astype(np.float32) + 100.0) / 300.0 * 255.0, 0, 255).astype(np.uint8)
    gray = cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA)
    labels2d = cv2.resize(labels2d.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
    image = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    for value, colour in ((1, (0, 220, 0)), (2, (0, 0, 255))):
        contours, _ = cv2.findContours((labels2d >= value).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(image, contours, -1, colour, 1)
    cv2.putText(image, title, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return image


def middle_liver_slice(liver: np.ndarray) -> int:
    zs = np.flatnonzero(liver.any(axis=(1, 2)))
    return int(zs[len(zs) // 2]) if len(zs) else liver.shape[0] // 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--slices", type=int, default=64)
    p.add_argument("--volumes", type=int, default=8, help="phantoms in the statistics (the picture shows 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--picture", default="docs/phantoms-abdomen.png")
    args = p.parse_args(argv)
    real_hu, real_liver = real_series()
    phantoms = [make_abdomen(np.random.default_rng([args.seed, i]), args.size, args.slices) for i in range(args.volumes)]
    rows = [("real series (TotalSegmentator liver)", statistics([real_hu], [real_liver])),
            (f"abdomen phantoms ({args.volumes} at {args.size}x{args.size}x{args.slices})",
             statistics([ph.hu.astype(np.float32) for ph in phantoms], [ph.labels > 0 for ph in phantoms]))]
    print("| | liver HU p5 / p25 / p50 / p75 / p95 | soft tissue outside the liver p5 / p25 / p50 / p75 / p95 "
          "| liver share of the body's area, slices with liver: median / p90 |")
    print("|---|---|---|---|")
    for name, (inside, outside, share) in rows:
        print(f"| {name} | {' / '.join(f'{v:.0f}' for v in inside)} | {' / '.join(f'{v:.0f}' for v in outside)} "
              f"| {' / '.join(f'{v:.2f}' for v in share)} |")
    tiles = []
    for i, ph in enumerate(phantoms[:4]):
        z = middle_liver_slice(ph.labels > 0)
        tiles.append(panel(ph.hu[z], ph.labels[z], 256, f"phantom {i}, slice {z}"))
    z = middle_liver_slice(real_liver)
    tiles.append(panel(real_hu[z], real_liver[z].astype(np.uint8), 256, f"real series, slice {z}"))
    picture = np.hstack(tiles)
    ok, buf = cv2.imencode(".png", picture, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    with open(args.picture, "wb") as f:
        f.write(buf.tobytes())
    print(f"wrote {args.picture} ({len(buf) // 1024} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
