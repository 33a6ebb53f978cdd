#!/usr/bin/env python
"""Reading a DICOM CT series: lits.core.dicom.read_series against SimpleITK's ImageSeriesReader.

    python benchmarks/dicom_read.py [--runs 5] [--slices 100] [--threads 4]

Two series, from local disk (warm page cache): the real JPEG 2000 series of tests/data (20 slices of
512x512) and an uncompressed one of 512x512x--slices written with pydicom to a temporary folder
(tests/dicom_factory.py). For each reader, the median of --runs reads: series MB/s (the files' bytes
per second) and slices per second. Ours is timed from a listed Series (discover_series is timed on
its own: headers only); SimpleITK's from its own file list (GDCM's sorting, timed with the read).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


def median_seconds(fns: dict, runs: int) -> dict:
    """{name: median seconds} of `runs` calls of each function, taken in turns (run 1 of each, then
    run 2 of each, ...) so that a change in the machine's load falls on all of them alike."""
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def sitk_read(folder: str):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(folder))
    return sitk.GetArrayFromImage(reader.Execute())


def rows_for(label: str, folder: str, runs: int, threads: int):
    import numpy as np

    from lits.core import dicom

    (series,), _ = dicom.discover_series(folder)
    megabytes = series.file_bytes / 1e6
    ours, _, _ = dicom.read_series(series, threads=threads)
    theirs = sitk_read(folder)
    assert np.array_equal(ours.transpose(2, 1, 0), theirs), "the readers disagree"
    shape = "x".join(str(s) for s in ours.shape)
    timed = median_seconds({
        f"lits read_series ({threads} threads)": lambda: dicom.read_series(series, threads=threads),
        "lits read_series (1 thread)": lambda: dicom.read_series(series, threads=1),
        "SimpleITK ImageSeriesReader": lambda: sitk_read(folder),
        "lits discover_series (headers only)": lambda: dicom.discover_series(folder),
    }, runs)
    lines = [f"| {label} ({shape}, {megabytes:.1f} MB) | {name} | {megabytes / s:.0f} | {series.slices / s:.0f} | "
             f"{s:.3f} |" for name, s in timed.items()]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()

    import numpy as np

    from dicom_factory import write_series

    print(f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; median of {args.runs}")
    print()
    print("| series | reader | MB/s | slices/s | s per read |")
    print("|---|---|---:|---:|---:|")
    for line in rows_for("real, JPEG 2000", os.path.join(ROOT, "tests", "data", "dicom-ct-series"), args.runs,
                         args.threads):
        print(line)
    with tempfile.TemporaryDirectory() as tmp:
        shape = (512, 512, args.slices)
        hu = np.random.default_rng(0).integers(-1024, 2000, size=shape, dtype=np.int16)
        write_series(os.path.join(tmp, "synthetic"), shape=shape, spacing=(0.8, 0.8, 1.5), hu=hu)
        for line in rows_for("synthetic, uncompressed", os.path.join(tmp, "synthetic"), args.runs, args.threads):
            print(line)


if __name__ == "__main__":
    main()
