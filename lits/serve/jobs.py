"""Bulk segmentation jobs: submitted, found again, cancelled and listed (what /v1/jobs answers).

A running job is a `JobRunner` actor (`lits.serve.job_runner`), named after the job's id and owned
by the process that submitted it (the HTTP replica). It is not detached on purpose: Ray keeps the
workers of a detached actor's tasks apart from every other's, and a worker that made a Serve
handle always owns a pending call (the handle's long poll), so Ray never ends it as idle: each
detached job would leave one idle worker (~290 MB) behind for good. Owned by the replica, all jobs
and uploads share its workers.

Where a job is, is kept in a small record per job in the jobs state folder (`<state>/<job_id>.json`,
written when the job is submitted and again by its actor when the job ends); the status of a
finished job is read from its summary (`OUTPUT/_jobs/<job_id>.json`) through that record, so it
survives the actor and a restart of the server.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Dict, List, Optional

import ray

from lits.core import storage
from lits.core.errors import UserError
from lits.serve import access
from lits.serve.job_progress import FINAL_STATES, JobProgress, JobState
from lits.serve.job_runner import JobRunner
from lits.serve.job_spec import ACTOR_PREFIX, JOBS_NAMESPACE, JobSpec, default_jobs_state, record_uri

log = logging.getLogger(__name__)

STATUS_WAIT_S = 10.0  # for a cancel
# A status waits this long for a busy job actor, then answers from the job's last summary (at most
# job_progress.SUMMARY_EVERY_S old): GET /v1/jobs/{id} stays under a second whatever the job's process is doing.
STATUS_ACTOR_WAIT_S = 0.3
LOST = ("the job stopped without a summary (its server or cluster stopped while it ran); submit it again: "
        "finished volumes are skipped")


def _actor(job_id: str):
    try:
        return ray.get_actor(ACTOR_PREFIX + job_id, namespace=JOBS_NAMESPACE)
    except ValueError:
        return None


# The handles of the jobs this process started: a job's actor is not detached (the module docstring says why) and
# lives while a handle to it does; it ends itself when the job is over.
_HELD: Dict[str, object] = {}
_LAST_STATUS: Dict[str, Dict] = {}  # the last answer of each running job's actor in this process


def submit_job(job: JobSpec) -> str:
    """Start `job` on the cluster; return its id at once (the job runs in its own actor).

    The job's record (its queued status, naming its summary) is written first: a job whose id was
    handed out can always be found. The jobs state folder is resolved here, in the submitting
    process, so the actor writes its record where this process looks for it.

    Raises:
        UserError: the output overlaps the jobs state folder, or is or contains the input
            (`access.check_job_uris`; the HTTP API answers those 400 before calling this).
    """
    job = dataclasses.replace(job, jobs_state=job.jobs_state or default_jobs_state())
    try:
        access.check_job_uris(job.input, job.output, job.jobs_state)
    except access.AccessError as exc:
        raise UserError(str(exc)) from exc
    storage.write_bytes(job.record_uri, json.dumps(JobProgress(job).status()).encode())
    runner = ray.remote(JobRunner).options(
        name=job.actor_name, namespace=JOBS_NAMESPACE, lifetime=None, num_cpus=0,
        max_concurrency=8, max_restarts=0,
    ).remote(job)
    ray.get(runner.start.remote())
    for done in [j for j in _HELD if _actor(j) is None]:  # those that ended, exited
        _HELD.pop(done)
    _HELD[job.job_id] = runner
    return job.job_id


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
    record = _read_json(record_uri(jobs_state or default_jobs_state(), job_id))
    if record is None or record.get("job_id") != job_id:
        return None
    if actor is not None and record.get("state") not in FINAL_STATES:
        summary = _read_json(record["summary"])  # alive: never lost, whatever the summary says
        return {k: summary[k] for k in record if k in summary} if summary and summary.get("job_id") == job_id else record
    return _from_record(record)


def volume_results(job_id: str, seen: int) -> Optional[Dict]:
    """A running job's volume results after its first `seen` (`JobProgress.results_since`), from its
    actor; None when the actor is gone or too busy to answer within STATUS_ACTOR_WAIT_S."""
    actor = _actor(job_id)
    if actor is None:
        return None
    try:
        return ray.get(actor.results_since.remote(seen), timeout=STATUS_ACTOR_WAIT_S)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
        return None


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
