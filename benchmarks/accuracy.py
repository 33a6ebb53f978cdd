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
recall and precision) on the own test split and on the unseen scans.

    python benchmarks/accuracy.py [--output bench-output/accuracy] [--train-args "--no-augment"]
    python benchmarks/accuracy.py --from train      # reuse the synthesized and prepared data
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
TRAIN_FLAGS = ["--num-workers", "2", "--epochs", "30", "--batch-size", "32", "--base-width", "16", "--depth", "4",
               "--lr", "1e-3"]


def run(script: str, *args: str) -> float:
    command = [sys.executable, os.path.join(ROOT, "workflows", f"{script}.py"), *args]
    print(f"$ python workflows/{script}.py {shlex.join(args)}", flush=True)
    started = time.perf_counter()
    code = subprocess.call(command, env=dict(os.environ, PYTHONPATH=ROOT))
    if code != 0:
        raise SystemExit(f"accuracy: {script} failed (exit {code})")
    return time.perf_counter() - started


def scores(summary: dict) -> dict:
    agg = summary["aggregate"]
    les = agg["lesions"]
    return {"liver": agg["liver"]["dice_per_case"], "tumour": agg["tumour"]["dice_per_case"],
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
    p.add_argument("--unseen", type=int, default=8, help="unseen scans (default: %(default)s)")
    args = p.parse_args(argv)
    out = os.path.abspath(args.output)
    d = {k: os.path.join(out, k) for k in ("volumes", "unseen", "prepared", "run", "seg")}
    seconds = {}
    todo = STEPS[STEPS.index(args.start):]
    if "synthesize" in todo:
        shutil.rmtree(out, ignore_errors=True)
        seconds["synthesize"] = run("synthesize", "--output", d["volumes"], "--volumes", "12", "--size", "256", "--slices", "64")
        seconds["synthesize"] += run("synthesize", "--output", d["unseen"], "--volumes", str(args.unseen), "--size", "256",
                                     "--slices", "64", "--seed", "11", "--first-id", "200")
    if "prepare" in todo:
        shutil.rmtree(d["prepared"], ignore_errors=True)
        seconds["prepare"] = run("prepare", "--input", d["volumes"], "--output", d["prepared"], "--image-size", "128")
    if "train" in todo:
        shutil.rmtree(d["run"], ignore_errors=True)
        seconds["train"] = run("train", "--data", d["prepared"], "--output", d["run"], *TRAIN_FLAGS,
                               *shlex.split(args.train_args))
    if "segment" in todo:
        shutil.rmtree(d["seg"], ignore_errors=True)
        seconds["segment"] = run("segment", "--model", os.path.join(d["run"], "model"), "--input", d["unseen"],
                                 "--output", d["seg"])
    if "evaluate" in todo:
        seconds["evaluate"] = run("evaluate", "--pred", d["seg"], "--ref", d["unseen"], "--local")
    unseen = scores(json.load(open(os.path.join(d["seg"], "_evaluation", "summary.json"))))
    own_path = os.path.join(d["run"], "test_evaluation", "summary.json")
    own = scores(json.load(open(own_path))) if os.path.exists(own_path) else None
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}; "
          f"train flags: {' '.join(TRAIN_FLAGS)} {args.train_args}".rstrip())
    print("\n| step | minutes |\n|---|---|")
    for k, v in seconds.items():
        print(f"| {k} | {v / 60:.1f} |")
    print(f"| total | {sum(seconds.values()) / 60:.1f} |")
    print("\n| scans | cases | liver Dice/case | tumour Dice/case | tumour Dice global | lesions |\n|---|---|---|---|---|---|")
    for name, s in (("own test split", own), ("unseen scans", unseen)):
        if s:
            print(f"| {name} | {s['cases']} | {s['liver']:.3f} | {s['tumour']:.3f} | {s['tumour_global']:.3f} | {s['lesions']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
