"""Shared fixtures: small seeded phantoms, a module-scoped Ray, a module-scoped S3 server."""

from __future__ import annotations

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
    """Job records (lits.jobs) go to a temporary folder, not ~/.cache: set before any Ray starts,
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


def local_ray(num_cpus: int):
    """Start a local Ray of `num_cpus` logical CPUs (no progress bars); yield its address; stop it."""
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_cluster():
    """A local 2-CPU Ray for the module; yields its address for workflow subprocesses."""
    yield from local_ray(2)


@pytest.fixture(scope="module")
def s3_server():
    """A real S3-protocol server (moto) on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        yield endpoint
    finally:
        server.stop()


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
    from lits.config import SynthConfig
    from lits.synthetic import synthesize as run

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


def run_workflow(name: str, *args: str, timeout: float = 300):
    """Run workflows/<name>.py in a subprocess; return the CompletedProcess."""
    import subprocess

    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(WORKFLOWS, f"{name}.py"), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def ray_train_cluster():
    """A local Ray with 3 logical CPUs: two 1-CPU training workers plus one for Ray Data's reads."""
    yield from local_ray(3)
