"""Ray Serve app and bulk jobs, end to end: real Ray, real HTTP, a real S3-protocol server.

Every test that uses the `server` fixture starts Ray and the app, so it is marked slow; the URI
rules and a job's per-volume outputs are checked without them.
"""

import concurrent.futures
import gzip
import hashlib
import http.client
import json
import os
import re
import signal
import time
import urllib.error
import urllib.request

import nibabel as nib
import numpy as np
import pytest

from conftest import free_port, local_ray, make_bucket, run_workflow, synthesize, upload_tree
from lits.model import inference
from test_inference import tiny_model

TOKEN = "s3cret-token"


def s3fs_for(endpoint):
    import s3fs

    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)


def bad_volumes(folder):
    """Three unusable 'volumes': cut-off gzip, not NIfTI at all, a single slice."""
    good = gzip.compress(nib.Nifti1Image(np.zeros((16, 16, 8), np.int16), np.eye(4)).to_bytes())
    (folder / "truncated.nii.gz").write_bytes(good[: len(good) // 2])
    (folder / "notes.nii").write_bytes(b"this is not a NIfTI file\n" * 40)
    (folder / "flat.nii.gz").write_bytes(gzip.compress(nib.Nifti1Image(np.zeros((32, 32, 1), np.int16), np.eye(4)).to_bytes()))


@pytest.fixture(scope="module")
def server(tmp_path_factory, s3_server):
    """Ray (6 logical CPUs) + the app on a free port, with a token, an allow-list and a bucket:
    archive/ct/ (4 good volumes, their reference segmentations, 3 bad files) and archive/many/
    (8 larger volumes). The bucket's endpoint reaches the replicas, job actors and volume tasks
    only through this driver's runtime_env, which Serve gives the apps it deploys (local_ray)."""
    from lits.serve import serving
    from lits.core.config import ServeConfig

    root = tmp_path_factory.mktemp("serving")
    ct = root / "ct"
    synthesize(ct, volumes=4, size=64, slices=24, seed=3)
    bad_volumes(ct)
    many = root / "many"
    synthesize(many, volumes=8, size=96, slices=48, seed=4)
    for f in many.glob("segmentation-*"):
        f.unlink()
    make_bucket(s3_server, "archive")
    make_bucket(s3_server, "other")
    upload_tree(s3_server, str(ct), "s3://archive/ct")
    upload_tree(s3_server, str(many), "s3://archive/many")
    model = tiny_model(root / "model")
    port = free_port()
    local_out = root / "local-out"
    local_out.mkdir()
    # 6 logical CPUs: this app's replica (1) and volume pool (2), then a second app's replica (1)
    # and its default pool (what is left: 2) in the tests that deploy one.
    cfg = ServeConfig(model=model, port=port, allow_prefixes=("s3://archive", str(local_out)), max_body_mb=3,
                      batch_wait_s=0.2, chunk=8, max_batch_size=16, token_sha256=serving.token_sha256(TOKEN),
                      volume_cpus=2)
    with local_ray(6):
        try:
            serving.deploy(cfg)
            yield {"url": f"http://127.0.0.1:{port}", "endpoint": s3_server, "root": root, "model": model,
                   "local_out": str(local_out), "cfg": cfg}
        finally:
            from ray import serve

            serve.shutdown()


def call(server, method, path, body=None, token=TOKEN, raw=None, headers=None):
    """(status, parsed JSON or bytes, headers) of one HTTP request."""
    h = dict(headers or {})
    if token:
        h["Authorization"] = f"Bearer {token}"
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
        h["Content-Type"] = "application/json"
    request = urllib.request.Request(server["url"] + path, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            payload, status, got = r.read(), r.status, dict(r.headers)
    except urllib.error.HTTPError as exc:
        payload, status, got = exc.read(), exc.code, dict(exc.headers)
    try:
        return status, json.loads(payload), got
    except ValueError:
        return status, payload, got


def wait_job(server, job_id, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status, job, _ = call(server, "GET", f"/v1/jobs/{job_id}")
        assert status == 200, job
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not end in {timeout} s")


def run_job(server, **request):
    status, body, _ = call(server, "POST", "/v1/jobs", request)
    assert status == 202, body
    return wait_job(server, body["job_id"])


@pytest.fixture(scope="module")
def first_job(server):
    return run_job(server, input="s3://archive/ct", output="s3://archive/seg")


@pytest.mark.slow
def test_job_segments_good_volumes_and_lists_bad_ones(server, first_job, tmp_path):
    import SimpleITK as sitk

    job = first_job
    assert job["state"] == "succeeded", job
    assert job["counts"] == {"total": 7, "done": 4, "skipped": 0, "failed": 3, "ignored": 4, "left_out": 0}
    reasons = {os.path.basename(f["input"]): f["reason"] for f in job["failed"]}
    assert set(reasons) == {"truncated.nii.gz", "notes.nii", "flat.nii.gz"}
    assert "truncated" in reasons["truncated.nii.gz"]
    assert "not a NIfTI" in reasons["notes.nii"]
    assert "implausible dimensions" in reasons["flat.nii.gz"]
    fs = s3fs_for(server["endpoint"])
    for i in range(4):
        fs.get(f"archive/seg/volume-{i}_seg.nii.gz", str(tmp_path / f"m{i}.nii.gz"))
        source = str(server["root"] / "ct" / f"volume-{i}.nii.gz")
        # A second reader (SimpleITK) agrees that the mask sits exactly on its volume.
        img, mask = sitk.ReadImage(source), sitk.ReadImage(str(tmp_path / f"m{i}.nii.gz"))
        assert mask.GetSize() == img.GetSize()
        assert np.allclose(mask.GetSpacing(), img.GetSpacing(), atol=1e-5)
        assert np.allclose(mask.GetOrigin(), img.GetOrigin(), atol=1e-4)
        assert np.allclose(mask.GetDirection(), img.GetDirection(), atol=1e-6)
        labels = sitk.GetArrayFromImage(mask)
        assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2}
        report = json.loads(fs.cat_file(f"archive/seg/volume-{i}.json"))
        assert report["model_id"] == job["model_id"]
        voxel_ml = float(np.prod(img.GetSpacing())) / 1000
        assert report["liver_volume_ml"] == pytest.approx(np.count_nonzero(labels >= 1) * voxel_ml, rel=1e-3, abs=1e-3)
        assert report["tumour_volume_ml"] == pytest.approx(np.count_nonzero(labels == 2) * voxel_ml, rel=1e-3, abs=1e-3)
        assert report["slices"] == 24
    # no outputs for bad volumes or reference segmentations, nothing half-written
    names = sorted(os.path.basename(p) for p in fs.ls("archive/seg"))
    assert names == ["_jobs"] + sorted([f"volume-{i}{suffix}" for i in range(4)
                                      for suffix in (".json", "_seg.nii.gz", "_preview.png")])
    summary = json.loads(fs.cat_file(f"archive/seg/_jobs/{job['job_id']}.json"))
    from lits.serve.job_progress import read_volume_records

    assert summary["state"] == "succeeded" and len(list(read_volume_records(summary))) == 7
    assert summary["counts"]["done"] == 4


@pytest.mark.slow
def test_second_submission_skips_and_overwrite_recomputes(server, first_job):
    fs = s3fs_for(server["endpoint"])
    before = fs.info("archive/seg/volume-0.json")["LastModified"]
    again = run_job(server, input="s3://archive/ct", output="s3://archive/seg")
    assert again["counts"]["skipped"] == 4 and again["counts"]["done"] == 0 and again["counts"]["failed"] == 3
    assert fs.info("archive/seg/volume-0.json")["LastModified"] == before
    redo = run_job(server, input="s3://archive/ct/volume-1.nii.gz", output="s3://archive/seg", overwrite=True)
    assert redo["counts"] == {"total": 1, "done": 1, "skipped": 0, "failed": 0, "ignored": 0, "left_out": 0}
    status, listing, _ = call(server, "GET", "/v1/jobs")
    assert status == 200
    assert {first_job["job_id"], again["job_id"], redo["job_id"]} <= {j["job_id"] for j in listing}


def wait_local_job(job_id, timeout=180):
    """The status of a job submitted with lits.serve.jobs (no HTTP) once it has ended."""
    from lits.serve import jobs

    deadline = time.time() + timeout
    while time.time() < deadline:
        job = jobs.get_job(job_id)
        if job["state"] in jobs.FINAL_STATES:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not end in {timeout} s")


def job_on_own_app(model: str, app_name: str, output: str, input: str = "s3://archive/ct") -> dict:
    """Deploy `model` as a second app (no HTTP), run one job of it to its end, undeploy; the job's status."""
    from lits.core.config import ServeConfig
    from lits.serve import jobs, serving
    from lits.serve.job_spec import JobSpec

    cfg = ServeConfig(model=model, chunk=8, max_batch_size=16, batch_wait_s=0.05)
    serving.deploy(cfg, http=False, app_name=app_name)
    try:
        return wait_local_job(jobs.submit_job(JobSpec(input=input, output=output, app_name=app_name, chunk=cfg.chunk)))
    finally:
        serving.undeploy(app_name)


@pytest.mark.slow
def test_a_new_model_recomputes_every_volume(server, tmp_path):
    """Outputs of one model are no reason to skip a volume for another: README's "a new model
    recomputes everything". A second app serves other weights; its job over the same output
    segments every volume again and every report then names it."""
    first = run_job(server, input="s3://archive/ct", output="s3://archive/remodel")
    assert first["counts"]["done"] == 4
    second = job_on_own_app(tiny_model(tmp_path / "model-b", seed=1), "lits-model-b", "s3://archive/remodel")
    assert second["state"] == "succeeded", second
    assert second["model_id"] != first["model_id"]
    assert second["counts"] == {"total": 7, "done": 4, "skipped": 0, "failed": 3, "ignored": 4,
                                 "left_out": 0}, second
    fs = s3fs_for(server["endpoint"])
    for i in range(4):
        assert json.loads(fs.cat_file(f"archive/remodel/volume-{i}.json"))["model_id"] == second["model_id"]


@pytest.mark.slow
def test_a_cascade_model_serves_both_stages_from_one_replica(server, tmp_path):
    """A cascade (a first stage that finds the liver, a second that segments its box) deployed like
    any model: a job's masks are, voxel for voxel, what the two stages give in one process, and its
    reports name the cascade's model id (both stages' weights)."""
    from lits.core import volumes
    from test_cascade import cascade_model

    model = cascade_model(tmp_path / "cascade")
    job = job_on_own_app(model, "lits-cascade", "s3://archive/cascade")
    assert job["counts"]["done"] == 4, job
    spec, _ = inference.load_spec(model)
    assert job["model_id"] == spec.model_id
    local = inference.LocalModel(*inference.load_predictors(model, device="cpu"))
    fs = s3fs_for(server["endpoint"])
    for i in range(4):
        hu, geometry = volumes.read_nifti(str(server["root"] / "ct" / f"volume-{i}.nii.gz"))
        expected, _ = inference.segment_array(hu, geometry, spec, local, chunk=8)
        got = nib.Nifti1Image.from_bytes(gzip.decompress(fs.cat_file(f"archive/cascade/volume-{i}_seg.nii.gz")))
        assert np.array_equal(np.asarray(got.dataobj), expected), i
        assert json.loads(fs.cat_file(f"archive/cascade/volume-{i}.json"))["model_id"] == spec.model_id
    assert len(np.unique(expected)) >= 2  # the second stage answered its input, not a constant


def test_a_stopped_volume_leaves_nothing_under_its_final_names(nifti_dir, tmp_path, monkeypatch):
    """A job's volume stopped between its mask and its report (the KeyboardInterrupt a cancel raises
    arrives while the preview is written): the mask it wrote is removed again, and so is a stale
    report of another model. Run to the end, the volume has all three outputs."""
    from lits.serve import job_tasks
    from lits.core import storage

    spec, weights = inference.load_spec(tiny_model(tmp_path / "model"))
    predictor = inference.Predictor(spec, weights, device="cpu")
    out = tmp_path / "out"
    out.mkdir()
    (out / "volume-0.json").write_text(json.dumps({"model_id": "f" * 16}))  # another model's outputs
    (out / "volume-0_seg.nii.gz").write_bytes(b"old mask")
    source = os.path.join(nifti_dir, "volume-0.nii.gz")
    real_write = storage.write_bytes

    def write_until_preview(uri, data):
        if uri.endswith("_preview.png"):
            assert os.path.exists(out / "volume-0_seg.nii.gz")  # the new mask is in place by now
            raise KeyboardInterrupt
        real_write(uri, data)

    def segment():
        return job_tasks.segment_volume(source, "volume-0", str(out), spec, lambda x: inference.Done(predictor(x)),
                                        overwrite=False, chunk=8)

    monkeypatch.setattr(storage, "write_bytes", write_until_preview)
    with pytest.raises(KeyboardInterrupt):
        segment()
    assert os.listdir(out) == []
    monkeypatch.setattr(storage, "write_bytes", real_write)
    result = segment()
    assert result["status"] == "done" and result["slices"] == 24
    assert sorted(os.listdir(out)) == ["volume-0.json", "volume-0_preview.png", "volume-0_seg.nii.gz"]
    assert json.loads((out / "volume-0.json").read_text())["model_id"] == spec.model_id
    assert segment()["status"] == "skipped"


def test_a_job_spec_survives_the_ray_boundary_and_refuses_bad_settings():
    """A job's settings cross to its actor and its volume tasks as one frozen JobSpec: pickled (what
    Ray does) it comes back equal; a bad field is one ValueError naming it, at the submitter."""
    import dataclasses
    import pickle

    from lits.core.config import ServeConfig
    from lits.serve import serving
    from lits.serve.job_spec import JobSpec

    job = JobSpec(input="s3://b/in", output="s3://b/out", app_name="lits", allow=["s3://b"], concurrency=3)
    assert job.allow == ("s3://b",) and re.fullmatch(r"[0-9a-f]{12}", job.job_id)
    assert pickle.loads(pickle.dumps(job)) == job and JobSpec(**dataclasses.asdict(job)) == job
    assert job.summary_uri == f"s3://b/out/_jobs/{job.job_id}.json"
    assert dataclasses.replace(job, jobs_state="s3://b/state").record_uri == f"s3://b/state/{job.job_id}.json"
    assert JobSpec(input="s3://b/in", output="s3://b/out", app_name="lits").job_id != job.job_id
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.chunk = 8
    for field, value in (("chunk", 0), ("concurrency", 0), ("cpus_per_volume", 0), ("cpus_per_volume", 65),
                         ("wait_s", 0), ("reserve_cpus", -1), ("job_id", "ABC"), ("input", ""), ("app_name", ""),
                         ("overwrite", "yes"), ("allow", ("",)), ("jobs_state", "")):
        with pytest.raises(ValueError, match=field):
            dataclasses.replace(job, **{field: value})
    # from the app's settings: the request's concurrency, else the app's; an elastic pool leaves
    # the replicas' CPUs (at max_replicas) to them, a fixed one (volume_cpus) never grows
    cfg = ServeConfig(model="s3://m", replicas=None, max_replicas=3, cpus_per_replica=2, job_concurrency=5,
                      allow_prefixes=("s3://b",), model_wait_s=7, jobs_state="s3://b/state")
    built = serving.job_spec(cfg, "app", "s3://b/in", "s3://b/out", True, None)
    assert (built.concurrency, built.reserve_cpus, built.allow, built.wait_s, built.jobs_state, built.overwrite) == (
        5, 6, ("s3://b",), 7, "s3://b/state", True)
    fixed = serving.job_spec(dataclasses.replace(cfg, volume_cpus=4), "app", "s3://b/in", "s3://b/out", concurrency=2)
    assert (fixed.concurrency, fixed.reserve_cpus, fixed.overwrite) == (2, None, False)


def test_a_running_job_writes_its_summary_at_most_every_few_seconds(tmp_path):
    """The summary of a running job is rewritten only when a volume finished since the last write,
    and at most every `every_s`; the final one always. A write that fails (here: outside the
    allow-list) is logged while the job runs, raised at its end. The status keeps its fields."""
    import dataclasses

    from lits.core.errors import BadInputError
    from lits.serve.job_progress import JobProgress, JobState, SummaryWriter, read_volume_records
    from lits.serve.job_spec import JobSpec

    job = JobSpec(input=str(tmp_path / "in"), output=str(tmp_path / "out"), app_name="lits")
    path = tmp_path / "out" / "_jobs" / f"{job.job_id}.json"
    progress = JobProgress(job)
    writer = SummaryWriter(progress, every_s=3600)

    def saved():
        return json.loads(path.read_text()) if path.exists() else None

    writer.save_progress()
    assert saved() is None  # nothing recorded yet
    writer.save_progress(force=True)
    assert saved()["state"] == "queued" and saved()["counts"]["done"] == 0
    progress.start()
    progress.listed(total=2, ignored=1)
    progress.record({"input": "in/b.nii.gz", "name": "b", "status": "done", "slices": 24, "chunks_resent": 1,
                     "node_id": "n1"})
    writer.save_progress()
    assert saved()["counts"]["done"] == 0  # not due yet
    writer.every_s = 0
    writer.save_progress()
    assert saved()["state"] == "running" and saved()["counts"]["done"] == 1
    path.unlink()
    writer.save_progress()
    assert saved() is None  # due, but nothing new
    progress.record({"input": "in/a.nii.gz", "name": "a", "status": "failed", "reason": "not NIfTI"})
    progress.finish()
    writer.write(JobState.SUCCEEDED)
    summary = saved()
    assert summary["state"] == "succeeded" and progress.status()["state"] == "running"
    assert [v["name"] for v in read_volume_records(summary)] == ["b", "a"] and summary["nodes"] == ["n1"]
    assert summary["failed"] == [{"input": "in/a.nii.gz", "reason": "not NIfTI"}]
    assert summary["progress"] == 1.0 and summary["slices_segmented"] == 24 and summary["chunks_resent"] == 1
    assert list(progress.status()) == ["job_id", "state", "input", "output", "overwrite", "model_id", "counts",
                                       "progress", "slices_segmented", "chunks_resent", "concurrency", "slices_per_s",
                                       "elapsed_s", "failed", "left_out", "error", "times", "summary"]
    fenced = SummaryWriter(JobProgress(dataclasses.replace(job, allow=(str(tmp_path / "in"),))), every_s=0)
    fenced.save_progress(force=True)  # logged, not raised: the job goes on
    with pytest.raises(BadInputError, match="outside the allowed prefixes"):
        fenced.write(JobState.SUCCEEDED)


@pytest.mark.slow
def test_cancel_stops_a_job(server):
    """Issue 11: DELETE marked a job cancelled while its tasks kept the CPUs. Cancel while the job's
    volume tasks hold both CPUs of the volume pool (seen in Ray's resource view); once the job says
    `cancelled` both are free again at once, and nothing half-done lies under a final name."""
    from lits.serve import serving

    status, body, _ = call(server, "POST", "/v1/jobs", {"input": "s3://archive/many", "output": "s3://archive/cancelled"})
    assert status == 202
    deadline = time.time() + 60
    while pool_cpus_free(serving.APP_NAME)[0] > 0 and time.time() < deadline:
        time.sleep(0.05)
    assert pool_cpus_free(serving.APP_NAME) == (0.0, 2.0)  # two volume tasks running
    status, job, _ = call(server, "DELETE", f"/v1/jobs/{body['job_id']}")
    assert status == 200
    job = wait_job(server, body["job_id"])
    assert job["state"] == "cancelled"
    # cancelled means its volume tasks have stopped: the pool's CPUs are free again (within the
    # resource view's own delay; a task still running takes seconds to end)
    deadline = time.time() + 0.5
    while pool_cpus_free(serving.APP_NAME)[0] < 2.0 and time.time() < deadline:
        time.sleep(0.05)
    assert pool_cpus_free(serving.APP_NAME) == (2.0, 2.0)
    assert job["counts"]["done"] < job["counts"]["total"] == 8
    fs = s3fs_for(server["endpoint"])
    summary = json.loads(fs.cat_file(f"archive/cancelled/_jobs/{body['job_id']}.json"))
    assert summary["state"] == "cancelled"
    # every mask written before the cancel has its report and every report its mask and preview:
    # nothing half-done under a final name
    names = [os.path.basename(p) for p in fs.ls("archive/cancelled")]
    masks = {n[:-len("_seg.nii.gz")] for n in names if n.endswith("_seg.nii.gz")}
    previews = {n[:-len("_preview.png")] for n in names if n.endswith("_preview.png")}
    reports = {n[:-len(".json")] for n in names if n.endswith(".json")}
    assert masks == reports == previews
    assert len(reports) >= job["counts"]["done"]


def pool_cpus_free(app_name, wait_s=10):
    """(free, total) CPUs of the app's volume pool, from Ray's resource view."""
    import ray

    from lits.serve import job_tasks

    key = f"CPU_group_{job_tasks.find_pool(app_name).id.hex()}"
    deadline = time.time() + wait_s
    while key not in ray.cluster_resources() and time.time() < deadline:  # Ray's view lags a new pool a little
        time.sleep(0.2)
    return ray.available_resources().get(key, 0.0), ray.cluster_resources()[key]


@pytest.mark.slow
def test_replica_killed_during_a_job_loses_no_volume(server):
    """Issue 11: SIGKILL the model replica while a job runs at the default concurrency. A second
    app (replica 1 CPU, default volume pool: the 2 CPUs left) whose batches wait 2 s for slices:
    half a second after a volume finished the next chunks sit queued in the replica when it is
    killed. Volume tasks must not take the CPU the dead replica frees (its replacement would never
    be scheduled: the job hung), and the chunks it held are sent again; every volume is done in
    bounded time. The PID is the one the replica reports itself (describe())."""
    from lits.serve import jobs, serving
    from lits.serve.job_spec import JobSpec
    from lits.core.config import ServeConfig

    cfg = ServeConfig(model=server["model"], batch_wait_s=2.0, max_batch_size=128, chunk=8,
                      model_wait_s=20)
    handle = serving.deploy(cfg, http=False, app_name="lits-kill")
    try:
        pid = handle.describe.remote().result()["pid"]
        assert pool_cpus_free("lits-kill") == (2.0, 2.0)
        job_id = jobs.submit_job(JobSpec(input="s3://archive/many", output="s3://archive/killed", app_name="lits-kill",
                                         chunk=cfg.chunk, wait_s=cfg.model_wait_s))
        deadline = time.time() + 60
        while time.time() < deadline:
            job = jobs.get_job(job_id)
            if job["counts"]["done"] >= 1:
                break
            time.sleep(0.1)
        time.sleep(0.5)
        job = jobs.get_job(job_id)
        assert job["state"] == "running" and job["counts"]["done"] < 8, job
        killed_at = time.time()
        os.kill(pid, signal.SIGKILL)
        while job["state"] == "running" and time.time() < killed_at + 120:
            time.sleep(0.5)
            job = jobs.get_job(job_id)
        assert job["state"] == "succeeded", job
        assert job["counts"]["done"] == 8 and job["counts"]["failed"] == 0, job
        assert time.time() - killed_at < 120
        assert job["chunks_resent"] >= 1, job  # the chunks the dead replica held were sent again
        assert handle.describe.remote().result(timeout_s=30)["pid"] != pid  # Serve replaced the replica
    finally:
        serving.undeploy("lits-kill")


@pytest.mark.slow
def test_segment_endpoint_answers_concurrent_requests(server):
    volumes = [server["root"] / "ct" / f"volume-{i}.nii.gz" for i in range(3)]

    def post(path):
        return call(server, "POST", f"/v1/segment?name={path.name}", raw=path.read_bytes(),
                    headers={"Content-Type": "application/octet-stream"})

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(post, volumes))
    for path, (status, payload, headers) in zip(volumes, answers):
        assert status == 200, payload
        mask = nib.Nifti1Image.from_bytes(gzip.decompress(payload))
        source = nib.load(str(path))
        assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)
        report = json.loads(headers["x-lits-report"])
        assert report["input"] == path.name and report["shape"] == list(source.shape)
        assert report["input_identity"] == {"name": path.name, "size": path.stat().st_size,
                                            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        assert headers["content-disposition"].endswith(f'{path.name[:-7]}_seg.nii.gz"')


@pytest.mark.slow
def test_segment_endpoint_rejects_bad_bodies(server):
    status, body, _ = call(server, "POST", "/v1/segment", raw=b"junk" * 100)
    assert status == 422 and "not a NIfTI" in body["detail"]
    status, body, _ = call(server, "POST", "/v1/segment", raw=b"\0" * (3 * 1024 * 1024 + 10))
    assert status == 413 and "limit of 3 MB" in body["detail"]
    status, body, _ = call(server, "POST", "/v1/segment", raw=b"")
    assert status == 400


@pytest.mark.slow
def test_segment_endpoint_answers_a_zip_of_one_dicom_series_with_its_seg(server, tmp_path):
    """Eight neighbouring slices of the real JPEG 2000 series, zipped in a folder, shuffled: the
    answer is a DICOM-SEG on that series (its instances referenced, its grid); a zip holding two
    series, or no DICOM, is one 422 line saying so."""
    import io
    import random
    import zipfile

    import pydicom

    from dicom_factory import write_series
    from lits.core import dicom, dicom_seg

    [series], _ = dicom.discover_series(os.path.join(os.path.dirname(__file__), "data", "dicom-ct-series"))
    files = list(series.files[4:12])
    random.Random(0).shuffle(files)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for f in files:
            zf.write(f, "export/" + os.path.basename(f))
    status, payload, headers = call(server, "POST", "/v1/segment?name=abdomen.zip", raw=buffer.getvalue(),
                                    headers={"Content-Type": "application/zip"})
    assert status == 200, payload
    assert headers["content-type"] == "application/dicom" and headers["content-disposition"].endswith('abdomen_seg.dcm"')
    seg = pydicom.dcmread(io.BytesIO(payload))
    referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID for f in files}
    labels, geometry = dicom_seg.read_seg(payload)
    assert geometry.canonical_shape == (8, 512, 512)
    report = json.loads(headers["x-lits-report"])
    assert report["input"] == "abdomen.zip" and report["slices"] == 8 and report["dicom"]["files"] == 8
    assert report["input_identity"]["sha256"] == hashlib.sha256(buffer.getvalue()).hexdigest()
    write_series(str(tmp_path / "a"), shape=(16, 16, 4))
    write_series(str(tmp_path / "b"), shape=(16, 16, 4))
    two = io.BytesIO()
    with zipfile.ZipFile(two, "w") as zf:
        for folder in ("a", "b"):
            for name in os.listdir(tmp_path / folder):
                zf.write(tmp_path / folder / name, f"{folder}/{name}")
    status, body, _ = call(server, "POST", "/v1/segment?name=two.zip", raw=two.getvalue())
    assert status == 422 and body["detail"].startswith("two.zip: 2 CT series"), body


@pytest.mark.slow
def test_every_api_route_needs_the_token(server, first_job):
    """Every route in the OpenAPI schema, called without the token or with a wrong one, answers 401;
    only /healthz (and the docs, which are not in the schema) are open."""
    assert call(server, "GET", "/healthz", token=None)[0] == 200
    assert call(server, "GET", "/docs", token=None)[0] == 200
    status, schema, _ = call(server, "GET", "/openapi.json", token=None)
    assert status == 200
    routes = {(method.upper(), path) for path, ops in schema["paths"].items() for method in ops}
    assert routes >= {("POST", "/v1/segment"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs"),
                      ("GET", "/v1/jobs/{job_id}"), ("DELETE", "/v1/jobs/{job_id}")}
    guarded = sorted(r for r in routes if r[1] != "/healthz")
    # path parameters name a real job: a route that skipped the check would answer 200, not 404
    for method, path in guarded:
        url = re.sub(r"\{[^}]+\}", first_job["job_id"], path)
        for token in (None, "wrong"):
            got, body, headers = call(server, method, url, token=token, raw=b"x" if method == "POST" else None)
            assert got == 401, (method, path, token, got, body)
            assert "token" in body["detail"]
            assert {k.lower(): v for k, v in headers.items()}.get("www-authenticate") == "Bearer"
    # and with the token the same real job is there (so the 401s above were about the token)
    assert call(server, "GET", f"/v1/jobs/{first_job['job_id']}")[0] == 200


@pytest.mark.slow
def test_body_limit_holds_for_a_chunked_upload(server):
    """A chunked upload declares no Content-Length: the limit is enforced while the body streams in."""
    def post_chunked(parts):
        connection = http.client.HTTPConnection("127.0.0.1", int(server["url"].rsplit(":", 1)[1]), timeout=120)
        try:
            connection.request("POST", "/v1/segment?name=volume-0.nii.gz", body=iter(parts),
                               headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/octet-stream"})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    volume = (server["root"] / "ct" / "volume-0.nii.gz").read_bytes()
    assert len(volume) < 3 * 1024 * 1024  # a chunked upload under the limit is segmented
    status, payload = post_chunked([volume[i:i + 65536] for i in range(0, len(volume), 65536)])
    assert status == 200, payload[:300]
    status, payload = post_chunked([b"\0" * 65536] * 49)  # 3 MiB + 64 KiB, no Content-Length
    assert status == 413 and b"limit of 3 MB" in payload, payload[:300]


@pytest.mark.slow
@pytest.mark.parametrize("uri, status", [
    ("s3://other/ct", 403),
    ("s3://archive-evil/ct", 403),
    ("/etc", 403),
    ("file:///etc/passwd", 403),
    ("s3://archive/../other/ct", 400),
    ("s3://archive/ct/./x", 400),
    ("relative/path", 400),
    ("http://example.com/ct", 400),
    ("s3://archive/nothing-here", 404),
])
def test_job_uris_are_checked(server, uri, status):
    got, body, _ = call(server, "POST", "/v1/jobs", {"input": uri, "output": "s3://archive/out"})
    assert got == status, body


@pytest.mark.slow
def test_job_requests_are_validated(server):
    assert call(server, "POST", "/v1/jobs", {"input": "s3://archive/ct", "output": "s3://other/out"})[0] == 403
    assert call(server, "POST", "/v1/jobs", {"input": "s3://archive/ct", "output": "s3://archive/o", "extra": 1})[0] == 422
    assert call(server, "GET", "/v1/jobs/0123456789ab")[0] == 404
    assert call(server, "GET", "/v1/jobs/..%2F..")[0] == 404
    assert call(server, "DELETE", "/v1/jobs/0123456789ab")[0] == 404


def test_check_uri_rules(tmp_path):
    from lits.serve.access import AccessError, check_uri

    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "escape").symlink_to("/etc")
    assert check_uri("s3://bucket/a/", []) == "s3://bucket/a"
    assert check_uri(str(allowed / "x"), [str(allowed)]) == str(allowed / "x")
    assert check_uri("file://" + str(allowed), [str(allowed)]) == str(allowed)
    cases = [("/tmp/x", [], 403), (str(allowed / "escape" / "passwd"), [str(allowed)], 403),
             ("s3://bucket/a\\..\\b", [], 400), ("s3://b/a/../c", [], 400), ("s3://b/x\n", [], 400),
             ("s3://", [], 400), ("s3://bucketx/a", ["s3://bucket"], 403)]
    for uri, allow, status in cases:
        with pytest.raises(AccessError) as err:
            check_uri(uri, allow)
        assert err.value.status == status, uri
    # format and C1/DEL characters too, as in input names (naming.hidden_character), each named
    for uri, named in [("s3://b/ct\u202e/x", "U+202E RIGHT-TO-LEFT OVERRIDE"), ("s3://b/a\x7f", "U+007F"),
                       ("s3://b/a\x85", "U+0085"), ("s3://b/x\n", "U+000A")]:
        with pytest.raises(AccessError, match=re.escape(named)) as err:
            check_uri(uri, [])
        assert err.value.status == 400 and "not allowed in URIs" in str(err.value), uri
    assert check_uri("s3://b/ünïcode scan/ct", []) == "s3://b/ünïcode scan/ct"


@pytest.mark.slow
def test_segment_workflow_against_the_server(server):
    env = {"LITS_API_TOKEN": TOKEN}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        proc = run_workflow("segment", "--input", "s3://archive/ct", "--output", "s3://archive/cli",
                            "--server", server["url"], timeout=300)
        os.environ["LITS_API_TOKEN"] = "wrong"
        denied = run_workflow("segment", "--input", "s3://archive/ct", "--output", "s3://archive/cli",
                              "--server", server["url"], timeout=60)
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    assert proc.returncode == 1, proc.stderr  # three bad volumes
    assert "failed volumes: 3" in proc.stdout and "succeeded" in proc.stdout
    assert "4/7 volumes" not in proc.stdout and "7/7 volumes" in proc.stderr
    assert denied.returncode == 2 and "401" in denied.stderr and "LITS_API_TOKEN" in denied.stderr
    assert len(denied.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_segment_workflow_runs_self_contained(server, tmp_path):
    out = tmp_path / "seg"
    proc = run_workflow("segment", "--input", str(server["root"] / "ct"), "--output", str(out),
                        "--model", server["model"], timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert sorted(p.name for p in out.glob("*_seg.nii.gz")) == [f"volume-{i}_seg.nii.gz" for i in range(4)]
    assert "done 4" in proc.stderr and "failed volumes: 3" in proc.stdout
    missing = run_workflow("segment", "--input", str(server["root"] / "ct"), "--output", str(out),
                           "--model", str(tmp_path / "no-model"), timeout=60)
    assert missing.returncode == 2 and "config.json is missing" in missing.stderr


@pytest.mark.slow
def test_serve_workflow_starts_answers_and_stops(server, tmp_path):
    """workflows/serve.py as a user runs it: its own local Ray, a token, SIGTERM to stop."""
    import subprocess
    import sys

    from conftest import ROOT, WORKFLOWS

    port = free_port()
    env = dict(os.environ, PYTHONPATH=ROOT, LITS_API_TOKEN="t0ken")
    proc = subprocess.Popen([sys.executable, os.path.join(WORKFLOWS, "serve.py"), "--model", server["model"],
                             "--port", str(port), "--allow-prefix", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # printed once the app is up
        assert line.startswith("serving model") and f":{port}" in line, (line, proc.stderr.read() if proc.poll() else "")
        local = {"url": f"http://127.0.0.1:{port}"}
        status, body, _ = call(local, "GET", "/healthz", token=None)
        assert status == 200 and body["model_id"] == call(server, "GET", "/healthz", token=None)[1]["model_id"]
        assert call(local, "GET", "/v1/jobs", token="t0ken")[0] == 200
        assert call(local, "GET", "/v1/jobs", token=TOKEN)[0] == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    bad = run_workflow("serve", "--model", str(tmp_path / "missing"), timeout=60)
    assert bad.returncode == 2 and "config.json is missing" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        busy = run_workflow("serve", "--model", server["model"], "--port", str(taken.getsockname()[1]), timeout=60)
    assert busy.returncode == 2 and "choose another --port" in busy.stderr


@pytest.mark.slow
def test_a_finished_job_keeps_no_actor_and_answers_from_its_summary(server, first_job):
    """Issue 11: every finished job kept a ~230 MB actor. Its actor exits once its summary and record
    are written; GET /v1/jobs/{id} then reads the summary in the bucket (nothing in the cluster's
    memory: what a restarted server sees), so an edit there shows in the answer."""
    import ray

    from lits.serve import job_runner, jobs

    job_id = first_job["job_id"]
    deadline = time.time() + 30
    while jobs._actor(job_id) is not None and time.time() < deadline:
        time.sleep(0.2)
    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    assert jobs.ACTOR_PREFIX + job_id not in names
    status, job, _ = call(server, "GET", f"/v1/jobs/{job_id}")
    assert status == 200 and job["state"] == "succeeded", job
    assert job["counts"] == first_job["counts"] and job["failed"] == first_job["failed"]
    fs = s3fs_for(server["endpoint"])
    key = f"archive/seg/_jobs/{job_id}.json"
    original = fs.cat_file(key)
    fs.pipe_file(key, json.dumps({**json.loads(original), "error": "edited in the bucket"}).encode())
    try:
        assert call(server, "GET", f"/v1/jobs/{job_id}")[1]["error"] == "edited in the bucket"
    finally:
        fs.pipe_file(key, original)
    status, listing, _ = call(server, "GET", "/v1/jobs")
    assert status == 200 and {"job_id": job_id, "state": "succeeded"}.items() <= next(
        j for j in listing if j["job_id"] == job_id).items()
    # no finished job of this module holds an actor
    time.sleep(job_runner.EXIT_AFTER_S + 2)
    finished = {j["job_id"] for j in listing if j["state"] in jobs.FINAL_STATES}
    alive = {a["name"][len(jobs.ACTOR_PREFIX):] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(jobs.ACTOR_PREFIX)}
    assert len(finished) >= 1 and not finished & alive, (finished, alive)


_PROBE = r"""
import sys, time, urllib.error, urllib.request
url, token, job_id = sys.argv[1:]
while True:
    for key, path, auth in (("healthz", "/healthz", {}), ("status", f"/v1/jobs/{job_id}", {"Authorization": f"Bearer {token}"})):
        t = time.perf_counter()
        try:
            with urllib.request.urlopen(urllib.request.Request(url + path, headers=auth), timeout=60) as r:
                r.read()
                status = r.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        print(key, round(time.perf_counter() - t, 3), status, flush=True)
    time.sleep(0.1)
"""


@pytest.mark.slow
def test_health_and_status_answer_within_a_second_under_load(server):
    """Issue 11: with 20 concurrent uploads and 3 jobs, /healthz took 6 s and job status up to 30 s
    (the ingress took 5 requests at once, uploads among them; a status waited for a busy job
    actor). The same load here (uploads of 96x96x48 volumes); 95% of /healthz and of the status of a
    running job answer in under a second and every one in under 3 s, as a client in its own process
    sees it (in this one, the upload threads and the S3 server's would be timed too)."""
    import subprocess
    import sys

    volumes = sorted((server["root"] / "many").glob("volume-*.nii.gz"))
    assert len(volumes) == 8 and all(p.stat().st_size < 1024 * 1024 for p in volumes)
    ids = []
    for k in range(3):
        status, body, _ = call(server, "POST", "/v1/jobs", {"input": "s3://archive/ct", "output": f"s3://archive/load-{k}"})
        assert status == 202, body
        ids.append(body["job_id"])
    def post(path):
        return call(server, "POST", f"/v1/segment?name={path.name}", raw=path.read_bytes(),
                    headers={"Content-Type": "application/octet-stream"})[0]

    prober = subprocess.Popen([sys.executable, "-c", _PROBE, server["url"], TOKEN, ids[0]], stdout=subprocess.PIPE,
                              text=True)
    try:
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            uploads = list(pool.map(post, [volumes[i % len(volumes)] for i in range(20)]))
        ended = [wait_job(server, i) for i in ids]
    finally:
        prober.terminate()
    latencies = {"healthz": [], "status": []}
    for line in prober.communicate(timeout=30)[0].splitlines():
        key, seconds, got = line.split()
        latencies[key].append((float(seconds), int(got)))
    assert uploads == [200] * 20
    assert [(j["state"], j["counts"]["done"]) for j in ended] == [("succeeded", 4)] * 3
    for key, seen in latencies.items():
        assert len(seen) >= 5 and {s for _, s in seen} == {200}, (key, seen)
        times = sorted(t for t, _ in seen)
        # 19 in 20 under a second, none over 3 s: on a 2-core box the probe, 20 upload threads and
        # the S3 server share the cores with the server, and one answer in ~40 has taken 1.3 s
        # (scheduling); the bug this guards against took 6-30 s, and 8.8 s with the ingress at 5.
        assert times[int(0.95 * (len(times) - 1))] < 1.0 and times[-1] < 3.0, (key, times[-5:])


@pytest.mark.slow
def test_segment_endpoint_rejects_complex_and_rgb_volumes(server):
    """Issue 11: a complex-valued or RGB NIfTI upload is the client's error: 4xx with one line."""
    rgb = np.zeros((16, 16, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    for data in (np.full((16, 16, 8), 1 + 2j, np.complex64), rgb):
        status, body, _ = call(server, "POST", "/v1/segment?name=odd.nii",
                               raw=nib.Nifti1Image(data, np.eye(4)).to_bytes())
        assert status in (400, 422), (data.dtype, status, body)
        assert isinstance(body["detail"], str) and body["detail"] and "\n" not in body["detail"], body


@pytest.mark.slow
def test_a_job_never_reads_or_writes_through_a_symlink_out_of_its_prefix(server, tmp_path):
    """Issue 11: below the allowed local folder, an input file that is a symlink to a file outside and
    an output sub-folder that is a symlink to a folder outside. Those two volumes fail with one line
    each; the outside folder is untouched; the plain volume is segmented."""
    import shutil

    outside = tmp_path / "outside"
    outside.mkdir()
    ct = server["root"] / "ct"
    shutil.copy(ct / "volume-2.nii.gz", outside / "secret.nii.gz")
    inp = os.path.join(server["local_out"], "links-in")
    os.makedirs(os.path.join(inp, "sub"))
    shutil.copy(ct / "volume-0.nii.gz", os.path.join(inp, "volume-0.nii.gz"))
    shutil.copy(ct / "volume-1.nii.gz", os.path.join(inp, "sub", "volume-1.nii.gz"))
    os.symlink(outside / "secret.nii.gz", os.path.join(inp, "linked.nii.gz"))
    out = os.path.join(server["local_out"], "links-out")
    os.makedirs(out)
    os.symlink(outside, os.path.join(out, "sub"))
    job = run_job(server, input=inp, output=out)
    assert job["state"] == "succeeded" and job["counts"]["done"] == 1 and job["counts"]["failed"] == 2, job
    reasons = {os.path.relpath(f["input"], inp): f["reason"] for f in job["failed"]}
    assert reasons["linked.nii.gz"].startswith("refused to read") and "outside the allowed prefixes" in reasons["linked.nii.gz"]
    assert reasons[os.path.join("sub", "volume-1.nii.gz")].startswith("refused to write")
    assert all("\n" not in r for r in reasons.values())
    assert sorted(os.listdir(outside)) == ["secret.nii.gz"]
    assert sorted(os.listdir(out)) == ["_jobs", "sub", "volume-0.json", "volume-0_preview.png", "volume-0_seg.nii.gz"]


def _tree_peak_rss_mb(pid: int) -> dict:
    """{pid: (peak RSS in MB (VmHWM), process title)} of `pid`'s descendants (this test's Ray: its
    GCS, raylet, workers, Serve replicas), from /proc."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    peaks, todo = {}, list(children.get(pid, []))
    while todo:
        current = todo.pop()
        try:
            with open(f"/proc/{current}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            peaks[current] = (int(fields["VmHWM"].split()[0]) / 1024, fields["Name"].strip())
        except (OSError, KeyError, ValueError):
            continue
        todo.extend(children.get(current, []))
    return peaks


@pytest.mark.slow
def test_decompression_bombs_on_the_segment_endpoint_stay_small(server, tmp_path):
    """Issue 11: a 2 MB .nii.gz holding valid voxels and then 2 GiB of zeros made a 4.3 GB worker on
    /v1/segment (under --max-body-mb); a valid file declaring over 2^30 voxels was taken as a scan.
    Both uploads answer 422 with one line naming the upload, and no process of this Ray (the
    ingress, the upload's worker, the replica, ...) has ever held more than 1.5 GB."""
    from test_bounded_inputs import BOMB_ZEROS, HUGE_SHAPE, write_gzip_stream

    from lits.core import volumes

    trailing, huge = tmp_path / "volume-90.nii.gz", tmp_path / "volume-91.nii.gz"
    write_gzip_stream(str(trailing), volumes.nifti_bytes(np.zeros((32, 32, 8), np.int16), np.eye(4), compress=False),
                      BOMB_ZEROS)
    header = nib.Nifti1Header()
    header.set_data_shape(HUGE_SHAPE)
    header.set_data_dtype(np.uint8)
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 352
    write_gzip_stream(str(huge), header.binaryblock + bytes(4), int(np.prod(HUGE_SHAPE)))
    assert trailing.stat().st_size < 3 << 20 and huge.stat().st_size < 3 << 20  # under the body limit
    answers = {path.name: call(server, "POST", f"/v1/segment?name={path.name}", raw=path.read_bytes())[:2]
               for path in (trailing, huge)}
    assert answers["volume-90.nii.gz"][0] == 422 and answers["volume-91.nii.gz"][0] == 422, answers
    assert answers["volume-90.nii.gz"][1]["detail"].startswith("volume-90.nii.gz: data continue after the 16736 bytes")
    assert answers["volume-91.nii.gz"][1]["detail"].startswith(
        "volume-91.nii.gz: the header declares 1024x1024x1100 = 1153433600 voxels, over the limit of 1073741824")
    assert all("\n" not in body["detail"] for _, body in answers.values())
    peaks = _tree_peak_rss_mb(os.getpid())
    assert len(peaks) >= 5, peaks  # GCS, raylet, the replicas, the upload's worker
    assert max(mb for mb, _ in peaks.values()) < 1536, sorted(peaks.values())[-3:]


@pytest.mark.slow
def test_a_lost_job_actor_loses_no_progress(server):
    """Issue 14.5: the summary was written only at the end, by an actor that is never restarted. The
    running job rewrites it as volumes finish; kill its actor mid-job: the status reads `failed`
    (submit again) with the counts the summary had, and the resubmission skips those volumes. An
    app whose batches wait 1 s for slices and one volume at a time: the job takes tens of seconds."""
    import ray

    from lits.serve import jobs, serving
    from lits.serve.job_spec import JobSpec
    from lits.core.config import ServeConfig

    cfg = ServeConfig(model=server["model"], batch_wait_s=1.0, max_batch_size=128, chunk=8,
                      volume_cpus=1)
    serving.deploy(cfg, http=False, app_name="lits-lost")
    settings = {"input": "s3://archive/many", "output": "s3://archive/lost", "app_name": "lits-lost", "chunk": cfg.chunk}
    try:
        job_id = jobs.submit_job(JobSpec(**settings))
        fs = s3fs_for(server["endpoint"])
        key = f"archive/lost/_jobs/{job_id}.json"
        deadline = time.time() + 120
        saved = {}
        while time.time() < deadline and saved.get("counts", {}).get("done", 0) < 1:
            time.sleep(0.2)
            fs.invalidate_cache()
            saved = json.loads(fs.cat_file(key)) if fs.exists(key) else {}
        assert saved["state"] == "running" and 1 <= saved["counts"]["done"] < 8, saved
        ray.kill(jobs._actor(job_id), no_restart=True)
        deadline = time.time() + 30
        while jobs._actor(job_id) is not None and time.time() < deadline:
            time.sleep(0.2)
        job = jobs.get_job(job_id)
        assert job["state"] == "failed" and job["error"] == jobs.LOST, job
        fs.invalidate_cache()
        saved = json.loads(fs.cat_file(key))
        assert job["counts"] == saved["counts"] and job["counts"]["done"] >= 1, (job, saved)
        again = jobs.submit_job(JobSpec(**settings, concurrency=4))
        deadline = time.time() + 180
        while jobs.get_job(again)["state"] not in jobs.FINAL_STATES and time.time() < deadline:
            time.sleep(0.5)
        again = jobs.get_job(again)
        assert again["state"] == "succeeded" and again["counts"]["failed"] == 0, again
        assert again["counts"]["skipped"] >= job["counts"]["done"], again
        assert again["counts"]["skipped"] + again["counts"]["done"] == 8, again
    finally:
        serving.undeploy("lits-lost")


@pytest.mark.slow
def test_an_elastic_job_takes_free_cpus_but_never_the_replicas(server):
    """Issue 14.5 on one node: this Ray has 6 CPUs; the app's replica holds 1 and its pool 2. A job
    whose app may have 1 replica CPU takes the 3 free ones into a group of its own (5 volumes at
    once) and gives them back when it ends; one whose replicas may take 4 CPUs at their maximum
    count takes none (nothing is free beyond what they may need). Each asks the autoscaler for the
    CPUs of its replicas, its groups and its waiting volumes (here: Ray's key-value store, what a
    cluster's autoscaler reads), and the last one withdraws the request."""
    import ray
    from ray.autoscaler._private.constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    from lits.serve import job_capacity, serving

    def group_cpus(groups, expected):
        """CPUs the placement groups hold in Ray's resource view (which lags a new or removed group)."""
        deadline = time.time() + 10
        while True:
            held = sum(ray.cluster_resources().get(f"CPU_group_{pg.id.hex()}", 0.0) for pg in groups)
            if held == expected or time.time() > deadline:
                return held
            time.sleep(0.1)

    deadline = time.time() + 60  # earlier tests' apps and tasks are gone: 3 CPUs free
    while ray.available_resources().get("CPU", 0.0) != 3.0 and time.time() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0.0) == 3.0
    capacity = job_capacity.JobCapacity(serving.APP_NAME, "0123456789ab", 1.0, reserve_cpus=1)
    assert capacity.concurrency() == 2 and group_cpus(capacity.groups, 2.0) == 2.0  # the app's pool
    capacity.refresh(waiting=8)
    try:
        assert capacity.concurrency() == 5 and len(capacity.groups) == 2
        assert group_cpus(capacity.groups, 5.0) == 5.0
        assert [capacity.place()["index"] for _ in range(5)] == [1, 0, 1, 0, 1]  # the one with most room first
        assert capacity.running == capacity.slots == [2, 3]
        asked = json.loads(_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL))
        # replica + both groups + the 3 volumes beyond them, as bundles only a CPU node type holds
        assert asked == [{"CPU": 1, "lits_cpu": 1}] * (1 + 5 + 3)
    finally:
        capacity.release(others_running=False)
    assert group_cpus(capacity.groups[1:], 0.0) == 0.0 and group_cpus(capacity.groups[:1], 2.0) == 2.0
    assert json.loads(_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)) == []
    greedy = job_capacity.JobCapacity(serving.APP_NAME, "ba9876543210", 1.0, reserve_cpus=4)
    greedy.refresh(waiting=8)
    assert greedy.concurrency() == 2 and len(greedy.groups) == 1
    greedy.release(others_running=False)


@pytest.mark.slow
def test_the_model_window_grows_only_while_it_is_full_and_the_model_idles(server, monkeypatch):
    """The app's model is idle here: a full window that turned over grows at every reading (x1.5);
    one the job does not fill, or that did not turn over (tasks starting), stays as it is; the
    replica's busy seconds count its forward passes."""
    from lits.serve import job_capacity, serving
    from lits.serve.model_client import model_handle

    monkeypatch.setattr(job_capacity, "REFRESH_S", 0.0)
    handle = model_handle(serving.APP_NAME)
    before = handle.progress.remote().result(timeout_s=30)
    window = job_capacity.ModelWindow(serving.APP_NAME, 2)
    replicas = job_capacity.running_replicas(serving.APP_NAME)
    assert replicas >= 1 and window.size(0, 0) == 2 * replicas  # readings asked, none read yet
    time.sleep(1.2)
    assert window.size(0, 0) == 2 * replicas  # the first answers have no predecessor
    time.sleep(1.2)
    assert window.size(0, 100) == 2 * replicas  # idle, but the job does not fill the window
    time.sleep(1.2)
    assert window.size(10 ** 6, 100 + 2 * replicas - 1) == 2 * replicas  # full, but not one turn finished
    time.sleep(1.2)
    assert window.size(10 ** 6, 1000) == 3 * replicas  # full, turned over and idle: 2 -> 3, on trial
    time.sleep(1.2)
    assert window.size(10 ** 6, 2000) == 3 * replicas  # the trial's first refresh settles (tasks start)
    time.sleep(1.2)
    assert window.size(10 ** 6, 4000) == 3 * replicas  # judged over two refreshes: the first decides nothing
    time.sleep(1.2)
    assert window.size(10 ** 6, 6000) == 4 * replicas and window.per_replica == 4  # paid (~4x): 3 -> 4
    time.sleep(1.2)
    assert window.size(10 ** 6, 8000) == 4 * replicas  # settles
    time.sleep(1.2)
    assert window.size(10 ** 6, 8100) == 4 * replicas
    time.sleep(1.2)
    assert window.size(10 ** 6, 8200) == 3 * replicas  # 4 did not pay (the rate fell): back to 3
    time.sleep(1.2)
    assert window.size(10 ** 6, 11000) == 3 * replicas  # and not past 3 again for a while
    after = handle.progress.remote().result(timeout_s=30)
    if after["pid"] == before["pid"]:
        assert 0.0 <= after["busy_s"] - before["busy_s"] < after["now"] - before["now"]


def test_the_window_per_replica_follows_the_busy_fraction():
    """Grow by half (at least one) while full and idle, up to MAX_PER_REPLICA; halve while
    the model is saturated, never below the configured base; hold when unknown or in between."""
    from lits.serve.job_capacity import MAX_PER_REPLICA, next_per_replica

    assert next_per_replica(3, 3, 0.2, full=True) == 4
    assert next_per_replica(8, 3, 0.5, full=True) == 12
    assert next_per_replica(MAX_PER_REPLICA, 3, 0.0, full=True) == MAX_PER_REPLICA
    assert next_per_replica(8, 3, 0.2, full=False) == 8  # the job does not use what it has
    assert next_per_replica(8, 3, 0.9, full=True) == 8  # between the thresholds
    assert next_per_replica(16, 3, 0.99, full=True) == 8
    assert next_per_replica(5, 3, 0.99, full=False) == 3  # never below the base
    assert next_per_replica(3, 3, 1.0, full=True) == 3
    assert next_per_replica(8, 3, None, full=True) == 8


def test_a_window_growth_is_kept_only_when_volumes_then_finish_faster():
    """Each growth is a trial: one refresh to settle, then the mean completion rate of the next
    JUDGE_REFRESHES refreshes must have risen by GROWTH_PAYS over the mean before the growth, or the
    window goes back and is barred from growing past that size for CEILING_REFRESHES refreshes (2 CPU
    cores under 18 logical ones: an idle model, no faster job)."""
    from lits.serve.job_capacity import GROWTH_PAYS, GrowthTrial

    trial = GrowthTrial(ceiling_refreshes=3, judge_refreshes=2)
    assert trial.step(3, 4, None) == 3  # no rate yet: no baseline, no growth
    assert trial.step(3, 4, 10.0) == 4  # grown on trial against 10/s
    assert trial.step(4, 6, 2.0) == 4  # the settling refresh: neither judged nor grown further
    paid = 10.0 * GROWTH_PAYS
    assert trial.step(4, 6, paid + 0.3) == 4  # judged over two refreshes: the first alone decides nothing
    assert trial.step(4, 6, paid - 0.1) == 6  # one interval under the bar, the mean over it: kept, 6 on trial
    assert trial.step(6, 9, 30.0) == 6  # settling
    assert trial.step(6, 9, 15.0) == 6  # one interval over the bar ...
    assert trial.step(6, 9, 8.0) == 4  # ... in a mean (11.5) under (paid + 0.1) * GROWTH_PAYS: back to 4
    assert trial.step(4, 6, 50.0) == 4  # barred past 4 ...
    assert trial.step(4, 6, 50.0) == 4
    assert trial.step(4, 6, 50.0) == 6  # ... for 3 refreshes, then tried again
    assert trial.step(6, 3, 50.0) == 3  # saturated: shrinking is never held back, and ends the trial
    assert trial.step(3, 4, 50.0) == 4
    # a grown window the job cannot fill yet (an elastic pool's new nodes take minutes) is not judged
    for _ in range(5):
        assert trial.step(4, 6, 1.0, filled=False) == 4
    assert trial.step(4, 6, 1.0, filled=True) == 4  # filled at last: one refresh to settle
    assert trial.step(4, 6, 50.0 * GROWTH_PAYS + 1) == 4
    assert trial.step(4, 6, 1.0, filled=False) == 4  # the job's tail: not counted against the growth
    assert trial.step(4, 6, 50.0 * GROWTH_PAYS + 1) == 6  # then judged against the rates before the growth
    assert trial.replicas_changed() == 4  # a growth still on trial goes back when the replicas change
    assert trial.trial is None and trial.ceiling is None and trial.recent == []
    assert trial.replicas_changed() is None


@pytest.mark.slow
def test_every_wait_on_the_model_has_a_deadline_and_a_resend(server, monkeypatch):
    """Issue 11: a wait on the model had no deadline (a job hung for as long as one waited). A real
    deployment that never answers in time: each try is cut after its deadline and sent again, and
    after RETRIES resends the caller gets one line (ModelUnavailable), in bounded time."""
    from ray import serve

    from lits.serve import model_client

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=16)
    class Stalled:
        def __init__(self):
            self.calls = 0

        async def predict(self, images):
            import asyncio

            self.calls += 1
            await asyncio.sleep(60)

        def count(self):
            return self.calls

    handle = serve.run(Stalled.bind(), name="lits-stalled", route_prefix=None)
    try:
        monkeypatch.setattr(model_client, "RETRY_WAIT_S", 0.05)
        resent = []
        started = time.time()
        with pytest.raises(model_client.ModelUnavailable, match=r"did not answer 8 slices in 6 tries of 1 s"):
            model_client.call_model(lambda: handle.predict.remote(np.zeros((8, 4, 4, 3), np.uint8)), "8 slices",
                                 wait_s=1.0, resent=resent, size=8)
        assert time.time() - started < 20
        assert resent == [8] * model_client.RETRIES
        assert handle.count.remote().result(timeout_s=10) == model_client.RETRIES + 1
    finally:
        serve.delete("lits-stalled")


def test_bookkeeping_costs_the_same_per_volume_at_any_job_size(tmp_path):
    """A job of 10,000 volumes whose summary is saved after every volume (the worst case): the bytes
    written per volume stay bounded (the summary is compact; each result is written once, in a
    shard), the actor holds at most a shard's worth of results, status lists capped failures,
    and every result can be read back in the order it finished."""
    from lits.serve import job_progress
    from lits.serve.job_progress import JobProgress, JobState, SummaryWriter, read_volume_records
    from lits.serve.job_spec import JobSpec

    job = JobSpec(input=str(tmp_path / "in"), output=str(tmp_path / "out"), app_name="lits")
    progress = JobProgress(job)
    writer = SummaryWriter(progress, every_s=0)
    progress.start()
    progress.listed(total=10_000, ignored=0)
    summary_path = tmp_path / "out" / "_jobs" / f"{job.job_id}.json"
    written = [0.0] * 10  # summary bytes written per thousand volumes
    for i in range(10_000):
        failed = i % 10 == 0
        progress.record({"input": f"in/v{i}.nii.gz", "name": f"v{i}", "node_id": f"n{i % 4}",
                         **({"status": "failed", "reason": "not NIfTI"} if failed else {"status": "done", "slices": 5})})
        writer.save_progress()
        written[i // 1000] += summary_path.stat().st_size
        assert len(progress.pending) < job_progress.RECORDS_PER_SHARD
    status = progress.status()  # answers from counts: its failures listed are capped too
    progress.finish()
    writer.write(JobState.SUCCEEDED)
    shards = sorted((tmp_path / "out" / "_jobs" / job.job_id).iterdir())
    # the last thousand volumes cost what the second thousand did (a summary of every result: 10x)
    assert written[-1] < 1.1 * written[1] and written[-1] / 1000 < 10_000, written
    assert sum(p.stat().st_size for p in shards) / 10_000 < 200  # each result written once
    summary = json.loads(summary_path.read_text())
    assert summary_path.stat().st_size < 32_000 and summary["counts"]["failed"] == 1_000
    assert len(summary["failed"]) == job_progress.FAILED_LISTED and summary["nodes"] == ["n0", "n1", "n2", "n3"]
    assert [r["name"] for r in read_volume_records(summary)] == [f"v{i}" for i in range(10_000)]
    assert len(shards) == 10 and len(status["failed"]) == job_progress.FAILED_LISTED
