"""Where one bulk job is (`JobProgress`: its state, counts and volume results, and the status read
off them) and its summary file (`SummaryWriter`: `OUTPUT/_jobs/<job_id>.json`, rewritten at most
every `SUMMARY_EVERY_S` while the job runs, so a lost actor loses little progress).

No Ray here: the job's actor (`lits.serve.job_runner`) holds one of each.
"""

from __future__ import annotations

import datetime
import enum
import json
import logging
import threading
import time
from typing import Dict, List, Optional

from lits.core import storage
from lits.serve import access
from lits.serve.job_spec import JobSpec

log = logging.getLogger(__name__)

SUMMARY_EVERY_S = 2.0  # a running job rewrites its summary at most this often as volumes finish


class JobState(str, enum.Enum):
    """Where a job is; its value is what status, summaries and records say ("state")."""
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_STATES = tuple(s.value for s in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class JobProgress:
    """What one job knows so far: its state, error, model, counts, volume results and times.

    The job's driving thread writes it and the actor's calls (status, cancel) read it at the same
    time: every change and every read holds one lock. `changes` counts the volumes recorded, so
    the summary writer knows whether anything is left unwritten.
    """

    def __init__(self, job: JobSpec):
        self.job = job
        self._lock = threading.Lock()
        self.state = JobState.QUEUED
        self.error: Optional[str] = None
        self.model: Dict = {}
        self.counts = {"total": 0, "done": 0, "skipped": 0, "failed": 0, "ignored": 0}
        self.failed: List[Dict] = []
        self.results: List[Dict] = []
        self.slices = 0
        self.chunks_resent = 0
        self.in_flight_cap = 0
        self.changes = 0
        self.times = {"submitted": _now(), "started": None, "finished": None}
        self.started_s: Optional[float] = None
        self.finished_s: Optional[float] = None

    def _set(self, **fields) -> None:
        with self._lock:
            for k, v in fields.items():
                setattr(self, k, v)

    def start(self) -> None:
        self._set(state=JobState.RUNNING, started_s=time.time(), times={**self.times, "started": _now()})

    def finish(self) -> None:
        """The job's work is over (its final state is set by `end` once its summary is written)."""
        self._set(finished_s=time.time(), times={**self.times, "finished": _now()})

    def end(self, state: JobState) -> None:
        self._set(state=state)

    def fail(self, error: str) -> None:
        self._set(error=error)

    def set_model(self, model: Dict) -> None:
        self._set(model=model)

    def set_concurrency(self, in_flight_cap: int) -> None:
        self._set(in_flight_cap=in_flight_cap)

    def listed(self, total: int, ignored: int) -> None:
        with self._lock:
            self.counts["total"] = total
            self.counts["ignored"] = ignored

    def record(self, result: Dict) -> None:
        """One volume's result (`job_tasks.segment_volume`'s dict)."""
        with self._lock:
            self.counts[result["status"]] += 1
            if result["status"] == "failed":
                self.failed.append({"input": result["input"], "reason": result["reason"]})
            if result["status"] == "done":
                self.slices += int(result.get("slices", 0))
                self.chunks_resent += int(result.get("chunks_resent", 0))
            self.results.append(result)
            self.changes += 1

    def status(self) -> Dict:
        """What GET /v1/jobs/{id} answers, and what the job's record holds."""
        with self._lock:
            counts = dict(self.counts)
            finished = counts["done"] + counts["skipped"] + counts["failed"]
            elapsed = ((self.finished_s or time.time()) - self.started_s) if self.started_s else 0.0
            ended = self.state.value in FINAL_STATES
            return {
                "job_id": self.job.job_id,
                "state": self.state.value,
                "input": self.job.input,
                "output": self.job.output,
                "overwrite": self.job.overwrite,
                "model_id": self.model.get("model_id"),
                "counts": counts,
                "progress": round(finished / counts["total"], 4) if counts["total"] else (1.0 if ended else 0.0),
                "slices_segmented": self.slices,
                "chunks_resent": self.chunks_resent,
                "concurrency": self.in_flight_cap,
                "slices_per_s": round(self.slices / elapsed, 2) if elapsed > 0 else None,
                "elapsed_s": round(elapsed, 1),
                "failed": list(self.failed),
                "error": self.error,
                "times": dict(self.times),
                "summary": self.job.summary_uri,
            }

    def summary(self, state: JobState) -> Dict:
        """The summary file's content: the status said with `state`, plus the model, every
        volume's result (by name) and the nodes that segmented them."""
        summary = self.status()
        summary["state"] = state.value
        with self._lock:
            results = list(self.results)
        summary["model"] = self.model
        summary["volumes"] = sorted(results, key=lambda r: r.get("name") or r["input"])
        summary["nodes"] = sorted({r["node_id"] for r in results if r.get("node_id")})
        return summary


class SummaryWriter:
    """Writes one job's summary (`JobSpec.summary_uri`): while the job runs, only when a volume was
    recorded since the last write and at most every `every_s`; at its end, always.

    The summary is where a finished job's status is read from (through its record), and how far a
    lost job got: a running job's is at most `every_s` behind, yet a thousand volumes finishing
    in a burst cost a few writes, not a thousand.
    """

    def __init__(self, progress: JobProgress, every_s: float = SUMMARY_EVERY_S):
        self.progress = progress
        self.every_s = every_s
        self.written_at = 0.0
        self.written_changes = 0

    def write(self, state: JobState) -> None:
        """Write the summary now, said with `state`; raises when it cannot be written (or would
        resolve outside the allow-list)."""
        summary = self.progress.summary(state)
        uri = summary["summary"]
        access.check_resolved(uri, self.progress.job.allow, "write")
        storage.write_bytes(uri, json.dumps(summary, indent=1).encode())

    def save_progress(self, force: bool = False) -> None:
        """Rewrite the running job's summary when it is due (or now, `force`). A failed write is
        logged and left for the next: the final summary is the one that must be written."""
        changes = self.progress.changes
        if not force and (changes == self.written_changes or time.time() - self.written_at < self.every_s):
            return
        self.written_at, self.written_changes = time.time(), changes
        try:
            self.write(self.progress.state)
        except Exception as exc:
            log.warning("job %s: cannot write its summary yet: %s", self.progress.job.job_id, exc)
