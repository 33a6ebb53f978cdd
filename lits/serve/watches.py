"""Watches: a prefix the service keeps segmenting. Objects landing under the watch's input are segmented
into its output without anyone resubmitting, through the bulk-job machinery (`lits.serve.jobs`).

A watch is a `WatchRunner` actor (one per watch per cluster, named after it, owned by the process that
started it) whose thread, every `poll_s`:
  1. holds the watch's lease (`OUTPUT/_watches/<id>/lease.json`: owner and expiry, taken when absent,
     expired or its own by a conditional write against the version it read: If-None-Match / If-Match
     on S3, a compare under a file lock locally, `storage.write_if`; of two servers on one watch
     exactly one holds it, the other only watches it), so a second server does no work twice; a watch
     is started only where a probe of its state folder finds the store honours those conditions
     (`watch_lease`: some S3-compatible stores accept the headers and ignore them), or where the
     server was told it runs alone;
  2. lists the input once (fsspec `find` with details: ListObjectsV2 pages on S3, size and ETag per
     key, no request per object) and moves each key on (`watch_state.advance`: ready when unchanged
     across two polls);
  3. submits the round's ready inputs together as one bulk job (`JobSpec.inputs`: their keys; input
     and output the watch's, so outputs are named as a job over the whole prefix names them), or a
     few jobs of at most JOB_INPUTS keys, with at most `max_jobs` of the watch's jobs at once. The
     job reads exactly the listed inputs (never an object still being written, never the old ones
     again) without listing the prefix, and a round's objects share one job actor, one model
     describe and one summary: what a job costs to start, rather than what a volume does, was most
     of a watch's lag with a job per object. The jobs' identity-based skip stays a second guard: a
     volume already segmented for this input and model is skipped, whoever submits it;
  4. follows its jobs and settles each key from the job's volume results: an object key as soon as
     its volume's result is recorded (`jobs.volume_results` while the job runs,
     `watch_state.settled_early`), a folder key at the job's end (`watch_state.outcomes`: done, or
     failed with its own volume's reason), and writes the watch's state
     (`OUTPUT/_watches/<id>/state.json`) when anything changed.

The state lives in the output bucket, so a restarted server (or another one) takes the watch up where
it was: entries already submitted are followed again through their job records. The list of watches is
kept beside the job records (`<jobs state>/watches/<id>.json`), which `resume` reads at start.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from typing import Dict, List, Optional

import ray

from lits.core import naming, storage
from lits.serve import jobs
from lits.serve.job_progress import FINAL_STATES, read_volume_records
from lits.serve.job_spec import JOBS_NAMESPACE, JobSpec, new_job_id, refused_input
from lits.serve import watch_state
from lits.serve.watch_lease import LeaseStoreRefused, check_lease_store, renew_lease, take_lease
from lits.serve.watch_state import WatchSpec

log = logging.getLogger(__name__)

ACTOR_PREFIX = "lits-watch-"
WATCHES_FOLDER = "_watches"
LEASE_POLLS = 3  # a lease lasts this many polls (at least LEASE_MIN_S): a server that stops polling loses it
LEASE_MIN_S = 30.0
JOB_INPUTS = 500  # inputs one job of a watch takes at most; a larger round is split into several jobs


def state_folder(output: str, watch_id: str) -> str:
    return storage.join(output, WATCHES_FOLDER, watch_id)


def registry_uri(jobs_state: str, watch_id: str) -> str:
    return storage.join(storage.normalise(jobs_state), "watches", f"{watch_id}.json")


def _read_json(uri: str) -> Optional[Dict]:
    try:
        return json.loads(storage.read_bytes(uri))
    except Exception:  # absent or unreadable: the caller decides what that means
        return None


DICOM_SUFFIXES = (".dcm", ".ima", ".dicom")
NOT_DICOM = {"DICOMDIR", "README", "LICENSE", "_SUCCESS"}  # names without a suffix that are no slice
DICOM_MIN_BYTES = 132  # a DICOM file's 128-byte preamble and 'DICM'


def _dicom_like(base: str, size: int) -> bool:
    """A slice by its name: a DICOM suffix, or none (or digits, '1.2.840...') on a file at least as
    large as the DICOM preamble that is not a known other file."""
    ext = os.path.splitext(base)[1].lower()
    if ext in DICOM_SUFFIXES:
        return True
    return (ext == "" or ext[1:].isdigit()) and size >= DICOM_MIN_BYTES and base.upper() not in NOT_DICOM


def list_prefix(input_uri: str, output_uri: str) -> Dict[str, Dict]:
    """key (path below the input) -> identity of every input a job would segment there, in one listing:
    each NIfTI object by its key, and each folder of DICOM-like files (`_dicom_like`: a series, or
    several) by the folder's key with a trailing '/' ('' + '/' for the input itself), its identity
    the file count, bytes and a digest of every file's identity, so a folder is ready only when no
    file of it changed, came or went for two polls. A folder that is not a leaf carries a 'refused'
    reason (a job over it would read its subfolders too): the watch fails it with that reason, and so
    does a key no job may take (`job_spec.refused_input`: an empty, '.' or '..' part). Not the
    product's own outputs, reference segmentations or anything under the output."""
    root = storage.normalise(input_uri).rstrip("/")
    out = storage.normalise(output_uri).rstrip("/")
    fs, path = storage.filesystem(root)
    fs.invalidate_cache()
    if not fs.exists(path):
        return {}
    found, folders = {}, {}
    for fs_path, info in fs.find(path, detail=True).items():
        uri = root + "/" + fs_path[len(path.rstrip("/")) + 1:]
        base = os.path.basename(uri)
        if (fs_path.endswith("/") or not base or uri.startswith(out + "/") or naming.is_reference(base)
                or naming.is_mask(base) or base.startswith(".")):
            continue  # a folder placeholder (a key ending in '/'), an output, a reference, a hidden file
        key = uri[len(root) + 1:]
        if uri.endswith(naming.NIFTI_SUFFIXES):
            found[key] = watch_state.identity_of(info)
        elif _dicom_like(base, int(info.get("size") or 0)):
            folders.setdefault(os.path.dirname(key) + "/", {})[base] = watch_state.identity_of(info)
    holding = set()  # every folder with an input below it ('' for the root): each input's ancestors
    for other in list(found) + [k.rstrip("/") for k in folders]:
        parts = other.split("/") if other else []
        holding.update("/".join(parts[:i]) for i in range(len(parts)))
    for key, files in folders.items():
        digest = hashlib.sha256(json.dumps(sorted(files.items()), sort_keys=True).encode()).hexdigest()[:32]
        found[key] = {"size": sum(f["size"] for f in files.values()), "etag": f"{len(files)}-{digest}"}
        if key.rstrip("/") in holding:
            # a job over this folder would take its subfolders too, ready or not: series in leaf folders only
            found[key]["refused"] = ("DICOM files beside subfolders of other inputs: a job over this folder would "
                                     "read those too; put each series in a folder of its own")
    for key, identity in found.items():  # a key no job may take (a '..' or empty part): failed with why
        why = key != "/" and refused_input(key, root, out)
        if why and "refused" not in identity:
            identity["refused"] = why
    return found


