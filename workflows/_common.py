"""What every workflow script shares: logging setup, Ray start/connect, one-line user errors."""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from typing import Iterator, Optional

from lits.runtime import worker_logs
from lits.core.errors import UserError


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # matplotlib's font search logs hundreds of DEBUG records per picture: not what --verbose is for
    logging.getLogger("matplotlib").setLevel(logging.INFO)


def apply_cluster_args(args) -> None:
    """Logging at --verbose; --s3-endpoint becomes this process's S3 endpoint (every storage call
    reads it from the environment, and start_ray sends it to the cluster's workers)."""
    from lits.core import storage

    setup_logging(args.verbose)
    storage.use_endpoint(args.s3_endpoint)
    if args.verbose:  # Ray's workers keep their chatter too (lits.runtime.worker_logs)
        os.environ[worker_logs.VERBOSE_ENV] = "1"


def start_ray(address: Optional[str], num_cpus: Optional[int] = None, data: bool = True) -> None:
    """Join the cluster at `address`, or start a local Ray with `num_cpus` (default: this machine's).
    The S3 endpoint (apply_cluster_args) goes to every worker of this job in its runtime_env: the
    workers of a cluster joined by address do not inherit this process's environment.
    `data`: the workflow uses Ray Data (its progress bars then follow the terminal); prepare does
    not, and saves importing it (~0.8 s)."""
    import ray

    from lits.core import storage

    # Every process of this job logs lits at INFO and Ray's own records at WARNING, unless --verbose
    # (lits.runtime.worker_logs); log_to_driver brings the workers' lines (an epoch's) here.
    env = {**storage.endpoint_env(), **worker_logs.ray_env()}
    runtime_env = {"env_vars": env, "worker_process_setup_hook": worker_logs.SETUP_HOOK}
    worker_logs.quiet_ray()  # before ray.init: its notices
    if address:
        logging.info("joining the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, logging_level=worker_logs.ray_level())
    else:
        logging.info("starting a local Ray (no --address given)")
        # address="local": always a fresh Ray, never one found through RAY_ADDRESS or the address
        # file a `ray start` leaves in /tmp/ray (possibly stale: that would hang for minutes).
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env,
                 log_to_driver=True, logging_level=worker_logs.ray_level())
    if data:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    worker_logs.quiet_ray()  # after ray.data set its loggers up


# Where `make demo` exports its model: the default --model of serve.py and segment.py.
DEFAULT_MODEL = os.path.join("demo-output", "run", "model")


def add_cluster_args(p) -> None:
    """--address, --s3-endpoint and --verbose: the same on every workflow."""
    p.add_argument("--address", default=None, help="Ray cluster to join, e.g. 'auto'; without it a local Ray starts")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL or AWS)")
    p.add_argument("--verbose", action="store_true", help="debug logging, a line per item of every progress, and "
                   "Ray's own records (its INFO lines, Ray Train's reports, Serve's controller and proxy)")


# Slices per forward pass of a GPU replica unless --max-batch-size says otherwise (a 24 GB card holds a
# width-64 U-Net's activations for it at 256^2 in half precision; not measured here: no GPU was lent).
GPU_MAX_BATCH = 64


def add_model_args(p, d) -> None:
    """Flags of the model deployment shared by serve.py and segment.py (`d`: a default ServeConfig);
    `apply_model_args` resolves them."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="exported model folder: train.py's OUTPUT/model "
                   "(default: %(default)s, what `make demo` trains)")
    p.add_argument("--num-gpus", type=int, default=None, help="N model replicas with one GPU each (as --replicas N "
                   "--num-gpus-per-replica 1); volume tasks never hold a GPU")
    p.add_argument("--num-gpus-per-replica", type=int, default=0, choices=(0, 1), help="(default: %(default)s)")
    p.add_argument("--cpus-per-replica", type=int, default=d.cpus_per_replica, help="CPUs and torch threads per replica (default: %(default)s)")
    p.add_argument("--cpus-per-volume", type=float, default=d.cpus_per_volume, help="CPUs a volume task reserves; "
                   "below 1 overlaps more volumes with the model on CPU-only machines (default: %(default)s)")
    p.add_argument("--max-batch-size", type=int, default=None, help=f"slices per forward pass (default: {GPU_MAX_BATCH} "
                   f"on a GPU replica, {d.max_batch_size} on a CPU one)")
    p.add_argument("--volumes-per-replica", type=int, default=d.volumes_per_replica, help="volumes a job keeps in "
                   "flight per running model replica at least; more while the model idles (docs/serve.md) "
                   "(default: %(default)s)")


def apply_model_args(args, d) -> None:
    """--num-gpus N: N replicas of one GPU each; --max-batch-size's default by the replica's device.
    Raises UserError for --num-gpus below 1 or beside a different --replicas."""
    if args.num_gpus is not None:
        if args.num_gpus < 1:
            raise UserError(f"--num-gpus must be at least 1, got {args.num_gpus}; leave it out to serve on CPUs")
        if args.replicas is not None and args.replicas != args.num_gpus:
            raise UserError(f"--num-gpus {args.num_gpus} means {args.num_gpus} replicas of one GPU each; leave out --replicas")
        args.replicas, args.num_gpus_per_replica = args.num_gpus, 1
    if args.max_batch_size is None:
        args.max_batch_size = GPU_MAX_BATCH if args.num_gpus_per_replica else d.max_batch_size


class Beat:
    """Which progress lines of a loop get a line of their own: failures, and one every `every_s`
    seconds at most (counted from the Beat's creation): none for a short loop (its summary follows),
    a steady beat for a long one. `level()` is a line's logging level: INFO when it does, else DEBUG
    (shown under --verbose, setup_logging)."""

    def __init__(self, every_s: float = 10.0):
        self.every_s = every_s
        self.last = time.monotonic()

    def level(self, failed: bool = False) -> int:
        now = time.monotonic()
        if failed or now - self.last >= self.every_s:
            self.last = now
            return logging.INFO
        return logging.DEBUG


def make_config(cls, **fields):
    """Build a stage config; its validation errors are the user's (bad flags)."""
    try:
        return cls(**fields)
    except ValueError as exc:
        raise UserError(str(exc)) from exc


@contextmanager
def user_errors(program: str) -> Iterator[None]:
    """Print a UserError as one line and exit 2 (other exceptions are bugs: traceback)."""
    try:
        yield
    except UserError as exc:
        print(f"{program}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{program}: interrupted; the output was left as it was before this run", file=sys.stderr)
        sys.exit(130)
