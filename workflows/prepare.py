#!/usr/bin/env python
"""Prepare LiTS CT volumes (or the converted image dataset) as Parquet training slices on Ray Data.

    python workflows/prepare.py --input s3://bucket/lits/ --output s3://bucket/prepared/
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from workflows._common import Beat, add_cluster_args, apply_cluster_args, make_config, start_ray, user_errors

from lits.core.config import INPUT_FORMATS, PrepareConfig


def parse_args(argv=None) -> argparse.Namespace:
    d = PrepareConfig(input="-", output="-")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--input", required=True, help="folder or s3:// prefix holding the dataset")
    p.add_argument("--output", required=True, help="folder or s3:// prefix to write train/ val/ test/ and manifest.json")
    p.add_argument("--format", default=d.format, choices=INPUT_FORMATS, help="input layout (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=d.image_size, help="output side in pixels (default: %(default)s)")
    p.add_argument("--keep-liver", type=float, default=d.keep_liver, help="fraction of liver-only slices kept (default: %(default)s)")
    p.add_argument("--keep-empty", type=float, default=d.keep_empty, help="fraction of slices without liver kept (default: %(default)s)")
    p.add_argument("--context", type=int, default=d.context, choices=(0, 1), help="1: 2.5-D images of slices z-1, z, z+1 (default: %(default)s)")
    p.add_argument("--roi", action="store_true", help="crop each slice to a box around its volume's liver: training "
                   "data for a cascade's second stage (train.py --first-stage; docs/train.md#a-cascade-a-liver-box-second-stage)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction, help="fraction of volumes for validation (default: %(default)s)")
    p.add_argument("--test-fraction", type=float, default=d.test_fraction, help="fraction of volumes for test (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the split and the slice filter (default: %(default)s)")
    p.add_argument("--strict", action="store_true", help="exit non-zero when any input failed")
    p.add_argument("--max-voxels", type=int, default=d.max_voxels, help="refuse a NIfTI whose header declares more "
                   "voxels, before inflating it (default: %(default)s = 2^30, 4x the largest LiTS volume)")
    add_cluster_args(p)
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> PrepareConfig:
    return make_config(
        PrepareConfig, input=args.input, output=args.output, format=args.format, image_size=args.image_size,
        keep_liver=args.keep_liver, keep_empty=args.keep_empty, context=args.context,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed,
        strict=args.strict, max_voxels=args.max_voxels, roi=args.roi,
    )


def stop_ray() -> None:
    """Shut Ray down now (at exit it would anyway), timed for benchmarks/prepare.py."""
    import ray

    started = time.perf_counter()
    ray.shutdown()
    logging.info("Ray stopped in %.2f s", time.perf_counter() - started)


def main(argv=None) -> int:
    args = parse_args(argv)
    apply_cluster_args(args)
    with user_errors("prepare"):
        cfg = config_from_args(args)
        from lits.prepare import pipeline
        from lits.core import reports, storage

        # Fail on a bad input or output before paying for a Ray start.
        storage.require(cfg.input)
        storage.check_writable(cfg.output)
        started = time.perf_counter()
        start_ray(args.address, data=False)
        logging.info("Ray ready in %.2f s", time.perf_counter() - started)

        beat = Beat()  # a line per volume under --verbose

        def progress(done: int, total: int, result: dict) -> None:
            e = result["entry"]
            if e is None:
                logging.info("[%*d/%d] failed: %s", len(str(total)), done, total, result["failed"][0]["reason"])
            else:
                s, k = e["slices"], e["kept"]
                logging.log(beat.level(), "[%*d/%d] %s: %d slices (%d empty, %d liver, %d tumour), kept %d, %.1f s",
                            len(str(total)), done, total, e["volume_id"], sum(s.values()),
                            s["empty"], s["liver"], s["tumour"], sum(k.values()), e["seconds"]["total"])

        manifest = pipeline.prepare(cfg, pipeline.run_ray, progress)
        print(reports.prepare_summary(manifest, storage.normalise(cfg.output)), flush=True)
        stop_ray()
        if manifest["totals"]["volumes"] == 0:
            return 1
        if cfg.strict and manifest["failed"]:
            print(f"prepare: {len(manifest['failed'])} input(s) failed and --strict was given", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
