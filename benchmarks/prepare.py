#!/usr/bin/env python
"""Benchmark of `prepare`: `python workflows/prepare.py` (Ray, the whole command: interpreter, Ray
start and stop included) against two single-process loops over the same files:

- the seed-style loop: what the original project's conversion does, written plainly (nibabel
  `get_fdata`, fastai's three channels per slice — W150/L30, W200/L60 and the slice's own
  frequency-histogram equalisation, as fastai's `hist_scaled()` without breaks —, resize to the
  prepared size, one JPEG image and one PNG mask per slice, as the seed saved them). It converts
  only the slices prepare keeps (the seed converted every second slice), so it does less than the
  seed did;
- the project's own loop (`pipeline.run_local`: the same per-volume code as the Ray tasks).

Prints markdown tables (paste them into README): the three runs with both ratios, where the time
goes, a shard-by-shard comparison of the own loop's and Ray's outputs, .nii.gz decode speed and
the memory of one volume.

    python benchmarks/prepare.py --volumes 60 --slices 120 --size 512

Synthetic volumes are generated once into --workdir (every second pair as .nii, the others as
.nii.gz) and reused by later runs. Exits non-zero when the two runs' shards differ.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from lits.prepare import pipeline
from lits.core import volumes  # noqa: E402
from lits.core.config import PrepareConfig, SynthConfig  # noqa: E402
from lits.core.schema import FREQHIST_BINS, WINDOW_CUSTOM, WINDOW_LIVER  # noqa: E402

STAGES = ("read", "validate", "select", "histogram", "images", "masks", "encode", "write")
SEED_STAGES = ("read", "select", "windows", "resize", "save")


def _synth_one(args):
    out, index, size, slices = args
    from lits.core.synthetic import synthesize

    synthesize(SynthConfig(output=out, volumes=1, size=size, slices=slices, first_id=index, compress=index % 2 == 0))


def generate(out: str, n: int, size: int, slices: int) -> None:
    """Synthesise pairs 0..n-1 into `out` (odd ids .nii, even .nii.gz), keeping those already there."""
    stamp = os.path.join(out, f".generated-{size}-{slices}-mixed")
    if not os.path.exists(stamp):
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        open(stamp, "w").close()
    ext = {i: ".nii.gz" if i % 2 == 0 else ".nii" for i in range(n)}
    missing = [i for i in range(n) if not os.path.exists(os.path.join(out, f"segmentation-{i}{ext[i]}"))]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_synth_one, [(out, i, size, slices) for i in missing]))
    for stale in os.listdir(out):  # volumes beyond n from a larger earlier run
        if ".nii" in stale and int(stale.split("-")[1].split(".")[0]) >= n:
            os.remove(os.path.join(out, stale))
    if missing:
        print(f"generated {len(missing)} volumes {size}x{size}x{slices} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


# --- the seed-style loop ---------------------------------------------------------------------

def _fastai_windowed(x: np.ndarray, width: float, level: float) -> np.ndarray:
    lo, hi = level - width // 2, level + width // 2
    return (np.clip(x, lo, hi) - lo) / (hi - lo)


def _fastai_hist_scaled(x: np.ndarray) -> np.ndarray:
    """fastai's `hist_scaled()` without breaks: the slice's own `freqhist_bins` (a sort), then np.interp."""
    ordered = np.sort(x.reshape(-1))
    t = np.concatenate([[0.001], np.arange(FREQHIST_BINS) / FREQHIST_BINS + 1 / (2 * FREQHIST_BINS), [0.999]])
    breaks = np.unique(ordered[(len(ordered) * t).astype(np.int64)])
    return np.clip(np.interp(x, breaks, np.linspace(0.0, 1.0, len(breaks))), 0.0, 1.0)


def seed_volume(task, cfg: PrepareConfig, out: str) -> dict:
    """One volume the seed's way; returns seconds per stage (SEED_STAGES) and 'slices' written."""
    import cv2
    import nibabel as nib

    from lits.core import masks
    from lits.prepare.slicing import slice_rng

    seconds = dict.fromkeys(SEED_STAGES, 0.0)
    t = time.perf_counter()

    def lap(stage):
        nonlocal t
        now = time.perf_counter()
        seconds[stage] += now - t
        t = now

    image_file = nib.load(task.volume_uri)
    hu = image_file.get_fdata()  # the seed's read_nii: float64
    labels = nib.load(task.segmentation_uri).get_fdata()
    lap("read")
    # The seed sliced the last axis (axial in LiTS files); the phantoms' axial axis varies, so it is
    # looked up, and the slices are chosen by prepare's rule (inferior to superior): the same slices.
    codes = nib.aff2axcodes(image_file.affine)
    axial = [i for i, c in enumerate(codes) if c in "SI"][0]
    hu, labels = np.moveaxis(hu, axial, -1), np.moveaxis(labels, axial, -1)
    categories = labels.max(axis=(0, 1)).astype(np.int8)
    order = slice(None, None, -1) if codes[axial] == "I" else slice(None)
    chosen = masks.select_slices(categories[order], cfg.keep_liver, cfg.keep_empty, slice_rng(cfg.seed, task.volume_id))
    keep = np.nonzero(chosen[order])[0]
    lap("select")
    size = cfg.image_size
    for z in keep:
        x = hu[..., z].astype(np.float32)
        image = np.stack([_fastai_windowed(x, *WINDOW_LIVER), _fastai_windowed(x, *WINDOW_CUSTOM), _fastai_hist_scaled(x)], -1)
        image = (image * 255).astype(np.uint8)
        lap("windows")
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
        mask = cv2.resize(labels[..., z].astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
        lap("resize")
        cv2.imwrite(os.path.join(out, f"{task.volume_id}_slice_{z}.jpg"), image[..., ::-1])
        cv2.imwrite(os.path.join(out, f"{task.volume_id}_slice_{z}_mask.png"), mask)
        lap("save")
    return dict(seconds, slices=len(keep))


def seed_loop(tasks, cfg: PrepareConfig, out: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    t0 = time.perf_counter()
    per_volume = [seed_volume(task, cfg, out) for task in tasks]
    total = time.perf_counter() - t0
    stages = {s: sum(v[s] for v in per_volume) for s in SEED_STAGES}
    return {"total": total, "stages": stages, "work": sum(stages.values()), "slices": sum(v["slices"] for v in per_volume)}


# --- the project's runs ----------------------------------------------------------------------

def stage_sums(manifest: dict) -> dict:
    """Per-stage seconds summed over volumes, and their total (checked: stages sum to each total)."""
    for e in manifest["volumes"]:
        parts = sum(v for k, v in e["seconds"].items() if k != "total")
        assert abs(parts - e["seconds"]["total"]) < 1e-6 * max(1.0, parts) + 1e-9, e["seconds"]
    return {s: sum(e["seconds"].get(s, 0.0) for e in manifest["volumes"]) for s in STAGES + ("total",)}


def own_loop(cfg: PrepareConfig) -> dict:
    t0 = time.perf_counter()
    manifest = pipeline.prepare(cfg, pipeline.run_local)
    return {"total": time.perf_counter() - t0, "manifest": manifest}


def ray_command(data: str, output: str) -> dict:
    """`python workflows/prepare.py` in a subprocess: its wall time, and what its log and manifest say."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "workflows", "prepare.py"), "--input", data, "--output", output],
                          capture_output=True, text=True)
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"prepare.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")

    def logged(what):
        found = re.search(rf"Ray {what} in ([0-9.]+) s", proc.stderr)
        return float(found.group(1)) if found else float("nan")

    with open(os.path.join(output, "manifest.json")) as f:
        manifest = json.load(f)
    return {"total": total, "manifest": manifest, "ray_start": logged("ready"), "ray_stop": logged("stopped")}


def compare_shards(dir_a: str, manifest_a: dict, dir_b: str, manifest_b: dict) -> str:
    """How the two runs' shards compare: byte for byte, or (when only the bytes differ) as decoded
    tables. Exits with a message naming the shards when the runs wrote different data."""
    import pyarrow.parquet as pq

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


# --- probes ------------------------------------------------------------------------------------

def time_decode(paths, repeats: int = 3):
    """MB/s of decoded voxels, one thread, best of `repeats`, for each reader over the same files."""
    import nibabel as nib

    readers = {
        "lits.core.volumes.read_nifti (ISA-L, streamed)": lambda p: volumes.read_nifti(p)[0],
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
from lits.prepare import slicing
from lits.core.config import PrepareConfig

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
                  "voxel_bytes": result.entry["voxel_bytes"], "reserved": task.memory_bytes}))
"""


def memory_probe(task) -> dict:
    """Peak memory of slicing one volume, in a fresh process (after a warm-up on the same volume)."""
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, ROOT, json.dumps(task.to_dict())],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- tables ------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--volumes", type=int, default=60)
    p.add_argument("--slices", type=int, default=120)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--workdir", default=os.path.join(ROOT, "bench-output", "prepare"))
    p.add_argument("--decode-files", type=int, default=4, help="files timed per reader (0: no decode table)")
    args = p.parse_args()

    data = os.path.join(args.workdir, "volumes")
    generate(data, args.volumes, args.size, args.slices)
    cfg = PrepareConfig(input=data, output=os.path.join(args.workdir, "out-local"))
    tasks, _ = pipeline.check_headers(pipeline.discover(cfg)[0], cfg)

    seed = seed_loop(tasks, cfg, os.path.join(args.workdir, "out-seed"))
    own = own_loop(cfg)
    ray_out = os.path.join(args.workdir, "out-ray")
    distributed = ray_command(data, ray_out)
    same = compare_shards(cfg.output, own["manifest"], ray_out, distributed["manifest"])
    mem = memory_probe(max(tasks, key=lambda t: t.memory_bytes))

    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"\n### prepare: {args.volumes} volumes x {args.slices} slices of {args.size}x{args.size} int16, half .nii.gz "
          f"and half .nii ({args.volumes * args.slices} slices), {time.strftime('%Y-%m-%d')}, {machine}\n")
    print_runs(args.volumes * args.slices, seed, own, distributed)
    print(f"\n{sum(own['manifest']['totals']['kept'].values())} slices kept and written ({seed['slices']} by the seed "
          f"loop); {same} between the own loop and Ray.\n")
    print_time(seed, own, distributed)
    if args.decode_files:
        paths = sorted(os.path.join(data, f) for f in os.listdir(data) if f.startswith("volume-") and f.endswith(".gz"))
        print_decode(time_decode(paths[: args.decode_files]))
    print_memory(mem)


