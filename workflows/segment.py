#!/usr/bin/env python
"""Segment every volume under a prefix: a mask (<name>_seg.nii.gz) and a report (<name>.json) each.

    # against a running server (workflows/serve.py), following the job until it ends
    python workflows/segment.py --input s3://archive/ct/ --output s3://archive/seg/ --server http://head:8000
    # self-contained: a local Ray + Serve with --model, the job, then shutdown
    python workflows/segment.py --input demo-output/volumes --output demo-output/segmentations
    # on a cluster
    ray job submit -- python workflows/segment.py --address auto --model s3://bucket/runs/model --input ... --output ...

Exit status: 0 when every volume was segmented or skipped, 1 when any failed or the job did not
succeed, 2 for a bad flag or input, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.request
import uuid

from workflows._common import add_cluster_args, add_model_args, make_config, setup_logging, start_ray, user_errors

from lits.config import ServeConfig
from lits.errors import UserError

TOKEN_ENV = "LITS_API_TOKEN"


def parse_args(argv=None) -> argparse.Namespace:
    d = ServeConfig(model="-")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="folder or s3:// prefix holding .nii / .nii.gz volumes")
    p.add_argument("--output", required=True, help="folder or s3:// prefix for masks, reports and _jobs/<id>.json")
    p.add_argument("--server", default=None, help="URL of a running serve.py, e.g. http://127.0.0.1:8000 "
                   f"(token from {TOKEN_ENV}); without it a local Ray and Serve run the job")
    p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                   help="follow the job with a progress bar until it ends (default: on; --no-wait prints the job id)")
    p.add_argument("--ref", default=None, help="reference segmentations (segmentation-N.nii[.gz]): evaluate the job's "
                   "masks against them into OUTPUT/_evaluation when the job ends")
    p.add_argument("--overwrite", action="store_true", help="recompute volumes whose outputs exist for this model")
    p.add_argument("--concurrency", type=int, default=None, help="volumes in flight (default: the volume pool's "
                   "CPUs / --cpus-per-volume: the CPUs the model replicas leave free)")
    p.add_argument("--replicas", type=int, default=1, help="model replicas, without --server (default: %(default)s)")
    add_model_args(p, d)  # these apply without --server: the server has its own
    add_cluster_args(p)
    return p.parse_args(argv)


class Progress:
    """A progress bar on a terminal; a line per change (at most every 10 s) otherwise."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.tty = stream.isatty()
        self.last = ("", 0.0)

    def show(self, job: dict) -> None:
        from lits.reports import progress_line

        line = progress_line(job)
        if self.tty:
            self.stream.write("\r" + line.ljust(100))
        else:
            counts = json.dumps(job["counts"], sort_keys=True) + job["state"]
            if counts == self.last[0] and time.time() - self.last[1] < 30:
                return
            if counts != self.last[0] and time.time() - self.last[1] < 10 and job["state"] == "running":
                return
            self.last = (counts, time.time())
            self.stream.write(line + "\n")
        self.stream.flush()

    def end(self) -> None:
        if self.tty:
            self.stream.write("\n")


def follow(get, interval: float = 1.0) -> dict:
    from lits.jobs import FINAL_STATES

    progress = Progress()
    while True:
        job = get()
        progress.show(job)
        if job["state"] in FINAL_STATES:
            progress.end()
            return job
        time.sleep(interval)


# --- against a server --------------------------------------------------------------------------

