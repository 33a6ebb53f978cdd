#!/usr/bin/env python
"""Which lesions a model misses, and what they look like: per-lesion size, contrast and hit, and a picture.

For every reference lesion (3-D tumour component, 26-connectivity) of the scans in a folder: its voxels,
its contrast (mean HU of the lesion minus the mean HU of the liver within 2 voxels of it), the liver's HU
standard deviation in that scan (noise and texture: what the contrast has to stand out of), and the share
of its voxels the model labels tumour. Segmented on the product's inference path (`segment_array`), with
`levers.py`'s weights (its --save folder, --prepared and variant) or an exported model (train.py's OUT/model).

    python benchmarks/lesion_misses.py --unseen A/unseen --weights A/weights --prepared A/prepared \
        --variant "best: epochs=8 tumour_fraction=0.33 intensity_aug=0.3" --picture missed.png
    python benchmarks/lesion_misses.py --unseen A/unseen --model RUN/model

Prints one row per lesion, largest first, then the hit rate by size and contrast; --picture draws the
largest missed lesions' slices: the model's three input channels and the reference (red: tumour, green:
liver) against the prediction (yellow: tumour, cyan: liver).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import ndimage  # noqa: E402

import levers  # noqa: E402
from lits.core import ct, volumes  # noqa: E402
from lits.core.config import TrainConfig  # noqa: E402
from lits.model import inference  # noqa: E402

HIT = 0.5  # a lesion counts as found when the model labels at least half its voxels tumour


def _model(args):
    """((spec, submit), inference overrides) of --model (the product's loader: cascades, its own
    mirroring and size filter) or of levers.py's saved --weights of --variant on --prepared."""
    if args.model:
        predictor, first_stage = inference.load_predictors(args.model, device="cpu")
        return (predictor.spec, inference.LocalModel(predictor, first_stage)), {}
    _, overrides, infer = levers.parse_variant(args.variant)
    path = levers.weights_path(args.weights, levers.weights_key(overrides, args.prepared))
    if not os.path.exists(path):
        raise SystemExit(f"no weights of variant {args.variant!r} trained on {args.prepared} in {args.weights}: "
                         "run levers.py with that --prepared, --variant and --save first")
    state, _, _ = torch.load(path, weights_only=True)
    cfg = TrainConfig(data="-", output="-", **{**levers.BASE, **overrides})
    prepare_cfg = json.load(open(os.path.join(args.prepared, "manifest.json")))["config"]
    return levers._predictor(state, cfg, {"image_size": prepare_cfg["image_size"], "context": prepare_cfg.get("context", 0)},
                             infer), infer


def lesions(hu: np.ndarray, ref: np.ndarray, labels: np.ndarray):
    """[(voxels, contrast HU, liver HU std, hit share, the slice where the lesion is largest)] of `ref`'s
    lesions (canonical arrays). Each lesion is measured inside its own box, 2 voxels wider than it."""
    liver = ref == 1
    noise = float(hu[liver].std()) if liver.any() else float("nan")
    comps, _ = ndimage.label(ref == 2, structure=np.ones((3, 3, 3)))
    out = []
    for k, box in enumerate(ndimage.find_objects(comps), start=1):
        box = tuple(slice(max(b.start - 2, 0), min(b.stop + 2, size)) for b, size in zip(box, comps.shape))
        m = comps[box] == k
        ring = ndimage.binary_dilation(m, iterations=2) & liver[box]
        contrast = float(hu[box][m].mean() - hu[box][ring].mean()) if ring.any() else float("nan")
        z = box[0].start + int(np.argmax(m.sum((1, 2))))
        out.append((int(m.sum()), contrast, noise, float((labels[box][m] == 2).mean()), z))
    return out


