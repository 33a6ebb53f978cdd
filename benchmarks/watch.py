#!/usr/bin/env python
"""Watches on this machine (issue 25, part 1): listing cost, lag, and nothing done twice across restarts.

    python benchmarks/watch.py [--keys 100000] [--objects 60] [--every-s 1] [--poll-s 1] [--restarts 2]
                               [--polls 3] [--put-threads 16] [--listing-only]

Everything in the embedded S3 server (moto on 127.0.0.1, as the tests run it):

- listing: --keys empty objects under one prefix (PUT from --put-threads threads: setup, not part of
  any poll's time); the seconds and ListObjectsV2 requests of each of --polls polls' listings
  (`watches.list_prefix`, what each poll costs: real ListObjectsV2 pages over HTTP), after one poll
  that warms the client, requests counted by the S3 client's own hooks; --listing-only stops there;
- lag: the app (a width-4 U-Net at 32, one replica) on a local Ray, a watch at --poll-s, and --objects
  small phantoms landing one every --every-s; for each, from its PUT returning to its report being
  readable (checked every 0.1 s); p50 and p95;
- restarts: the app undeployed and deployed again --restarts times while objects land; at the end,
  the jobs the watch started (job summaries under the output; one a poll round) and how many times
  each object was segmented (its 'done' volume results over those jobs): once each means nothing
  was done twice and nothing lost.

Prints a markdown table. The issue's full run (100,000 keys; 30 minutes at one object a second) is
`--keys 100000 --objects 1800`; say which was run when quoting numbers.
"""

from __future__ import annotations

import argparse
import collections
import glob
import logging
import os
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


def s3(endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)


def listing_cost(endpoint: str, keys: int, polls: int = 3, threads: int = 16) -> dict:
    """Seconds and requests of each of `polls` polls over `keys` objects (after one that warms the client)."""
    import boto3
    from concurrent.futures import ThreadPoolExecutor

    from lits.core import storage
    from lits.serve import watches

    client = boto3.client("s3", endpoint_url=endpoint)  # boto3 clients are thread-safe
    client.create_bucket(Bucket="many")
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: client.put_object(Bucket="many", Key=f"in/{i // 1000:03d}/volume-{i}.nii.gz",
                                                  Body=b""), range(keys), chunksize=256))
    made_s = time.perf_counter() - t
    fs, _ = storage.filesystem("s3://many/in")
    calls = collections.Counter()
    fs.s3.meta.events.register("before-call.s3.*", lambda model, **_: calls.update([model.name]))
    watches.list_prefix("s3://many/in", "s3://many/out")
    each = []
    for _ in range(polls):
        calls.clear()
        t = time.perf_counter()
        found = watches.list_prefix("s3://many/in", "s3://many/out")
        each.append({"seconds": round(time.perf_counter() - t, 2), "requests": dict(calls)})
    return {"keys": len(found), "seconds": min(e["seconds"] for e in each), "requests": each[-1]["requests"],
            "polls": each, "made_s": round(made_s, 1)}


def save_unet(folder: str) -> str:
    import torch

    from lits.model import inference
    from lits.model.unet import UNet

    torch.manual_seed(0)
    arch = {"name": "UNet", "in_channels": 3, "out_channels": 3, "base_width": 4, "depth": 3}
    inference.save_model(folder, UNet(3, 3, base_width=4, depth=3).state_dict(),
                         inference.model_config(arch, "liver-tumour", 32, 0))
    return folder


