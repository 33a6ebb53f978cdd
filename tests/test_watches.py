"""Watches (/v1/watches): a prefix the service keeps segmenting. The rules on hand-made listings (fast),
then the real app on a real Ray against a real S3-protocol server (slow, one app for the module)."""

import json
import logging
import time

import pytest

from conftest import free_port, local_ray, make_bucket, synthesize
from lits.serve import watch_state
from test_inference import tiny_model
from test_serving import TOKEN, call, s3fs_for


def test_an_object_is_ready_after_two_unchanged_polls_and_segmented_once():
    entries = {}
    a1, a2 = {"size": 10, "etag": "x"}, {"size": 12, "etag": "y"}
    assert watch_state.advance(entries, {"a.nii.gz": a1}, 0.0) == []  # seen once
    assert watch_state.advance(entries, {"a.nii.gz": a2}, 1.0) == []  # still growing: seen once again
    assert watch_state.advance(entries, {"a.nii.gz": a2}, 2.0) == ["a.nii.gz"]
    watch_state.submitted(entries, ["a.nii.gz"], "0123456789ab", 2.0)
    assert watch_state.advance(entries, {"a.nii.gz": a2}, 3.0) == []  # submitted: never again while unchanged
    watch_state.finished(entries, "a.nii.gz", True, None, 5.0)
    assert entries["a.nii.gz"]["state"] == "done" and entries["a.nii.gz"]["lag_s"] == 4.0  # from first seen, t=1
    for t in (6.0, 7.0):
        assert watch_state.advance(entries, {"a.nii.gz": a2}, t) == []
    # Replaced: segmented again; deleted: left alone (a pending one that vanishes is forgotten).
    a3 = {"size": 12, "etag": "z"}
    assert watch_state.advance(entries, {"a.nii.gz": a3, "b.nii": a1}, 8.0) == []
    assert watch_state.advance(entries, {"a.nii.gz": a3}, 9.0) == ["a.nii.gz"]
    assert entries["a.nii.gz"]["versions"] == 1 and "b.nii" not in entries
    watch_state.submitted(entries, ["a.nii.gz"], "0123456789ac", 9.0)
    watch_state.finished(entries, "a.nii.gz", False, "not a NIfTI file", 10.0)
    assert watch_state.advance(entries, {}, 11.0) == [] and entries["a.nii.gz"]["state"] == "failed"
    assert watch_state.summary(entries)["failed"] == [{"key": "a.nii.gz", "reason": "not a NIfTI file",
                                                        "job_id": "0123456789ac"}]
    assert "entries" not in watch_state.summary(entries)
    assert watch_state.summary(entries, rows=5)["entries"] == [{"key": "a.nii.gz", "state": "failed", "lag_s": 2.0,
                                                                "reason": "not a NIfTI file", "job_id": "0123456789ac",
                                                                "changed_at": 10.0}]


def test_a_status_lists_the_first_keys_or_the_latest_to_move():
    """?entries=N&order=key|recent: of 1,000 keys, the first N by key, or the N that moved last (done,
    failed, submitted or first seen, newest first); counts, failures and pending keys over all of them."""
    entries = {}
    for i in range(1000):
        key = f"v{i:04d}.nii"
        entries[key] = {"identity": {}, "state": "pending", "polls": 1, "first_seen": float(i)}
        if i % 3 == 0:
            watch_state.submitted(entries, [key], "0123456789ab", 2000.0 - i)
        if i % 6 == 0:
            watch_state.finished(entries, key, i % 12 == 0, "bad", 5000.0 - i)
    first = watch_state.summary(entries, rows=3)
    assert [e["key"] for e in first["entries"]] == ["v0000.nii", "v0001.nii", "v0002.nii"]
    recent = watch_state.summary(entries, rows=4, order="recent")["entries"]
    assert [(e["key"], e["changed_at"]) for e in recent] == [("v0000.nii", 5000.0), ("v0006.nii", 4994.0),
                                                             ("v0012.nii", 4988.0), ("v0018.nii", 4982.0)]
    assert first["counts"] == {"pending": 666, "submitted": 167, "done": 84, "failed": 83}
    assert [f["key"] for f in first["failed"][:2]] == ["v0006.nii", "v0018.nii"] and len(first["failed"]) == 83
    assert first["pending"][:2] == ["v0001.nii", "v0002.nii"] and len(first["pending"]) == 100
    with pytest.raises(ValueError, match="order"):
        watch_state.summary(entries, rows=1, order="newest")


