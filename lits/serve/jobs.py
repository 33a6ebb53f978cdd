"""Bulk segmentation jobs: every NIfTI under a prefix -> a mask and a report per volume.

A running job is a `JobRunner` actor, named (found again by its id) and owned by the process that
submitted it (the HTTP replica). It is not detached on purpose: Ray keeps the workers of a
detached actor's tasks apart from every other's, and a worker that made a Serve handle always owns
a pending call (the handle's long poll), so Ray never ends it as idle: each detached job left one
idle worker (~290 MB) behind for good. Owned by the replica, all jobs and uploads share its
workers. It lists the inputs, then keeps volume tasks (`lits.serve.job_tasks`) in flight in the
placement groups `lits.serve.job_capacity` gives it (the app's volume pool, plus CPUs that join the
cluster when the pool is elastic). It writes `OUTPUT/_jobs/<job_id>.json` (the summary) after the
listing, then at most every `SUMMARY_EVERY_S` as volumes finish, and last when it ends: a lost
actor loses no progress. Then it updates the job's record and exits: a finished job costs no
process. Where a job is, is kept in a small record per job in the jobs state folder
(`<state>/<job_id>.json`, written when the job is submitted); the status of a finished job is read
from its summary through that record, so it survives the actor and a restart of the server.

Failure rules: a bad volume is recorded with its reason and the job goes on; a lost model
replica costs a resend of the chunks it held, a lost CPU worker a retry of its volume (Ray's task
retries), never the volume. A cancel cancels the volume tasks (forcefully when they do not stop
within `fanout.CANCEL_GRACE_S`), so their CPUs are free once the job says `cancelled`.
"""

from __future__ import annotations

import datetime
import enum
import json
import logging
import os
import threading
import time
import traceback
import uuid
from typing import Dict, List, Optional, Sequence

import ray

from lits.serve import access
from lits.runtime import fanout
from lits.model import inference
from lits.core import storage
from lits.core.errors import UserError
from lits.serve.job_capacity import JobCapacity
from lits.serve.job_tasks import list_inputs, segment_volume, segment_volume_task  # noqa: F401  (segment_volume: callers' one entry)
from lits.serve.model_client import MODEL_WAIT_S, describe_model

log = logging.getLogger(__name__)

JOBS_NAMESPACE = "lits-jobs"
ACTOR_PREFIX = "lits-job-"
JOBS_FOLDER = "_jobs"
JOBS_STATE_ENV = "LITS_JOBS_STATE"


class JobState(str, enum.Enum):
    """Where a job is; its value is what status, summaries and records say ("state")."""
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_STATES = tuple(s.value for s in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED))
EXIT_AFTER_S = 1.0  # a finished job's actor answers this long from memory, then exits
STATUS_WAIT_S = 10.0  # for a cancel
# A status waits this long for a busy job actor, then answers from the job's last summary (at most
# SUMMARY_EVERY_S old): GET /v1/jobs/{id} stays under a second whatever the job's process is doing.
STATUS_ACTOR_WAIT_S = 0.3
SUMMARY_EVERY_S = 2.0  # a running job rewrites its summary at most this often as volumes finish
LOST = ("the job stopped without a summary (its server or cluster stopped while it ran); submit it again: "
        "finished volumes are skipped")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def default_jobs_state() -> str:
    """Where job records live unless the server is told (`--jobs-state`): $LITS_JOBS_STATE or
    ~/.cache/lits/jobs."""
    return os.environ.get(JOBS_STATE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "lits", "jobs")


def _record_uri(jobs_state: str, job_id: str) -> str:
    return storage.join(storage.normalise(jobs_state), f"{job_id}.json")


