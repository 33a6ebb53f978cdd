"""Issue 21, items 1, 3 and 6: a job writes only inside its own output, skips a volume only when the
same model saw the same input, and its output overlaps neither the job records nor its own input.

Real files and a real S3-protocol server (moto, conftest's `s3_server`). The listing, the output
checks and the skip decision are tested directly, without Ray; the last test runs the attack of
item 1 (an S3 key with '..' parts aimed at another job's record) and the refusals of item 6 through
a running server.
"""

import json
import os
import shutil

import pytest

from conftest import free_port, local_ray, make_bucket
from lits.core import storage
from lits.core.errors import UserError
from lits.model import inference
from lits.serve import access, job_inputs, job_tasks
from test_inference import tiny_model

BUCKET = "integrity"


def s3fs_for(endpoint):
    import s3fs

    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)


@pytest.fixture(scope="module")
def bucket(s3_server):
    try:
        make_bucket(s3_server, BUCKET)
    except FileExistsError:  # moto keeps its buckets per process, across the modules' servers
        pass
    return s3fs_for(s3_server)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(ModelSpec, submit) of a tiny random U-Net run in this process."""
    spec, weights = inference.load_spec(tiny_model(tmp_path_factory.mktemp("model")))
    predictor = inference.Predictor(spec, weights, device="cpu")
    return spec, lambda images: inference.Done(predictor(images))


def ct_bytes(nifti_dir, i):
    with open(os.path.join(nifti_dir, f"volume-{i}.nii.gz"), "rb") as f:
        return f.read()


def segment(model, uri, rel, output, allow=(), overwrite=False):
    spec, submit = model
    return job_tasks.segment_volume(uri, rel, output, spec, submit, overwrite=overwrite, chunk=8, allow=list(allow))


# --- item 1: names that climb out of the output ---------------------------------------------------

def test_input_names_with_dot_or_empty_parts_are_refused_when_listing(bucket, nifti_dir):
    """S3 stores '..', '.' and empty key parts literally; the listing refuses those names (each a
    failed volume with its reason, so the user sees the object), as it does a name whose outputs
    would land among the job summaries or over another input's outputs."""
    good = ct_bytes(nifti_dir, 0)
    keys = ["in/volume-0.nii.gz", "in/../../../../tmp/allowed/state/0123456789ab.nii.gz", "in//volume-1.nii.gz",
            "in/./volume-2.nii.gz", "in/sub/../volume-3.nii.gz", "in/_jobs/0123456789ab.nii.gz",
            "in/a.nii", "in/a.nii.gz", "in/sub/volume-4.nii.gz"]
    for key in keys:
        bucket.pipe_file(f"{BUCKET}/list/{key}", good)
    listing = job_inputs.list_inputs(f"s3://{BUCKET}/list/in", f"s3://{BUCKET}/list/out")
    root = f"s3://{BUCKET}/list/in/"
    assert listing["volumes"] == [(root + "a.nii", "a"), (root + "sub/volume-4.nii.gz", "sub/volume-4"),
                                  (root + "volume-0.nii.gz", "volume-0")]
    reasons = {uri[len(root):]: why for uri, why in listing["refused"]}
    assert sorted(reasons) == sorted(k[len("in/"):] for k in keys[1:6] + ["in/a.nii.gz"])
    assert "'..' path parts" in reasons["../../../../tmp/allowed/state/0123456789ab.nii.gz"]
    assert "'' path parts" in reasons["/volume-1.nii.gz"] and "'.' path parts" in reasons["./volume-2.nii.gz"]
    assert "job summaries" in reasons["_jobs/0123456789ab.nii.gz"]
    assert "a.nii" in reasons["a.nii.gz"] and "names of" in reasons["a.nii.gz"]
    assert all("\n" not in why for why in reasons.values())


