#!/usr/bin/env python
"""Benchmark of `prepare`: the Ray pipeline against a single-process loop, .nii.gz decode speed,
and memory per volume. Prints markdown tables (paste them into README).

    python benchmarks/prepare.py --volumes 60 --slices 120 --size 512

Synthetic volumes are generated once into --workdir and reused by later runs.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from lits import pipeline, volumes  # noqa: E402
from lits.config import PrepareConfig, SynthConfig  # noqa: E402


def _synth_one(args):
    out, index, size, slices = args
    from lits.synthetic import synthesize

    synthesize(SynthConfig(output=out, volumes=1, size=size, slices=slices, first_id=index))


def generate(out: str, n: int, size: int, slices: int) -> None:
    """Synthesise volumes 0..n-1 into `out`, keeping any already there from an earlier run."""
    stamp = os.path.join(out, f".generated-{size}-{slices}")
    if not os.path.exists(stamp):
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        open(stamp, "w").close()
    missing = [i for i in range(n) if not os.path.exists(os.path.join(out, f"segmentation-{i}.nii.gz"))]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_synth_one, [(out, i, size, slices) for i in missing]))
    for stale in os.listdir(out):  # volumes beyond n from a larger earlier run
        if stale.endswith(".nii.gz") and int(stale.split("-")[1].split(".")[0]) >= n:
            os.remove(os.path.join(out, stale))
    if missing:
        print(f"generated {len(missing)} volumes {size}x{size}x{slices} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def time_decode(paths, repeats: int = 3):
    """MB/s of decoded voxels, one thread, best of `repeats`, for each reader over the same files."""
    import nibabel as nib

    readers = {
        "lits.volumes.read_nifti (ISA-L, one shot)": lambda p: volumes.read_nifti(p)[0],
        "zlib one shot + frombuffer": lambda p: volumes.parse_nifti(gzip.decompress(open(p, "rb").read()))[0],
        "nibabel dataobj (GzipFile stream)": lambda p: np.asanyarray(nib.load(p).dataobj),
        "nibabel get_fdata (float64)": lambda p: nib.load(p).get_fdata(),
    }
    try:
        import SimpleITK as sitk

        readers["SimpleITK ReadImage"] = lambda p: sitk.GetArrayViewFromImage(sitk.ReadImage(p))
    except ImportError:
        pass
    voxel_bytes = sum(volumes.read_nifti(p)[0].nbytes for p in paths)
    results = {}
    for name, read in readers.items():
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for p in paths:
                read(p)
            best = min(best, time.perf_counter() - t0)
        results[name] = voxel_bytes / 1e6 / best
    return results


_MEMORY_PROBE = r"""
import json, sys, threading, time, tracemalloc
sys.path.insert(0, sys.argv[1])
from lits import slicing
from lits.config import PrepareConfig

def rss_kb():
    with open("/proc/self/status") as f:
        return [int(l.split()[1]) for l in f if l.startswith("VmRSS")][0]

task = slicing.VolumeTask.from_dict(json.loads(sys.argv[2]))
cfg = PrepareConfig(input="-", output="-")
slicing.slice_volume(task, cfg)  # warm-up: imports, cv2 and numpy pools
import gc; gc.collect()
before, peak, done = rss_kb(), [0], []

def sample():  # RSS sampled every millisecond while the volume is sliced
    while not done:
        peak[0] = max(peak[0], rss_kb())
        time.sleep(0.001)

sampler = threading.Thread(target=sample)
sampler.start()
result = slicing.slice_volume(task, cfg)
done.append(1)
sampler.join()
tracemalloc.start()
slicing.slice_volume(task, cfg)
traced = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
print(json.dumps({"traced_peak": traced, "rss_before_kb": before, "rss_peak_kb": peak[0],
                  "voxel_bytes": result.entry["voxel_bytes"]}))
"""


def memory_probe(task) -> dict:
    """Peak memory of slicing one volume, in a fresh process (after a warm-up on the same volume)."""
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, ROOT, json.dumps(task.to_dict())],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--volumes", type=int, default=60)
    p.add_argument("--slices", type=int, default=120)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--workdir", default=os.path.join(ROOT, "bench-output", "prepare"))
    p.add_argument("--decode-files", type=int, default=4, help="files timed per reader")
    args = p.parse_args()

    data = os.path.join(args.workdir, "volumes")
    generate(data, args.volumes, args.size, args.slices)
    cfg = PrepareConfig(input=data, output=os.path.join(args.workdir, "out-local"))
    tasks, _, _ = pipeline.discover(cfg)
    slices = args.volumes * args.slices

    # 1. decode speed, one thread
    paths = sorted(os.path.join(data, f) for f in os.listdir(data) if f.startswith("volume-"))[: args.decode_files]
    decode = time_decode(paths)

    # 2. memory of one volume in a fresh process
    mem = memory_probe(tasks[0])

    # 3. single-process loop vs Ray pipeline (Ray start included), same functions, same files
    t0 = time.perf_counter()
    local = pipeline.prepare(cfg, pipeline.run_local)
    local_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    start_s = time.perf_counter() - t0
    ray_cfg = PrepareConfig(input=data, output=os.path.join(args.workdir, "out-ray"))
    distributed = pipeline.prepare(ray_cfg, pipeline.run_ray)
    ray_s = time.perf_counter() - t0
    cpus = int(ray.cluster_resources().get("CPU", 0))
    ray.shutdown()
    assert local["splits"] == distributed["splits"], "the two runs must produce the same shards"

    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"\n### prepare: {args.volumes} volumes x {args.slices} slices of {args.size}x{args.size} "
          f"int16 .nii.gz ({slices} slices) on {machine}\n")
    kept = sum(local["totals"]["kept"].values())
    rows = [
        ["single-process loop (run_local)", f"{local_s:.1f}", f"{slices / local_s:.0f}", "1.00x"],
        [f"Ray Data pipeline, {cpus} CPUs (start {start_s:.1f} s included)", f"{ray_s:.1f}", f"{slices / ray_s:.0f}",
         f"{local_s / ray_s:.2f}x"],
    ]
    print(_markdown(["run", "seconds", "input slices/s", "speed-up"], rows))
    print(f"\n{kept} slices kept and written; shards identical between the two runs.\n")
    print("### .nii.gz decode, one thread (MB/s of decoded voxels)\n")
    sitk = decode.get("SimpleITK ReadImage")
    rows = [[name, f"{mbps:.0f}", f"{mbps / sitk:.2f}" if sitk else "-"] for name, mbps in decode.items()]
    print(_markdown(["reader", "MB/s", "vs SimpleITK"], rows))
    vol_mb = mem["voxel_bytes"] / 1e6
    rss_mb = (mem["rss_peak_kb"] - mem["rss_before_kb"]) / 1e3
    print("\n### memory of slicing one volume (fresh process, after a warm-up)\n")
    print(_markdown(["measure", "MB", "x one volume"], [
        ["one volume's voxels (int16)", f"{vol_mb:.0f}", "1.00"],
        ["peak traced allocations (tracemalloc)", f"{mem['traced_peak'] / 1e6:.0f}", f"{mem['traced_peak'] / 1e6 / vol_mb:.2f}"],
        ["peak RSS growth while slicing (sampled every ms)", f"{rss_mb:.0f}", f"{rss_mb / vol_mb:.2f}"],
    ]))


def _markdown(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
