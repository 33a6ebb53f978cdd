#!/usr/bin/env python
"""Benchmark of `prepare`: the Ray pipeline against a single-process loop (with the time of each
stage, and a shard-by-shard comparison of the two outputs), .nii.gz decode speed, memory per
volume, and the effect of Ray Data's per-operator resource reservation. Prints markdown tables
(paste them into README).

    python benchmarks/prepare.py --volumes 60 --slices 120 --size 512

Synthetic volumes are generated once into --workdir and reused by later runs. Exits non-zero when
the two runs' shards differ.
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


_IMPORT_RSS_PROBE = r"""
import sys
sys.path.insert(0, sys.argv[1])
import ray.data, lits.pipeline  # what a prepare worker imports before its first volume
with open("/proc/self/status") as f:
    print([int(l.split()[1]) for l in f if l.startswith("VmRSS")][0])
"""


def import_rss_mb() -> float:
    """Resident size of a fresh Python process once it has imported ray.data and lits.pipeline."""
    out = subprocess.run([sys.executable, "-c", _IMPORT_RSS_PROBE, ROOT], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1e3


def timed_prepare(cfg: PrepareConfig, runner):
    """Run prepare and time its stages from the progress callback.

    Returns:
        (manifest, {'total', 'first' (first volume done), 'last' (last volume done), 'commit'
        (after the last volume: manifest, preview, splits moved), 'volume_mean' and 'volume_sum'
        (slicing seconds per volume as recorded in the manifest, shard write excluded)}).
    """
    marks = []
    t0 = time.perf_counter()
    manifest = pipeline.prepare(cfg, runner, lambda done, total, result: marks.append(time.perf_counter() - t0))
    total = time.perf_counter() - t0
    volume_s = [e["seconds"]["total"] for e in manifest["volumes"]]
    return manifest, {"total": total, "first": marks[0], "last": marks[-1], "commit": total - marks[-1],
                      "volume_mean": float(np.mean(volume_s)), "volume_sum": float(np.sum(volume_s))}


def compare_shards(dir_a: str, manifest_a: dict, dir_b: str, manifest_b: dict) -> str:
    """How the two runs' shards compare: byte for byte, or (when only the bytes differ) as decoded
    tables. Exits with a message naming the shards when the runs wrote different data."""
    import pyarrow.parquet as pq
    import ray.data  # noqa: F401  (registers the tensor column type, so the tables decode)

    def names(manifest):
        return sorted(s for split in manifest["splits"].values() for s in split["shards"])

    if names(manifest_a) != names(manifest_b):
        sys.exit(f"the runs wrote different shards: {sorted(set(names(manifest_a)) ^ set(names(manifest_b)))}")
    by_bytes = [n for n in names(manifest_a)
                if open(os.path.join(dir_a, n), "rb").read() != open(os.path.join(dir_b, n), "rb").read()]
    by_rows = [n for n in by_bytes if not pq.read_table(os.path.join(dir_a, n)).equals(pq.read_table(os.path.join(dir_b, n)))]
    if by_rows:
        sys.exit(f"{len(by_rows)} shards hold different rows in the two runs: {by_rows[:5]}")
    if by_bytes:
        return f"{len(names(manifest_a))} shards hold the same rows ({len(by_bytes)} differ in their bytes)"
    return f"{len(names(manifest_a))} shards identical byte for byte"


def reservation_probe(rows: int = 12, cpu_s: float = 0.5) -> dict:
    """CPUs kept busy by a one-operator Ray Data map of `rows` CPU-bound rows (`cpu_s` of CPU each),
    with Ray Data's per-operator resource reservation on (its default) and off (what run_ray sets).
    Busy CPUs = CPU seconds spent in the rows / wall seconds of the whole map. Ray must be running."""
    import ray.data

    def spin(row):
        start = time.thread_time()
        while time.thread_time() - start < cpu_s:
            pass
        return {"cpu": time.thread_time() - start}

    busy = {}
    for enabled in (True, False):
        ds = ray.data.range(rows, override_num_blocks=rows).map(spin, num_cpus=1)
        ds.context.op_resource_reservation_enabled = enabled
        t0 = time.perf_counter()
        cpu = sum(r["cpu"] for r in ds.iter_rows())
        busy[enabled] = cpu / (time.perf_counter() - t0)
    return busy


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

    # 1. decode speed, one thread
    paths = sorted(os.path.join(data, f) for f in os.listdir(data) if f.startswith("volume-"))[: args.decode_files]
    decode = time_decode(paths)

    # 2. memory of one volume in a fresh process; a fresh process's size after a worker's imports
    mem = dict(memory_probe(tasks[0]), import_rss_mb=import_rss_mb())

    # 3. single-process loop vs Ray pipeline (Ray start included), same functions, same files
    local, local_t = timed_prepare(cfg, pipeline.run_local)
    t0 = time.perf_counter()
    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    start_s = time.perf_counter() - t0
    ray_cfg = PrepareConfig(input=data, output=os.path.join(args.workdir, "out-ray"))
    distributed, ray_t = timed_prepare(ray_cfg, pipeline.run_ray)
    cpus = int(ray.cluster_resources().get("CPU", 0))

    # 4. Ray Data's per-operator reservation, on and off, on a plain CPU-bound map
    reservation = reservation_probe()
    ray.shutdown()
    same = compare_shards(cfg.output, local, ray_cfg.output, distributed)

    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"\n### prepare: {args.volumes} volumes x {args.slices} slices of {args.size}x{args.size} "
          f"int16 .nii.gz ({args.volumes * args.slices} slices) on {machine}\n")
    print_pipeline(args.volumes * args.slices, local_t, ray_t, start_s, cpus)
    print(f"\n{sum(local['totals']['kept'].values())} slices kept and written; {same} between the two runs.\n")
    print_probes(decode, mem, reservation, cpus)


def print_pipeline(slices: int, local_t: dict, ray_t: dict, start_s: float, cpus: int) -> None:
    """The speed-up table and the time of each stage of both runs."""
    local_s, ray_s = local_t["total"], start_s + ray_t["total"]
    print(_markdown(["run", "seconds", "input slices/s", "speed-up", "speed-up without Ray's start"], [
        ["single-process loop (run_local)", f"{local_s:.1f}", f"{slices / local_s:.0f}", "1.00x", "-"],
        [f"Ray Data pipeline, {cpus} CPUs (start {start_s:.1f} s included)", f"{ray_s:.1f}", f"{slices / ray_s:.0f}",
         f"{local_s / ray_s:.2f}x", f"{local_s / ray_t['total']:.2f}x"],
    ]))
    print("\n### where the time goes (seconds from the start of prepare())\n")

    def row(name, key, digits=2):
        return [name, f"{local_t[key]:.{digits}f}", f"{ray_t[key]:.{digits}f}"]

    busy = [t["volume_sum"] / t["last"] for t in (local_t, ray_t)]
    print(_markdown(["stage", "single process", f"Ray Data, {cpus} CPUs"], [
        ["ray.init (before prepare)", "-", f"{start_s:.2f}"],
        row("first volume done (Ray: executor and workers started, first imports, one volume)", "first"),
        row("last volume done", "last"),
        row("commit after the last volume (preview, splits moved, manifest)", "commit"),
        row("slicing one volume, mean (read to resized slices; shard write not included)", "volume_mean", 3),
        ["CPUs busy slicing (slicing seconds / time to the last volume)", f"{busy[0]:.2f}", f"{busy[1]:.2f}"],
    ]))


def print_probes(decode: dict, mem: dict, reservation: dict, cpus: int) -> None:
    """The decode, memory and reservation tables."""
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
        ["RSS of a fresh process after importing ray.data and lits.pipeline", f"{mem['import_rss_mb']:.0f}", "-"],
    ]))
    print(f"\n### Ray Data's per-operator resource reservation (one map of 12 rows x 0.5 s CPU, {cpus} CPUs)\n")
    print(_markdown(["reservation", f"CPUs busy (of {cpus})"], [
        ["on (Ray Data's default)", f"{reservation[True]:.2f}"],
        ["off (what pipeline.run_ray sets)", f"{reservation[False]:.2f}"],
    ]))


def _markdown(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