class WatchRunner:
    """One watch's actor: its polling thread (module docstring) and what GET /v1/watches/{id} reads."""

    def __init__(self, spec: WatchSpec, job_template: JobSpec, owner: Optional[str] = None, alone: bool = False):
        self.spec = spec
        self.template = job_template
        self.alone = alone  # the server runs without another on these buckets (`watch_lease.check_lease_store`)
        # One runner per watch per cluster (a named actor): the runner a restarted app starts in the same
        # cluster is the same owner and takes the lease up at once, without waiting for it to expire.
        self.owner = owner or hashlib.sha256(f"{ray.get_runtime_context().gcs_address}/{spec.watch_id}".encode()
                                             ).hexdigest()[:16]
        self.folder = state_folder(spec.output, spec.watch_id)
        self.lease_s = max(LEASE_MIN_S, LEASE_POLLS * spec.poll_s)
        self.entries: Dict[str, Dict] = {}
        self.jobs: Dict[str, List[str]] = {}
        self.cursors: Dict[str, int] = {}  # job -> its volume results already read while it ran
        self.leased = False
        self.takeovers = 0  # times this runner took the lease up (from none, another server, or after an error)
        self.submits = 0
        self.polls = 0
        self.listing = {"keys": 0, "seconds": None}
        self.error: Optional[str] = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"watch-{self.spec.watch_id}", daemon=True)
        self._thread.start()

    def stop(self) -> Dict:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(30.0, 3 * self.spec.poll_s))
        return self.status()

    def status(self, rows: int = 0, order: str = "key") -> Dict:
        """What GET /v1/watches/{id} answers; with `rows` > 0 `rows` entries too, in `order`
        (`watch_state.summary`)."""
        with self._lock:
            return {"watch_id": self.spec.watch_id, "state": "watching" if self.leased else "standby",
                    "input": self.spec.input, "output": self.spec.output, "poll_s": self.spec.poll_s,
                    "polls": self.polls, "takeovers": self.takeovers, "jobs_submitted": self.submits,
                    "listing": dict(self.listing), "error": self.error,
                    **watch_state.summary(self.entries, rows=rows, order=order)}

    def _reload(self) -> None:
        """Take the watch up as its last holder left it (its state in the output): what it submitted is
        followed through the job records, never submitted again."""
        saved = _read_json(storage.join(self.folder, "state.json")) or {}
        with self._lock:
            self.entries = saved.get("entries", {})
            running = {e["job_id"] for e in self.entries.values() if e["state"] == "submitted"}
            # Each job with all the keys it was given, settled ones too (a key's result is told apart from
            # another's by the job's whole list: `watch_state.outcomes`); rebuilt from the entries for a
            # state written before the lists were kept.
            kept = saved.get("jobs", {})
            self.jobs = {job_id: list(keys) for job_id, keys in kept.items() if job_id in running}
            rebuilt = running - kept.keys()
            for key, entry in self.entries.items():
                if entry.get("job_id") in rebuilt:
                    self.jobs.setdefault(entry["job_id"], []).append(key)
            self.cursors = {}

    def _run(self) -> None:
        lease = storage.join(self.folder, "lease.json")
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                check_lease_store(self.folder, self.spec.watch_id, self.alone)  # a dict lookup once answered
                holding = take_lease(lease, self.owner, self.lease_s)
                if holding and not self.leased:
                    self._reload()
                    self.takeovers += 1
                self.leased = holding
                if holding:
                    self.poll_once(lease)
                self.error = None
            except Exception as exc:  # storage down, a bug: said in status, tried again next poll
                log.warning("watch %s: %s", self.spec.watch_id, exc)
                self.error = f"{type(exc).__name__}: {exc}"
                self.leased = False
            self._stop.wait(max(0.0, self.spec.poll_s - (time.monotonic() - started)))

    def poll_once(self, lease: str) -> None:
        """One poll: list, follow the jobs, submit the ready objects (while the `lease` is still this
        runner's), write the state when it changed."""
        t = time.monotonic()
        listing = list_prefix(self.spec.input, self.spec.output)
        seconds = time.monotonic() - t
        now = time.time()
        with self._lock:
            before = json.dumps(self.entries, sort_keys=True)
            self.polls += 1
            self.listing = {"keys": len(listing), "seconds": round(seconds, 4)}
            ready = watch_state.advance(self.entries, listing, now)
        self._follow_jobs()
        for keys in watch_state.job_batches(ready, len(self.jobs), self.spec.max_jobs, JOB_INPUTS):
            # The lease renewed before each job and the state written after it: a server that takes the
            # watch over (this one stalled past its lease) reads every job submitted so far.
            if not renew_lease(lease, self.owner, self.lease_s):
                self.leased = False  # taken over: the new holder submits the rest, and its state is the one
                return
            self._submit(keys)
            self._save()
        with self._lock:
            changed = json.dumps(self.entries, sort_keys=True) != before
        if changed:
            self._save()

    def _save(self) -> None:
        with self._lock:
            state = json.dumps({"watch": self.spec.to_dict(), "owner": self.owner, "entries": self.entries,
                                "jobs": self.jobs})
        storage.write_bytes(storage.join(self.folder, "state.json"), state.encode())

    def _submit(self, keys: List[str]) -> None:
        """One job over ready inputs: NIfTI objects and folders of DICOM files (keys ending in '/'),
        named as a job over the whole prefix names them (`job_inputs.list_inputs`); the key '/' (the
        input itself is one series, and then the only input) is a job over the input."""
        job = dataclasses.replace(self.template, input=self.spec.input, output=self.spec.output,
                                  inputs=None if keys == ["/"] else tuple(keys), overwrite=self.spec.overwrite,
                                  job_id=new_job_id())
        job_id = jobs.submit_job(job)
        with self._lock:
            watch_state.submitted(self.entries, keys, job_id, time.time())
            self.submits += 1
            self.jobs.setdefault(job_id, []).extend(keys)

    def _follow_jobs(self) -> None:
        for job_id, keys in list(self.jobs.items()):
            status = jobs.get_job(job_id, self.template.jobs_state)
            if status is not None and status["state"] not in FINAL_STATES:
                got = jobs.volume_results(job_id, self.cursors.get(job_id, 0))  # keys its volumes finished
                if got is not None:
                    self.cursors[job_id] = got["next"]
                    self._settle(job_id, watch_state.settled_early(self._uris(keys), got["results"]))
                continue
            if status is None or status.get("error") == jobs.LOST:  # stopped with its server: submit it again
                with self._lock:
                    for key in keys:
                        if key in self.entries and self.entries[key]["state"] == "submitted":
                            watch_state.retry(self.entries, key)
                    del self.jobs[job_id]
                    self.cursors.pop(job_id, None)
                continue
            self._settle(job_id, self._outcomes(job_id, status, keys))
            with self._lock:
                del self.jobs[job_id]
                self.cursors.pop(job_id, None)

    def _settle(self, job_id: str, settled: Dict) -> None:
        """Each key of `settled` (key -> (ok, reason)) still submitted to `job_id` is done or failed."""
        with self._lock:
            for key, (ok, reason) in settled.items():
                entry = self.entries.get(key)
                if entry is not None and entry["state"] == "submitted" and entry.get("job_id") == job_id:
                    watch_state.finished(self.entries, key, ok, reason, time.time())

    def _uris(self, keys: List[str]) -> Dict[str, str]:
        root = storage.normalise(self.spec.input)
        return {key: storage.join(root, key.rstrip("/")) if key != "/" else root for key in keys}

    def _outcomes(self, job_id: str, status: Dict, keys: List[str]) -> Dict:
        """key -> (ok, reason) of a finished job, from its volume results (`watch_state.outcomes`);
        when they cannot be read, the job's own outcome for every key."""
        uris = self._uris(keys)
        if status.get("error"):
            missing = status["error"]
        elif status["state"] == "succeeded":
            missing = f"nothing segmented in it: no NIfTI volume or DICOM CT series there (job {job_id})"
        else:  # cancelled or stopped before this input's turn
            missing = f"job {job_id} {status['state']} before this input was segmented"
        try:
            summary = json.loads(storage.read_bytes(status["summary"]))
            return watch_state.outcomes(uris, read_volume_records(summary), missing)
        except Exception as exc:  # its results unreadable: the job as a whole says
            log.warning("watch %s: job %s's volume results: %s", self.spec.watch_id, job_id, exc)
        ok = status["state"] == "succeeded" and status["counts"]["failed"] == 0
        reason = None if ok else (status.get("failed") or [{}])[0].get("reason") or status.get("error") \
            or f"job {job_id} {status['state']}"
        return {key: (ok, reason) for key in keys}


