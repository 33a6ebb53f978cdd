"""A real two-node Ray cluster on this machine: `ray start --head` + `ray start --address`, each node
with its own resource, and the workflows joining it with --address; work must land on both nodes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import free_port, run_workflow

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
    _stop(proc)
    raise RuntimeError("ray start did not come up:\n" + "".join(seen[-30:]))


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the `ray start --block` process (it stops its node's processes), then its group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


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
        # Asked from a fresh process: this one imported Ray before the auth mode was set.
        query = ("import json, ray; ray.init(address=%r, log_to_driver=False); "
                 "print(json.dumps({n['NodeID']: 'head' if 'node_head' in n['Resources'] else 'worker' "
                 "for n in ray.nodes() if n['Alive']}))" % address)
        deadline = time.time() + 90
        names = {}
        while time.time() < deadline and len(names) < 2:
            out = subprocess.run([sys.executable, "-c", query], capture_output=True, text=True, timeout=120)
            names = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {}
            time.sleep(0.5)
        assert sorted(names.values()) == ["head", "worker"], (names, out.stderr[-2000:])
        yield address, names
    finally:
        for proc in reversed(procs):
            _stop(proc)
        import shutil

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