def test_an_object_replaced_while_its_job_runs_is_segmented_again_after():
    entries = {}
    for t in (0.0, 1.0):
        ready = watch_state.advance(entries, {"a.nii": {"size": 1, "etag": "x"}}, t)
    watch_state.submitted(entries, ready, "0123456789ab", 1.0)
    assert watch_state.advance(entries, {"a.nii": {"size": 2, "etag": "y"}}, 2.0) == []
    watch_state.finished(entries, "a.nii", True, None, 3.0)
    assert entries["a.nii"]["state"] == "pending"
    assert watch_state.advance(entries, {"a.nii": {"size": 2, "etag": "y"}}, 4.0) == []
    assert watch_state.advance(entries, {"a.nii": {"size": 2, "etag": "y"}}, 5.0) == ["a.nii"]


def test_an_object_whose_job_was_lost_is_submitted_again_at_the_next_poll():
    entries = {}
    for t in (0.0, 1.0):
        ready = watch_state.advance(entries, {"a.nii": {"size": 1, "etag": "x"}}, t)
    watch_state.submitted(entries, ready, "0123456789ab", 1.0)
    watch_state.retry(entries, "a.nii")
    assert watch_state.advance(entries, {"a.nii": {"size": 1, "etag": "x"}}, 2.0) == ["a.nii"]
    assert entries["a.nii"]["first_seen"] == 0.0 and entries["a.nii"]["retries"] == 1


