#!/usr/bin/env python
"""Whole-volume accuracy of the training recipe, measured the way a user sees it.

The contract of issue 10, step by step with the real commands:

    synthesize.py --volumes 12 --size 256 --slices 64                     (training data, seed 0)
    synthesize.py --volumes 8 --size 256 --slices 64 --seed 11 --first-id 200   (unseen scans)
    prepare.py --image-size 128                                           (default keep fractions)
    train.py --num-workers 2 --epochs 30 --batch-size 32 --base-width 16 --depth 4 --lr 1e-3
    segment.py --model RUN/model --input UNSEEN                           (self-contained job)
    evaluate.py --pred SEG --ref UNSEEN --local

and prints one markdown table: minutes per step, and liver / tumour Dice per case (plus lesion
recall and precision) on the own test split, on the unseen scans of the training generator, on
scans of an independent generator never trained on (benchmarks/heldout_phantoms.py, written without
reading the training generator; issue 23), and the liver agreement and invented tumour volume on the
real CT series in tests/data (TotalSegmentator's liver as the other opinion).

    python benchmarks/accuracy.py [--output bench-output/accuracy] [--train-args "--no-augment"]
    python benchmarks/accuracy.py --anatomy abdomen   # train on the domain-randomised phantoms
    python benchmarks/accuracy.py --from train      # reuse the synthesized and prepared data
    python benchmarks/accuracy.py --anatomy abdomen --cascade   # + a liver-box second stage (prepare --roi,
                                                                #   train --first-stage RUN/model)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("synthesize", "prepare", "train", "segment", "evaluate")
REAL_SERIES = os.path.join(ROOT, "tests", "data", "dicom-ct-series")
REAL_LIVER = os.path.join(ROOT, "tests", "data", "dicom-ct-series-liver.nii.gz")
TRAIN_FLAGS = ["--num-workers", "2", "--epochs", "30", "--batch-size", "32", "--base-width", "16", "--depth", "4",
               "--lr", "1e-3"]


def call(command, shown: str) -> float:
    print(f"$ {shown}", flush=True)
    started = time.perf_counter()
    code = subprocess.call(command, env=dict(os.environ, PYTHONPATH=ROOT))
    if code != 0:
        raise SystemExit(f"accuracy: {shown.split()[1]} failed (exit {code})")
    return time.perf_counter() - started


def run(script: str, *args: str) -> float:
    return call([sys.executable, os.path.join(ROOT, "workflows", f"{script}.py"), *args],
                f"python workflows/{script}.py {shlex.join(args)}")


def run_heldout(out: str, volumes: int) -> float:
    args = ["--output", out, "--volumes", str(volumes), "--size", "256", "--slices", "64", "--seed", "29",
            "--first-id", "400"]
    return call([sys.executable, os.path.join(ROOT, "benchmarks", "heldout_phantoms.py"), *args],
                f"python benchmarks/heldout_phantoms.py {shlex.join(args)}")


def scores(summary: dict) -> dict:
    agg = summary["aggregate"]
    les = agg["lesions"]
    return {"liver": agg["liver"]["dice_per_case"], "tumour": agg["tumour"]["dice_per_case"],
            "tumour_present": agg["tumour"]["dice_per_case_present"],
            "tumour_global": agg["tumour"]["dice_global"],
            "lesions": f"{les['detected']}/{les['reference']} found, "
                       f"precision {les['precision'] if les['precision'] is not None else float('nan'):.2f}",
            "cases": summary["cases_evaluated"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--output", default=os.path.join(ROOT, "bench-output", "accuracy"))
    p.add_argument("--from", dest="start", default="synthesize", choices=STEPS, help="first step to run (default: all)")
    p.add_argument("--train-args", default="", help="extra train.py flags (a lever to measure)")
    p.add_argument("--unseen", type=int, default=8, help="unseen scans of each generator (default: %(default)s)")
    p.add_argument("--anatomy", default="simple", choices=("simple", "abdomen", "mixed"),
                   help="the training generator's anatomy (synthesize.py --anatomy; mixed: half of each; "
                   "default: %(default)s)")
    p.add_argument("--train-scans", type=int, default=12,
                   help="training phantoms (default: %(default)s, the contract's; more scans for fewer epochs is a "
                   "lever: --train-scans 48 --train-args '--epochs 8')")
    p.add_argument("--cascade", action="store_true",
                   help="also train a liver-box second stage (prepare --roi, train --first-stage RUN/model, the same "
                   "flags) and segment with the cascade")
    args = p.parse_args(argv)
    out = os.path.abspath(args.output)
    d = {k: os.path.join(out, k) for k in ("volumes", "unseen", "heldout", "real", "prepared", "run", "seg",
                                          "seg-heldout", "seg-real", "prepared-roi", "run-roi")}
    seconds = {}
    todo = STEPS[STEPS.index(args.start):]
    if "synthesize" in todo:
        shutil.rmtree(out, ignore_errors=True)
        # 'mixed': half of each anatomy, training and unseen alike (ids after the first half's)
        parts = [(a, 1) for a in ("simple", "abdomen")] if args.anatomy == "mixed" else [(args.anatomy, 0)]
        seconds["synthesize"] = 0.0
        for i, (anatomy, split) in enumerate(parts):
            train_n, unseen_n = (args.train_scans // 2, args.unseen // 2) if split else (args.train_scans, args.unseen)
            seconds["synthesize"] += run("synthesize", "--output", d["volumes"], "--volumes", str(train_n), "--size", "256",
                                         "--slices", "64", "--anatomy", anatomy, "--first-id", str(i * train_n),
                                         "--seed", str(i))
            seconds["synthesize"] += run("synthesize", "--output", d["unseen"], "--volumes", str(unseen_n), "--size",
                                         "256", "--slices", "64", "--seed", str(11 + i), "--first-id",
                                         str(200 + i * unseen_n), "--anatomy", anatomy)
        seconds["synthesize"] += run_heldout(d["heldout"], args.unseen)
        shutil.copytree(REAL_SERIES, os.path.join(d["real"], "real-ct-dicom"))
    if "prepare" in todo:
        shutil.rmtree(d["prepared"], ignore_errors=True)
        seconds["prepare"] = run("prepare", "--input", d["volumes"], "--output", d["prepared"], "--image-size", "128")
        if args.cascade:
            shutil.rmtree(d["prepared-roi"], ignore_errors=True)
            seconds["prepare"] += run("prepare", "--input", d["volumes"], "--output", d["prepared-roi"], "--image-size",
                                      "128", "--roi")
    if "train" in todo:
        shutil.rmtree(d["run"], ignore_errors=True)
        seconds["train"] = run("train", "--data", d["prepared"], "--output", d["run"], *TRAIN_FLAGS,
                               *shlex.split(args.train_args))
        if args.cascade:
            shutil.rmtree(d["run-roi"], ignore_errors=True)
            seconds["train"] += run("train", "--data", d["prepared-roi"], "--output", d["run-roi"], *TRAIN_FLAGS,
                                    *shlex.split(args.train_args), "--first-stage", os.path.join(d["run"], "model"))
    model = os.path.join(d["run-roi"] if args.cascade else d["run"], "model")
    scan_sets = (("seg", "unseen"), ("seg-heldout", "heldout"), ("seg-real", "real"))
    if "segment" in todo:
        seconds["segment"] = 0.0
        for seg, scans in scan_sets:
            shutil.rmtree(d[seg], ignore_errors=True)
            seconds["segment"] += run("segment", "--model", model, "--input", d[scans],
                                      "--output", d[seg])
    if "evaluate" in todo:
        seconds["evaluate"] = run("evaluate", "--pred", d["seg"], "--ref", d["unseen"], "--local")
        seconds["evaluate"] += run("evaluate", "--pred", d["seg-heldout"], "--ref", d["heldout"], "--local")
    unseen = scores(json.load(open(os.path.join(d["seg"], "_evaluation", "summary.json"))))
    heldout = scores(json.load(open(os.path.join(d["seg-heldout"], "_evaluation", "summary.json"))))
    sys.path.insert(0, ROOT)
    from lits.evaluate.agreement import liver_agreement

    real = liver_agreement(os.path.join(d["seg-real"], "real-ct-dicom_seg.nii.gz"), REAL_LIVER)
    own_path = os.path.join(os.path.dirname(model), "test_evaluation", "summary.json")
    own = scores(json.load(open(own_path))) if os.path.exists(own_path) else None
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}; "
          f"anatomy: {args.anatomy}; train flags: {' '.join(TRAIN_FLAGS)} {args.train_args}".rstrip()
          + ("; cascade: whole-slice first stage + liver-box second stage" if args.cascade else ""))
    print("\n| step | minutes |\n|---|---|")
    for k, v in seconds.items():
        print(f"| {k} | {v / 60:.1f} |")
    print(f"| total | {sum(seconds.values()) / 60:.1f} |")
    print("\n| scans | cases | liver Dice/case | tumour Dice/case (cases with tumour) | tumour Dice global | lesions |"
          "\n|---|---|---|---|---|---|")
    for name, s in (("own test split", own), ("unseen scans, training generator", unseen),
                    ("unseen scans, independent generator", heldout)):
        if s:
            present = f"{s['tumour_present']:.3f}" if s["tumour_present"] is not None else "-"
            print(f"| {name} | {s['cases']} | {s['liver']:.3f} | {s['tumour']:.3f} ({present}) | {s['tumour_global']:.3f} "
                  f"| {s['lesions']} |")
    print("\n| real CT series (tests/data) | liver agreement (Dice) with TotalSegmentator | liver mL ours / theirs "
          "| tumour invented (mL, lesions) |\n|---|---|---|---|")
    print(f"| TotalSegmentator example_ct_dicom | {real['liver_dice']:.3f} | {real['pred_liver_ml']:.0f} / "
          f"{real['ref_liver_ml']:.0f} | {real['pred_tumour_ml']:.1f}, {real['pred_lesions']} |")
    print("goals (issue 23): training generator tumour >= 0.80, liver >= 0.95; independent generator tumour >= 0.65, "
          "liver >= 0.95; real series liver >= 0.90, invented tumour <= 5 mL")
    return 0


if __name__ == "__main__":
    sys.exit(main())
