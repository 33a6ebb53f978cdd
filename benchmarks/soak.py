#!/usr/bin/env python
"""Memory of a running server under use: uploads and bulk jobs against workflows/serve.py on 127.0.0.1.

    python benchmarks/soak.py [--uploads 100 --jobs 20] [--size 64 --slices 24] [--timeout 1200]

Starts `workflows/serve.py` (its own local Ray, a token, one --allow-prefix: a temporary folder)
with a random-weight model, runs one bulk job, then `--uploads` POST /v1/segment calls (4 at a
time) and `--jobs` - 1 more jobs (each over 2 small synthetic volumes, lits.core.synthetic), and prints
a markdown table of the server process tree's RSS (from /proc: Linux) (serve.py, Ray's GCS, raylet, workers, the Serve
replicas and job actors: every descendant) before, after the first job and after all. Goal: after
all <= 1.5x after the first job. Exits 1 when a call fails or the goal is missed, 2 on timeout.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from lits.model import inference  # noqa: E402
from lits.core.config import SynthConfig  # noqa: E402
from lits.model.unet import UNet  # noqa: E402
from lits.core.synthetic import synthesize  # noqa: E402

TOKEN = "soak-token"


def _children() -> dict:
    """{ppid: [pid, ...]} of every process, from /proc (Linux)."""
    tree: dict = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def tree_rss_mb(pid: int):
    """(RSS in MB summed over the process and all its descendants, number of processes)."""
    tree, todo, total, count = _children(), [pid], 0, 0
    page = os.sysconf("SC_PAGE_SIZE")
    while todo:
        current = todo.pop()
        try:
            with open(f"/proc/{current}/statm") as f:
                total += int(f.read().split()[1]) * page
            count += 1
        except (OSError, ValueError):
            continue
        todo.extend(tree.get(current, []))
    return round(total / 2**20), count


def tree_titles(pid: int) -> str:
    """The descendants' process titles (Ray names its workers ray::<what they run>), counted."""
    tree, todo, seen = _children(), list(_children().get(pid, [])), {}
    while todo:
        current = todo.pop()
        try:
            with open(f"/proc/{current}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace").split("/")[-1][:40]
        except OSError:
            continue
        seen[title] = seen.get(title, 0) + 1
        todo.extend(tree.get(current, []))
    return ", ".join(f"{n} x {t}" if n > 1 else t for t, n in sorted(seen.items()))


def call(url: str, method: str, path: str, body=None, raw=None):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    data = raw
    if body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    request = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def run_job(url: str, folder: str, out: str, deadline: float) -> dict:
    status, body = call(url, "POST", "/v1/jobs", {"input": folder, "output": out, "overwrite": True})
    if status != 202:
        raise SystemExit(f"POST /v1/jobs answered {status}: {body[:200]!r}")
    job_id = json.loads(body)["job_id"]
    while time.time() < deadline:
        status, body = call(url, "GET", f"/v1/jobs/{job_id}")
        job = json.loads(body)
        if job.get("state") in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} did not end in time")


def start_server(work: str, model: str, port: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT, LITS_API_TOKEN=TOKEN)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "workflows", "serve.py"), "--model", model,
                             "--port", str(port), "--allow-prefix", work, "--jobs-state", os.path.join(work, "state")],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = proc.stdout.readline()
    if not line.startswith("serving model"):
        proc.kill()
        raise SystemExit(f"serve.py did not start: {line!r}")
    return proc


def soak(args, work: str) -> int:
    synthesize(SynthConfig(output=os.path.join(work, "volumes"), volumes=4, size=args.size, slices=args.slices, seed=5))
    volumes = sorted(os.path.join(work, "volumes", f) for f in os.listdir(os.path.join(work, "volumes"))
                     if f.startswith("volume-"))
    job_in = os.path.join(work, "job-in")
    os.makedirs(job_in)
    for path in volumes[:2]:
        os.link(path, os.path.join(job_in, os.path.basename(path)))
    torch.manual_seed(0)
    arch = {"name": "UNet", "in_channels": 3, "out_channels": 3, "base_width": 4, "depth": 3}
    model = os.path.join(work, "model")
    inference.save_model(model, UNet(3, 3, 4, 3).state_dict(), inference.model_config(arch, "liver-tumour", 32, 0))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + args.timeout
    t0 = time.time()
    proc = start_server(work, model, port)
    try:
        rows = [("server up", *tree_rss_mb(proc.pid))]
        first = run_job(url, job_in, os.path.join(work, "out-0"), deadline)
        time.sleep(args.settle)  # the finished job's actor exits; Ray ends idle workers
        rows.append(("after the first job", *tree_rss_mb(proc.pid)))
        bodies = [open(p, "rb").read() for p in volumes]
        failures = []

        def upload(i):
            status, body = call(url, "POST", f"/v1/segment?name=v{i}.nii.gz", raw=bodies[i % len(bodies)])
            if status != 200 and not failures:
                failures.append(f"upload {i}: {status} {body[:300]!r}")
            return status

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            uploads = list(pool.map(upload, range(args.uploads)))
        ended = [first] + [run_job(url, job_in, os.path.join(work, f"out-{k}"), deadline) for k in range(1, args.jobs)]
        time.sleep(args.settle)
        rows.append((f"after {args.uploads} uploads + {args.jobs} jobs", *tree_rss_mb(proc.pid)))
        titles = [tree_titles(proc.pid)]
        status, listing = call(url, "GET", "/v1/jobs")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
    base = rows[1][1]
    print(f"{platform.machine()}, {os.cpu_count()} CPUs; volumes {args.size}x{args.size}x{args.slices}, "
          f"{time.time() - t0:.0f} s in all\n")
    print("| point | server tree RSS (MB) | processes | vs after the first job |")
    print("|---|---|---|---|")
    for name, rss, count in rows:
        print(f"| {name} | {rss} | {count} | {rss / base:.2f}x |")
    print(f"\nprocesses at the end: {titles[0]}")
    bad_uploads = sum(1 for s in uploads if s != 200)
    bad_jobs = [j for j in ended if j["state"] != "succeeded" or j["counts"]["failed"]]
    failures += [f"job {j['job_id']}: {j['state']}, {j.get('error')}, {j.get('failed')}" for j in bad_jobs[:1]]
    bad_jobs = len(bad_jobs)
    print(f"\nuploads not 200: {bad_uploads}; jobs not succeeded cleanly: {bad_jobs}; "
          f"GET /v1/jobs lists {len(json.loads(listing)) if status == 200 else status} jobs")
    for line in failures:
        print("first failure:", line)
    ok = rows[2][1] <= 1.5 * base and not bad_uploads and not bad_jobs
    print("goal (after all <= 1.5x after the first job):", "met" if ok else "NOT met")
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--uploads", type=int, default=100)
    p.add_argument("--jobs", type=int, default=20)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--slices", type=int, default=24)
    p.add_argument("--settle", type=float, default=10, help="seconds waited before each measurement (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds for the whole run (default: %(default)s)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="lits-soak-") as work:
        try:
            return soak(args, os.path.realpath(work))
        except TimeoutError as exc:
            print(f"soak: {exc}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
