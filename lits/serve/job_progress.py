"""Where one bulk job is (`JobProgress`: its state, counts and volume results, and the status read
off them) and its summary file (`SummaryWriter`: `OUTPUT/_jobs/<job_id>.json`, rewritten at most
every `SUMMARY_EVERY_S` while the job runs, so a lost actor loses little progress).

Bookkeeping costs O(1) per volume at any job size: the summary is compact (counts, the first
`FAILED_LISTED` failures, the nodes, the model) and the volumes' results go to shards of
`RECORDS_PER_SHARD` JSON lines (`_jobs/<job_id>/volumes-NNNNN.jsonl`), each written once, when it
is full or the job ends. The actor holds only the results not yet in a shard. A volume's own
report beside its mask is its durable record: a lost job's last partial shard is not needed to
resume it.

No Ray here: the job's actor (`lits.serve.job_runner`) holds one of each.
"""

from __future__ import annotations

import datetime
import enum
import json
import logging
import threading
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from lits.core import storage
from lits.serve import access
from lits.serve.job_spec import JobSpec, records_shard

log = logging.getLogger(__name__)

SUMMARY_EVERY_S = 2.0  # a running job rewrites its summary at most this often as volumes finish
RECORDS_PER_SHARD = 1000  # volume results per records shard
FAILED_LISTED = 100  # failures (input, reason) listed in status and summary; counts["failed"] has them all
LEFT_OUT_LISTED = 100  # DICOM files and series the selection left out, listed; counts["left_out"] has them all


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
        self.counts = {"total": 0, "done": 0, "skipped": 0, "failed": 0, "ignored": 0, "left_out": 0}
        self.failed: List[Dict] = []  # the first FAILED_LISTED
        self.left_out: List[Dict] = []  # the first LEFT_OUT_LISTED DICOM files and series left out, and why
        self.pending: List[Dict] = []  # results not yet in a written shard
        self.shards_written = 0
        self.in_shards = 0  # results written to shards (they left memory)
        self.nodes: set = set()
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

    def listed(self, total: int, ignored: int, skipped: Sequence = ()) -> None:
        """What the listing found: `total` inputs, `ignored` files, and the DICOM files and series
        `skipped` by the selection (`dicom.Skipped`: scouts, other modalities, not DICOM...):
        counted, the first LEFT_OUT_LISTED of them listed with their reasons."""
        with self._lock:
            self.counts["total"] = total
            self.counts["ignored"] = ignored
            self.counts["left_out"] = len(skipped)
            self.left_out = [{"what": s.what, "reason": s.reason} for s in skipped[:LEFT_OUT_LISTED]]

    def record(self, result: Dict) -> None:
        """One volume's result (`job_tasks.segment_volume`'s dict)."""
        with self._lock:
            self.counts[result["status"]] += 1
            if result["status"] == "failed" and len(self.failed) < FAILED_LISTED:
                self.failed.append({"input": result["input"], "reason": result["reason"]})
            if result["status"] == "done":
                self.slices += int(result.get("slices", 0))
                self.chunks_resent += int(result.get("chunks_resent", 0))
            if result.get("node_id"):
                self.nodes.add(result["node_id"])
            self.pending.append(result)
            self.changes += 1

    def due_shards(self, final: bool) -> List[Tuple[int, List[Dict]]]:
        """(index, results) of every full shard not yet written, and with `final` the partial last
        one. The caller writes them in order, calling `shard_written` after each."""
        with self._lock:
            count = len(self.pending) if final else len(self.pending) - len(self.pending) % RECORDS_PER_SHARD
            due, base = self.pending[:count], self.shards_written
        return [(base + i, due[start:start + RECORDS_PER_SHARD]) for i, start in enumerate(range(0, count, RECORDS_PER_SHARD))]

    def shard_written(self, results: int) -> None:
        """The next shard, of `results` results, is written: they leave memory."""
        with self._lock:
            self.pending = self.pending[results:]
            self.shards_written += 1
            self.in_shards += results

    def results_since(self, seen: int) -> Dict:
        """The volume results recorded after the first `seen` that are still in memory: {'next': the
        count recorded so far (the next call's `seen`), 'results', 'complete': False when some after
        `seen` already left memory for a shard (the shards have them)}. A watch settles its keys
        with it while their job runs."""
        with self._lock:
            start = max(0, seen - self.in_shards)
            return {"next": self.in_shards + len(self.pending), "results": self.pending[start:],
                    "complete": seen >= self.in_shards}

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
                "left_out": list(self.left_out),
                "error": self.error,
                "times": dict(self.times),
                "summary": self.job.summary_uri,
            }

    def summary(self, state: JobState) -> Dict:
        """The summary file's content: the status said with `state`, plus the model, the nodes that
        segmented volumes, and where the shards of volume results written so far are
        (`volume_records`: their folder and count; `read_volume_records` reads them, in the order
        the volumes finished)."""
        summary = self.status()
        summary["state"] = state.value
        with self._lock:
            summary["nodes"] = sorted(self.nodes)
            shards = self.shards_written
        summary["model"] = self.model
        summary["volume_records"] = {"folder": self.job.records_folder, "shards": shards}
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
        """Write the full shards of volume results (every one left, in a final `state`), then the
        summary, said with `state`; raises when one cannot be written (or would resolve outside the
        allow-list). A shard that fails to write stays in memory, to be written with the next."""
        job = self.progress.job
        for index, results in self.progress.due_shards(final=state.value in FINAL_STATES):
            uri = records_shard(job.records_folder, index)
            access.check_resolved(uri, job.allow, "write")
            storage.write_bytes(uri, "".join(json.dumps(r) + "\n" for r in results).encode())
            self.progress.shard_written(len(results))
        summary = self.progress.summary(state)
        uri = summary["summary"]
        access.check_resolved(uri, job.allow, "write")
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


def read_volume_records(summary: Dict) -> Iterator[Dict]:
    """Every volume result a job summary's shards hold, in the order the volumes finished."""
    records = summary["volume_records"]
    for index in range(records["shards"]):
        for line in storage.read_bytes(records_shard(records["folder"], index)).decode().splitlines():
            yield json.loads(line)