def test_every_output_is_checked_against_the_jobs_own_output(model, nifti_dir, tmp_path, bucket):
    """A volume whose output names climb out of the job's output (through '..' parts, or a symlinked
    sub-folder pointing at another allowed folder) fails before anything is removed or written: the
    files already at the escape target stay as they were. Locally and on S3."""
    allowed = tmp_path / "allowed"
    out, other = allowed / "out", allowed / "other-job"
    out.mkdir(parents=True)
    other.mkdir()
    victims = {name: f"{name} of another job".encode() for name in ("volume-0.json", "volume-0_seg.nii.gz",
                                                                     "volume-0_preview.png")}
    for name, data in victims.items():
        (other / name).write_bytes(data)
    (out / "linked").symlink_to(other)
    source = str(allowed / "volume-0.nii.gz")
    shutil.copyfile(os.path.join(nifti_dir, "volume-0.nii.gz"), source)
    for rel in ("../other-job/volume-0", "linked/volume-0"):
        result = segment(model, source, rel, str(out), allow=[str(allowed)])
        assert result["status"] == "failed" and "outside the job's output" in result["reason"], result
        assert {p.name: p.read_bytes() for p in other.iterdir()} == victims
        assert sorted(os.listdir(out)) == ["linked"]
    bucket.pipe_file(f"{BUCKET}/outs/evil/volume-0.json", b"another job's report")
    result = segment(model, source, "../evil/volume-0", f"s3://{BUCKET}/outs/job", allow=[str(allowed), f"s3://{BUCKET}"])
    assert result["status"] == "failed" and "not a plain name inside the job's output" in result["reason"], result
    bucket.invalidate_cache()
    assert bucket.find(f"{BUCKET}/outs") == [f"{BUCKET}/outs/evil/volume-0.json"]
    assert bucket.cat_file(f"{BUCKET}/outs/evil/volume-0.json") == b"another job's report"
    summaries = segment(model, source, "_jobs/0123456789ab", str(out))
    assert summaries["status"] == "failed" and "summaries' folder" in summaries["reason"], summaries
    done = segment(model, source, "sub/volume-0", f"s3://{BUCKET}/outs/job")
    assert done["status"] == "done", done