def _actor(watch_id: str):
    try:
        return ray.get_actor(ACTOR_PREFIX + watch_id, namespace=JOBS_NAMESPACE)
    except ValueError:
        return None


_HELD: Dict[str, object] = {}  # the runners this process started (not detached: see lits.serve.jobs)


def start_watch(spec: WatchSpec, job_template: JobSpec, register: bool = True, check: bool = True,
                alone: bool = False) -> str:
    """Register the watch beside the job records (unless `register` is False: it is already) and start
    its runner in this cluster, unless one runs already. With `check`, LeaseStoreRefused, nothing
    registered or started, when the store of its state ignores conditional writes (`check_lease_store`);
    the runner asks again before each lease in any case. `alone`: such a store is accepted (the server
    runs without another on these buckets: `watch_lease.check_lease_store`)."""
    if check:
        check_lease_store(state_folder(spec.output, spec.watch_id), spec.watch_id, alone)
    if register:
        storage.write_bytes(registry_uri(job_template.jobs_state, spec.watch_id),
                            json.dumps({"watch": spec.to_dict(), "deleted": False}).encode())
    if _actor(spec.watch_id) is None:
        runner = ray.remote(WatchRunner).options(name=ACTOR_PREFIX + spec.watch_id, namespace=JOBS_NAMESPACE,
                                                 num_cpus=0, max_concurrency=4, max_restarts=0
                                                 ).remote(spec, job_template, alone=alone)
        ray.get(runner.start.remote())
        _HELD[spec.watch_id] = runner
    return spec.watch_id


