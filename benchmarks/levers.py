#!/usr/bin/env python
"""What each training lever contributes, at whole-volume level, in one process (no Ray).

Trains the product's own step (lits.train.train_steps: patch sampler, loss, schedule, augmentation) on a
prepared split held in memory, segments unseen scans with the product's inference path
(lits.model.inference.segment_array: preprocessing, probabilities resized back, post-processing) and
scores them with lits.core.metrics, for each variant given. Same data, same seed, same CPU threads for
every variant, so the rows compare.

    python benchmarks/accuracy.py                       # once: synthesizes and prepares bench-output/accuracy
    python benchmarks/levers.py --prepared bench-output/accuracy/prepared --unseen bench-output/accuracy/unseen \\
        --variant "original: crop=128 tumour_fraction=0 schedule=plateau" --variant "recipe:"

A variant is 'name: key=value ...' over TrainConfig fields (plus tta=1, min_tumour_ml=X for inference).

A model that train.py exported (e.g. over 1 vs 2 Ray Train workers) is scored on the same unseen volumes,
by the same code, with the inference settings of its config.json:

    python benchmarks/levers.py --unseen bench-output/accuracy/unseen --model "2 workers, seed 0=RUN/model"
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lits.model import inference  # noqa: E402
from lits.core import metrics, shards, volumes  # noqa: E402
from lits.core.config import TrainConfig  # noqa: E402
from lits.model.unet import UNet  # noqa: E402
from lits.train.sampling import PatchBatches  # noqa: E402
from lits.train.train_steps import (EpochContext, EpochRandom, TrainState, schedule_step, train_one_epoch,  # noqa: E402
                                    validate_with_best_statistics)
from lits.train.train_data import patch_size  # noqa: E402
from lits.core.roi import ROI_MARGIN  # noqa: E402
from accuracy import REAL_LIVER, REAL_SERIES  # noqa: E402  (this folder: the real series accuracy.py scores)

BASE = dict(epochs=30, batch_size=16, base_width=16, depth=4, lr=1e-3)

def load_split(prepared: str, split: str):
    import json

    manifest = json.load(open(os.path.join(prepared, "manifest.json")))
    tables = [shards.read_columns(open(os.path.join(prepared, s), "rb").read()) for s in manifest["splits"][split]["shards"]]
    images = np.concatenate([t["image"] for t in tables])
    masks = np.concatenate([t["mask"] for t in tables])
    vids = np.concatenate([t["volume_id"] for t in tables]).astype(str)
    return images, masks, vids, manifest["config"]

def parse_variant(text: str):
    name, _, rest = text.partition(":")
    train, infer = {}, {}
    for item in rest.split():
        key, _, value = item.partition("=")
        target = infer if key in ("tta", "min_tumour_ml") else train
        field = TrainConfig.__dataclass_fields__.get(key)
        if field is not None and field.type in ("int", "Optional[int]"):
            target[key] = int(value)
        elif value in ("True", "False"):
            target[key] = value == "True"
        else:
            try:
                target[key] = float(value) if "." in value or "e" in value else int(value)
            except ValueError:
                target[key] = value
    return name.strip(), train, infer

def train_variant(cfg: TrainConfig, train, val, threads: int):
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    images, masks, _, _ = train
    side = images.shape[1]
    crop = patch_size(cfg, side)
    model = UNet(3, cfg.classes, cfg.base_width, cfg.depth, cfg.norm)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    draws = EpochRandom(torch.Generator().manual_seed(cfg.seed),
                        PatchBatches(crop, cfg.tumour_fraction, 16 * cfg.batch_size, np.random.default_rng(cfg.seed)))
    rng = np.random.default_rng(cfg.seed + 1)
    ctx = EpochContext(cfg, model, optimizer, torch.device("cpu"),
                       steps_estimate=len(images) // cfg.batch_size * (side // crop) ** 2)
    val_index = {v: i for i, v in enumerate(sorted(set(val[2])))}
    state, best, started, steps = TrainState(), None, time.perf_counter(), 0
    while state.epoch < cfg.epochs and not state.stopped_early:
        order = rng.permutation(len(images))
        batches = iter({"image": images[order[i:i + cfg.batch_size]], "mask": masks[order[i:i + cfg.batch_size]]}
                       for i in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size))
        totals = train_one_epoch(ctx, state, batches, draws)
        steps += totals.steps
        vb = lambda: ({"image": val[0][i:i + 32], "mask": val[1][i:i + 32], "volume_id": val[2][i:i + 32]}  # noqa: E731
                      for i in range(0, len(val[0]), 32))
        (val_loss, _, _), _ = validate_with_best_statistics(ctx, totals.slices, vb, val_index)
        state, improved = schedule_step(state, val_loss[0] / max(1, val_loss[1]), cfg)
        if improved:
            best = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return best, time.perf_counter() - started, steps

def _one_predictor(weights, cfg: TrainConfig, prepare_cfg, infer: dict, first_stage=None):
    buf = io.BytesIO()
    torch.save(weights, buf)
    spec = inference.ModelSpec(uri="memory", model_id="x", task=cfg.task, out_channels=cfg.classes,
                               base_width=cfg.base_width, depth=cfg.depth, norm=cfg.norm, image_size=prepare_cfg["image_size"],
                               context=prepare_cfg.get("context", 0),
                               roi_margin=ROI_MARGIN if first_stage is not None else 0.0, first_stage=first_stage)
    return inference.Predictor(spec, buf.getvalue(), device="cpu", tta=bool(infer.get("tta", 0)))


def _predictor(weights, cfg: TrainConfig, prepare_cfg, infer: dict):
    """(spec, submit) of a trained model, or of a cascade when `weights` is (first stage's, second's):
    both stages trained with `cfg`, the second on prepare --roi crops of `prepare_cfg`'s size."""
    if isinstance(weights, tuple):
        first = _one_predictor(weights[0], cfg, prepare_cfg, infer)
        second = _one_predictor(weights[1], cfg, prepare_cfg, infer, first_stage=first.spec)
        return second.spec, inference.LocalModel(second, first)
    predictor = _one_predictor(weights, cfg, prepare_cfg, infer)
    return predictor.spec, inference.LocalModel(predictor)