def test_check_inside_rules(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    access.check_inside(str(out / "a" / "b.json"), str(out))
    access.check_inside("s3://b/out/a/b.json", "s3://b/out")
    for uri, output in ((str(out / ".." / "x.json"), str(out)), (str(out), str(out)), (str(tmp_path / "outer.json"), str(out)),
                        ("s3://b/out/../x.json", "s3://b/out"), ("s3://b/out//x.json", "s3://b/out"),
                        ("s3://b/out/./x.json", "s3://b/out"), ("s3://b/outer/x.json", "s3://b/out"),
                        ("s3://b/out", "s3://b/out")):
        with pytest.raises(Exception, match="refused to write"):
            access.check_inside(uri, output)


# --- item 3: input identity -----------------------------------------------------------------------

def test_identity_changes_when_an_input_is_replaced(bucket, nifti_dir, tmp_path):
    uri = f"s3://{BUCKET}/identity/volume-0.nii.gz"
    bucket.pipe_file(uri[len("s3://"):], ct_bytes(nifti_dir, 0))
    first = storage.identity(uri)
    assert first["uri"] == uri and first["size"] == len(ct_bytes(nifti_dir, 0)) and len(first["etag"]) == 32
    assert storage.identity(uri) == first
    bucket.pipe_file(uri[len("s3://"):], ct_bytes(nifti_dir, 1))
    assert storage.identity(uri) != first
    local = tmp_path / "volume-0.nii.gz"
    local.write_bytes(ct_bytes(nifti_dir, 0))
    os.utime(local, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    before = storage.identity(str(local))
    assert before == {"uri": str(local), "size": local.stat().st_size, "mtime": 1_700_000_000.0}
    shutil.copyfile(os.path.join(nifti_dir, "volume-1.nii.gz"), local)  # a rescan copied over it
    assert storage.identity(str(local)) != before


def test_a_volume_is_skipped_only_when_this_model_saw_this_input(model, bucket, nifti_dir):
    """The report records the input's identity; the same input is skipped, a replaced input under the
    same key, another input writing the same names, and a report from before identities are
    recomputed."""
    out = f"s3://{BUCKET}/skip/out"
    first, second = f"s3://{BUCKET}/skip/a/volume-0.nii.gz", f"s3://{BUCKET}/skip/b/volume-0.nii.gz"
    bucket.pipe_file(first[len("s3://"):], ct_bytes(nifti_dir, 0))
    bucket.pipe_file(second[len("s3://"):], ct_bytes(nifti_dir, 2))
    report_key = f"{BUCKET}/skip/out/volume-0.json"

    def report():
        bucket.invalidate_cache()
        return json.loads(bucket.cat_file(report_key))

    assert segment(model, first, "volume-0", out)["status"] == "done"
    identity = report()["input_identity"]
    assert identity == storage.identity(first) and identity["etag"]
    assert segment(model, first, "volume-0", out)["status"] == "skipped"
    assert segment(model, second, "volume-0", out)["status"] == "done"  # another input, the same names
    assert report()["input"] == second and report()["input_identity"]["uri"] == second
    assert segment(model, first, "volume-0", out)["status"] == "done"
    bucket.pipe_file(first[len("s3://"):], ct_bytes(nifti_dir, 1))  # a rescan under the same key
    result = segment(model, first, "volume-0", out)
    assert result["status"] == "done" and report()["input_identity"] == storage.identity(first) != identity
    assert segment(model, first, "volume-0", out)["status"] == "skipped"
    old = {k: v for k, v in report().items() if k != "input_identity"}  # written before identities
    bucket.pipe_file(report_key, json.dumps(old).encode())
    assert segment(model, first, "volume-0", out)["status"] == "done"
    assert "input_identity" in report()


def test_a_replaced_local_input_is_recomputed(model, nifti_dir, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    volume = inp / "volume-0.nii.gz"
    shutil.copyfile(os.path.join(nifti_dir, "volume-0.nii.gz"), volume)
    assert segment(model, str(volume), "volume-0", str(out))["status"] == "done"
    assert segment(model, str(volume), "volume-0", str(out))["status"] == "skipped"
    shutil.copyfile(os.path.join(nifti_dir, "volume-3.nii.gz"), volume)
    assert segment(model, str(volume), "volume-0", str(out))["status"] == "done"
    assert json.loads((out / "volume-0.json").read_text())["input_identity"] == storage.identity(str(volume))


# --- item 6: overlapping outputs ------------------------------------------------------------------

def test_an_output_overlapping_the_job_records_or_its_input_is_refused(tmp_path):
    state, data = str(tmp_path / "state"), str(tmp_path / "data")
    refused = [  # (input, output, jobs state, what the message says)
        (data, state, state, "overlaps the jobs state folder"),
        (data, state + "/sub", state, "overlaps the jobs state folder"),
        (data, str(tmp_path), state, "overlaps the jobs state folder"),
        ("s3://b/in", "s3://b/state", "s3://b/state", "overlaps the jobs state folder"),
        ("s3://b/in", "s3://b", "s3://b/state", "overlaps the jobs state folder"),
        (data, data, state, "is the input itself"),
        (data + "/ct", data, state, "contains the input"),
        ("s3://b/lits/ct", "s3://b/lits", "s3://c/state", "contains the input"),
    ]
    for inp, out, jobs_state, message in refused:
        with pytest.raises(access.AccessError, match=message) as caught:
            access.check_job_uris(inp, out, jobs_state)
        assert caught.value.status == 400 and "\n" not in str(caught.value)
    for inp, out in ((data, data + "/seg"), (data, str(tmp_path / "seg")), (data + "/volume-0.nii.gz", data),
                     ("s3://b/lits", "s3://b/lits/seg"), ("s3://b/lits", "s3://b/lits-seg")):
        access.check_job_uris(inp, out, state)


def test_submit_job_refuses_an_output_over_the_job_records(tmp_path):
    """The same rules hold for a job submitted without HTTP (workflows/segment.py's own server), before
    its record is written or any Ray call."""
    from lits.serve import jobs
    from lits.serve.job_spec import JobSpec

    state = tmp_path / "state"
    job = JobSpec(input=str(tmp_path / "in"), output=str(state), app_name="lits", jobs_state=str(state))
    with pytest.raises(UserError, match="overlaps the jobs state folder"):
        jobs.submit_job(job)
    assert not state.exists()


def test_listing_explains_an_input_inside_its_output_and_skips_an_output_inside_its_input(bucket, nifti_dir):
    """A LiTS folder with the output inside it: the output's files are ignored, the CT listed. A folder
    input inside the output would be all ignored: the listing says so instead of finding nothing."""
    for key in ("lits/volume-0.nii.gz", "lits/segmentation-0.nii.gz", "lits/seg/volume-0_seg.nii.gz",
                "lits/seg/old/volume-9.nii.gz"):
        bucket.pipe_file(f"{BUCKET}/{key}", ct_bytes(nifti_dir, 0))
    listing = job_inputs.list_inputs(f"s3://{BUCKET}/lits", f"s3://{BUCKET}/lits/seg")
    assert listing["volumes"] == [(f"s3://{BUCKET}/lits/volume-0.nii.gz", "volume-0")] and listing["refused"] == []
    assert len(listing["ignored"]) == 3
    for output in (f"s3://{BUCKET}/lits", f"s3://{BUCKET}"):
        with pytest.raises(UserError, match="lies inside the output"):
            job_inputs.list_inputs(f"s3://{BUCKET}/lits", output)
    single = job_inputs.list_inputs(f"s3://{BUCKET}/lits/volume-0.nii.gz", f"s3://{BUCKET}/lits")
    assert single["volumes"] == [(f"s3://{BUCKET}/lits/volume-0.nii.gz", "volume-0")]


# --- end to end: the attack of item 1 and the refusals of item 6 on a running server ---------------

@pytest.fixture(scope="module")
def server(tmp_path_factory, s3_server, bucket):
    """Ray (3 logical CPUs) + the app, allowed to touch s3://integrity and one local folder, which
    also holds the job records (`allowed/state`), as in the issue's setup."""
    from ray import serve

    from lits.core.config import ServeConfig
    from lits.serve import serving

    root = tmp_path_factory.mktemp("integrity-server")
    allowed = root / "allowed"
    (allowed / "state").mkdir(parents=True)
    port = free_port()
    cfg = ServeConfig(model=tiny_model(root / "model"), port=port, allow_prefixes=(f"s3://{BUCKET}", str(allowed)),
                      jobs_state=str(allowed / "state"), chunk=8, max_batch_size=16, batch_wait_s=0.05, volume_cpus=1)
    with local_ray(3):
        try:
            serving.deploy(cfg)
            yield {"url": f"http://127.0.0.1:{port}", "allowed": allowed}
        finally:
            serve.shutdown()


def call(server, method, path, body=None):
    """(status, parsed JSON) of one HTTP request."""
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(server["url"] + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def run_job(server, **request):
    import time

    status, body = call(server, "POST", "/v1/jobs", request)
    assert status == 202, body
    deadline = time.time() + 300
    while time.time() < deadline:
        status, job = call(server, "GET", f"/v1/jobs/{body['job_id']}")
        assert status == 200, job
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {body['job_id']} did not end")


def files_under(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, names in os.walk(folder) for f in names)


@pytest.mark.slow
def test_a_key_with_dot_dot_parts_never_leaves_its_jobs_output(server, bucket, nifti_dir):
    """Issue 21, items 1 and 6, as the issue tried them: an output over the job records, over its
    input or equal to it is a 400 at submission; an S3 object named `evil/../../…/state/<id>.nii.gz`,
    aimed at an earlier job's record through a local output, fails as one refused volume while the
    job's plain volume is segmented; the earlier job keeps its record and answers; nothing is
    written outside the job's output."""
    allowed = server["allowed"]
    state = allowed / "state"
    for key in ("good/volume-0.nii.gz", "good/volume-1.nii.gz", "evil/volume-2.nii.gz"):
        bucket.pipe_file(f"{BUCKET}/e2e/{key}", ct_bytes(nifti_dir, int(key[-8])))
    good = f"s3://{BUCKET}/e2e/good"
    for output, message in ((str(state), "overlaps the jobs state folder"), (str(allowed), "overlaps the jobs state"),
                            (str(state / "jobs"), "overlaps the jobs state"), (good, "is the input itself"),
                            (f"s3://{BUCKET}/e2e", "contains the input")):
        status, body = call(server, "POST", "/v1/jobs", {"input": good, "output": output})
        assert status == 400 and message in body["detail"], (output, status, body)
    assert os.listdir(state) == []
    first = run_job(server, input=good, output=str(allowed / "out-a"))
    assert first["state"] == "succeeded" and first["counts"]["done"] == 2, first
    record = state / f"{first['job_id']}.json"
    before = record.read_bytes()
    climb = "../" * (len((allowed / "out-b").parts) + 1)
    bucket.pipe_file(f"{BUCKET}/e2e/evil/{climb}{str(state).lstrip('/')}/{first['job_id']}.nii.gz", ct_bytes(nifti_dir, 3))
    job = run_job(server, input=f"s3://{BUCKET}/e2e/evil", output=str(allowed / "out-b"))
    assert record.read_bytes() == before
    assert job["state"] == "succeeded" and job["counts"] == {"total": 2, "done": 1, "skipped": 0, "failed": 1,
                                                               "ignored": 0, "left_out": 0}, job
    [failure] = job["failed"]
    assert "/../" in failure["input"] and "'..' path parts" in failure["reason"], failure
    status, again = call(server, "GET", f"/v1/jobs/{first['job_id']}")
    assert status == 200 and again["state"] == "succeeded"
    assert first["job_id"] in {j["job_id"] for j in call(server, "GET", "/v1/jobs")[1]}
    outputs = [f"{name}{suffix}" for name in ("volume-0", "volume-1") for suffix in (".json", "_preview.png", "_seg.nii.gz")]
    assert files_under(allowed) == sorted(
        [f"out-a/{f}" for f in outputs] + [f"out-a/_jobs/{first['job_id']}.json", f"out-b/_jobs/{job['job_id']}.json"]
        + [f"{out}/_jobs/{j['job_id']}/volumes-00000.jsonl" for out, j in (("out-a", first), ("out-b", job))]
        + [f"out-b/volume-2{s}" for s in (".json", "_preview.png", "_seg.nii.gz")]
        + [f"state/{first['job_id']}.json", f"state/{job['job_id']}.json"])


def test_names_with_a_query_or_format_characters_are_refused():
    """s3fs reads 'victim.nii.gz?versionId=x.nii.gz' as the object 'victim.nii.gz': such a key would read
    another object and write every output to that one name. DEL and bidi overrides spoof names."""
    from lits.core.naming import refused_name

    assert "'?'" in refused_name("p/victim.nii.gz?versionId=x.nii.gz")
    assert "holds U+202E RIGHT-TO-LEFT OVERRIDE, a control or format character" in refused_name("p/a\u202egz.nii.gz")
    assert "U+007F control character" in refused_name("p/a\x7f.nii.gz")
    assert "U+200B ZERO WIDTH SPACE" in refused_name("p/volume\u200b-1.nii.gz")
    assert refused_name("p/ünïcode scan 1/volume-1.nii.gz") is None
