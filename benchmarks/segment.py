#!/usr/bin/env python
"""A scan's CPU work per stage, bulk segmentation throughput and /v1/segment latency on this machine's CPUs.

    python benchmarks/segment.py [--stage-slices 500] [--volumes 4 --size 512 --slices 100]
                                 [--image-size 128 --base-width 16 | --model MODEL] [--skip-bulk]

First, one size x size x stage-slices synthetic scan (lits.core.synthetic) through a volume task's
work (`inference.segment_uri`: read, histogram, preprocess, labels stored, post-process, report,
encode, preview, write) with the model excluded: its answers are computed before the clock starts
from the scan's synthetic ground truth (one-hot probabilities area-resized to the model's size
and blurred by 1 px, i.e. a good model's soft answer: a liver with tumours, so post-processing
costs what it costs on a real prediction, where an untrained model's speckle would not), turned
into labels by the replica's own function. Per-stage seconds with 1 and 2 threads, and what the
replica's labels cost (probabilities resized and argmaxed: cv2 on a CPU replica, torch on a GPU).

Then three ways over the same volumes and the same model (random weights unless --model: the
forward passes' speed does not depend on them):
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

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from lits.core import ct, naming, storage, volumes
from lits.model import inference
from lits.serve import jobs  # noqa: E402
from lits.serve.job_spec import JobSpec  # noqa: E402
from lits.core import postprocess as post  # noqa: E402
from lits.model import streaming  # noqa: E402
from lits.core.config import ServeConfig, SynthConfig  # noqa: E402
from lits.model.unet import UNet  # noqa: E402
from lits.core.synthetic import synthesize  # noqa: E402


def _markdown(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def make_model(folder: str, image_size: int, width: int, depth: int) -> str:
    torch.manual_seed(0)
    model = UNet(3, 3, width, depth)
    arch = {"name": "UNet", "in_channels": 3, "out_channels": 3, "base_width": width, "depth": depth}
    inference.save_model(folder, model.state_dict(), inference.model_config(arch, "liver-tumour", image_size, 0))
    return folder


def model_only(paths, spec, weights, threads: int) -> float:
    torch.set_num_threads(threads)
    predictor = inference.Predictor(spec, weights, device="cpu")
    inputs = []
    for p in paths:
        hu_file, geometry = volumes.read_nifti(p)
        hu = geometry.to_canonical(hu_file)
        inputs.append(streaming.preprocess(hu, spec, slice(0, len(hu)), ct.freqhist_breaks(hu)))
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
        uris = naming.output_uris(out, name)
        inference.segment_uri(p, uris, spec, inference.LocalModel(predictor))
    return time.perf_counter() - t0


class Answers:
    """The model's part done before the clock starts: each chunk's (labels, coarse labels), as a
    replica answers them (`answers_labels`)."""

    answers_labels = True

    def __init__(self, answers):
        self.answers = answers
        self.k = 0

    def __call__(self, images, shape):
        answer = self.answers[self.k]
        self.k += 1
        return inference.Done(answer)


def reference_probs(seg_path: str, size: int) -> np.ndarray:
    """uint8 (Z, S, S, 3): the scan's ground truth as a good model's soft probabilities."""
    seg, geometry = volumes.read_nifti(seg_path)
    ref = geometry.to_canonical(volumes.as_labels(seg, seg_path))
    probs = np.empty((len(ref), size, size, 3), np.uint8)
    for z in range(len(ref)):
        one_hot = np.stack([np.where(ref[z] == c, 255, 0).astype(np.uint8) for c in range(3)], -1)
        probs[z] = cv2.GaussianBlur(ct.resize_image(one_hot, size), (5, 5), 1.0)
    return probs


def replica_labels(probs: np.ndarray, shape, chunk: int, how: str):
    """(seconds, answers): chunk after chunk, probabilities to labels as a replica does them."""
    t = time.perf_counter()
    if how == "cv2":
        answers = [(post.probs_to_labels(probs[s:s + chunk], shape, "liver-tumour"), post.argmax3(probs[s:s + chunk]))
                   for s in range(0, len(probs), chunk)]
    else:
        answers = []
        for s in range(0, len(probs), chunk):
            q = torch.from_numpy(probs[s:s + chunk]).permute(0, 3, 1, 2).float()
            up = torch.nn.functional.interpolate(q, size=shape, mode="bilinear", align_corners=False)
            answers.append((up.argmax(1).byte().numpy(), q.argmax(1).byte().numpy()))
    return time.perf_counter() - t, answers


def stages(args, work: str, spec) -> None:
    """Table 1 and 2: one scan's per-stage seconds (model excluded) and the replica's labels cost."""
    folder = os.path.join(work, f"scan-{args.size}x{args.stage_slices}")
    if not os.path.isdir(folder):
        print(f"synthesising one {args.size}x{args.size}x{args.stage_slices} scan in {folder}", file=sys.stderr)
        synthesize(SynthConfig(output=folder, volumes=1, size=args.size, slices=args.stage_slices))
    scan = os.path.join(folder, "volume-0.nii.gz")
    geometry = volumes.read_header(scan).geometry
    probs = reference_probs(os.path.join(folder, "segmentation-0.nii.gz"), spec.image_size)
    shape = geometry.canonical_shape[1:]
    cv2_s, answers = replica_labels(probs, shape, 16, "cv2")
    torch_s, torch_answers = replica_labels(probs, shape, 16, "torch")
    a, b = np.concatenate([x[0] for x in answers]), np.concatenate([x[0] for x in torch_answers])
    dice = {c: 2 * np.sum((a >= c) & (b >= c)) / max(1, np.sum(a >= c) + np.sum(b >= c)) for c in (1, 2)}
    columns, masks = {}, {}
    for threads in (1, 2):
        cv2.setNumThreads(threads)
        out = os.path.join(work, f"stages-{threads}")
        uris = naming.output_uris(out, "volume-0")
        best = None
        for run in range(max(1, args.repeats) + 1):  # the fastest run after a warm-up one (the box is shared)
            t = time.perf_counter()
            report = inference.segment_uri(scan, uris, spec, Answers(answers), chunk=16, threads=threads)
            wall = time.perf_counter() - t
            if run and (best is None or wall < best["wall"]):
                best = {**report["seconds"], "wall": wall}
        columns[threads] = best
        masks[threads] = np.asarray(volumes.read_nifti(uris["mask"])[0])
    keys = [k for k in columns[1] if k not in ("total", "wall", "segment_s")]
    rows = [[k, f"{columns[1][k]:.3f}", f"{columns[2][k]:.3f}"] for k in keys]
    rows.append(["**wall, model excluded**", f"**{columns[1]['wall']:.2f}**", f"**{columns[2]['wall']:.2f}**"])
    print(f"\n### One {args.size}x{args.size}x{args.stage_slices} scan, model at {spec.image_size}^2 excluded "
          f"(answers from the synthetic ground truth), seconds per stage\n")
    print(_markdown(["stage", "1 thread", "2 threads"], rows))
    print(f"\nmasks of the 1- and 2-thread runs identical: {np.array_equal(masks[1], masks[2])}; "
          f"report: liver {report['liver_volume_ml']} mL, tumour {report['tumour_volume_ml']} mL, "
          f"{report['lesion_count']} lesion(s)")
    print(f"\n### The replica's part on this machine's CPU, {args.stage_slices} slices: probabilities "
          f"({spec.image_size}^2) to labels ({shape[0]}x{shape[1]})\n")
    print(_markdown(["how", "seconds", "liver Dice vs cv2", "tumour Dice vs cv2"],
                    [["cv2 uint8 bilinear + argmax3 (a CPU replica: the values volume tasks computed before, np.argmax then)", f"{cv2_s:.2f}", "1", "1"],
                     ["torch float bilinear + argmax (a GPU replica's code, here on CPU)", f"{torch_s:.2f}",
                      f"{dice[1]:.5f}", f"{dice[2]:.5f}"]]))


def bulk(args, work: str, model_dir: str, spec, weights) -> None:
    """Table 3: model only vs loop vs bulk job over the same volumes; then /v1/segment latency."""
    data = os.path.join(work, "volumes")
    if not os.path.isdir(data):
        print(f"synthesising {args.volumes} volumes of {args.size}x{args.size}x{args.slices} in {data}", file=sys.stderr)
        synthesize(SynthConfig(output=data, volumes=args.volumes, size=args.size, slices=args.slices))
    paths = sorted(os.path.join(data, f) for f in os.listdir(data) if f.startswith("volume-"))[: args.volumes]
    slices = sum(volumes.read_nifti(p)[1].canonical_shape[0] for p in paths)
    t_model = model_only(paths, spec, weights, os.cpu_count() or 1)
    t_model_1 = model_only(paths, spec, weights, args.cpus_per_replica)
    t_loop = loop(paths, os.path.join(work, "loop-out"), spec, weights)

    import ray
    from ray import serve

    from lits.serve import serving

    cpus = args.ray_cpus or os.cpu_count() or 1
    t = time.perf_counter()
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    cfg = ServeConfig(model=model_dir, port=8765, cpus_per_replica=args.cpus_per_replica, allow_prefixes=(work,),
                      cpus_per_volume=args.cpus_per_volume)
    serving.deploy(cfg)
    t_start = time.perf_counter() - t
    concurrency = args.concurrency or max(1, int((cpus - args.cpus_per_replica) / args.cpus_per_volume))
    # one warm-up job on one volume (worker processes import torch once)
    warm = jobs.submit_job(JobSpec(input=paths[0], output=os.path.join(work, "warm"), app_name=serving.APP_NAME,
                                   overwrite=True, chunk=cfg.chunk, concurrency=concurrency,
                                   cpus_per_volume=cfg.cpus_per_volume))
    while jobs.get_job(warm)["state"] in ("running", "queued"):
        time.sleep(0.2)
    t = time.perf_counter()
    job_id = jobs.submit_job(JobSpec(input=data, output=os.path.join(work, "job-out"), app_name=serving.APP_NAME,
                                     overwrite=True, chunk=cfg.chunk, concurrency=concurrency,
                                     cpus_per_volume=cfg.cpus_per_volume))
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
    # The box is shared and drifts: the model-only floors are measured again after the job, the
    # faster of the two kept (both printed).
    again = model_only(paths, spec, weights, os.cpu_count() or 1), model_only(paths, spec, weights, args.cpus_per_replica)
    print(f"\nmodel only before / after the job: {os.cpu_count()} threads {t_model:.1f} / {again[0]:.1f} s, "
          f"{args.cpus_per_replica} thread(s) {t_model_1:.1f} / {again[1]:.1f} s")
    t_model, t_model_1 = min(t_model, again[0]), min(t_model_1, again[1])

    print(f"\n### Bulk job: {len(paths)} volumes of {args.size}x{args.size}x{args.slices} ({slices} slices), replica "
          f"{args.cpus_per_replica} CPU, {concurrency} volume(s) in flight at {args.cpus_per_volume} CPU each, Ray "
          f"given {cpus} CPUs\n")
    rows = [
        [f"model only (forward passes, in memory, {os.cpu_count()} threads)", f"{t_model:.1f}", f"{slices / t_model:.1f}", "1.00"],
        [f"model only, {args.cpus_per_replica} thread(s) (a replica's torch threads)", f"{t_model_1:.1f}",
         f"{slices / t_model_1:.1f}", f"{t_model_1 / t_model:.2f}"],
        ["loop (read, preprocess, predict, post-process, write)", f"{t_loop:.1f}", f"{slices / t_loop:.1f}", f"{t_loop / t_model:.2f}"],
        ["bulk job (Ray tasks + Serve deployment)", f"{t_job:.1f}", f"{slices / t_job:.1f}", f"**{t_job / t_model:.2f}**"],
    ]
    print(_markdown(["way", "seconds", "slices/s", "time vs model only"], rows))
    print(f"\nRay + Serve start-up (not in the job's time): {t_start:.1f} s")
    print(f"\nPOST /v1/segment of one {shape[0]}x{shape[1]}x{shape[2]} volume ({len(body) / 1e6:.1f} MB .nii.gz): "
          f"median {statistics.median(latencies):.2f} s (of {', '.join(f'{x:.2f}' for x in latencies)})")
    storage.delete(os.path.join(work, "warm"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--stage-slices", type=int, default=500, help="slices of the scan measured stage by stage")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per stage column, after a warm-up (the fastest is printed)")
    p.add_argument("--volumes", type=int, default=4)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--slices", type=int, default=100)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--base-width", type=int, default=16)
    p.add_argument("--depth", type=int, default=5)
    p.add_argument("--cpus-per-replica", type=int, default=1)
    p.add_argument("--cpus-per-volume", type=float, default=1.0)
    p.add_argument("--model", default=None, help="an exported model (default: random weights of --base-width/--depth)")
    p.add_argument("--concurrency", type=int, default=None, help="volumes in flight (default: CPUs - replica CPUs)")
    p.add_argument("--ray-cpus", type=int, default=None,
                   help="logical CPUs Ray may hand out (default: the machine's); e.g. 3 on 2 cores lets a 2-CPU "
                        "replica use both cores beside a 1-CPU volume pool whose tasks mostly wait on the model")
    p.add_argument("--skip-stages", action="store_true")
    p.add_argument("--skip-bulk", action="store_true")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()

    work = args.workdir or tempfile.mkdtemp(prefix="bench-segment-")
    model_dir = args.model or make_model(os.path.join(work, "model"), args.image_size, args.base_width, args.depth)
    spec, weights = inference.load_spec(model_dir)
    import ray

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, ray {ray.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; U-Net width {spec.base_width} depth {spec.depth} at "
          f"{spec.image_size}^2 ({'model ' + args.model if args.model else 'random weights'}, mirroring {spec.mirror})")
    if not args.skip_stages:
        stages(args, work, spec)
    if not args.skip_bulk:
        bulk(args, work, model_dir, spec, weights)


if __name__ == "__main__":
    main()