class JobRunner:
    """One bulk job's state and its driving thread (a Ray actor; see `submit_job`).

    Args:
        job_id: the id; the actor is named ACTOR_PREFIX + job_id in JOBS_NAMESPACE.
        request: {'input', 'output', 'overwrite'} (URIs already checked and normalised).
        app_name: the Serve application holding the model deployment (and its volume pool).
        chunk: slices per model request.
        concurrency: volumes in flight; None: what the app's volume pool holds / cpus_per_volume.
        cpus_per_volume: CPUs a volume task reserves. A task waits on the model for much of
            its time, so below 1 lets more volumes overlap on a CPU-only machine.
        jobs_state: the folder of job records; allow: the server's allow-list (every file a
            volume reads or writes must resolve inside it); wait_s: longest wait for the model.
        reserve_cpus: CPUs the app's replicas may hold; given, the job adds CPUs that join the
            cluster to its pool (`lits.serve.job_capacity`); None: the app's pool as it is.
    """

    def __init__(self, job_id: str, request: Dict, app_name: str, chunk: int = 16,
                 concurrency: Optional[int] = None, cpus_per_volume: float = 1.0,
                 jobs_state: Optional[str] = None, allow: Sequence[str] = (), wait_s: float = MODEL_WAIT_S,
                 reserve_cpus: Optional[float] = None):
        self.job_id = job_id
        self.request = dict(request)
        self.app_name = app_name
        self.chunk = chunk
        self.cpus_per_volume = cpus_per_volume
        self.concurrency = concurrency
        self.jobs_state = jobs_state or default_jobs_state()
        self.allow = tuple(allow)
        self.wait_s = wait_s
        self.reserve_cpus = reserve_cpus
        self.in_flight_cap = 0
        self.summary_at = 0.0
        self.unsaved = False  # volumes finished since the summary was last written
        self.lock = threading.Lock()
        self.cancel_requested = threading.Event()
        self.state = JobState.QUEUED
        self.error: Optional[str] = None
        self.model: Dict = {}
        self.counts = {"total": 0, "done": 0, "skipped": 0, "failed": 0, "ignored": 0}
        self.failed: List[Dict] = []
        self.results: List[Dict] = []
        self.slices = 0
        self.chunks_resent = 0
        self.times = {"submitted": _now(), "started": None, "finished": None}
        self.started_s: Optional[float] = None
        self.finished_s: Optional[float] = None
        self.thread: Optional[threading.Thread] = None

    def start(self) -> str:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name=f"job-{self.job_id}", daemon=True)
            self.thread.start()
        return self.job_id

    def cancel(self) -> Dict:
        if self.state.value not in FINAL_STATES:
            self.cancel_requested.set()
        return self.status()

    def status(self) -> Dict:
        with self.lock:
            counts = dict(self.counts)
            finished = counts["done"] + counts["skipped"] + counts["failed"]
            elapsed = ((self.finished_s or time.time()) - self.started_s) if self.started_s else 0.0
            return {
                "job_id": self.job_id,
                "state": self.state.value,
                "input": self.request["input"],
                "output": self.request["output"],
                "overwrite": bool(self.request.get("overwrite")),
                "model_id": self.model.get("model_id"),
                "counts": counts,
                "progress": round(finished / counts["total"], 4) if counts["total"] else (1.0 if self.state.value in FINAL_STATES else 0.0),
                "slices_segmented": self.slices,
                "chunks_resent": self.chunks_resent,
                "concurrency": self.in_flight_cap,
                "slices_per_s": round(self.slices / elapsed, 2) if elapsed > 0 else None,
                "elapsed_s": round(elapsed, 1),
                "failed": list(self.failed),
                "error": self.error,
                "times": dict(self.times),
                "summary": storage.join(self.request["output"], JOBS_FOLDER, f"{self.job_id}.json"),
            }

    def _set(self, **fields) -> None:
        with self.lock:
            for k, v in fields.items():
                setattr(self, k, v)

    def _record(self, result: Dict) -> None:
        with self.lock:
            self.counts[result["status"]] += 1
            if result["status"] == "failed":
                self.failed.append({"input": result["input"], "reason": result["reason"]})
            if result["status"] == "done":
                self.slices += int(result.get("slices", 0))
                self.chunks_resent += int(result.get("chunks_resent", 0))
            self.results.append(result)
            self.unsaved = True

    def _run(self) -> None:
        self._set(state=JobState.RUNNING, started_s=time.time(), times={**self.times, "started": _now()})
        try:
            self._run_volumes()
            state = JobState.CANCELLED if self.cancel_requested.is_set() else JobState.SUCCEEDED
        except UserError as exc:
            state = JobState.FAILED
            self._set(error=str(exc))
        except Exception as exc:  # a bug or a lost cluster: the job fails and says why
            log.error("job %s: %s", self.job_id, traceback.format_exc())
            state = JobState.FAILED
            self._set(error=f"internal error: {type(exc).__name__}: {exc}")
        self._set(finished_s=time.time(), times={**self.times, "finished": _now()})
        try:
            self._write_summary(state)
        except Exception as exc:
            log.error("job %s: cannot write its summary: %s", self.job_id, exc)
            if state == JobState.SUCCEEDED:
                state = JobState.FAILED
                self._set(error=f"cannot write the job summary: {exc}")
        self._set(state=state)
        self._exit()

    def _exit(self) -> None:
        """Leave the job's status to its record and summary, and end this actor (its memory)."""
        try:
            storage.write_bytes(_record_uri(self.jobs_state, self.job_id), json.dumps(self.status()).encode())
        except Exception as exc:  # without its record the actor is the only one who knows: it stays
            log.error("job %s: cannot write its record under %s (%s); its actor stays", self.job_id, self.jobs_state, exc)
            return
        time.sleep(EXIT_AFTER_S)
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def _run_volumes(self) -> None:
        self._set(model=describe_model(self.app_name, self.wait_s))
        listing = list_inputs(self.request["input"], self.request["output"])
        volumes = listing["volumes"]
        with self.lock:
            self.counts["total"] = len(volumes)
            self.counts["ignored"] = len(listing["ignored"])
        if not volumes:
            raise UserError(f"no .nii or .nii.gz volumes under {self.request['input']} "
                            f"({len(listing['ignored'])} ignored: reference segmentations or outputs)")
        spec = inference.ModelSpec.from_dict(self.model)
        capacity = JobCapacity(self.app_name, self.job_id, self.cpus_per_volume, self.reserve_cpus, self.concurrency)
        if not capacity.groups and not capacity.elastic:
            log.warning("job %s: app %s has no volume pool; its tasks may take the CPUs a model replica needs",
                        self.job_id, self.app_name)
        self._save_progress(force=True)
        try:
            self._drive(volumes, spec, capacity)
        finally:
            capacity.release(others_running=_other_jobs_running(self.job_id))

    def _drive(self, volumes: List, spec: inference.ModelSpec, capacity: JobCapacity) -> None:
        """Keep volume tasks in flight (as many as `capacity` allows now, in its volume pool) until
        every volume is done or the job is cancelled (lits.runtime.fanout stops the tasks in flight then)."""
        common = (self.request["output"], spec, self.app_name, bool(self.request.get("overwrite")), self.chunk,
                  self.allow, self.wait_s)

        def place(args, attempt):
            slot = capacity.place()
            return {"num_cpus": self.cpus_per_volume, **slot["options"]}, slot["index"]

        def tick(waiting: int) -> None:
            capacity.refresh(waiting)
            self._set(in_flight_cap=capacity.concurrency())
            if self.unsaved:
                self._save_progress()

        for outcome in fanout.fan_out(segment_volume_task, [(uri, rel, *common) for uri, rel in volumes], place,
                                      lambda: self.in_flight_cap, release=capacity.done, stop=self.cancel_requested,
                                      tick=tick, poll_s=0.5):
            result, exc = outcome.value, outcome.error
            if exc is not None:
                if self.cancel_requested.is_set():
                    continue
                why = "worker crashed repeatedly" if isinstance(exc, ray.exceptions.WorkerCrashedError) else "worker failed"
                result = {"input": outcome.args[0], "status": "failed", "reason": f"{why}: {exc}"}
            self._record(result)

    def _save_progress(self, force: bool = False) -> None:
        """Rewrite the summary of the running job (at most every SUMMARY_EVERY_S unless forced)."""
        if not force and time.time() - self.summary_at < SUMMARY_EVERY_S:
            return
        self._set(summary_at=time.time(), unsaved=False)
        try:
            self._write_summary(self.state)
        except Exception as exc:  # the final summary is the one that must be written; this one can wait
            log.warning("job %s: cannot write its summary yet: %s", self.job_id, exc)

    def _write_summary(self, state: JobState) -> None:
        summary = self.status()
        summary["state"] = state.value
        with self.lock:
            results = list(self.results)
        summary["model"] = self.model
        summary["volumes"] = sorted(results, key=lambda r: r.get("name") or r["input"])
        summary["nodes"] = sorted({r["node_id"] for r in results if r.get("node_id")})
        uri = summary["summary"]
        access.check_resolved(uri, self.allow, "write")
        storage.write_bytes(uri, json.dumps(summary, indent=1).encode())