def registered(jobs_state: str) -> List[Dict]:
    """Every watch registered beside the job records (deleted ones included, marked)."""
    folder = storage.join(storage.normalise(jobs_state), "watches")
    if not storage.exists(folder):
        return []
    found = [_read_json(uri) for uri in storage.list_files(folder) if uri.endswith(".json")]
    return [w for w in found if w and "watch" in w]


def resume(job_template: JobSpec, alone: bool = False) -> List[str]:
    """Start the runner of every registered, not deleted watch that has none in this cluster (a server's
    start); their state is read back from each output."""
    started = []
    for found in registered(job_template.jobs_state):
        if not found.get("deleted"):
            spec = WatchSpec(**found["watch"])
            try:
                started.append(start_watch(spec, job_template, register=False, alone=alone))
            except LeaseStoreRefused as exc:  # this watch's store, definitely: logged, the others still start
                log.warning("%s", exc)
            except Exception as exc:  # the store cannot be asked now: its runner asks before each lease
                log.warning("watch %s: its store could not be probed (%s); started, probing again", spec.watch_id, exc)
                started.append(start_watch(spec, job_template, register=False, check=False, alone=alone))
    return started


def get_watch(watch_id: str, jobs_state: str, rows: int = 0, order: str = "key") -> Optional[Dict]:
    """The watch's status (with `rows` of its entries in `order`, `watch_state.summary`): from its runner
    in this cluster, else from its state in the output."""
    actor = _actor(watch_id)
    if actor is not None:
        try:
            return ray.get(actor.status.remote(rows, order), timeout=5)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
    found = _read_json(registry_uri(jobs_state, watch_id))
    if not found:
        return None
    spec = WatchSpec(**found["watch"])
    saved = _read_json(storage.join(state_folder(spec.output, watch_id), "state.json")) or {}
    return {"watch_id": watch_id, "state": "deleted" if found.get("deleted") else "stopped", "input": spec.input,
            "output": spec.output, "poll_s": spec.poll_s,
            **watch_state.summary(saved.get("entries", {}), rows=rows, order=order)}


def delete_watch(watch_id: str, jobs_state: str) -> Optional[Dict]:
    """Stop the watch's runner and mark it deleted (its outputs and state stay; jobs it started run on)."""
    found = _read_json(registry_uri(jobs_state, watch_id))
    if not found:
        return None
    storage.write_bytes(registry_uri(jobs_state, watch_id), json.dumps({**found, "deleted": True}).encode())
    actor = _actor(watch_id)
    if actor is not None:
        try:
            ray.get(actor.stop.remote(), timeout=60)
        except ray.exceptions.RayActorError:
            pass
        ray.kill(actor)
    _HELD.pop(watch_id, None)
    return get_watch(watch_id, jobs_state)