def score_unseen(weights, cfg: TrainConfig, prepare_cfg, unseen: str, infer: dict):
    """(liver Dice, tumour Dice per case, tumour Dice per case with tumour, lesions found, present,
    predicted) over `unseen`'s volumes. A case without tumour scores tumour Dice 1 when none is
    predicted (lits.core.metrics), so the per-case mean rises as a model predicts less tumour
    anywhere; the mean over the cases with tumour does not."""
    spec, submit = _predictor(weights, cfg, prepare_cfg, infer)
    rows = []
    for name in sorted(f for f in os.listdir(unseen) if f.startswith("volume-")):
        hu, geometry = volumes.read_nifti(os.path.join(unseen, name))
        ref, _ = volumes.read_nifti(os.path.join(unseen, name.replace("volume-", "segmentation-")))
        labels, _ = inference.segment_array(hu, geometry, spec, submit, min_tumour_ml=infer.get("min_tumour_ml"))
        counts = metrics.overlap_counts(labels[None], np.asarray(ref)[None], (1, 2))
        dice, _ = metrics.dice_iou(counts)
        found = metrics.lesion_detection(labels == 2, np.asarray(ref) == 2)
        rows.append((dice[0, 0], dice[0, 1], found["ref_detected"], found["ref_lesions"], found["pred_lesions"],
                     (np.asarray(ref) == 2).any()))
    rows = np.array(rows, float)
    with_tumour = rows[rows[:, 5] > 0, 1]
    return (rows[:, 0].mean(), rows[:, 1].mean(), with_tumour.mean() if len(with_tumour) else float("nan"),
            int(rows[:, 2].sum()), int(rows[:, 3].sum()), int(rows[:, 4].sum()))


def score_real(weights, cfg: TrainConfig, prepare_cfg, infer: dict, series_dir: str = REAL_SERIES,
               liver: str = REAL_LIVER):
    """(liver agreement Dice, invented tumour mL) on the real DICOM series against its reference liver,
    compared in world coordinates (lits.evaluate.agreement, as accuracy.py and the demo do)."""
    import tempfile

    from lits.core import dicom
    from lits.evaluate.agreement import liver_agreement

    spec, submit = _predictor(weights, cfg, prepare_cfg, infer)
    (series, *_), _ = dicom.discover_series(series_dir)
    hu, geometry, _ = dicom.read_series(series)
    labels, _ = inference.segment_array(hu, geometry, spec, submit, min_tumour_ml=infer.get("min_tumour_ml"))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "real_seg.nii.gz")
        volumes.write_nifti(out, labels, geometry.affine)
        found = liver_agreement(out, liver)
    return found["liver_dice"], found["pred_tumour_ml"]


def score_all(weights, cfg: TrainConfig, prepare_cfg, sets, infer: dict, real: bool) -> str:
    """The table cells after the variant's name: per scan set liver / tumour Dice and lesions, then the
    real series' liver agreement and invented tumour."""
    cells = []
    for unseen in sets:
        liver, tumour, tumour_present, found, present, predicted = score_unseen(weights, cfg, prepare_cfg, unseen, infer)
        cells.append(f"{liver:.3f} / {tumour:.3f} ({tumour_present:.3f}) | {found}/{present} ({predicted})")
    if real:
        dice, tumour_ml = score_real(weights, cfg, prepare_cfg, infer)
        cells.append(f"{dice:.3f} / {tumour_ml:.1f} mL")
    return " | ".join(cells)


def header(first: str, sets, real: bool) -> str:
    names = [os.path.basename(os.path.normpath(u)) for u in sets]
    cols = [first, "train min", "steps"] + [c for n in names for c in (f"{n}: liver / tumour Dice per case (cases with tumour)",
                                                                        f"{n}: lesions found (predicted)")]
    cols += ["real series: liver agreement / invented tumour"] if real else []
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)