# --- the registry: live actors, then records and summaries --------------------------------------

def _other_jobs_running(job_id: str) -> bool:
    return any(a["name"].startswith(ACTOR_PREFIX) and a["name"] != ACTOR_PREFIX + job_id
               for a in ray.util.list_named_actors(all_namespaces=True) if a.get("namespace") == JOBS_NAMESPACE)


def _actor(job_id: str):
    try:
        return ray.get_actor(ACTOR_PREFIX + job_id, namespace=JOBS_NAMESPACE)
    except ValueError:
        return None


# The handles of the jobs this process started: a job's actor is not detached (see submit_job) and
# lives while a handle to it does; it ends itself when the job is over.
_HELD: Dict[str, object] = {}
_LAST_STATUS: Dict[str, Dict] = {}  # the last answer of each running job's actor in this process


def submit_job(request: Dict, app_name: str, chunk: int = 16, concurrency: Optional[int] = None,
               cpus_per_volume: float = 1.0, jobs_state: Optional[str] = None,
               allow: Sequence[str] = (), wait_s: float = MODEL_WAIT_S, reserve_cpus: Optional[float] = None) -> str:
    """Start a job on the cluster; return its id at once (the job runs in its own actor).

    The job's record (its queued status, naming its summary) is written first: a job whose id was
    handed out can always be found."""
    job_id = uuid.uuid4().hex[:12]
    jobs_state = jobs_state or default_jobs_state()
    args = (job_id, request, app_name, chunk, concurrency, cpus_per_volume, jobs_state, tuple(allow), wait_s,
            reserve_cpus)
    storage.write_bytes(_record_uri(jobs_state, job_id), json.dumps(JobRunner(*args).status()).encode())
    runner = ray.remote(JobRunner).options(
        name=ACTOR_PREFIX + job_id, namespace=JOBS_NAMESPACE, lifetime=None, num_cpus=0,
        max_concurrency=8, max_restarts=0,
    ).remote(*args)
    ray.get(runner.start.remote())
    for done in [j for j in _HELD if _actor(j) is None]:  # those that ended, exited
        _HELD.pop(done)
    _HELD[job_id] = runner
    return job_id