def _tile(hu, ref, labels, z: int, title: str) -> np.ndarray:
    image = ct.slice_image(hu, z, ct.freqhist_breaks(hu))
    row = [cv2.cvtColor(np.ascontiguousarray(image[..., c]), cv2.COLOR_GRAY2BGR) for c in range(3)]
    over = row[0].copy()
    for src, label, colour in ((ref, 1, (0, 200, 0)), (labels, 1, (255, 255, 0)), (ref, 2, (0, 0, 255)), (labels, 2, (0, 255, 255))):
        contours, _ = cv2.findContours((src[z] == label).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(over, contours, -1, colour, 1)
    tile = np.concatenate(row + [over], 1)
    cv2.putText(tile, title + f", slice {z}", (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return tile


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unseen", required=True, help="a folder of volume-N / segmentation-N scans")
    p.add_argument("--model", help="an exported model folder (train.py's OUT/model)")
    p.add_argument("--weights", help="levers.py's --save folder")
    p.add_argument("--variant", help="the levers.py variant whose saved weights to use")
    p.add_argument("--prepared", help="the prepare output the --weights variant trained on (levers.py's --prepared)")
    p.add_argument("--picture", help="a PNG of the largest missed lesions")
    p.add_argument("--rows", type=int, default=4, help="lesions in the picture (default: 4)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if not args.model and not (args.weights and args.variant and args.prepared):
        p.error("give --model, or --weights, --variant and --prepared")
    torch.set_num_threads(args.threads)
    (spec, submit), infer = _model(args)
    rows, missed = [], []
    for name in sorted(f for f in os.listdir(args.unseen) if f.startswith("volume-")):
        hu, geometry = volumes.read_nifti(os.path.join(args.unseen, name))
        ref, _ = volumes.read_nifti(os.path.join(args.unseen, name.replace("volume-", "segmentation-")))
        labels, _ = inference.segment_array(hu, geometry, spec, submit, min_tumour_ml=infer.get("min_tumour_ml"))
        hu, ref, labels = (geometry.to_canonical(np.asarray(a)) for a in (hu, ref, labels))
        hu = hu.astype(np.int16)
        for voxels, contrast, noise, hit, z in lesions(hu, ref, labels):
            rows.append((name, voxels, contrast, noise, hit))
            if hit < HIT:
                missed.append((voxels, name, contrast, noise, hu, ref, labels, z))
        missed = sorted(missed, key=lambda m: -m[0])[:args.rows]  # keep the largest only (memory)
    print("| scan | voxels | contrast HU | liver HU std | contrast / std | share labelled tumour |")
    print("|---|---|---|---|---|---|")
    for name, voxels, contrast, noise, hit in sorted(rows, key=lambda r: -r[1]):
        print(f"| {name} | {voxels} | {contrast:+.0f} | {noise:.0f} | {abs(contrast) / noise:.2f} | {hit:.2f} |")
    a = np.array([(r[1], abs(r[2]) / r[3], r[4] >= HIT) for r in rows], float) if rows else np.zeros((0, 3))
    print(f"\nfound (>= {HIT:.0%} of voxels labelled tumour): {int(a[:, 2].sum()) if len(a) else 0} of {len(a)}")
    print("| lesion | lesions | found |")
    print("|---|---|---|")
    for label, keep in (("< 100 voxels", a[:, 0] < 100), (">= 100 voxels, contrast < 1 std", (a[:, 0] >= 100) & (a[:, 1] < 1)),
                        (">= 100 voxels, contrast >= 1 std", (a[:, 0] >= 100) & (a[:, 1] >= 1))):
        print(f"| {label} | {int(keep.sum())} | {int(a[keep, 2].sum())} |")
    if args.picture and missed:
        tiles = [_tile(hu, ref, labels, z, f"{name}: {voxels} voxels, {contrast:+.0f} HU (std {noise:.0f}), missed")
                 for voxels, name, contrast, noise, hu, ref, labels, z in missed]
        width = max(t.shape[1] for t in tiles)
        tiles = [cv2.copyMakeBorder(t, 0, 4, 0, width - t.shape[1], cv2.BORDER_CONSTANT) for t in tiles]
        picture = np.concatenate(tiles, 0)
        scale = min(1.0, 820 / picture.shape[1])
        cv2.imwrite(args.picture, cv2.resize(picture, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA),
                    [cv2.IMWRITE_PNG_COMPRESSION, 9])
        print(f"picture: {args.picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
