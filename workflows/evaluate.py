#!/usr/bin/env python
"""Score predicted segmentations against references with the LiTS challenge metrics.

    python workflows/evaluate.py --pred s3://archive/seg/ --ref s3://archive/lits/ --images s3://archive/lits/
    python workflows/evaluate.py --pred demo-output/segmentations --ref demo-output/new-scans --images demo-output/new-scans

Pairs '<name>_seg.nii.gz' or '<name>_seg.dcm' (a bulk job's output) or 'segmentation-N.nii[.gz]'
predictions with 'segmentation-N.nii[.gz]' references ('.dcm' on either side: a DICOM-SEG); writes
metrics.csv, summary.json, report.md, overlays.png and dice_boxplot.png under --output (default:
PRED/_evaluation). Exit status 0, 1 when a pair could not be evaluated, 2 for a bad flag or input.
"""

from __future__ import annotations

import argparse
import logging
import sys

from workflows._common import Beat, add_cluster_args, apply_cluster_args, make_config, start_ray, user_errors

from lits.core.config import EvaluateConfig


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--pred", required=True, help="folder or s3:// prefix of predicted segmentations")
    p.add_argument("--ref", required=True, help="folder or s3:// prefix of reference segmentations")
    p.add_argument("--output", default=None, help="where the report goes (default: PRED/_evaluation)")
    p.add_argument("--images", default=None, help="folder or s3:// prefix of the CT volumes (volume-N.nii[.gz]), "
                   "drawn under the overlays")
    p.add_argument("--local", action="store_true", help="evaluate in this process, without Ray")
    add_cluster_args(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    apply_cluster_args(args)
    with user_errors("evaluate"):
        from lits.evaluate import evaluation
        from lits.core import reports

        cfg = make_config(EvaluateConfig, pred=args.pred, ref=args.ref, output=args.output, images=args.images,
                          local=args.local)
        evaluation.check_inputs(cfg)  # before paying for Ray
        if not cfg.local:
            start_ray(args.address)

        beat = Beat()  # a line per case under --verbose; every case is in metrics.csv and report.md

        def progress(done: int, total: int, row: dict) -> None:
            if "error" in row:
                logging.info("[%*d/%d] case %s: not evaluated: %s", len(str(total)), done, total, row["case"], row["error"])
            else:
                logging.log(beat.level(), "[%*d/%d] case %s: liver Dice %.4f, tumour Dice %.4f (%.1f s)",
                            len(str(total)), done, total, row["case"], row["liver_dice"], row["tumour_dice"], row["seconds"])

        summary = evaluation.evaluate(cfg, progress)
        print(reports.evaluation_summary(summary))
        return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