def _read_json(uri: str) -> Optional[Dict]:
    try:
        return json.loads(storage.read_bytes(uri))
    except Exception as exc:  # unreadable or gone: the caller says what that means for the job
        log.debug("cannot read %s: %s", uri, exc)
        return None


def _from_record(record: Dict) -> Dict:
    """A job without an actor: its summary (the finished job's state, or how far a lost job got),
    else its record."""
    summary = _read_json(record["summary"])
    if summary and summary.get("job_id") == record["job_id"]:
        found = {k: summary[k] for k in record if k in summary}
        return found if found.get("state") in FINAL_STATES else {**found, "state": JobState.FAILED.value, "error": LOST}
    if record.get("state") in FINAL_STATES:
        return record
    return {**record, "state": JobState.FAILED.value, "error": LOST}


def get_job(job_id: str, jobs_state: Optional[str] = None) -> Optional[Dict]:
    """The job's status: from its actor while it runs (when the actor does not answer within
    STATUS_ACTOR_WAIT_S: its last answer in this process, else its last summary), from its summary
    (through its record) after."""
    actor = _actor(job_id)
    if actor is not None:
        try:
            status = ray.get(actor.status.remote(), timeout=STATUS_ACTOR_WAIT_S)
            if status["state"] in FINAL_STATES:
                _LAST_STATUS.pop(job_id, None)
            else:
                _LAST_STATUS[job_id] = status
            return status
        except ray.exceptions.GetTimeoutError:
            if job_id in _LAST_STATUS:  # too busy to answer now: what it said last
                return _LAST_STATUS[job_id]
        except ray.exceptions.RayActorError:
            pass  # it just ended: the record and summary know
    _LAST_STATUS.pop(job_id, None)
    record = _read_json(_record_uri(jobs_state or default_jobs_state(), job_id))
    if record is None or record.get("job_id") != job_id:
        return None
    if actor is not None and record.get("state") not in FINAL_STATES:
        summary = _read_json(record["summary"])  # alive: never lost, whatever the summary says
        return {k: summary[k] for k in record if k in summary} if summary and summary.get("job_id") == job_id else record
    return _from_record(record)


def cancel_job(job_id: str, jobs_state: Optional[str] = None) -> Optional[Dict]:
    actor = _actor(job_id)
    if actor is not None:
        try:
            return ray.get(actor.cancel.remote(), timeout=STATUS_WAIT_S)
        except ray.exceptions.RayActorError:
            pass  # it just ended: nothing left to cancel
    return get_job(job_id, jobs_state)


def list_jobs(jobs_state: Optional[str] = None) -> List[Dict]:
    """Every job with a record in the state folder, newest first (finished ones from their records)."""
    folder = storage.normalise(jobs_state or default_jobs_state())
    if not storage.exists(folder):
        return []
    found = []
    for uri in storage.list_files(folder):
        record = _read_json(uri) if uri.endswith(".json") else None
        if not record or "job_id" not in record:
            continue
        found.append(record if record.get("state") in FINAL_STATES else get_job(record["job_id"], folder))
    return sorted((j for j in found if j), key=lambda j: j["times"]["submitted"], reverse=True)
