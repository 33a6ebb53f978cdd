"""A running bulk job: its Ray actor (`JobRunner`) and the thread that drives it (`JobDriver`).

The actor holds the job's `JobProgress`, answers status and cancel, and starts one `JobDriver`
thread: it lists the inputs, then keeps volume tasks (`lits.serve.job_tasks`) in flight in the
placement groups `lits.serve.job_capacity` gives it (the app's volume pool, plus CPUs that join
the cluster when the pool is elastic), never more than the model replicas can absorb (the running
replicas x their `volumes_per_replica`, from the model's describe()), and writes the job's summary
through a `SummaryWriter`: after the listing, then at most every `SUMMARY_EVERY_S` as volumes
finish, and last when it ends.
Then the actor writes the job's record and ends itself: a finished job costs no process, and its
status is read from its summary through that record (`lits.serve.jobs`).

Failure rules: a bad volume is recorded with its reason and the job goes on; a busy model costs
a wait, never a resend; a lost model replica costs a resend of the chunks it held, a lost CPU
worker a retry of its volume (Ray's task retries), never the volume. A cancel cancels the volume
tasks (forcefully when they do not stop within `fanout.CANCEL_GRACE_S`), so their CPUs are free
once the job says `cancelled`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
from typing import Dict, List, Optional

import ray

from lits.core import storage
from lits.core.errors import UserError
from lits.model import inference
from lits.runtime import fanout
from lits.serve.job_capacity import VOLUMES_PER_REPLICA, JobCapacity, ModelWindow
from lits.serve.job_progress import FINAL_STATES, JobProgress, JobState, SummaryWriter
from lits.serve.job_spec import ACTOR_PREFIX, JOBS_NAMESPACE, JobSpec
from lits.serve.job_inputs import list_inputs
from lits.serve.job_tasks import segment_volume_task, source_name
from lits.serve.model_client import describe_model

log = logging.getLogger(__name__)

EXIT_AFTER_S = 1.0  # a finished job's actor answers this long from memory, then exits


def other_jobs_running(job_id: str) -> bool:
    """Whether a job other than `job_id` has a live actor (it may still want the CPUs asked for)."""
    return any(a["name"].startswith(ACTOR_PREFIX) and a["name"] != ACTOR_PREFIX + job_id
               for a in ray.util.list_named_actors(all_namespaces=True) if a.get("namespace") == JOBS_NAMESPACE)


class JobDriver:
    """Runs one job from its model and listing to its final summary, recording into `progress`;
    stops early when `stop` is set (a cancel)."""

    def __init__(self, job: JobSpec, progress: JobProgress, stop: threading.Event):
        self.job = job
        self.progress = progress
        self.stop = stop
        self.summaries = SummaryWriter(progress)

    def run(self) -> JobState:
        """Drive the job to its end and return its final state (also set on `progress`); never raises."""
        job_id = self.job.job_id
        self.progress.start()
        try:
            self._run_volumes()
            state = JobState.CANCELLED if self.stop.is_set() else JobState.SUCCEEDED
        except UserError as exc:
            state = JobState.FAILED
            self.progress.fail(str(exc))
        except Exception as exc:  # a bug or a lost cluster: the job fails and says why
            log.error("job %s: %s", job_id, traceback.format_exc())
            state = JobState.FAILED
            self.progress.fail(f"internal error: {type(exc).__name__}: {exc}")
        self.progress.finish()
        try:
            self.summaries.write(state)
        except Exception as exc:
            log.error("job %s: cannot write its summary: %s", job_id, exc)
            if state == JobState.SUCCEEDED:
                state = JobState.FAILED
                self.progress.fail(f"cannot write the job summary: {exc}")
        self.progress.end(state)
        return state

    def _run_volumes(self) -> None:
        job = self.job
        self.progress.set_model(describe_model(job.app_name, job.wait_s))
        listing = list_inputs(job.input, job.output, inputs=job.inputs)
        volumes, refused = listing["volumes"], listing["refused"]
        self.progress.listed(len(volumes) + len(refused), len(listing["ignored"]), listing["skipped"])
        if not volumes and not refused:
            why = "; ".join(str(s) for s in listing["skipped"][:2])
            raise UserError(f"no .nii or .nii.gz volumes and no DICOM CT series under {job.input} "
                            f"({len(listing['ignored'])} ignored: reference segmentations or outputs"
                            f"{'; skipped: ' + why if why else ''})")
        for uri, reason in refused:  # names that would write outside the output, or over another's outputs
            self.progress.record({"input": uri, "status": "failed", "reason": f"refused: {reason}"})
        if not volumes:
            return
        model = inference.ModelSpec.from_dict(self.progress.model)
        window = ModelWindow(job.app_name, self.progress.model.get("volumes_per_replica", VOLUMES_PER_REPLICA))
        capacity = JobCapacity(job.app_name, job.job_id, job.cpus_per_volume, reserve_cpus=job.reserve_cpus,
                               concurrency=job.concurrency, window=window.size)
        if not capacity.groups and not capacity.elastic:
            log.warning("job %s: app %s has no volume pool; its tasks may take the CPUs a model replica needs",
                        job.job_id, job.app_name)
        self.summaries.save_progress(force=True)
        try:
            self._drive(volumes, model, capacity)
        finally:
            capacity.release(others_running=other_jobs_running(job.job_id))

    def _drive(self, volumes: List, model: inference.ModelSpec, capacity: JobCapacity) -> None:
        """Keep volume tasks in flight (as many as `capacity` allows now, in its volume pool) until
        every volume is done or the job is cancelled (lits.runtime.fanout stops the tasks in flight then)."""

        def place(args, attempt):  # fan_out's signature; a volume's slot does not depend on them
            slot = capacity.place()
            return {"num_cpus": self.job.cpus_per_volume, **slot["options"]}, slot["index"]

        def tick(waiting: int) -> None:
            capacity.refresh(waiting)
            self.progress.set_concurrency(capacity.concurrency())
            self.summaries.save_progress()

        items = [(uri, rel, self.job, model) for uri, rel in volumes]
        for outcome in fanout.fan_out(segment_volume_task, items, place, lambda: self.progress.in_flight_cap,
                                      release=capacity.done, stop=self.stop, tick=tick, poll_s=0.5):
            result, exc = outcome.value, outcome.error
            if exc is not None:
                if self.stop.is_set():
                    continue
                crashed = isinstance(exc, ray.exceptions.WorkerCrashedError)
                why = "worker crashed repeatedly" if crashed else "worker failed"
                result = {"input": source_name(outcome.args[0]), "status": "failed", "reason": f"{why}: {exc}"}
            self.progress.record(result)


class JobRunner:
    """One bulk job as a Ray actor (made by `jobs.submit_job`): status and cancel answered from its
    `JobProgress` while a `JobDriver` thread runs the job; then the job's record is written and
    the actor ends itself."""

    def __init__(self, job: JobSpec):
        self.job = job
        self.progress = JobProgress(job)
        self.cancel_requested = threading.Event()
        self.thread: Optional[threading.Thread] = None

    def start(self) -> str:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name=f"job-{self.job.job_id}", daemon=True)
            self.thread.start()
        return self.job.job_id

    def cancel(self) -> Dict:
        if self.progress.state.value not in FINAL_STATES:
            self.cancel_requested.set()
        return self.status()

    def status(self) -> Dict:
        return self.progress.status()

    def results_since(self, seen: int) -> Dict:
        return self.progress.results_since(seen)

    def _run(self) -> None:
        JobDriver(self.job, self.progress, self.cancel_requested).run()
        self._exit()

    def _exit(self) -> None:
        """Leave the job's status to its record and summary, and end this actor (its memory)."""
        try:
            storage.write_bytes(self.job.record_uri, json.dumps(self.status()).encode())
        except Exception as exc:  # without its record the actor is the only one who knows: it stays
            log.error("job %s: cannot write its record under %s (%s); its actor stays", self.job.job_id,
                      self.job.jobs_state, exc)
            return
        time.sleep(EXIT_AFTER_S)
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