def print_runs(slices: int, seed: dict, own: dict, ray_run: dict) -> None:
    rows = [["seed-style loop (nibabel, per-slice fastai windows, JPEG/PNG per slice)", seed["total"]],
            ["own loop (pipeline.run_local, one process)", own["total"]],
            ["`python workflows/prepare.py` (Ray, whole command)", ray_run["total"]]]
    print(_markdown(["run", "seconds", "input slices/s", "vs seed loop", "vs own loop"], [
        [name, f"{s:.1f}", f"{slices / s:.0f}", f"{seed['total'] / s:.2f}x", f"{own['total'] / s:.2f}x"] for name, s in rows]))


def print_time(seed: dict, own: dict, ray_run: dict) -> None:
    """Where the time goes: the command's phases, then the per-volume work by stage (summed over volumes)."""
    m = ray_run["manifest"]
    line = m["timeline"]
    outside = ray_run["total"] - ray_run["ray_start"] - m["seconds"] - ray_run["ray_stop"]
    phases = [
        ["interpreter, imports, input checks, exit", outside],
        ["ray.init (local Ray: GCS, raylet, agents, 2 workers)", ray_run["ray_start"]],
        ["discovery and header checks", line["headers_checked"]],
        ["first volume done (worker imports, one volume)", line["first_volume_done"] - line["headers_checked"]],
        ["the other volumes", line["last_volume_done"] - line["first_volume_done"]],
        ["split, preview, commit", m["seconds"] - line["last_volume_done"]],
        ["ray.shutdown", ray_run["ray_stop"]],
        ["**total**", ray_run["total"]],
    ]
    print("### where the time goes: `python workflows/prepare.py`, seconds of wall time\n")
    print(_markdown(["phase", "seconds"], [[name, f"{s:.2f}"] for name, s in phases]))
    own_s, ray_s = stage_sums(own["manifest"]), stage_sums(m)
    volume_phase = line["last_volume_done"] - line["headers_checked"]
    own_phase = own["manifest"]["timeline"]["last_volume_done"] - own["manifest"]["timeline"]["headers_checked"]
    print("\n### where the time goes: per-volume work, seconds summed over the volumes\n")
    rows = [[f"{stage}", f"{own_s[stage]:.2f}", f"{ray_s[stage]:.2f}"] for stage in STAGES]
    rows += [["**total** (manifest: the stages sum to each volume's total)", f"{own_s['total']:.2f}", f"{ray_s['total']:.2f}"],
             ["CPUs busy (work / wall time from the first task to the last volume)",
              f"{own_s['total'] / own_phase:.2f}", f"{ray_s['total'] / volume_phase:.2f}"]]
    print(_markdown(["stage", "own loop", "Ray tasks"], rows))
    print("\nSeed-style loop, same volumes: " + ", ".join(f"{s} {v:.2f}" for s, v in seed["stages"].items())
          + f" (total {seed['work']:.2f} s).\n")