def test_of_servers_taking_an_expired_lease_at_once_exactly_one_holds_it(tmp_path):
    """take_lease is a conditional write against the version read: absent, expired or its own, and
    of 4 servers at once (threads released by one barrier) exactly one gets it; renew_lease keeps
    only the holder's."""
    import threading

    from lits.serve.watch_lease import read_lease, renew_lease, take_lease

    uri = str(tmp_path / "lease.json")
    for round_ in range(6):
        barrier, holders = threading.Barrier(4), []

        def take(owner):
            barrier.wait()
            if take_lease(uri, owner, ttl_s=0.05):  # expires at once: the next round takes it again
                holders.append(owner)

        threads = [threading.Thread(target=take, args=(f"s{round_}-{i}",)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(holders) == 1 and read_lease(uri)["owner"] == holders[0], holders
        time.sleep(0.06)
    assert take_lease(uri, "a", ttl_s=60) and not take_lease(uri, "b", ttl_s=60)  # held: not taken
    assert renew_lease(uri, "a", 60) and not renew_lease(uri, "b", 60) and read_lease(uri)["owner"] == "a"


def test_a_listing_keys_nifti_objects_and_leaf_folders_of_dicom_files(tmp_path):
    """One listing: each NIfTI object by its key; each leaf folder of DICOM-like files (.dcm, no
    suffix, digits) as one input whose identity changes when any file of it changes, comes or goes;
    other files, the output and a folder with subfolders of inputs are not inputs."""
    import shutil

    from dicom_factory import write_series
    from lits.serve.watches import list_prefix

    root = tmp_path / "in"
    (root / "p1").mkdir(parents=True)
    (root / "a.nii.gz").write_bytes(b"x" * 10)
    write_series(str(root / "p1" / "ct"), shape=(8, 8, 3))
    (root / "p1" / "notes.json").write_text("{}")
    (root / "p2").mkdir()
    (root / "p2" / "IM0001").write_bytes(b"d" * 200)
    (root / "p2" / "1.2.840.1").write_bytes(b"d" * 150)
    (root / "p2" / "README").write_bytes(b"r" * 500)  # no suffix, but no slice
    (root / "p2" / "tiny").write_bytes(b"t" * 20)  # no suffix, smaller than a DICOM preamble
    (root / "mixed" / "sub").mkdir(parents=True)
    (root / "mixed" / "x.dcm").write_bytes(b"d")
    (root / "mixed" / "sub" / "v.nii").write_bytes(b"n")
    (root / "out").mkdir()
    (root / "out" / "y.dcm").write_bytes(b"o")
    listing = list_prefix(str(root), str(root / "out"))
    assert sorted(listing) == ["a.nii.gz", "mixed/", "mixed/sub/v.nii", "p1/ct/", "p2/"], listing
    assert listing["p2/"]["size"] == 350 and listing["p2/"]["etag"].startswith("2-")
    assert "folder of its own" in listing["mixed/"]["refused"] and not any("refused" in listing[k] for k in
                                                                           ("p1/ct/", "p2/", "a.nii.gz"))
    # the mixed folder is never submitted: once ready it is failed with the reason
    entries = {}
    assert watch_state.advance(entries, listing, 0.0) == []
    assert watch_state.advance(entries, listing, 1.0) == ["a.nii.gz", "mixed/sub/v.nii", "p1/ct/", "p2/"]
    assert entries["mixed/"]["state"] == "failed" and "folder of its own" in entries["mixed/"]["reason"]
    before = listing["p1/ct/"]
    shutil.copy(next((root / "p1" / "ct").iterdir()), root / "p1" / "ct" / "extra.dcm")
    after = list_prefix(str(root), str(root / "out"))["p1/ct/"]
    assert after != before and after["etag"].startswith("4-")


def test_folder_placeholders_on_s3_are_not_inputs(s3_server):
    """Keys ending in '/' (the S3 console's "Create folder") are neither slices nor folders of them."""
    from lits.serve.watches import list_prefix
    from test_serving import s3fs_for

    make_bucket(s3_server, "placeholders")
    fs = s3fs_for(s3_server)
    for key in ("in/", "in/p1/", "in/p1/ct/"):
        fs.pipe_file(f"placeholders/{key}", b"")
    for name in ("a.dcm", "b.dcm"):
        fs.pipe_file(f"placeholders/in/p1/ct/{name}", b"d" * 200)
    listing = list_prefix("s3://placeholders/in", "s3://placeholders/out")
    assert sorted(listing) == ["p1/ct/"] and listing["p1/ct/"]["etag"].startswith("2-"), listing


def test_a_key_no_job_may_take_is_listed_refused(s3_server):
    """An S3 key may hold '..' or empty parts: the listing marks it refused (the watch fails it with the
    reason) instead of handing a job an input it would refuse."""
    from lits.serve.watches import list_prefix
    from test_serving import s3fs_for

    make_bucket(s3_server, "crafted")
    fs = s3fs_for(s3_server)
    for key in ("in/ok.nii.gz", "in/a/../../out/x.nii.gz", "in/b//c.nii.gz"):
        fs.pipe_file(f"crafted/{key}", b"n" * 10)
    listing = list_prefix("s3://crafted/in", "s3://crafted/out")
    assert "refused" not in listing["ok.nii.gz"], listing
    crafted = {k: v for k, v in listing.items() if k != "ok.nii.gz"}
    assert sorted(crafted) == ["a/../../out/x.nii.gz", "b//c.nii.gz"], listing
    assert all("path parts" in v.get("refused", "") for v in crafted.values()), listing


def test_percentiles_and_the_job_window():
    assert watch_state.percentile([5, 1, 3, 2, 4], 50) == 3 and watch_state.percentile([], 95) is None
    assert watch_state.percentile(list(range(1, 101)), 95) == 95
    # a round's ready keys in one job (or jobs of at most per_job), as many jobs as the window has room for
    assert watch_state.job_batches(["a", "b", "c"], 3, 4, 500) == [["a", "b", "c"]]
    assert watch_state.job_batches(["a", "b", "c"], 1, 4, 2) == [["a", "b"], ["c"]]
    assert watch_state.job_batches(["a", "b", "c"], 3, 4, 2) == [["a", "b"]]
    assert watch_state.job_batches(["a", "b"], 4, 4, 500) == []
    assert watch_state.job_batches(["/"], 0, 4, 500) == [["/"]]


def test_a_jobs_volume_results_settle_each_of_its_keys_alone():
    """One job over several keys: a key is done when its own volumes are, failed with its own reason,
    and failed with the job's word when none of its volumes was recorded."""
    uris = {"a.nii": "s3://b/in/a.nii", "notes.nii": "s3://b/in/notes.nii", "p1/ct/": "s3://b/in/p1/ct",
            "p2/ct/": "s3://b/in/p2/ct", "gone/": "s3://b/in/gone"}
    records = [{"input": "s3://b/in/a.nii", "status": "done"},
               {"input": "s3://b/in/notes.nii", "status": "failed", "reason": "not a NIfTI file"},
               {"input": "s3://b/in/p1/ct", "status": "skipped"},
               {"input": "s3://b/in/p2/ct", "status": "done"},
               {"input": "s3://b/in/p2/ct", "status": "failed", "reason": "series 2: gaps"},
               {"input": "s3://b/in/p1/ct2", "status": "failed", "reason": "another folder"}]
    assert watch_state.outcomes(uris, records, "nothing there") == {
        "a.nii": (True, None), "notes.nii": (False, "not a NIfTI file"), "p1/ct/": (True, None),
        "p2/ct/": (False, "series 2: gaps"), "gone/": (False, "nothing there")}
    # a job of one key owns every record (a series refused by its short name, 'ct')
    assert watch_state.outcomes({"/": "s3://b/in"}, [{"input": "ct", "status": "failed", "reason": "tilt"}],
                                "x") == {"/": (False, "tilt")}


def test_a_running_jobs_results_settle_its_object_keys_before_it_ends(tmp_path):
    """While a job runs, the watch reads its volume results past a cursor (`results_since`, also across
    a records shard written meanwhile) and settles each object key whose volume is recorded; a folder
    key (a series, maybe several volumes) waits for the job's end."""
    from lits.serve import job_progress
    from lits.serve.job_progress import JobProgress, SummaryWriter
    from lits.serve.job_spec import JobSpec

    progress = JobProgress(JobSpec(input=str(tmp_path / "in"), output=str(tmp_path / "out"), app_name="lits"))
    writer = SummaryWriter(progress, every_s=0)
    progress.start()
    assert progress.results_since(0) == {"next": 0, "results": [], "complete": True}
    for i in range(3):
        progress.record({"input": f"s3://b/in/v{i}.nii", "name": f"v{i}", "status": "done"})
    got = progress.results_since(1)
    assert got["next"] == 3 and [r["name"] for r in got["results"]] == ["v1", "v2"] and got["complete"]
    for i in range(3, job_progress.RECORDS_PER_SHARD + 2):  # a shard is written: its results leave memory
        progress.record({"input": f"s3://b/in/v{i}.nii", "name": f"v{i}", "status": "done"})
    writer.save_progress()
    got = progress.results_since(3)
    assert got["next"] == job_progress.RECORDS_PER_SHARD + 2 and not got["complete"]
    assert [r["name"] for r in got["results"]] == [f"v{job_progress.RECORDS_PER_SHARD}", f"v{job_progress.RECORDS_PER_SHARD + 1}"]
    assert progress.results_since(job_progress.RECORDS_PER_SHARD + 1)["results"][0]["name"] == \
        f"v{job_progress.RECORDS_PER_SHARD + 1}"

    uris = {"a.nii": "s3://b/in/a.nii", "b.nii": "s3://b/in/b.nii", "c.nii": "s3://b/in/c.nii",
            "p1/ct/": "s3://b/in/p1/ct"}
    so_far = [{"input": "s3://b/in/a.nii", "status": "done"}, {"input": "s3://b/in/p1/ct", "status": "done"},
              {"input": "s3://b/in/c.nii", "status": "failed", "reason": "bad header"}]
    assert watch_state.settled_early(uris, so_far) == {"a.nii": (True, None), "c.nii": (False, "bad header")}
    # a lone object key owns only the record of its own URI (another's failure is not its own)
    assert watch_state.settled_early({"b.nii": "s3://b/in/b.nii"}, so_far) == {}
    assert watch_state.settled_early({"/": "s3://b/in"}, so_far) == {}


def test_a_restarted_runner_follows_each_job_with_every_key_it_was_given(tmp_path):
    """Job J took a.nii and the series folder p1/ct/; a.nii settled early and was then replaced (a fresh
    entry, no job). A runner reloading the state follows J with both keys, so at J's end the folder is
    not the job's lone key and a.nii's failure stays a.nii's; a state written before the lists were
    kept is rebuilt from the entries' jobs."""
    from lits.core import storage
    from lits.serve import watches
    from lits.serve.job_spec import JobSpec

    spec = watch_state.WatchSpec(input=str(tmp_path / "in"), output=str(tmp_path / "out"), poll_s=1.0)
    runner = watches.WatchRunner(spec, JobSpec(input="-", output="-", app_name="lits"), owner="me")
    entries = {"a.nii": {"identity": {"size": 2}, "state": "pending", "polls": 1, "first_seen": 5.0},
               "p1/ct/": {"identity": {"size": 9}, "state": "submitted", "polls": 2, "first_seen": 1.0,
                          "job_id": "0123456789ab", "submitted_at": 2.0},
               "old.nii": {"identity": {"size": 1}, "state": "done", "polls": 2, "first_seen": 0.0,
                           "job_id": "00000000000a", "done_at": 1.0, "lag_s": 1.0}}
    state = {"watch": spec.to_dict(), "owner": "me", "entries": entries,
             "jobs": {"0123456789ab": ["a.nii", "p1/ct/"], "00000000000a": ["old.nii"]}}
    storage.write_bytes(storage.join(runner.folder, "state.json"), json.dumps(state).encode())
    runner.cursors = {"0123456789ab": 7}
    runner._reload()
    assert runner.jobs == {"0123456789ab": ["a.nii", "p1/ct/"]} and runner.cursors == {}
    records = [{"input": str(tmp_path / "in" / "a.nii"), "status": "failed", "reason": "bad header"},
               {"input": str(tmp_path / "in" / "p1" / "ct"), "status": "done"}]
    assert watch_state.outcomes(runner._uris(runner.jobs["0123456789ab"]), records, "none")["p1/ct/"] == (True, None)
    del state["jobs"]
    storage.write_bytes(storage.join(runner.folder, "state.json"), json.dumps(state).encode())
    runner._reload()
    assert runner.jobs == {"0123456789ab": ["p1/ct/"]}


def test_a_job_takes_explicit_inputs_only_below_its_input_and_outside_its_output():
    from lits.serve.job_spec import JobSpec

    def job(inputs):
        return JobSpec(input="s3://b/in", output="s3://b/in/out", app_name="lits", inputs=inputs)

    assert job(["a/v.nii.gz", "p1/ct/"]).inputs == ("a/v.nii.gz", "p1/ct/")
    for bad in ("../x.nii.gz", "a/../../x.nii", "/etc/x.nii", "a//b.nii", "./a.nii", "a/./b.nii", "out/x.nii",
                "out/", "", "/", "a\\b.nii", "a\x01.nii", 3):
        with pytest.raises(ValueError):
            job([bad])
    with pytest.raises(ValueError, match="at least one"):
        job([])


def test_explicit_inputs_are_read_alone_and_named_as_the_whole_prefix_names_them(tmp_path):
    """A job's explicit inputs (what a watch submits): only those objects and folders are read (not
    one still being written beside them), and each output name is the one a job over the whole
    prefix gives it; a folder that is gone is refused with the reason."""
    from dicom_factory import write_series
    from lits.serve.job_inputs import list_inputs

    root = tmp_path / "in"
    (root / "a").mkdir(parents=True)
    (root / "a" / "v1.nii.gz").write_bytes(b"x" * 10)
    (root / "v2.nii").write_bytes(b"x" * 10)
    (root / "growing.nii.gz").write_bytes(b"x" * 3)
    write_series(str(root / "p1" / "ct"), shape=(8, 8, 3))
    write_series(str(root / "p2" / "ct"), shape=(8, 8, 3))
    whole = list_inputs(str(root), str(root / "out"))
    names = {rel: src for src, rel in whole["volumes"]}
    assert sorted(names) == ["a/v1", "growing", "p1/ct", "p2/ct", "v2"], sorted(names)
    chosen = list_inputs(str(root), str(root / "out"), inputs=["a/v1.nii.gz", "p2/ct/", "gone/"])
    assert sorted(rel for _, rel in chosen["volumes"]) == ["a/v1", "p2/ct"]
    for source, rel in chosen["volumes"]:
        assert source == names[rel] or source.files == names[rel].files, rel
    assert chosen["refused"] == [(str(root / "gone"), chosen["refused"][0][1])]
    assert "cannot list it" in chosen["refused"][0][1]


def test_a_watch_on_a_store_that_ignores_conditional_writes_is_not_started(s3_server, tmp_path, monkeypatch, caplog):
    """Through a real proxy that drops If-None-Match / If-Match (an S3-compatible store that accepts the
    headers and ignores them), start_watch refuses in one line naming the endpoint and the fix, and
    leaves nothing behind: no registration, no probe object, no state."""
    from lits.core import storage
    from lits.core.errors import UserError
    from lits.serve import watch_lease, watches
    from lits.serve.job_spec import JobSpec
    from test_storage import HeaderStrippingProxy

    make_bucket(s3_server, "ignoring")
    spec = watch_state.WatchSpec(input="s3://ignoring/in", output="s3://ignoring/out", poll_s=1.0)
    job = JobSpec(input="-", output="-", app_name="lits", jobs_state=str(tmp_path / "jobs"))
    proxy = HeaderStrippingProxy(s3_server)
    monkeypatch.setenv(storage.ENDPOINT_ENV, proxy.url)
    try:
        with pytest.raises(UserError) as refused:
            watches.start_watch(spec, job)
        # a server told it runs alone (serve.py --single-server-watches) accepts the store, with one warning
        with caplog.at_level(logging.WARNING, logger="lits.serve.watch_lease"):
            for _ in range(2):
                watch_lease.check_lease_store(watches.state_folder(spec.output, spec.watch_id), spec.watch_id, alone=True)
        with pytest.raises(watch_lease.LeaseStoreRefused):  # and only that server
            watch_lease.check_lease_store(watches.state_folder(spec.output, spec.watch_id), spec.watch_id)
    finally:
        proxy.close()
    line = str(refused.value)
    assert f"watch {spec.watch_id} not started: the S3 store at {proxy.url} ignores conditional writes" in line
    assert "s3://ignoring/out/_watches/" in line and "AWS S3" in line and "--single-server-watches" in line, line
    assert "\n" not in line
    warned = [r.getMessage() for r in caplog.records if "ignores conditional writes" in r.getMessage()]
    assert len(warned) == 1 and "runs alone (--single-server-watches)" in warned[0], warned
    assert not (tmp_path / "jobs").exists()
    monkeypatch.setenv(storage.ENDPOINT_ENV, s3_server)
    assert s3fs_for(s3_server).find("ignoring") == []


@pytest.fixture(scope="module")
def lease_proxy(s3_server):
    """The app's S3 endpoint: a HeaderStrippingProxy in front of the module's S3 server, forwarding every
    header until a test sets its `strip` (the app's processes reach the store only through it)."""
    from lits.core import storage
    from test_storage import HeaderStrippingProxy

    proxy = HeaderStrippingProxy(s3_server, strip=False)
    storage.use_endpoint(proxy.url)
    try:
        yield proxy
    finally:
        storage.use_endpoint(s3_server)
        proxy.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, s3_server, lease_proxy):
    from ray import serve

    from lits.core.config import ServeConfig
    from lits.serve import serving

    root = tmp_path_factory.mktemp("watch")
    synthesize(root / "ct", volumes=4, size=48, slices=16, seed=9)
    for bucket in ("watched", "watched-ignoring", "watched-honouring"):
        make_bucket(s3_server, bucket)
    port = free_port()
    cfg = ServeConfig(model=tiny_model(root / "model"), port=port,
                      allow_prefixes=("s3://watched", "s3://watched-ignoring", "s3://watched-honouring"),
                      batch_wait_s=0.05, chunk=8, max_batch_size=16, token_sha256=serving.token_sha256(TOKEN),
                      volume_cpus=2, jobs_state=str(root / "jobs"))
    with local_ray(3):
        try:
            serving.deploy(cfg)
            yield {"url": f"http://127.0.0.1:{port}", "endpoint": s3_server, "ct": root / "ct", "cfg": cfg,
                   "proxy": lease_proxy}
        finally:
            serve.shutdown()


def wait_watch(server, watch_id, until, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status, found, _ = call(server, "GET", f"/v1/watches/{watch_id}")
        assert status == 200, found
        if until(found):
            return found
        time.sleep(0.5)
    raise AssertionError(f"watch {watch_id}: {found}")


def put(fs, server, name, key):
    fs.put_file(str(server["ct"] / name), f"watched/{key}")


def job_summaries(fs, prefix):
    fs.invalidate_cache()  # s3fs caches listings: a job's summary written since would be "not found"
    return [p for p in fs.find(f"watched/{prefix}") if "/_jobs/" in p and p.endswith(".json")]


def segmented(fs, prefix):
    """Output name -> how many times a job under the output segmented it (its 'done' volume results)."""
    from collections import Counter

    from lits.serve.job_progress import read_volume_records

    return dict(Counter(r["name"] for p in job_summaries(fs, prefix)
                        for r in read_volume_records(json.loads(fs.cat(p))) if r["status"] == "done"))


@pytest.mark.slow
def test_a_watch_segments_what_lands_once_survives_a_restart_and_reports_failures(server):
    from lits.serve import serving

    fs = s3fs_for(server["endpoint"])
    # Three objects there when the watch starts: ready in the same round, so one job takes them all.
    put(fs, server, "volume-0.nii.gz", "in/a/volume-0.nii.gz")
    put(fs, server, "volume-1.nii.gz", "in/volume-1.nii.gz")
    fs.pipe_file("watched/in/notes.nii", b"this is not a NIfTI file\n" * 40)
    status, created, _ = call(server, "POST", "/v1/watches", {"input": "s3://watched/in", "output": "s3://watched/out",
                                                               "poll_s": 0.5})
    assert status == 202, created
    watch_id = created["watch_id"]
    found = wait_watch(server, watch_id, lambda w: w["counts"]["done"] == 2 and w["counts"]["failed"] == 1)
    # each key settled by its own volume: the failed one with its reason, the others done
    assert found["failed"][0]["key"] == "notes.nii" and "not a NIfTI" in found["failed"][0]["reason"], found
    assert found["lag_s"]["n"] == 2 and 0 < found["lag_s"]["p50"] <= found["lag_s"]["p95"] < 60, found
    for key in ("a/volume-0", "volume-1"):
        assert fs.exists(f"watched/out/{key}_seg.nii.gz") and fs.exists(f"watched/out/{key}.json")
    assert len(job_summaries(fs, "out")) == 1 and found["jobs_submitted"] == 1, found  # one job for 3 objects
    assert segmented(fs, "out") == {"a/volume-0": 1, "volume-1": 1}
    # Replaced: segmented again; deleted: left alone (its outputs stay).
    first = json.loads(fs.cat("watched/out/volume-1.json"))
    put(fs, server, "volume-2.nii.gz", "in/volume-1.nii.gz")
    fs.rm("watched/in/a/volume-0.nii.gz")
    wait_watch(server, watch_id, lambda w: w["counts"]["done"] == 2 and len(job_summaries(fs, "out")) == 2
               and not w["counts"]["submitted"] and not w["counts"]["pending"])
    assert json.loads(fs.cat("watched/out/volume-1.json"))["shape"] != first["shape"] or \
        json.loads(fs.cat("watched/out/volume-1.json")) != first
    assert fs.exists("watched/out/a/volume-0_seg.nii.gz")
    # A restart of the server: the watch is taken up from its state in the bucket; done work stays done.
    serving.undeploy(serving.APP_NAME)
    serving.deploy(server["cfg"])
    assert call(server, "GET", "/v1/watches")[1] == [{"watch_id": watch_id, "input": "s3://watched/in",
                                                      "output": "s3://watched/out", "deleted": False}]
    put(fs, server, "volume-3.nii.gz", "in/volume-3.nii.gz")
    found = wait_watch(server, watch_id, lambda w: w["counts"]["done"] == 3)
    time.sleep(2)  # a few more polls: nothing is submitted again
    assert len(job_summaries(fs, "out")) == 3 and call(server, "GET", f"/v1/watches/{watch_id}")[1]["counts"] == \
        {"pending": 0, "submitted": 0, "done": 3, "failed": 1}
    # A DICOM series landing file by file: one input (its folder), segmented once it stopped changing,
    # named as a job over the whole prefix names it.
    from dicom_factory import write_series

    for path in write_series(str(server["ct"].parent / "series"), shape=(32, 32, 6)):
        fs.put_file(path, f"watched/in/p1/ct/{path.rsplit('/', 1)[1]}")
    found = wait_watch(server, watch_id, lambda w: w["counts"]["done"] == 4)
    assert fs.exists("watched/out/p1/ct_seg.nii.gz") and fs.exists("watched/out/p1/ct.json"), fs.find("watched/out/p1")
    assert len(job_summaries(fs, "out")) == 4
    assert segmented(fs, "out") == {"a/volume-0": 1, "volume-1": 2, "volume-3": 1, "p1/ct": 1}  # nothing twice
    status, deleted, _ = call(server, "DELETE", f"/v1/watches/{watch_id}")
    assert status == 200 and deleted["state"] == "deleted", deleted


@pytest.mark.slow
def test_keys_of_one_job_settle_as_their_volumes_finish_not_at_its_end(server):
    """Six objects ready in one round: one job takes them, and its volumes finish in waves (two volume
    CPUs); each key is done at the first poll after its own volume, so their times spread over the job,
    where settling at the job's end would give all six one poll's time."""
    fs = s3fs_for(server["endpoint"])
    for i in range(6):
        put(fs, server, f"volume-{i % 4}.nii.gz", f"waves/v{i}.nii.gz")
    status, created, _ = call(server, "POST", "/v1/watches", {"input": "s3://watched/waves",
                                                               "output": "s3://watched/waves-out", "poll_s": 0.2})
    assert status == 202, created
    watch_id = created["watch_id"]
    found = wait_watch(server, watch_id, lambda w: w["counts"]["done"] == 6, timeout=180)
    assert found["jobs_submitted"] == 1, found
    status, listed, _ = call(server, "GET", f"/v1/watches/{watch_id}?entries=10")
    settled = sorted(e["changed_at"] for e in listed["entries"])
    times = json.loads(fs.cat(job_summaries(fs, "waves-out")[0]))["times"]
    assert settled[-1] - settled[0] >= 0.4, (settled, times)  # more than two polls apart
    assert call(server, "DELETE", f"/v1/watches/{watch_id}")[0] == 200


@pytest.mark.slow
def test_two_servers_on_one_watch_do_no_work_twice(server):
    """A second runner of the same watch (what another server would start) waits on the lease."""
    import ray

    from lits.serve import watches
    from lits.serve.job_spec import JobSpec
    from lits.serve.watch_state import WatchSpec

    fs = s3fs_for(server["endpoint"])
    status, created, _ = call(server, "POST", "/v1/watches", {"input": "s3://watched/in2", "output": "s3://watched/out2",
                                                               "poll_s": 0.3})
    assert status == 202, created
    watch_id = created["watch_id"]
    wait_watch(server, watch_id, lambda w: w["state"] == "watching")  # the server's runner holds the lease
    job = JobSpec(input="-", output="-", app_name="lits", chunk=8, allow=("s3://watched",),
                  jobs_state=server["cfg"].jobs_state, cpus_per_volume=1.0)
    other = ray.remote(watches.WatchRunner).options(num_cpus=0, max_concurrency=4).remote(
        WatchSpec(input="s3://watched/in2", output="s3://watched/out2", poll_s=0.3, watch_id=watch_id), job,
        owner="another-server")
    ray.get(other.start.remote())
    for i in range(3):
        put(fs, server, f"volume-{i}.nii.gz", f"in2/volume-{i}.nii.gz")
    wait_watch(server, watch_id, lambda w: w["counts"]["done"] == 3)
    time.sleep(2)
    mine, theirs = call(server, "GET", f"/v1/watches/{watch_id}")[1], ray.get(other.status.remote())
    assert theirs["state"] == "standby" and theirs["jobs_submitted"] == 0, (mine, theirs)
    assert len(job_summaries(fs, "out2")) == mine["jobs_submitted"] <= 3, (mine, theirs)
    assert segmented(fs, "out2") == {f"volume-{i}": 1 for i in range(3)}
    ray.get(other.stop.remote())
    assert call(server, "DELETE", f"/v1/watches/{watch_id}")[0] == 200


@pytest.mark.slow
def test_post_watches_on_a_store_that_ignores_conditional_writes_answers_one_line(server):
    """A bucket behind a proxy that drops the conditional headers: POST /v1/watches answers 503 with the
    one line and starts nothing; a bucket probed with the headers passed on starts. (The probe's answer
    is kept per endpoint and bucket, so each case has a bucket no earlier test probed.)"""
    fs = s3fs_for(server["endpoint"])
    body = {"input": "s3://watched-ignoring/in3", "output": "s3://watched-ignoring/out3", "poll_s": 0.5}
    server["proxy"].strip = True
    try:
        status, refused, _ = call(server, "POST", "/v1/watches", body)
    finally:
        server["proxy"].strip = False
    assert status == 503, refused
    line = refused["detail"]
    assert f"the S3 store at {server['proxy'].url} ignores conditional writes" in line and "\n" not in line, line
    assert "s3://watched-ignoring/out3/_watches/" in line and "bulk jobs" in line, line
    fs.invalidate_cache()
    assert not fs.exists("watched-ignoring/out3") and all(w["output"] != "s3://watched-ignoring/out3"
                                                          for w in call(server, "GET", "/v1/watches")[1])
    # A server told it runs alone (serve.py --single-server-watches) watches on that store and segments.
    import dataclasses

    from lits.serve import serving

    serving.undeploy(serving.APP_NAME)
    serving.deploy(dataclasses.replace(server["cfg"], single_server_watches=True))
    server["proxy"].strip = True
    try:
        fs.put_file(str(server["ct"] / "volume-0.nii.gz"), "watched-ignoring/in3/v0.nii.gz")
        status, alone, _ = call(server, "POST", "/v1/watches", body)
        assert status == 202, alone
        found = wait_watch(server, alone["watch_id"], lambda w: w["counts"]["done"] == 1, timeout=180)
        assert found["state"] == "watching" and found["error"] is None, found
        assert call(server, "DELETE", f"/v1/watches/{alone['watch_id']}")[0] == 200
    finally:
        server["proxy"].strip = False
        serving.undeploy(serving.APP_NAME)
        serving.deploy(server["cfg"])
    fs.invalidate_cache()
    assert fs.exists("watched-ignoring/out3/v0_seg.nii.gz")
    body = {"input": "s3://watched-honouring/in3", "output": "s3://watched-honouring/out3", "poll_s": 0.5}
    status, created, _ = call(server, "POST", "/v1/watches", body)
    assert status == 202, created
    assert wait_watch(server, created["watch_id"], lambda w: w["state"] == "watching")["error"] is None
    assert call(server, "DELETE", f"/v1/watches/{created['watch_id']}")[0] == 200
