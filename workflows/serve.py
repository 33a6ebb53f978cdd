#!/usr/bin/env python
"""Serve an exported model on Ray Serve: POST /v1/segment, bulk jobs under /v1/jobs, docs at /docs.

    python workflows/serve.py --model s3://bucket/runs/model --min-replicas 1 --max-replicas 8 --num-gpus-per-replica 1
    python workflows/serve.py --model demo-output/run/model --allow-prefix "$PWD/demo-output"

Set LITS_API_TOKEN to require `Authorization: Bearer <token>` on every /v1 call.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from workflows._common import (add_cluster_args, add_model_args, apply_cluster_args, apply_model_args, make_config,
                               start_ray, user_errors)

from lits.core.config import ServeConfig
from lits.core.errors import UserError
from lits.serve.access import TOKEN_ENV

def parse_args(argv=None) -> argparse.Namespace:
    d = ServeConfig(model="-")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    add_model_args(p, d)
    p.add_argument("--replicas", type=int, default=None, help="fixed number of model replicas (default: autoscale between --min/--max-replicas)")
    p.add_argument("--min-replicas", type=int, default=1, help="(default: %(default)s)")
    p.add_argument("--max-replicas", type=int, default=1, help="(default: %(default)s)")
    p.add_argument("--chunk", type=int, default=d.chunk, help="slices per request from a volume (default: %(default)s)")
    p.add_argument("--host", default=d.host, help="HTTP host; 0.0.0.0 to listen on every interface (default: %(default)s)")
    p.add_argument("--port", type=int, default=d.port, help="(default: %(default)s)")
    p.add_argument("--allow-prefix", action="append", default=[], help="URI prefix jobs may read and write (repeatable); "
                   "without it any s3:// URI and no local path")
    p.add_argument("--max-body-mb", type=int, default=d.max_body_mb, help="largest /v1/segment upload; the JSON routes "
                   "take 1 MB (default: %(default)s)")
    p.add_argument("--body-grace-s", type=float, default=d.body_grace_s, help="a request body must arrive at "
                   "--min-body-kbps after this many seconds, else 408 (default: %(default)s)")
    p.add_argument("--min-body-kbps", type=float, default=d.min_body_kbps, help="(default: %(default)s)")
    p.add_argument("--job-concurrency", type=int, default=None, help="volumes in flight per job (default: the volume "
                   "pool's CPUs / --cpus-per-volume, growing as CPU nodes join)")
    p.add_argument("--volume-cpus", type=float, default=None, help="CPUs reserved for volume tasks, a fixed pool "
                   "(default: what is free once the replicas are placed, less what autoscaling to --max-replicas "
                   "takes; jobs add the CPUs that join the cluster later and ask the autoscaler for more)")
    p.add_argument("--jobs-state", default=None, help="folder or s3:// prefix of the job records (default: "
                   "$LITS_JOBS_STATE or ~/.cache/lits/jobs; on a cluster use s3://…)")
    p.add_argument("--max-uploads", type=int, default=d.max_uploads, help="/v1/segment uploads segmented at once; "
                   "more wait their turn (default: %(default)s)")
    p.add_argument("--max-jobs", type=int, default=d.max_jobs, help="bulk jobs running at once; more wait queued "
                   "(default: %(default)s)")
    p.add_argument("--single-server-watches", action="store_true", help="this server is the only one that will run "
                   "watches on its buckets: watch on a store that ignores conditional writes (older MinIO, some Ceph), "
                   "which a watch's lease between servers needs; refused with one line otherwise")
    p.add_argument("--insecure", action="store_true", help=f"allow a host other than loopback without {TOKEN_ENV}")
    p.add_argument("--detach", action="store_true", help="with --address: deploy, then exit and leave the app running")
    add_cluster_args(p)
    return p.parse_args(argv)


def resume_watches(cfg: ServeConfig) -> None:
    """Take up the watches registered with the job records (GET /v1/watches resumes them in the ingress,
    which owns their runners); a failure is a warning: the first /v1/watches call tries again."""
    from lits.serve import segment_client

    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    try:
        found = segment_client.call_server(f"http://{host}:{cfg.port}", "GET", "/v1/watches")
    except UserError as exc:
        logging.warning("watches not resumed yet: %s", exc)
        return
    if any(not w["deleted"] for w in found):
        print(f"watching {sum(not w['deleted'] for w in found)} prefix(es): {cfg.host}:{cfg.port}/v1/watches", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    apply_cluster_args(args)
    with user_errors("serve"):
        from lits.serve import access, http_guard, serving
        from lits.model import inference
        from lits.core import storage

        apply_model_args(args, ServeConfig(model="-"))
        cfg = make_config(
            ServeConfig, model=storage.normalise(args.model), replicas=args.replicas, min_replicas=args.min_replicas,
            max_replicas=max(args.max_replicas, args.min_replicas) if args.replicas is None else args.max_replicas,
            num_gpus_per_replica=args.num_gpus_per_replica, cpus_per_replica=args.cpus_per_replica,
            max_batch_size=args.max_batch_size, chunk=min(args.chunk, args.max_batch_size), host=args.host, port=args.port,
            allow_prefixes=tuple(storage.normalise(p) for p in args.allow_prefix), max_body_mb=args.max_body_mb,
            job_concurrency=args.job_concurrency, cpus_per_volume=args.cpus_per_volume, token_sha256=serving.token_sha256(os.environ.get(access.TOKEN_ENV)),
            volume_cpus=args.volume_cpus,
            jobs_state=storage.normalise(args.jobs_state) if args.jobs_state else None, max_uploads=args.max_uploads,
            max_jobs=args.max_jobs, volumes_per_replica=args.volumes_per_replica, body_grace_s=args.body_grace_s, min_body_kbps=args.min_body_kbps,
            single_server_watches=args.single_server_watches,
        )
        if not cfg.token_sha256 and http_guard.exposed(cfg.host) and not args.insecure:
            raise UserError(f"--host {cfg.host} lets other machines in and no {TOKEN_ENV} is set: set it, or pass "
                            "--insecure to serve without a token")
        if args.detach and not args.address:
            raise UserError("--detach needs --address: a local Ray ends with this process")
        if args.address:
            from lits.serve.job_spec import default_jobs_state

            state = args.jobs_state or default_jobs_state()
            if not (storage.is_s3(state) or state.startswith("file://")):
                raise UserError(f"--address: the job records ({state}) must be read alike on every node of the cluster; "
                                "pass --jobs-state s3://BUCKET/PREFIX (or file:///PATH for a folder every node mounts)")
        spec, _ = inference.load_spec(cfg.model)  # a bad model fails here, not in a replica
        if not args.address:  # locally the proxy binds on this machine: a taken port fails here, not in its actor
            import socket

            with socket.socket() as probe:
                try:
                    probe.bind((cfg.host, cfg.port))
                except OSError as exc:
                    raise UserError(f"cannot listen on {cfg.host}:{cfg.port} ({exc.strerror}); choose another --port") from exc
        start_ray(args.address)
        serving.deploy(cfg)
        # SIGTERM stops the app from here on (systemd, a test), before the line that says it is up: one
        # arriving while watches resume is kept for the loop below. (Set before ray.init, Ray's own
        # handler would replace it; that one exits at once with code 15.)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        url = f"http://{cfg.host}:{cfg.port}"
        print(f"serving model {spec.model_id} ({cfg.model}) at {url}  (API docs: {url}/docs)", flush=True)
        if not cfg.token_sha256:
            print(f"no {access.TOKEN_ENV} set: the API accepts every caller", flush=True)
        resume_watches(cfg)
        if args.detach:
            return 0
        try:
            while not stop.wait(3600):
                pass
        except KeyboardInterrupt:
            pass
        logging.info("shutting down the application")
        serving.undeploy(serving.APP_NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())