def print_decode(decode: dict) -> None:
    print("### .nii.gz decode, one thread (MB/s of decoded voxels)\n")
    sitk = decode.get("SimpleITK ReadImage")
    rows = [[name, f"{mbps:.0f}", f"{mbps / sitk:.2f}" if sitk else "-"] for name, mbps in decode.items()]
    print(_markdown(["reader", "MB/s", "vs SimpleITK"], rows) + "\n")


def print_memory(mem: dict) -> None:
    vol_mb = mem["voxel_bytes"] / 1e6
    rss_mb = (mem["rss_peak_kb"] - mem["rss_before_kb"]) / 1e3
    print("### memory of slicing the largest volume (fresh process, after a warm-up)\n")
    print(_markdown(["measure", "MB", "x one volume"], [
        ["one volume's voxels (int16)", f"{vol_mb:.0f}", "1.00"],
        ["peak traced allocations (tracemalloc)", f"{mem['traced_peak'] / 1e6:.0f}", f"{mem['traced_peak'] / 1e6 / vol_mb:.2f}"],
        ["peak RSS growth while slicing (sampled every ms)", f"{rss_mb:.0f}", f"{rss_mb / vol_mb:.2f}"],
        ["Ray memory= its task reserves (from its headers, worker included)", f"{mem['reserved'] / 1e6:.0f}", "-"],
    ]))


def _markdown(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