def land_and_time(fs, volumes, args, restart) -> dict:
    """Land --objects volumes one every --every-s (restarting the app at even points); per object the
    seconds from landing to its report."""
    landed, seen = {}, {}
    restarts_at = {int(args.objects * (i + 1) / (args.restarts + 1)) for i in range(args.restarts)}

    def check():
        while len(seen) < args.objects:
            for key, t in list(landed.items()):
                if key not in seen and fs.exists(f"archive/out/{key}.json"):
                    seen[key] = time.time() - t
            time.sleep(0.1)

    checker = threading.Thread(target=check, daemon=True)
    checker.start()
    for i in range(args.objects):
        key = f"scan-{i:05d}"
        fs.put_file(volumes[i % len(volumes)], f"archive/in/{key}.nii.gz")
        landed[key] = time.time()
        if i in restarts_at:
            restart()
        time.sleep(args.every_s)
    checker.join(timeout=args.objects * 5 + 120)
    return seen


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--keys", type=int, default=100_000)
    p.add_argument("--objects", type=int, default=60)
    p.add_argument("--every-s", type=float, default=1.0)
    p.add_argument("--poll-s", type=float, default=1.0)
    p.add_argument("--restarts", type=int, default=2)
    p.add_argument("--ray-cpus", type=int, default=4)
    p.add_argument("--polls", type=int, default=3, help="listings timed (after one that warms the client)")
    p.add_argument("--put-threads", type=int, default=16, help="threads PUTting the --keys objects")
    p.add_argument("--listing-only", action="store_true", help="measure the listing cost only, no app")
    args = p.parse_args(argv)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    os.environ.update({k: os.environ.get(k, "bench") for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    from moto.server import ThreadedMotoServer

    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    endpoint = f"http://127.0.0.1:{port}"
    from lits.core import storage

    storage.use_endpoint(endpoint)
    listing = listing_cost(endpoint, args.keys, args.polls, args.put_threads)
    print(f"listing: {listing}", flush=True)
    if args.listing_only:
        moto.stop()
        return 0

    import ray
    from ray import serve

    from lits.core.config import ServeConfig
    from lits.core.synthetic import synthesize
    from lits.core.config import SynthConfig
    from lits.serve import serving, watches

    work = tempfile.mkdtemp(prefix="lits-watch-")
    synthesize(SynthConfig(output=os.path.join(work, "ct"), volumes=4, size=32, slices=8, seed=1))
    volumes = sorted(glob.glob(os.path.join(work, "ct", "volume-*")))
    fs = s3(endpoint)
    fs.mkdir("archive")
    env = storage.endpoint_env()
    hidden = {k: os.environ.pop(k) for k in storage.ENDPOINT_VARS if k in os.environ}
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    os.environ.update(hidden)
    http = free_port()
    cfg = ServeConfig(model=save_unet(os.path.join(work, "model")), port=http, replicas=1, chunk=8, max_batch_size=16,
                      batch_wait_s=0.01, volume_cpus=args.ray_cpus - 1, jobs_state="s3://archive/state/",
                      allow_prefixes=("s3://archive",))
    url = f"http://127.0.0.1:{http}"
    try:
        serving.deploy(cfg)
        from lits.serve import segment_client

        watch_id = segment_client.call_server(url, "POST", "/v1/watches", {
            "input": "s3://archive/in", "output": "s3://archive/out", "poll_s": args.poll_s})["watch_id"]

        def restart():
            serving.undeploy(serving.APP_NAME)
            serving.deploy(cfg)
            segment_client.call_server(url, "GET", "/v1/watches")  # what serve.py does at start: resume
            print("restarted", flush=True)

        started = time.time()
        lags = land_and_time(fs, volumes, args, restart)
        wall = time.time() - started
        status = segment_client.call_server(url, "GET", f"/v1/watches/{watch_id}")
        fs.invalidate_cache()
        summaries = [p for p in fs.find("archive/out/_jobs") if p.endswith(".json")]
        import json

        from lits.serve.job_progress import read_volume_records

        # per object: the jobs that segmented it (its 'done' volume results over every job of the watch)
        per_key = collections.Counter(r["name"] for p in summaries for r in read_volume_records(json.loads(fs.cat(p)))
                                      if r["status"] == "done")
    finally:
        serve.shutdown()
        ray.shutdown()
        moto.stop()
    from lits.serve.watch_state import percentile

    values = list(lags.values())
    twice = sum(1 for n in per_key.values() if n > 1)
    print(f"\n| measure | value |\n|---|---|")
    print(f"| listing: keys, one poll | {listing['keys']} keys in {listing['seconds']:.2f} s, "
          f"requests {listing['requests']} |")
    print(f"| objects landed (one every {args.every_s:g} s), poll {args.poll_s:g} s | {args.objects} in {wall:.0f} s, "
          f"{args.restarts} restarts of the app |")
    print(f"| lag landing -> report, p50 / p95 / max | {percentile(values, 50):.1f} / {percentile(values, 95):.1f} / "
          f"{max(values):.1f} s ({len(values)} of {args.objects} seen) |")
    print(f"| jobs | {len(summaries)} jobs for {args.objects} objects ({len(summaries) / args.objects:.2f} per object); "
          f"{len(per_key)} objects segmented, {twice} more than once, {args.objects - len(per_key)} never |")
    print(f"| watch status at the end | {status['counts']}, takeovers {status.get('takeovers')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
