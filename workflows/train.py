#!/usr/bin/env python
"""Train the LiTS U-Net data-parallel on Ray Train from prepared shards.

    python workflows/train.py --data s3://bucket/prepared --output s3://bucket/runs --num-gpus 4
    python workflows/train.py --data prepared/ --output runs/ --num-gpus 0 --num-workers 2 --base-width 16
"""

from __future__ import annotations

import argparse
import os
import sys

from workflows._common import add_cluster_args, apply_cluster_args, make_config, start_ray, user_errors

from lits.core.config import AMP_MODES, INGEST_MODES, SCHEDULES, TASKS, TrainConfig


def parse_args(argv=None) -> argparse.Namespace:
    d = TrainConfig(data="-", output="-")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--data", required=True, help="a prepare output (folder or s3:// prefix with manifest.json)")
    p.add_argument("--output", required=True, help="folder or s3:// prefix for checkpoints, metrics.csv, curves.png, model/")
    p.add_argument("--num-gpus", type=int, default=d.num_gpus, help="GPU workers, one GPU each (default: %(default)s: CPU)")
    p.add_argument("--num-workers", type=int, default=None, help="CPU workers when --num-gpus is 0 (default: 1)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="slices per optimizer step over all workers, split evenly among them (a multiple of the "
                   "workers): any number of workers makes the steps of one process, at the same --lr "
                   "(default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="(default: %(default)s)")
    p.add_argument("--task", default=d.task, choices=TASKS, help="(default: %(default)s)")
    p.add_argument("--base-width", type=int, default=d.base_width, help="U-Net first-level channels (default: %(default)s)")
    p.add_argument("--depth", type=int, default=d.depth, help="U-Net levels (default: %(default)s)")
    p.add_argument("--amp", default=d.amp, choices=AMP_MODES, help="mixed precision on GPU (default: %(default)s)")
    p.add_argument("--max-failures", type=int, default=d.max_failures, help="worker-group restarts (default: %(default)s)")
    p.add_argument("--name", default=d.name, help="run name; the same name resumes (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="(default: %(default)s)")
    p.add_argument("--crop", type=int, default=None, help="side of the square training patches; each batch of slices "
                   "gives (S/crop)^2 patch batches, so an epoch covers one pass over the split's pixels "
                   "(default: half the prepared image size; the image size trains on whole slices)")
    p.add_argument("--tumour-fraction", type=float, default=d.tumour_fraction,
                   help="least share of patches centred on tumour in every batch (default: %(default)s: random "
                   "patches; nnU-Net forces 0.33, which helps when prepare keeps most non-tumour slices)")
    p.add_argument("--schedule", default=d.schedule, choices=SCHEDULES,
                   help="poly: warm-up then lr*(1-t)^0.9 over the run; plateau: the original's drops and early "
                   "stopping (default: %(default)s)")
    p.add_argument("--steps-per-epoch", type=int, default=None, help="cap on steps per epoch (default: whole split)")
    p.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs and torch threads per worker (default: %(default)s)")
    p.add_argument("--no-augment", action="store_true", help="train without augmentation")
    p.add_argument("--scale-aug", type=float, default=d.scale_aug,
                   help="zoom range of the random affine: scale in [1-X, 1+X] (default: %(default)s; nnU-Net: ~0.3)")
    p.add_argument("--intensity-aug", type=float, default=d.intensity_aug,
                   help="probability of each intensity augmentation per sample: brightness, shift, contrast, gamma, "
                   "noise, blur (default: %(default)s: none)")
    p.add_argument("--lesion-loss", type=float, default=d.lesion_loss,
                   help="weight of a per-lesion Dice term (blob loss): each tumour component scored on its own, so "
                   "small lesions weigh as much as large ones (default: %(default)s: off)")
    p.add_argument("--norm", default=d.norm, choices=("batch", "instance"),
                   help="the U-Net's normalisation (default: %(default)s)")
    p.add_argument("--precise-bn", type=int, default=d.precise_bn,
                   help="whole training slices per worker and epoch on which BatchNorm's statistics are recomputed; "
                   "validation keeps them or the moving average, whichever validates better; 0: the moving average "
                   "(default: %(default)s)")
    p.add_argument("--checkpoint-minutes", type=float, default=d.checkpoint_interval_s / 60,
                   help="checkpoint after the first epoch ending this long after the last checkpoint, and after "
                   "the last epoch; 0: every epoch (default: %(default)s)")
    p.add_argument("--ingest", default=d.ingest, choices=INGEST_MODES,
                   help="materialize: decode the splits once into Ray's object store; stream: read them every "
                   "epoch (for splits larger than the object store); auto: materialize when the decoded splits fit "
                   "in --materialize-gb (default: %(default)s)")
    p.add_argument("--materialize-gb", type=float, default=d.materialize_gb,
                   help="largest decoded train+val size --ingest auto materializes (default: %(default)s)")
    p.add_argument("--mlflow", nargs="?", const="", default=None, metavar="URI",
                   help="log parameters, per-epoch metrics, curves.png and the model to MLflow at URI (sqlite:///..., "
                   "http://...); without URI a sqlite store in --output (OUTPUT/mlflow.db, artifacts in "
                   "OUTPUT/mlartifacts; a local --output only). Needs the extra lits[mlflow]")
    p.add_argument("--first-stage", metavar="MODEL", help="train a cascade's second stage: --data holds prepare --roi "
                   "crops and MODEL (a whole-slice model, train.py's OUT/model) finds the liver; the exported model "
                   "holds both (docs/train.md#a-cascade-a-liver-box-second-stage)")
    add_cluster_args(p)
    return p.parse_args(argv)


def dice_summary(metrics: dict, prefix: str = "") -> str:
    """'Dice liver 0.532, tumour 0.000 per volume (liver 0.561, tumour 0.188 per slice)' from the metrics named
    <prefix>dice_<class>_<volume|slice> (every metric, IoU too: model/config.json, metrics.csv)."""
    def per(unit: str) -> str:
        names = [(c, f"{prefix}dice_{c}_{unit}") for c in ("liver", "tumour")]
        return ", ".join(f"{c} {metrics[k]:.3f}" for c, k in names if metrics.get(k) is not None)

    return f"Dice {per('volume')} per volume ({per('slice')} per slice)"


def main(argv=None) -> int:
    args = parse_args(argv)
    apply_cluster_args(args)
    with user_errors("train"):
        cfg = make_config(
            TrainConfig, data=args.data, output=args.output, num_gpus=args.num_gpus, num_workers=args.num_workers,
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, task=args.task, base_width=args.base_width,
            depth=args.depth, amp=args.amp, max_failures=args.max_failures, name=args.name, seed=args.seed,
            augment=not args.no_augment, steps_per_epoch=args.steps_per_epoch, crop=args.crop,
            tumour_fraction=args.tumour_fraction, schedule=args.schedule,
            checkpoint_interval_s=args.checkpoint_minutes * 60, ingest=args.ingest,
            materialize_gb=args.materialize_gb, cpus_per_worker=args.cpus_per_worker, norm=args.norm,
            precise_bn=args.precise_bn, scale_aug=args.scale_aug, intensity_aug=args.intensity_aug,
            lesion_loss=args.lesion_loss, first_stage=args.first_stage,
        )
        from lits.core import storage
        from lits.train import train_data, training

        tracking = None
        if args.mlflow is not None:
            from lits.train import tracking as mlflow_tracking

            tracking = mlflow_tracking.resolve(args.mlflow, cfg.output)
        info = train_data.check_data(cfg)  # before paying for Ray
        storage.check_writable(cfg.output)
        # Locally, one logical CPU beyond the training workers, so Ray Data can read while they train.
        start_ray(args.address, num_cpus=max(os.cpu_count() or 1, cfg.workers * cfg.cpus_per_worker + 1))
        # A cluster joined by address may autoscale: missing GPUs are a warning there, an error locally.
        config = training.train(cfg, info, strict_resources=not args.address, tracking=tracking)
        out = storage.normalise(cfg.output)
        val = config["val_metrics"]
        print(f"trained {config['training']['epochs_run']} epoch(s); best epoch {config['training']['best_epoch']}: "
              f"validation loss {val['val_loss']:.3f}, {dice_summary(val, 'val_')}")
        test = config["test_metrics"]
        if test:
            print(f"test split, {test['volumes']} volume(s) as prepared slices: {dice_summary(test)}")
        if config.get("test_evaluation"):
            from lits.core import reports

            print("\ntest split, whole volumes at their original resolution (LiTS metrics):")
            print(reports.evaluation_summary(config["test_evaluation"]))
        if tracking is not None:
            print(f"MLflow: experiment {tracking.experiment!r} at {tracking.uri}")
        print(f"model: {storage.join(out, 'model')}  metrics: {storage.join(out, 'metrics.csv')}  curves: {storage.join(out, 'curves.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
