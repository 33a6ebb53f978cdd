"""At most `max_jobs` bulk jobs running per ingress replica; the others wait in order (`JobQueue`).

Each running job costs a Ray actor and a worker process (hundreds of MB), whatever the volume pool
does: jobs over the cap get a record saying `queued` (found by status and list like any other)
and wait in this replica's memory; they start, oldest first, as running jobs end (their actors
exit). Cancelling a queued job removes it and records it `cancelled`. The queue lives in the
replica: when the server stops, the queued jobs are reported lost (submit them again), as running
ones are.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections import OrderedDict
from typing import Callable, Dict, Optional

import ray

from lits.core import storage
from lits.serve import jobs
from lits.serve.job_progress import JobProgress, JobState
from lits.serve.job_spec import ACTOR_PREFIX, JOBS_NAMESPACE, JobSpec, default_jobs_state

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often a queue with waiting jobs looks for ended ones


def actor_alive(job_id: str) -> bool:
    """Whether the job's actor still exists (it exits once the job's record is written)."""
    try:
        ray.get_actor(ACTOR_PREFIX + job_id, namespace=JOBS_NAMESPACE)
        return True
    except ValueError:
        return False


def _write_record(job: JobSpec, status: Dict) -> None:
    storage.write_bytes(job.record_uri, json.dumps(status).encode())


class JobQueue:
    """The jobs this replica started (running while their actors live) and those waiting.

    Args:
        max_jobs: jobs running at once.
        start: starts a job and returns its id (`jobs.submit_job`); blocking, run on a thread.
        alive: whether a started job still runs (`actor_alive`); blocking, run on a thread.
    """

    def __init__(self, max_jobs: int, start: Callable[[JobSpec], str] = jobs.submit_job,
                 alive: Callable[[str], bool] = actor_alive):
        self.max_jobs = max_jobs
        self._start, self._alive = start, alive
        self.running: set = set()
        self.waiting: "OrderedDict[str, JobSpec]" = OrderedDict()
        self._queued: Dict[str, Dict] = {}  # each waiting job's status, as its record says
        self._lock: Optional[asyncio.Lock] = None
        self._dispatcher: Optional[asyncio.Task] = None

    def _locked(self) -> asyncio.Lock:
        if self._lock is None:  # made on the replica's event loop, where it is used
            self._lock = asyncio.Lock()
        return self._lock

    async def _prune(self) -> None:
        for job_id in list(self.running):
            if not await asyncio.to_thread(self._alive, job_id):
                self.running.discard(job_id)

    async def submit(self, job: JobSpec) -> str:
        """Start `job` now when fewer than max_jobs run and none waits; else record it queued."""
        job = dataclasses.replace(job, jobs_state=job.jobs_state or default_jobs_state())
        async with self._locked():
            await self._prune()
            if len(self.running) < self.max_jobs and not self.waiting:
                self.running.add(await asyncio.to_thread(self._start, job))
                return job.job_id
            status = JobProgress(job).status()
            await asyncio.to_thread(_write_record, job, status)
            self.waiting[job.job_id] = job
            self._queued[job.job_id] = status
            log.info("job %s queued: %d running (--max-jobs %d), %d waiting", job.job_id, len(self.running),
                     self.max_jobs, len(self.waiting))
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch())
        return job.job_id

    def status(self, job_id: str) -> Optional[Dict]:
        """A waiting job's status (state 'queued'); None for any other job."""
        return self._queued.get(job_id)

    async def cancel(self, job_id: str) -> Optional[Dict]:
        """Remove a waiting job and record it cancelled; None when `job_id` is not waiting."""
        async with self._locked():
            job = self.waiting.pop(job_id, None)
            if job is None:
                return None
            progress = JobProgress(job)
            progress.times = self._queued[job_id]["times"]
            progress.end(JobState.CANCELLED)
            status = progress.status()
            await asyncio.to_thread(_write_record, job, status)
            self._queued.pop(job_id)
            return status

    async def _dispatch(self) -> None:
        """Start waiting jobs, oldest first, whenever running ones have ended; stop when none waits."""
        while self.waiting:
            await asyncio.sleep(POLL_S)
            async with self._locked():
                try:
                    await self._prune()
                except Exception as exc:  # Ray busy or restarting: look again next time
                    log.warning("job queue: cannot see which jobs still run: %s", exc)
                    continue
                while self.waiting and len(self.running) < self.max_jobs:
                    job_id, job = next(iter(self.waiting.items()))
                    try:
                        self.running.add(await asyncio.to_thread(self._start, job))
                    except Exception as exc:  # its record says why; the queue goes on
                        log.error("job %s: cannot start: %s", job_id, exc)
                        await asyncio.to_thread(self._record_failure, job, exc)
                    self.waiting.pop(job_id)
                    self._queued.pop(job_id)

    def _record_failure(self, job: JobSpec, exc: Exception) -> None:
        progress = JobProgress(job)
        progress.fail(f"the job could not start: {exc}")
        progress.end(JobState.FAILED)
        try:
            _write_record(job, progress.status())
        except Exception as again:
            log.error("job %s: cannot write its record either: %s", job.job_id, again)
