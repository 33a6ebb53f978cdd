#!/usr/bin/env python
"""Segment every volume under a prefix: a mask (<name>_seg.nii.gz) and a report (<name>.json) each.

    # against a running server (workflows/serve.py), following the job until it ends
    python workflows/segment.py --input s3://archive/ct/ --output s3://archive/seg/ --server http://head:8000
    # self-contained: a local Ray + Serve with --model, the job, then shutdown
    python workflows/segment.py --input demo-output/volumes --output demo-output/segmentations
    # keep segmenting what lands under the prefix (a watch on the server; Ctrl-C leaves it running there)
    python workflows/segment.py --watch --poll-s 10 --input s3://archive/incoming/ --output s3://archive/seg/ --server http://head:8000
    # on a cluster
    ray job submit -- python workflows/segment.py --address auto --model s3://bucket/runs/model --input ... --output ...

Exit status: 0 when every volume was segmented or skipped, 1 when any failed or the job did not
succeed, 2 for a bad flag or input, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import sys

from workflows._common import (add_cluster_args, add_model_args, apply_cluster_args, apply_model_args, make_config,
                               start_ray, user_errors)

from lits.serve.access import TOKEN_ENV
from lits.core.config import ServeConfig


def parse_args(argv=None) -> argparse.Namespace:
    d = ServeConfig(model="-")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--input", required=True, help="folder or s3:// prefix holding .nii / .nii.gz volumes")
    p.add_argument("--output", required=True, help="folder or s3:// prefix for masks, reports and _jobs/<id>.json")
    p.add_argument("--server", default=None, help="URL of a running serve.py, e.g. http://127.0.0.1:8000 "
                   f"(token from {TOKEN_ENV}); without it a local Ray and Serve run the job")
    p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                   help="follow the job with a progress bar until it ends (default: on; --no-wait prints the job id)")
    p.add_argument("--ref", default=None, help="reference segmentations (segmentation-N.nii[.gz]): evaluate the job's "
                   "masks against them into OUTPUT/_evaluation when the job ends")
    p.add_argument("--watch", action="store_true", help="with --server: keep segmenting every volume that lands "
                   "under --input (a watch on the server, POST /v1/watches); follows it until Ctrl-C unless --no-wait")
    p.add_argument("--poll-s", type=float, default=10.0, help="with --watch: seconds between two listings of --input; "
                   "a volume is taken once unchanged across two (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="recompute volumes whose outputs exist for this model")
    p.add_argument("--concurrency", type=int, default=None, help="volumes in flight (default: the volume pool's "
                   "CPUs / --cpus-per-volume: the CPUs the model replicas leave free)")
    p.add_argument("--replicas", type=int, default=None, help="model replicas, without --server (default: 1)")
    add_model_args(p, d)  # these apply without --server: the server has its own
    add_cluster_args(p)
    return p.parse_args(argv)


def run(args) -> dict:
    """The job on args.server, or on a model deployed here (cfg from the flags)."""
    from lits.serve import segment_client
    from lits.core import storage

    request = {"input": segment_client.as_uri(args.input), "output": segment_client.as_uri(args.output),
               "overwrite": args.overwrite}
    if args.server:
        if args.concurrency:
            request["concurrency"] = args.concurrency
        return segment_client.run_on_server(args.server, request, args.wait)
    apply_model_args(args, ServeConfig(model="-"))
    cfg = make_config(ServeConfig, model=storage.normalise(args.model), replicas=args.replicas or 1,
                      num_gpus_per_replica=args.num_gpus_per_replica, cpus_per_replica=args.cpus_per_replica,
                      max_batch_size=args.max_batch_size, chunk=min(ServeConfig.chunk, args.max_batch_size),
                      job_concurrency=args.concurrency, cpus_per_volume=args.cpus_per_volume,
                      volumes_per_replica=args.volumes_per_replica)
    return segment_client.run_locally(cfg, {**request, "input": args.input, "output": args.output}, args.concurrency,
                                      lambda: start_ray(args.address), quiet=not args.verbose)


def watch(args) -> int:
    """Start a watch on args.server; with --wait print its counts every few seconds until Ctrl-C."""
    import time

    from lits.core.errors import UserError
    from lits.serve import segment_client

    if not args.server or args.ref:
        raise UserError("--watch needs --server (a watch runs on a server that stays up) and takes no --ref")
    request = {"input": segment_client.as_uri(args.input), "output": segment_client.as_uri(args.output),
               "poll_s": args.poll_s, "overwrite": args.overwrite}
    watch_id = segment_client.call_server(args.server, "POST", "/v1/watches", request)["watch_id"]
    url = f"{args.server.rstrip('/')}/v1/watches/{watch_id}"
    print(f"watch {watch_id} started: {url}  (stop it: curl -X DELETE -H 'Authorization: Bearer ...' {url})", flush=True)
    try:
        while args.wait:
            found = segment_client.call_server(args.server, "GET", f"/v1/watches/{watch_id}")
            c, lag = found["counts"], found["lag_s"]
            print(f"{found['state']}: {c['done']} done, {c['failed']} failed, {c['submitted']} running, {c['pending']} "
                  f"pending; lag p50 {lag['p50']} s, p95 {lag['p95']} s", flush=True)
            time.sleep(max(2.0, args.poll_s))
    except KeyboardInterrupt:
        print("\nthe watch goes on on the server", flush=True)
        return 130
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    apply_cluster_args(args)
    with user_errors("segment"):
        from lits.core import reports, storage
        from lits.serve import segment_client

        if args.watch:
            return watch(args)
        if args.ref:
            storage.require(args.ref)
        job = run(args)
        if not job:
            return 0
        print(reports.job_summary(job))
        summary = None
        if args.ref and job["state"] == "succeeded" and job["counts"]["done"] + job["counts"]["skipped"]:
            from lits.evaluate import evaluation
            from lits.core.config import EvaluateConfig

            print()
            # Locally Ray is still up (run_locally leaves it to the process's end); against a
            # server this process reads the masks itself.
            as_uri = segment_client.as_uri
            summary = evaluation.evaluate(EvaluateConfig(pred=as_uri(args.output), ref=as_uri(args.ref),
                                                         images=as_uri(args.input), local=bool(args.server)))
            print(reports.evaluation_summary(summary))
        return segment_client.exit_status(job, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
