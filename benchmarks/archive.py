#!/usr/bin/env python
"""An archive-scale rehearsal of a bulk job on this machine (issue 20, item 6).

    python benchmarks/archive.py [--volumes 1000] [--fast-volumes 200] [--ray-cpus 18] [--fast-only]

Many tiny volumes (size x size x slices phantoms, lits.core.synthetic) in the embedded S3 server
(moto on 127.0.0.1, as the tests run it); Ray started with --ray-cpus logical CPUs, so a job's
CPU concurrency (16 volumes) far exceeds what one model replica absorbs; two jobs through the
product (`serving.deploy` + `jobs.submit_job`):

- slow: a wide U-Net (width 32, depth 4 at --image-size) whose forward passes cost >= 10x a
  volume's CPU work. Volumes done and failed, chunks resent, and the model's busy fraction:
  volumes x model seconds per volume / replicas / the job's wall time (the model's seconds per
  volume measured in this process first, one thread as the replica has, in full batches);
- fast: a width-4 U-Net at 32, run twice on the same Ray (the second on warm workers): the wall per
  volume beyond the model's own seconds per volume, and where the CPU goes, by process (`CpuLedger`:
  volume tasks, the replica, the job's actor, Ray's own, this process's S3 server); the machinery's
  CPU per volume is all of it but the volume tasks' and this process's, less the model's seconds.

During the slow job: job status latency (p50, p95; jobs.get_job every 0.5 s), the job actor's
peak RSS (VmHWM of the `ray::JobRunner` process), and the bytes the job wrote under its jobs
state (its summary rewrites and record; counted by the S3 server). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import platform
import socket
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_server(written: dict) -> str:
    """moto's S3 app on 127.0.0.1 behind a counter of the bytes PUT/POSTed under a _jobs-state key."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    app = DomainDispatcherApplication(create_backend_app)

    def counting(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if environ["REQUEST_METHOD"] in ("PUT", "POST") and ("/state/" in path or "/_jobs/" in path):
            written["bytes"] += int(environ.get("CONTENT_LENGTH") or 0)
            written["writes"] += 1
        return app(environ, start_response)

    port = free_port()
    server = make_server("127.0.0.1", port, counting, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{port}"


def save_unet(folder: str, width: int, depth: int, image_size: int) -> str:
    import torch

    from lits.model import inference
    from lits.model.unet import UNet

    torch.manual_seed(0)
    arch = {"name": "UNet", "in_channels": 3, "out_channels": 3, "base_width": width, "depth": depth}
    inference.save_model(folder, UNet(3, 3, base_width=width, depth=depth).state_dict(),
                         inference.model_config(arch, "liver-tumour", image_size, 0))
    return folder


def model_s_per_volume(model: str, batch: int, slices: int, size: int, repeats: int = 3) -> float:
    """Seconds of forward pass + labels per volume of `slices`, in full batches, on one thread."""
    import numpy as np
    import torch

    from lits.model import inference

    torch.set_num_threads(1)
    spec, weights = inference.load_spec(model)
    predictor = inference.Predictor(spec, weights, max_batch=batch)
    images = np.random.default_rng(0).integers(0, 255, (batch, spec.image_size, spec.image_size, 3), np.uint8)
    predictor.labels([images], [(size, size)])
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        predictor.labels([images], [(size, size)])
        best = min(best, time.perf_counter() - started)
    return best / batch * slices


def job_actor_hwm_mb() -> float:
    """The largest VmHWM (peak RSS) of a live ray::JobRunner process of this benchmark's Ray, MB (0 if
    none; another run's job actors on a shared machine are not this one's)."""
    peak = 0.0
    for pid in process_tree(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"JobRunner" not in f.read(200):
                    continue
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) / 1024)
        except OSError:
            continue
    return peak


BENCHMARK = "benchmark (S3 server, status polls)"  # this process's group in the CPU table


def _process_group(pid: int) -> str:
    """What a process of this benchmark's Ray is, from its title: 'ray::JobRunner', 'ray::ServeReplica',
    'ray::segment_volume_task', 'raylet', ... ('' if it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read(2000).decode(errors="replace").split("\0")
    except OSError:
        return ""
    if args[0].startswith("ray::"):
        return "ray::" + args[0][5:].replace(":", ".").split(".")[0].split(" ")[0]
    scripts = [os.path.basename(a) for a in args[1:] if a.endswith(".py")]
    return "ray worker (starting)" if "default_worker.py" in scripts else (scripts or [os.path.basename(args[0])])[0]


def process_tree(pid: int) -> list:
    """`pid` and all its descendants (this process's Ray: GCS, raylet, workers, Serve), from each
    thread's /proc/PID/task/TID/children."""
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        for listing in glob.glob(f"/proc/{tree[-1]}/task/*/children"):
            try:
                with open(listing) as f:
                    todo.extend(int(child) for child in f.read().split())
            except (OSError, ValueError):
                continue
    return tree


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds `pid` has used (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


class CpuLedger:
    """CPU seconds by kind of process over a job: each process's seconds at the start and at its last
    sample, attributed to the busiest title it showed (a Ray worker is 'ray::IDLE' between tasks).
    This process itself is 'benchmark (S3 server, status polls)': moto serves in its threads."""

    def __init__(self):
        self.start = {pid: cpu_seconds(pid) for pid in process_tree(os.getpid())}
        self.last, self.titles = dict(self.start), {}

    def sample(self) -> None:
        for pid in process_tree(os.getpid()):
            self.last[pid] = cpu_seconds(pid)
            title, titles = _process_group(pid), self.titles.setdefault(pid, set())
            if title and title != "ray::IDLE":
                titles.add(title)

    def by_group(self) -> dict:
        self.sample()
        groups = {}
        for pid, seconds in self.last.items():
            titles = sorted(self.titles.get(pid) or {"ray::IDLE"})
            group = BENCHMARK if pid == os.getpid() else "+".join(titles)
            groups[group] = groups.get(group, 0.0) + seconds - self.start.get(pid, 0.0)
        return dict(sorted(groups.items(), key=lambda kv: -kv[1]))


def cpu_side_s(fs, output: str, sample: int = 100) -> float:
    """Median seconds of a volume task's own work (its report's total less its waits on the model)
    over `sample` volume reports under `output`."""
    import json
    import statistics

    reports = sorted(k for k in fs.ls(output) if k.endswith(".json"))[:sample]
    seconds = [json.loads(fs.cat(k))["seconds"] for k in reports]
    return statistics.median(s["total"] - s.get("predict_wait_s", 0.0) for s in seconds) if seconds else float("nan")


def run_job(app: str, uri: str, output: str, cfg, concurrency: int, cpus_per_volume: float) -> dict:
    """Submit and follow one job: its final status, status latencies, the actor's peak RSS."""
    from lits.serve import jobs
    from lits.serve.job_spec import JobSpec

    job_id = jobs.submit_job(JobSpec(input=uri, output=output, app_name=app, chunk=cfg.chunk, wait_s=cfg.model_wait_s,
                                     concurrency=concurrency, cpus_per_volume=cpus_per_volume,
                                     jobs_state=cfg.jobs_state))
    latencies, rss, ledger = [], 0.0, CpuLedger()
    job = jobs.get_job(job_id, cfg.jobs_state)
    while job["state"] in ("queued", "running"):
        time.sleep(0.5)
        rss = max(rss, job_actor_hwm_mb())
        ledger.sample()
        started = time.perf_counter()
        job = jobs.get_job(job_id, cfg.jobs_state)
        latencies.append(time.perf_counter() - started)
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")  # noqa: E731
    return {"job": job, "p50": pick(0.5), "p95": pick(0.95), "rss_mb": rss, "cpu": ledger.by_group()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--volumes", type=int, default=1000)
    p.add_argument("--fast-volumes", type=int, default=200)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--slices", type=int, default=8)
    p.add_argument("--image-size", type=int, default=96, help="the slow model's input size")
    p.add_argument("--ray-cpus", type=int, default=18)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--volumes-per-replica", type=int, default=3)
    p.add_argument("--fast-only", action="store_true", help="only the fast job (the machinery's cost and its CPU "
                   "by process); --volumes then only sizes the archive")
    args = p.parse_args(argv)

    import ray
    from ray import serve

    from lits.core import storage
    from lits.core.config import ServeConfig, SynthConfig
    from lits.core.synthetic import synthesize
    from lits.serve import serving

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")  # the embedded server's; never a real key
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    written = {"bytes": 0, "writes": 0}
    endpoint = s3_server(written)
    storage.use_endpoint(endpoint)
    work = tempfile.mkdtemp(prefix="lits-archive-")
    started = time.perf_counter()
    synthesize(SynthConfig(output=os.path.join(work, "ct"), volumes=args.volumes, size=args.size,
                           slices=args.slices, seed=20))
    for f in glob.glob(os.path.join(work, "ct", "segmentation-*")):
        os.remove(f)
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    fs.mkdir("archive")
    fs.put(os.path.join(work, "ct") + "/", "archive/ct/", recursive=True)
    for f in sorted(glob.glob(os.path.join(work, "ct", "volume-*")))[:args.fast_volumes]:
        fs.put(f, "archive/fast/" + os.path.basename(f))
    print(f"{args.volumes} volumes of {args.size}x{args.size}x{args.slices} in S3 in "
          f"{time.perf_counter() - started:.0f} s", flush=True)

    slow = save_unet(os.path.join(work, "slow"), 32, 4, args.image_size)
    fast = save_unet(os.path.join(work, "fast-model"), 4, 3, 32)
    common = dict(replicas=1, cpus_per_replica=1, chunk=8, max_batch_size=16, batch_wait_s=0.01,
                  volume_cpus=args.ray_cpus - 2, jobs_state="s3://archive/state/",
                  volumes_per_replica=args.volumes_per_replica)
    model_s = {name: model_s_per_volume(m, 16, args.slices, args.size) for name, m in (("slow", slow), ("fast", fast))}
    env = storage.endpoint_env()
    hidden = {k: os.environ.pop(k) for k in storage.ENDPOINT_VARS if k in os.environ}
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    os.environ.update(hidden)
    runs = {}
    try:
        # The fast job twice on the same Ray: the first starts the volume workers (each imports torch,
        # OpenCV, s3fs), the second finds them warm, as a long job's volumes after its first do.
        todo = (("fast", fast, "s3://archive/fast"), ("fast, warm", fast, "s3://archive/fast"),
                ("slow", slow, "s3://archive/ct"))
        for name, model, uri in todo[:2] if args.fast_only else todo:
            cfg = ServeConfig(model=model, **common)
            app = "archive-" + name.split(",")[0]
            serving.deploy(cfg, http=False, app_name=app)
            before = dict(written)
            output = "s3://archive/seg-" + name.replace(", ", "-")
            runs[name] = run_job(app, uri, output, cfg, args.concurrency, 1.0)
            runs[name]["state_bytes"] = written["bytes"] - before["bytes"]
            runs[name]["state_writes"] = written["writes"] - before["writes"]
            runs[name]["cpu_side_s"] = cpu_side_s(fs, output[len("s3://"):])
            serving.undeploy(app)
            print(name, {k: v for k, v in runs[name]["job"].items() if k not in ("failed",)}, flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    print_table(args, runs, model_s)
    return 0


def machinery_ms(cpu: dict, done: int, model_s: float) -> float:
    """The job machinery's CPU milliseconds per volume: every process but this benchmark's (its S3
    server stands in for a store elsewhere) and the volume tasks' (the volume's own reading, decoding,
    encoding and writing), less the model's own seconds (`model_s` a volume, in the replica)."""
    rest = sum(v for g, v in cpu.items() if g != BENCHMARK and "segment_volume_task" not in g)
    return (rest - model_s * done) * 1000 / max(1, done)


def print_cpu_table(runs: dict, model_s: dict) -> None:
    """CPU milliseconds per volume done, by kind of process, for each job."""
    names = list(runs)
    done = {n: max(1, runs[n]["job"]["counts"]["done"]) for n in names}
    groups = list(dict.fromkeys(g for n in names for g in runs[n]["cpu"]))
    print("\n| CPU per volume done, by process | " + " | ".join(f"{n} job" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for g in groups:
        print(f"| {g} | " + " | ".join(f"{runs[n]['cpu'].get(g, 0.0) * 1000 / done[n]:.1f} ms" for n in names) + " |")
    print("| **all** | " + " | ".join(f"{sum(runs[n]['cpu'].values()) * 1000 / done[n]:.1f} ms" for n in names) + " |")
    print("| **the machinery** (all but the volume tasks and this process, less the model's own seconds) | " +
          " | ".join(f"{machinery_ms(runs[n]['cpu'], done[n], model_s[n.split(',')[0]]):.1f} ms" for n in names) + " |")


def print_table(args, runs: dict, model_s: dict) -> None:
    print_cpu_table(runs, model_s)
    for name in ("fast", "fast, warm"):
        fj = runs[name]["job"]
        per_volume = fj["elapsed_s"] / max(1, fj["counts"]["done"])
        print(f"{name} job: {fj['counts']['done']} done, {fj['counts']['failed']} failed, {per_volume * 1000:.0f} ms wall "
              f"per volume, {(per_volume - model_s['fast']) * 1000:.0f} ms beyond the model "
              f"({model_s['fast'] * 1000:.0f} ms per volume); a volume task's own work {runs[name]['cpu_side_s'] * 1000:.0f} ms")
    if "slow" not in runs:
        return
    slow, fast = runs["slow"], runs["fast"]
    sj, fj = slow["job"], fast["job"]
    busy = sj["counts"]["done"] * model_s["slow"] / max(sj["elapsed_s"], 1e-9)
    fast_per_volume = fj["elapsed_s"] / max(1, fj["counts"]["done"])
    beyond = fast_per_volume - model_s["fast"]
    cpu_side = slow["cpu_side_s"]
    print(f"\n{platform.node()}, {os.cpu_count()} cores, Ray with {args.ray_cpus} logical CPUs, one model replica "
          f"(1 CPU), {args.volumes_per_replica} volumes per replica, job concurrency {args.concurrency}\n")
    print("| measure | value | goal |")
    print("|---|---|---|")
    print(f"| slow job: volumes done / failed / chunks resent | {sj['counts']['done']} / {sj['counts']['failed']} / "
          f"{sj['chunks_resent']} (of {args.volumes}, state {sj['state']}) | all / 0 / 0 |")
    print(f"| slow model: seconds per volume (1 replica) vs a volume task's own work (median) | "
          f"{model_s['slow']:.3f} s vs {cpu_side * 1000:.0f} ms: {model_s['slow'] / max(cpu_side, 1e-3):.0f}x | >= 10x |")
    print(f"| slow job: wall time, model busy fraction | {sj['elapsed_s']:.0f} s, {busy:.2f} | >= 0.9 |")
    print(f"| fast job ({fj['counts']['done']} volumes, model {model_s['fast'] * 1000:.0f} ms per volume): "
          f"machinery per volume beyond the model | {beyond * 1000:.0f} ms (wall {fast_per_volume * 1000:.0f} ms "
          f"per volume) | <= 50 ms |")
    print(f"| job state written (summaries + record), slow job | {slow['state_bytes'] / 1e3:.0f} kB in "
          f"{slow['state_writes']} writes | bounded |")
    print(f"| job status latency during the slow job, p50 / p95 | {slow['p50'] * 1000:.0f} / {slow['p95'] * 1000:.0f} ms "
          f"| |")
    print(f"| job actor peak RSS (slow / fast job) | {slow['rss_mb']:.0f} / {fast['rss_mb']:.0f} MB | bounded |")


if __name__ == "__main__":
    raise SystemExit(main())
