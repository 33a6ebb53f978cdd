"""Draw docs/data-flow.png (the README's picture of the data flow): python docs/make_dataflow.py"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

BUCKET, STAGE = "#e8f0fb", "#fdf0e0"
boxes = {  # name: (x, y, w, h, colour, text)
    "ct": (0.2, 4.2, 2.6, 1.1, BUCKET, "s3://…/lits/\nvolume-N.nii(.gz)\nsegmentation-N.nii(.gz)"),
    "prepare": (3.6, 4.2, 2.6, 1.1, STAGE, "prepare\nRay tasks, CPU workers\nwindows · filter · split by volume"),
    "shards": (7.0, 4.2, 2.8, 1.1, BUCKET, "s3://…/prepared/\nParquet shards + manifest.json\npreview.png"),
    "train": (7.0, 2.4, 2.8, 1.1, STAGE, "train\nRay Train, DDP on N GPUs\ncheckpoints · resumable"),
    "model": (3.6, 2.4, 2.6, 1.1, BUCKET, "s3://…/runs/model/\nweights.pt + config.json\nmetrics.csv · curves.png"),
    "serve": (0.2, 2.4, 2.6, 1.1, STAGE, "serve\nRay Serve: HTTP API +\nbatched GPU replicas"),
    "new": (0.2, 0.4, 2.6, 1.1, BUCKET, "s3://archive/ct/\nnew scans"),
    "job": (3.6, 0.4, 2.6, 1.1, STAGE, "bulk job\nvolume tasks on CPUs,\nslices batched on GPUs"),
    "seg": (7.0, 0.4, 2.8, 1.1, BUCKET, "s3://archive/seg/\n<name>_seg.nii.gz · <name>.json\n_preview.png · _evaluation/"),
}
arrows = [("ct", "prepare"), ("prepare", "shards"), ("shards", "train"), ("train", "model"), ("model", "serve"),
          ("new", "job"), ("serve", "job"), ("job", "seg")]

fig, ax = plt.subplots(figsize=(10, 5.6), dpi=110)
ax.set_xlim(0, 10)
ax.set_ylim(0, 5.6)
ax.axis("off")
for name, (x, y, w, h, colour, text) in boxes.items():
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.04", fc=colour, ec="#555555", lw=1))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=8.5)


def anchor(name, toward):
    x, y, w, h = boxes[name][:4]
    tx, ty, tw, th = boxes[toward][:4]
    cx, cy, tcx, tcy = x + w / 2, y + h / 2, tx + tw / 2, ty + th / 2
    if abs(tcx - cx) > abs(tcy - cy):
        return (x + w if tcx > cx else x, cy)
    return (cx, y if tcy < cy else y + h)


for a, b in arrows:
    ax.add_patch(FancyArrowPatch(anchor(a, b), anchor(b, a), arrowstyle="-|>", mutation_scale=14, color="#333333", lw=1.2))
ax.text(5.0, 5.5, "LiTS on Ray: bucket to bucket (blue: data in buckets, orange: Ray stages)", ha="center", fontsize=10)
ax.text(8.4, 1.75, "evaluate: LiTS metrics,\nreport.md, overlays.png", ha="center", fontsize=8, color="#333333")
fig.tight_layout()
fig.savefig(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data-flow.png"))
