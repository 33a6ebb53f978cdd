"""Shared fixtures: small seeded phantoms, a module-scoped Ray, a module-scoped S3 server."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = os.path.join(ROOT, "workflows")

# Fake credentials, set before any Ray worker starts so that workers inherit them. They only
# ever reach the local S3-compatible server below.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)


# Fixtures that start Ray (or the Serve app on it): a test using one is marked slow.
RAY_FIXTURES = {"ray_cluster", "ray_train_cluster", "server", "two_nodes"}


@pytest.fixture(autouse=True)
def fast_tests_start_no_ray(request):
    """`make test-fast` (-m "not slow") promises no Ray: a test outside the slow marker fails when it
    uses a Ray fixture or initialises Ray in this process (ray.init, or Ray Data's automatic start).
    Workflows run as subprocesses are not seen here; those that start Ray are marked by hand."""
    if request.node.get_closest_marker("slow") is not None:
        yield
        return
    used = RAY_FIXTURES & set(request.fixturenames)
    assert not used, f"{request.node.nodeid} uses {sorted(used)}, which start Ray: mark it slow"
    ray = sys.modules.get("ray")
    running_before = bool(ray and ray.is_initialized())
    yield
    ray = sys.modules.get("ray")
    if not running_before and ray is not None and ray.is_initialized():
        ray.shutdown()
        pytest.fail(f"{request.node.nodeid} started Ray but is not marked slow")


@pytest.fixture(scope="session", autouse=True)
def jobs_state_folder(tmp_path_factory):
    """Job records (lits.serve.jobs) go to a temporary folder, not ~/.cache: set before any Ray starts,
    so its workers, the Serve replicas and workflow subprocesses inherit it."""
    folder = str(tmp_path_factory.mktemp("jobs-state"))
    old = os.environ.get("LITS_JOBS_STATE")
    os.environ["LITS_JOBS_STATE"] = folder
    yield folder
    if old is None:
        os.environ.pop("LITS_JOBS_STATE", None)
    else:
        os.environ["LITS_JOBS_STATE"] = old


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_ray(num_cpus: int, dashboard: bool = False):
    """Start a local Ray of `num_cpus` logical CPUs (no progress bars); yield its address; stop it.
    `dashboard`: also its dashboard, which serves Ray's state API (ray.util.state).

    The S3 endpoint of this process (the s3_server fixture's) reaches this driver's workers the way
    workflows send it to a cluster they join (workflows/_common.start_ray): in the job's
    runtime_env. The cluster's own processes start without it, as a remote cluster's do, so a
    workflow that joins this Ray reaches the bucket only when it sends the endpoint itself."""
    import ray

    from lits.core import storage

    env = storage.endpoint_env()
    hidden = {k: os.environ.pop(k) for k in storage.ENDPOINT_VARS if k in os.environ}
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, log_to_driver=False,
                 runtime_env={"env_vars": env} if env else None, **({"dashboard_port": 0} if dashboard else {}))
    finally:
        os.environ.update(hidden)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    """A local 2-CPU Ray for the module; yields its address for workflow subprocesses. After the
    module's S3 server: its workers reach the bucket (local_ray)."""
    with local_ray(2) as address:
        yield address


@pytest.fixture(scope="module")
def s3_server():
    """A real S3-protocol server (moto) on 127.0.0.1, this process's S3 endpoint for the module
    (lits.core.storage.use_endpoint: every storage call, and every process started meanwhile, reaches
    it); yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    from lits.core import storage

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    before = {k: os.environ.get(k) for k in storage.ENDPOINT_VARS}
    storage.use_endpoint(endpoint)
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in before.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def make_bucket(endpoint: str, name: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    fs.mkdir(name)


def upload_tree(endpoint: str, local: str, uri: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    fs.put(local.rstrip("/") + "/", uri[len("s3://"):].rstrip("/") + "/", recursive=True)


def synthesize(out_dir: str, volumes: int = 4, size: int = 64, slices: int = 24, fmt: str = "nifti",
               colormap: str = "Blues", seed: int = 0, first_id: int = 0, compress: bool = True) -> str:
    from lits.core.config import SynthConfig
    from lits.core.synthetic import synthesize as run

    run(SynthConfig(output=str(out_dir), volumes=volumes, size=size, slices=slices, format=fmt,
                    colormap=colormap, seed=seed, first_id=first_id, compress=compress))
    return str(out_dir)


@pytest.fixture(scope="session")
def nifti_dir(tmp_path_factory):
    """Six 64x64x24 phantoms as volume-N.nii.gz / segmentation-N.nii.gz (flipped, permuted affines)."""
    return synthesize(tmp_path_factory.mktemp("nifti"), volumes=6)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def run_workflow(name: str, *args: str, timeout: float = 300, unset: tuple = ()):
    """Run workflows/<name>.py in a subprocess; return the CompletedProcess. `unset`: variables of
    this process's environment the workflow does not inherit."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in unset}
    env["PYTHONPATH"] = ROOT
    return subprocess.run([sys.executable, os.path.join(WORKFLOWS, f"{name}.py"), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def ray_train_cluster(s3_server):
    """A local Ray with 3 logical CPUs: two 1-CPU training workers plus one for Ray Data's reads; with
    its dashboard, so that a test finds this run's worker processes through Ray's state API."""
    with local_ray(3, dashboard=True) as address:
        yield address