def _call(server: str, method: str, path: str, body=None) -> dict:
    headers = {"Content-Type": "application/json"}
    token = os.environ.get(TOKEN_ENV)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(server.rstrip("/") + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail")
        except ValueError:
            detail = exc.reason
        hint = {401: f"; set {TOKEN_ENV} to the server's token"}.get(exc.code, "")
        raise UserError(f"{server} answered {exc.code} to {method} {path}: {detail}{hint}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise UserError(f"cannot reach {server} ({getattr(exc, 'reason', exc)}); is workflows/serve.py running there?") from exc


def storage_endpoint(args):
    from lits import storage

    return storage.resolve_endpoint(args.s3_endpoint)


def _as_uri(uri: str) -> str:
    return uri if "://" in uri else os.path.abspath(uri)


def run_on_server(args) -> dict:
    request = {"input": _as_uri(args.input), "output": _as_uri(args.output), "overwrite": args.overwrite}
    if args.concurrency:
        request["concurrency"] = args.concurrency
    job_id = _call(args.server, "POST", "/v1/jobs", request)["job_id"]
    status_url = f"{args.server.rstrip('/')}/v1/jobs/{job_id}"
    print(f"job {job_id} submitted: {status_url}", flush=True)
    if not args.wait:
        return {}
    try:
        return follow(lambda: _call(args.server, "GET", f"/v1/jobs/{job_id}"), interval=2.0)
    except KeyboardInterrupt:
        print(f"\nthe job goes on on the server; cancel it with: curl -X DELETE {status_url}", file=sys.stderr)
        raise SystemExit(130)


# --- self-contained ----------------------------------------------------------------------------

def run_locally(args) -> dict:
    from lits import inference, jobs, serving, storage

    s3 = storage.resolve_endpoint(args.s3_endpoint)
    cfg = make_config(ServeConfig, model=storage.normalise(args.model), replicas=args.replicas,
                      num_gpus_per_replica=args.num_gpus_per_replica, cpus_per_replica=args.cpus_per_replica,
                      max_batch_size=args.max_batch_size, chunk=min(ServeConfig.chunk, args.max_batch_size),
                      job_concurrency=args.concurrency, cpus_per_volume=args.cpus_per_volume, s3_endpoint=s3)
    spec, _ = inference.load_spec(cfg.model, s3)  # before paying for Ray
    storage.require(args.input, s3)
    storage.check_writable(args.output, s3)
    start_ray(args.address, s3)
    if not args.verbose:  # Serve's start-up and shutdown chatter would bury the progress bar
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    app_name = f"lits-segment-{uuid.uuid4().hex[:8]}"
    logging.info("deploying model %s as Serve app %s", spec.model_id, app_name)
    serving.deploy(cfg, http=False, app_name=app_name)
    job_id = None
    try:
        # Volume tasks run in the app's volume pool (the CPUs the replica does not hold) and, on a
        # cluster, on CPU nodes that join (the job asks the autoscaler for them); by default as many
        # at once as they have room for.
        request = {"input": storage.normalise(args.input), "output": storage.normalise(args.output),
                   "overwrite": args.overwrite}
        job_id = jobs.submit_job(request, app_name, cfg.chunk, args.concurrency, s3, cfg.cpus_per_volume,
                                 reserve_cpus=serving.replica_cpus(cfg)[1])
        logging.info("job %s started: %s -> %s", job_id, request["input"], request["output"])
        job = follow(lambda: jobs.get_job(job_id))
        return job
    except KeyboardInterrupt:
        if job_id:
            jobs.cancel_job(job_id)
            print(f"\ncancelling job {job_id}; outputs written so far are complete and stay", file=sys.stderr)
            follow(lambda: jobs.get_job(job_id))
        raise SystemExit(130)
    finally:
        serving.undeploy(app_name)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    with user_errors("segment"):
        from lits import reports

        if args.ref:
            from lits import storage

            storage.require(args.ref, storage.resolve_endpoint(args.s3_endpoint))
        job = run_on_server(args) if args.server else run_locally(args)
        if not job:
            return 0
        print(reports.job_summary(job))
        status = 0 if job["state"] == "succeeded" and not job["counts"]["failed"] else 1
        if args.ref and job["state"] == "succeeded" and job["counts"]["done"] + job["counts"]["skipped"]:
            from lits import evaluation
            from lits.config import EvaluateConfig

            print()
            # Locally Ray is still up (run_locally leaves it to the process's end); against a
            # server this process reads the masks itself.
            summary = evaluation.evaluate(EvaluateConfig(pred=_as_uri(args.output), ref=_as_uri(args.ref),
                                                         images=_as_uri(args.input), local=bool(args.server),
                                                         s3_endpoint=storage_endpoint(args)))
            print(reports.evaluation_summary(summary))
            status = max(status, 1 if summary["failed"] else 0)
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
