"""A real multi-node Ray cluster on this machine: `ray start --head` + `ray start --address`, each node
with its own resource, and the workflows joining it with --address; work must land where it should:
prepare and train on both nodes, a bulk job on the CPU node that joined while it waited."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import free_port, run_workflow
from test_inference import tiny_model

from lits.serve.job_progress import read_volume_records

pytestmark = pytest.mark.slow

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def _start(args, ready: str = "Ray runtime started", timeout: float = 120) -> subprocess.Popen:
    """`ray start ... --block` in its own process group; returns once it reports the node up."""
    proc = subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + timeout
    seen = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if ready in line:
            return proc
    _stop([proc])
    raise RuntimeError("ray start did not come up:\n" + "".join(seen[-30:]))


STOP_GRACE_S = 8


def _stop(procs) -> None:
    """SIGTERM the `ray start --block` processes (each stops its node's processes): the joined nodes
    together, then the head, each given STOP_GRACE_S; then SIGKILL what is left of their process
    groups (a node's graceful stop took ~30 s, with nothing left to keep)."""
    for group in (procs[1:], procs[:1]):
        for proc in group:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in group:
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _node_names(address: str, count: int, timeout: float = 90) -> dict:
    """{node_id: 'head' | 'worker' | 'cpu'} (from each node's custom resource), once `count` are alive.
    Asked from a fresh process: this one imported Ray before the auth mode was set."""
    query = ("import json, ray; ray.init(address=%r, log_to_driver=False); "
             "print(json.dumps({n['NodeID']: next((k[5:] for k in n['Resources'] if k.startswith('node_')), '?') "
             "for n in ray.nodes() if n['Alive']}))" % address)
    deadline = time.time() + timeout
    names, out = {}, None
    while time.time() < deadline and len(names) < count:
        out = subprocess.run([sys.executable, "-c", query], capture_output=True, text=True, timeout=120)
        names = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {}
        time.sleep(0.5)
    assert len(names) == count, (names, out.stderr[-2000:] if out else "")
    return names


@pytest.fixture(scope="module")
def two_nodes():
    """Head with 3 CPUs and {'node_head': 1}, worker with 3 CPUs and {'node_worker': 1}; yields
    (address, {node_id: which}); both nodes are stopped afterwards, also when a test fails."""
    # `ray start --head` turns on token authentication; every process that joins (the second node,
    # this test, the workflows) must then present the token Ray keeps under ~/.ray.
    old_mode = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "token"
    port = free_port()
    address = f"127.0.0.1:{port}"
    # Its own temp dir: `ray start --head` writes the cluster's address file there, not into
    # /tmp/ray where every later `ray.init()` on this machine would find it.
    temp_dir = f"/tmp/lits-mn-{port}"
    head = _start(["--head", f"--port={port}", f"--temp-dir={temp_dir}", "--num-cpus=3", "--resources={\"node_head\": 1}",
                   "--include-dashboard=false", "--node-ip-address=127.0.0.1"])
    procs = [head]
    try:
        procs.append(_start([f"--address={address}", "--num-cpus=3", "--resources={\"node_worker\": 1}",
                             "--node-ip-address=127.0.0.1"]))
        names = _node_names(address, 2)
        assert sorted(names.values()) == ["head", "worker"], names
        yield address, names
    finally:
        _stop(procs)
        shutil.rmtree(temp_dir, ignore_errors=True)
        if old_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = old_mode


def test_prepare_and_train_run_on_both_nodes(two_nodes, nifti_dir, tmp_path):
    address, names = two_nodes
    prepared, runs = tmp_path / "prepared", tmp_path / "runs"
    proc = run_workflow("prepare", "--input", nifti_dir, "--output", str(prepared), "--image-size", "32",
                        "--keep-liver", "1", "--keep-empty", "0.2", "--val-fraction", "0.34", "--test-fraction", "0",
                        "--address", address, timeout=600)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((prepared / "manifest.json").read_text())
    entries = [e for split in manifest["volumes"].values() for e in split] if isinstance(manifest.get("volumes"), dict) \
        else manifest["volumes"]
    used = {names[e["node_id"]] for e in entries}
    assert used == {"head", "worker"}, [e["node_id"] for e in entries]

    # two CPU workers of 2 CPUs each: no node has room for both, so the group spans the cluster
    proc = run_workflow("train", "--data", str(prepared), "--output", str(runs), "--num-workers", "2",
                        "--cpus-per-worker", "2", "--epochs", "1", "--base-width", "4", "--depth", "3",
                        "--batch-size", "8", "--address", address, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    header, row = (runs / "metrics.csv").read_text().strip().splitlines()[:2]
    nodes = row.split(",")[header.split(",").index("nodes")].split(";")
    assert {names[n] for n in nodes} == {"head", "worker"}
    assert (runs / "model" / "config.json").exists()


def _http(url: str, method: str = "GET", body=None):
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None, method=method,
                                     headers={"Authorization": "Bearer mn-token", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        return json.loads(r.read())


def test_a_bulk_job_takes_the_cpu_node_that_joins(nifti_dir, tmp_path, monkeypatch):
    """Issue 14.5: cluster.yaml's head has `CPU: 0`; jobs sized their concurrency once from
    ray.cluster_resources()["CPU"]. Here the head has no CPU and one node has 1 CPU (the model
    replica takes it), so serve.py deploys with no CPU left for volume tasks (before: it refused to
    start). A job over 4 volumes waits (concurrency 0) with its summary already written; then a node
    with 2 CPUs joins, the job takes them, and every volume runs there."""
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    port = free_port()
    address = f"127.0.0.1:{port}"
    temp_dir = f"/tmp/lits-mn-{port}"
    procs = [_start(["--head", f"--port={port}", f"--temp-dir={temp_dir}", "--num-cpus=0", "--resources={\"node_head\": 1}",
                     "--include-dashboard=false", "--node-ip-address=127.0.0.1"])]
    try:
        procs.append(_start([f"--address={address}", "--num-cpus=1", "--resources={\"node_replica\": 1}",
                             "--node-ip-address=127.0.0.1"]))
        inputs, out = tmp_path / "in", tmp_path / "out"
        inputs.mkdir()
        for i in range(4):
            shutil.copy(os.path.join(nifti_dir, f"volume-{i}.nii.gz"), inputs)
        http_port = free_port()
        monkeypatch.setenv("LITS_API_TOKEN", "mn-token")
        proc = run_workflow("serve", "--model", tiny_model(tmp_path / "model"), "--address", address, "--detach",
                            "--port", str(http_port), "--allow-prefix", str(tmp_path), "--jobs-state",
                            f"file://{tmp_path / 'state'}", timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "no CPU is free for volume tasks now" in proc.stderr
        url = f"http://127.0.0.1:{http_port}"
        job_id = _http(url + "/v1/jobs", "POST", {"input": str(inputs), "output": str(out)})["job_id"]
        deadline = time.time() + 60
        job = _http(f"{url}/v1/jobs/{job_id}")
        while job["counts"]["total"] == 0 and time.time() < deadline:
            time.sleep(0.5)
            job = _http(f"{url}/v1/jobs/{job_id}")
        time.sleep(3)
        job = _http(f"{url}/v1/jobs/{job_id}")
        assert job["state"] == "running" and job["concurrency"] == 0 and job["counts"]["done"] == 0, job
        summary = json.loads((out / "_jobs" / f"{job_id}.json").read_text())  # written before any volume ended
        assert summary["state"] == "running" and summary["counts"]["total"] == 4, summary

        procs.append(_start([f"--address={address}", "--num-cpus=2", "--resources={\"node_cpu\": 1}",
                             "--node-ip-address=127.0.0.1"]))
        names = _node_names(address, 3)
        deadline = time.time() + 300
        while job["state"] == "running" and time.time() < deadline:
            time.sleep(1)
            job = _http(f"{url}/v1/jobs/{job_id}")
        assert job["state"] == "succeeded" and job["counts"]["done"] == 4, job
        assert job["concurrency"] == 2, job
        summary = json.loads((out / "_jobs" / f"{job_id}.json").read_text())
        records = list(read_volume_records(summary))
        assert [names[v["node_id"]] for v in records] == ["cpu"] * 4, records
        assert sorted(p.name for p in out.iterdir() if p.name.endswith("_seg.nii.gz")) == [
            f"volume-{i}_seg.nii.gz" for i in range(4)]
    finally:
        _stop(procs)
        shutil.rmtree(temp_dir, ignore_errors=True)