def score_model(name: str, uri: str, sets, real: bool) -> str:
    """The table row of the exported model at `uri` (train.py's OUT/model) on the scan `sets`."""
    import json

    spec, weights = inference.load_spec(uri)
    training = json.load(open(os.path.join(uri, "config.json")))["training"]
    cfg = TrainConfig(**training["config"])
    metrics_csv = os.path.join(os.path.dirname(uri), "metrics.csv")
    steps, minutes = "-", "-"
    if os.path.exists(metrics_csv):
        import csv

        rows = list(csv.DictReader(open(metrics_csv)))
        steps = sum(int(float(r["steps"])) for r in rows if r.get("steps"))
        minutes = f"{sum(float(r['seconds']) for r in rows) / 60:.1f}"
    cells = score_all(torch.load(io.BytesIO(weights), weights_only=True), cfg,
                      {"image_size": spec.image_size, "context": spec.context}, sets,
                      {"tta": int(spec.mirror), "min_tumour_ml": spec.min_tumour_ml}, real)
    return f"| {name} | {minutes} | {steps} | {cells} |"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--prepared", help="a prepare output to train the variants on")
    p.add_argument("--unseen", required=True, action="append",
                   help="a folder of volume-N/segmentation-N scans never trained on; repeat for more sets (own "
                   "generator, the independent one), each scored in its own columns")
    p.add_argument("--real", action="store_true",
                   help="also score the real CT series in tests/data: liver agreement with its reference (another "
                   "model's liver) and the tumour volume the model invents")
    p.add_argument("--variant", action="append", default=[])
    p.add_argument("--model", action="append", default=[], metavar="NAME=DIR", help="score train.py's exported model DIR")
    p.add_argument("--roi-prepared", help="prepare --roi crops of the same volumes: each variant also trains a "
                   "second stage on them and scores the cascade (its row named '... + liver box')")
    p.add_argument("--save", help="a folder to keep each variant's weights in; weights found there are reused")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.model:
        torch.set_num_threads(args.threads)
        print(header("model", args.unseen, args.real), flush=True)
        for item in args.model:
            name, _, uri = item.rpartition("=")
            print(score_model(name, uri, args.unseen, args.real), flush=True)
    if not args.variant:
        return 0
    train = load_split(args.prepared, "train")
    val = load_split(args.prepared, "val")
    print(f"{len(train[0])} train slices, {len(val[0])} val slices; unseen: {args.unseen}; inference without "
          "mirroring or tumour size filter unless a variant sets tta=1 / min_tumour_ml=X (the product: both)", flush=True)
    print(header("variant", args.unseen, args.real), flush=True)
    roi = (load_split(args.roi_prepared, "train"), load_split(args.roi_prepared, "val")) if args.roi_prepared else None
    trained = {}  # variants differing only in inference flags share one training
    for text in args.variant:
        name, overrides, infer = parse_variant(text)
        cfg = TrainConfig(data="-", output="-", **{**BASE, **overrides})
        key = repr(sorted(overrides.items()))
        if key not in trained:
            trained[key] = kept_training(args.save, weights_key(overrides, args.prepared), cfg, train, val, args.threads)
        weights, seconds, steps = trained[key]
        print(f"| {name} | {seconds / 60:.1f} | {steps} | {score_all(weights, cfg, train[3], args.unseen, infer, args.real)} |",
              flush=True)
        if roi is not None:
            if key + "roi" not in trained:
                trained[key + "roi"] = kept_training(args.save, weights_key(overrides, args.roi_prepared) + " roi", cfg,
                                                     roi[0], roi[1], args.threads)
            second, seconds2, steps2 = trained[key + "roi"]
            cells = score_all((weights, second), cfg, train[3], args.unseen, infer, args.real)
            print(f"| {name} + liver box | {(seconds + seconds2) / 60:.1f} | {steps + steps2} | {cells} |", flush=True)
    return 0


def weights_key(overrides: dict, prepared: str) -> str:
    """What --save names a variant's weights by: its overrides and the data it trained on (the prepare
    output's input and creation time), so one folder can serve several data sets."""
    import json

    manifest = json.load(open(os.path.join(prepared, "manifest.json")))
    return f"{sorted(overrides.items())!r} on {manifest['input']} prepared {manifest['created']}"


def weights_path(folder: str, key: str) -> str:
    """The file --save keeps the weights named `key` (weights_key) in."""
    import hashlib

    return os.path.join(folder, hashlib.sha256(key.encode()).hexdigest()[:12] + ".pt")


def kept_training(folder, key: str, cfg: TrainConfig, train, val, threads: int):
    """`train_variant`'s (weights, seconds, steps), kept in `folder` under a name made of `key`."""
    path = weights_path(folder, key) if folder else None
    if path and os.path.exists(path):
        return torch.load(path, weights_only=True)
    result = train_variant(cfg, train, val, threads)
    if path:
        os.makedirs(folder, exist_ok=True)
        torch.save(result, path + ".part")
        os.replace(path + ".part", path)
    return result

if __name__ == "__main__":
    sys.exit(main())
