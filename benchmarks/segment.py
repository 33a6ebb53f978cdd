#!/usr/bin/env python
"""Bulk segmentation throughput and /v1/segment latency on this machine's CPUs.

    python benchmarks/segment.py [--volumes 6 --size 512 --slices 100] [--image-size 128 --base-width 16]

Three ways over the same volumes and the same model (random weights: speed does not depend on them):
- model only: the forward passes alone over the volumes' preprocessed slices, in memory, all
  threads (the floor: what the model costs);
- loop: one process, volume after volume: read, preprocess, predict, resize back, post-process,
  write (what a user's script does);
- bulk job: the product (Ray tasks + the Serve model deployment), measured from submission to
  the job's end (Ray and Serve start-up reported apart).
Then the latency of one POST /v1/segment of a size x size x slices volume (median of 3).
Prints markdown tables (paste them into README).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lits import inference, jobs, storage, volumes  # noqa: E402
from lits.config import ServeConfig, SynthConfig  # noqa: E402
from lits.model import UNet  # noqa: E402
from lits.synthetic import synthesize  # noqa: E402


def _markdown(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def make_model(folder: str, image_size: int, width: int, depth: int) -> str:
    torch.manual_seed(0)
    model = UNet(3, 3, width, depth)
    arch = {"name": "UNet", "in_channels": 3, "out_channels": 3, "base_width": width, "depth": depth}
    inference.save_model(folder, model.state_dict(), inference.model_config(arch, "liver-tumour", image_size, 0))
    return folder


def model_only(paths, spec, weights) -> float:
    torch.set_num_threads(os.cpu_count() or 1)
    predictor = inference.Predictor(spec, weights, device="cpu")
    inputs = []
    for p in paths:
        hu_file, geometry = volumes.read_nifti(p)
        hu = geometry.to_canonical(hu_file)
        from lits import ct

        inputs.append(inference.preprocess(hu, spec, slice(0, len(hu)), ct.freqhist_breaks(hu)))
    predictor(inputs[0][:8])  # warm-up
    t0 = time.perf_counter()
    for images in inputs:
        predictor(images)
    return time.perf_counter() - t0


def loop(paths, out, spec, weights) -> float:
    torch.set_num_threads(os.cpu_count() or 1)
    predictor = inference.Predictor(spec, weights, device="cpu")
    predictor(np.zeros((1, spec.image_size, spec.image_size, 3), np.uint8))
    t0 = time.perf_counter()
    for p in paths:
        name = os.path.basename(p)[: -len(".nii.gz")]
        uris = jobs.output_uris(out, name)
        inference.segment_uri(p, uris, spec, lambda x: inference.Done(predictor(x)))
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--volumes", type=int, default=6)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--slices", type=int, default=100)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--base-width", type=int, default=16)
    p.add_argument("--depth", type=int, default=5)
    p.add_argument("--cpus-per-replica", type=int, default=1)
    p.add_argument("--cpus-per-volume", type=float, default=1.0)
    p.add_argument("--model", default=None, help="an exported model (default: random weights of --base-width/--depth)")
    p.add_argument("--concurrency", type=int, default=None, help="volumes in flight (default: CPUs - replica CPUs)")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()

    work = args.workdir or tempfile.mkdtemp(prefix="bench-segment-")
    data = os.path.join(work, "volumes")
    if not os.path.isdir(data):
        print(f"synthesising {args.volumes} volumes of {args.size}x{args.size}x{args.slices} in {data}", file=sys.stderr)
        synthesize(SynthConfig(output=data, volumes=args.volumes, size=args.size, slices=args.slices))
    paths = sorted(os.path.join(data, f) for f in os.listdir(data) if f.startswith("volume-"))[: args.volumes]
    slices = sum(volumes.read_nifti(p)[1].canonical_shape[0] for p in paths)
    model_dir = args.model or make_model(os.path.join(work, "model"), args.image_size, args.base_width, args.depth)
    spec, weights = inference.load_spec(model_dir)

    t_model = model_only(paths, spec, weights)
    t_loop = loop(paths, os.path.join(work, "loop-out"), spec, weights)

    import ray
    from ray import serve

    from lits import serving

    cpus = os.cpu_count() or 1
    t = time.perf_counter()
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    cfg = ServeConfig(model=model_dir, port=8765, cpus_per_replica=args.cpus_per_replica, allow_prefixes=(work,),
                      cpus_per_volume=args.cpus_per_volume)
    serving.deploy(cfg)
    t_start = time.perf_counter() - t
    concurrency = args.concurrency or max(1, int((cpus - args.cpus_per_replica) / args.cpus_per_volume))
    # one warm-up job on one volume (worker processes import torch once)
    warm = jobs.submit_job({"input": paths[0], "output": os.path.join(work, "warm"), "overwrite": True},
                           serving.APP_NAME, cfg.chunk, concurrency, None, cfg.cpus_per_volume)
    while jobs.get_job(warm)["state"] == "running" or jobs.get_job(warm)["state"] == "queued":
        time.sleep(0.2)
    t = time.perf_counter()
    job_id = jobs.submit_job({"input": data, "output": os.path.join(work, "job-out"), "overwrite": True},
                             serving.APP_NAME, cfg.chunk, concurrency, None, cfg.cpus_per_volume)
    while (job := jobs.get_job(job_id))["state"] not in jobs.FINAL_STATES:
        time.sleep(0.1)
    t_job = time.perf_counter() - t
    assert job["state"] == "succeeded" and job["counts"]["done"] == len(paths), job

    latencies = []
    body = open(paths[0], "rb").read()
    shape = volumes.read_nifti(paths[0])[1].shape
    for _ in range(3):
        t = time.perf_counter()
        request = urllib.request.Request(f"http://127.0.0.1:{cfg.port}/v1/segment?name=v.nii.gz", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=600) as r:
            assert r.status == 200
            json.loads(r.headers["X-LiTS-Report"])
            r.read()
        latencies.append(time.perf_counter() - t)
    serve.shutdown()
    ray.shutdown()

    print(f"\nmachine: {platform.machine()}, {cpus} CPUs, torch {torch.__version__}, ray {ray.__version__}; "
          f"{len(paths)} volumes of {args.size}x{args.size}x{args.slices} ({slices} slices), U-Net width "
          f"{spec.base_width} depth {spec.depth} at {spec.image_size}^2 ({'model ' + args.model if args.model else 'random weights'}), "
          f"replica {args.cpus_per_replica} CPU, {concurrency} volume(s) in flight at {args.cpus_per_volume} CPU each\n")
    rows = [
        ["model only (forward passes, in memory)", f"{t_model:.1f}", f"{slices / t_model:.1f}", "1.00"],
        ["loop (read, preprocess, predict, post-process, write)", f"{t_loop:.1f}", f"{slices / t_loop:.1f}", f"{t_loop / t_model:.2f}"],
        ["bulk job (Ray tasks + Serve deployment)", f"{t_job:.1f}", f"{slices / t_job:.1f}", f"{t_job / t_model:.2f}"],
    ]
    print(_markdown(["way", "seconds", "slices/s", "time vs model only"], rows))
    print(f"\nRay + Serve start-up (not in the job's time): {t_start:.1f} s")
    print(f"\nPOST /v1/segment of one {shape[0]}x{shape[1]}x{shape[2]} volume ({len(body) / 1e6:.1f} MB .nii.gz): "
          f"median {statistics.median(latencies):.2f} s (of {', '.join(f'{x:.2f}' for x in latencies)})")
    storage.delete(os.path.join(work, "warm"))


if __name__ == "__main__":
    main()
