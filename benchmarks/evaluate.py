#!/usr/bin/env python
"""Per-volume LiTS metrics: lits.core.metrics against medpy on 512x512x200 masks, same values.

    python benchmarks/evaluate.py [--slices 200] [--repeats 3]

medpy is what the LiTS evaluation scripts call: dc, jc, ravd, assd and hd, each surface metric
computing its own distance transforms over the whole volume. lits.core.metrics.class_metrics computes
surfaces and distance transforms once, over the masks' bounding box. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from lits.core import metrics  # noqa: E402


def masks(slices: int, seed: int = 0):
    """A liver-sized smooth blob (reference) and a prediction that differs along its surface."""
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[:slices, :512, :512]
    spacing = (2.5, 0.75, 0.75)  # (z, y, x) mm for arrays in (z, y, x)
    dist = ((z - slices * 0.5) * spacing[0] / 90) ** 2 + ((y - 230) * spacing[1] / 80) ** 2 + ((x - 190) * spacing[2] / 100) ** 2
    wobble = ndimage.gaussian_filter(rng.normal(size=(slices // 4, 64, 64)), 2)
    wobble = ndimage.zoom(wobble, (slices / wobble.shape[0], 8, 8), order=1)[:slices, :512, :512]
    ref = dist < 1.0
    pred = dist < 1.0 + 0.6 * wobble / np.abs(wobble).max()
    return pred, ref, spacing


def timed(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--slices", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from medpy.metric import binary as medpy

    pred, ref, spacing = masks(args.slices)

    def with_medpy():
        return {"dice": medpy.dc(pred, ref), "jaccard": medpy.jc(pred, ref), "rvd": medpy.ravd(pred, ref),
                "assd": medpy.assd(pred, ref, voxelspacing=spacing), "mssd": medpy.hd(pred, ref, voxelspacing=spacing)}

    def with_lits():
        return metrics.class_metrics(pred, ref, spacing)

    t_medpy, a = timed(with_medpy, args.repeats)
    t_lits, b = timed(with_lits, args.repeats)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; masks "
          f"512x512x{args.slices}, reference {ref.sum() / ref.size:.1%} of the volume, spacing {spacing} mm; "
          f"best of {args.repeats}\n")
    print("| metric | medpy | lits.core.metrics | equal |\n|---|---|---|---|")
    for k in ("dice", "jaccard", "rvd", "assd", "mssd"):
        print(f"| {k} | {a[k]:.6f} | {b[k]:.6f} | {'yes' if np.isclose(a[k], b[k], rtol=1e-9) else 'NO'} |")
    print("\n| implementation | seconds per class | speed-up |\n|---|---|---|")
    print(f"| medpy dc + jc + ravd + assd + hd | {t_medpy:.2f} | 1.0x |")
    print(f"| lits.core.metrics.class_metrics (all of them + RMSD) | {t_lits:.2f} | {t_medpy / t_lits:.1f}x |")


if __name__ == "__main__":
    main()
