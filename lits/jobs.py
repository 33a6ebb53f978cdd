"""Bulk segmentation jobs: every NIfTI under a prefix -> a mask and a report per volume.

A job is a `JobRunner` actor (named, detached: it outlives the HTTP replica that created it
and is found again by its id). It lists the inputs, then keeps at most `concurrency` volume
tasks in flight across the cluster. Each task reads, preprocesses and post-processes on a CPU
worker and sends its slices, chunk by chunk, to the model deployment, where @serve.batch
gathers slices of many volumes into one forward pass.

Outputs per input `INPUT/<rel>.nii[.gz]`: `OUTPUT/<rel>_seg.nii.gz`, `OUTPUT/<rel>_preview.png`,
then `OUTPUT/<rel>.json` (the report, written last: its presence with this model's id means done). Every write
is atomic, and a volume's outputs are all or nothing (`segment_volume`). At the end `OUTPUT/_jobs/<job_id>.json`
holds the summary.

Failure rules: a bad volume is recorded with its reason and the job goes on; a lost model
replica costs a retry of the chunks it held (`RETRIES`), a lost CPU worker a retry of its volume
(Ray's task retries), never the volume.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import threading
import time
import traceback
import uuid
from typing import Dict, List, Optional

import numpy as np
import ray

from lits import inference, storage
from lits.errors import BadInputError, UserError

log = logging.getLogger(__name__)

JOBS_NAMESPACE = "lits-jobs"
ACTOR_PREFIX = "lits-job-"
JOBS_FOLDER = "_jobs"
MAX_KEPT_JOBS = 100  # finished job actors kept for GET /v1/jobs; summaries stay in the bucket
RETRIES = 5  # per chunk, when the model replica that held it is lost
RETRY_WAIT_S = 2.0
STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATES = ("succeeded", "failed", "cancelled")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --- talking to the model deployment -------------------------------------------------------------

def _replica_lost(exc: BaseException) -> bool:
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    lost = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, BackPressureError,
            DeploymentUnavailableError)
    return isinstance(exc, lost) or "ActorDied" in type(exc).__name__ or "Unavailable" in type(exc).__name__


class _Pending:
    """A chunk sent to the model deployment; `.result()` resends it when its replica was lost."""

    def __init__(self, handle, images: np.ndarray, resent: Optional[List[int]] = None):
        self.handle = handle
        self.images = images
        self.resent = resent if resent is not None else []
        self.response = handle.predict.remote(images)

    def result(self, timeout_s: Optional[float] = None) -> np.ndarray:
        for attempt in range(RETRIES + 1):
            try:
                return self.response.result()
            except Exception as exc:
                if not _replica_lost(exc) or attempt == RETRIES:
                    raise
                log.warning("model replica lost (%s); resending %d slices (try %d of %d)",
                            type(exc).__name__, len(self.images), attempt + 1, RETRIES)
                time.sleep(RETRY_WAIT_S * (attempt + 1))
                self.resent.append(len(self.images))
                self.response = self.handle.predict.remote(self.images)
        raise AssertionError("unreachable")


def model_handle(app_name: str):
    from ray import serve

    from lits.serving import MODEL_DEPLOYMENT

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # one "router started" line per worker otherwise
    return serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name=app_name)


def describe_model(app_name: str) -> Dict:
    """The deployed model's spec (ModelSpec as a dict) plus batching facts."""
    return model_handle(app_name).describe.remote().result()


# --- one volume -----------------------------------------------------------------------------------

def output_uris(output: str, rel_name: str) -> Dict[str, str]:
    return {"mask": storage.join(output, rel_name + "_seg.nii.gz"), "preview": storage.join(output, rel_name + "_preview.png"),
            "report": storage.join(output, rel_name + ".json")}


def already_done(uris: Dict[str, str], model_id: str, s3_endpoint: Optional[str]) -> bool:
    """True when this model's report and mask for the volume exist (the report is written last)."""
    if not storage.exists(uris["report"], s3_endpoint):
        return False
    try:
        report = json.loads(storage.read_bytes(uris["report"], s3_endpoint))
    except (ValueError, UserError):
        return False
    return report.get("model_id") == model_id and storage.exists(uris["mask"], s3_endpoint)


def remove_outputs(uris: Dict[str, str], s3_endpoint: Optional[str]) -> None:
    """Delete a volume's report, preview and mask (report first: it is what marks a volume done)."""
    for key in ("report", "preview", "mask"):
        storage.delete(uris[key], s3_endpoint)


def segment_volume(uri: str, rel_name: str, output: str, spec: inference.ModelSpec, submit: inference.Submit,
                   overwrite: bool, chunk: int, s3_endpoint: Optional[str]) -> Dict:
    """One volume of a job (what `segment_volume_task` runs); never raises for a bad volume.

    Outputs are all or nothing: stale ones (another model's, or a half-written earlier try) are
    removed before the volume is segmented, and whatever this call wrote is removed again when it
    stops before the report (a cancel's KeyboardInterrupt, a failed write). So no mask or preview
    lies under its final name without this model's report, and no report describes another
    model's mask.

    Returns:
        {'input', 'name', 'status': 'done'|'skipped'|'failed', 'reason' when failed, report figures when done}.
    """
    uris = output_uris(output, rel_name)
    result = {"input": uri, "name": rel_name}
    try:
        done_before = already_done(uris, spec.model_id, s3_endpoint)
        if done_before and not overwrite:
            return {**result, "status": "skipped"}
        if not done_before:
            remove_outputs(uris, s3_endpoint)
        try:
            report = inference.segment_uri(uri, uris, spec, submit, s3_endpoint, chunk)
        except BaseException:
            try:
                if not already_done(uris, spec.model_id, s3_endpoint):
                    remove_outputs(uris, s3_endpoint)
            except Exception as exc:  # the first failure is the one to report
                log.warning("volume %s: could not remove its partial outputs: %s", uri, exc)
            raise
    except BadInputError as exc:
        return {**result, "status": "failed", "reason": str(exc)}
    except UserError as exc:  # e.g. the output became unwritable
        return {**result, "status": "failed", "reason": str(exc)}
    except Exception as exc:
        log.error("volume %s: %s", uri, traceback.format_exc())
        return {**result, "status": "failed", "reason": f"internal error: {type(exc).__name__}: {exc}"}
    return {**result, "status": "done", "slices": report["slices"], "seconds": report["seconds"]["total"],
            "liver_volume_ml": report["liver_volume_ml"], "tumour_volume_ml": report["tumour_volume_ml"],
            "lesion_count": report["lesion_count"]}


@ray.remote(num_cpus=1, max_retries=2)
def segment_volume_task(uri: str, rel_name: str, output: str, spec: Dict, app_name: str, overwrite: bool,
                        chunk: int, s3_endpoint: Optional[str]) -> Dict:
    """`segment_volume` on a Ray worker, its chunks sent to the model deployment of `app_name`."""
    resent: List[int] = []
    handles: List = []

    def submit(images: np.ndarray) -> _Pending:
        if not handles:  # one handle per task, made only when a volume needs the model
            handles.append(model_handle(app_name))
        return _Pending(handles[0], images, resent)

    result = segment_volume(uri, rel_name, output, inference.ModelSpec.from_dict(spec), submit, overwrite, chunk,
                            s3_endpoint)
    result["node_id"] = ray.get_runtime_context().get_node_id()
    if result["status"] == "done":
        result["chunks_resent"] = len(resent)
    return result


@ray.remote(num_cpus=1, max_retries=2)
def segment_upload_task(data: bytes, name: str, spec: Dict, app_name: str, chunk: int) -> Dict:
    """Segment uploaded NIfTI bytes (POST /v1/segment): {'mask': bytes, 'report'} or {'error'}."""
    handle = model_handle(app_name)
    try:
        mask, report = inference.segment_bytes(data, name, inference.ModelSpec.from_dict(spec),
                                               lambda images: _Pending(handle, images), chunk)
    except BadInputError as exc:
        return {"error": str(exc)}
    return {"mask": mask, "report": report}


# --- listing --------------------------------------------------------------------------------------

def list_inputs(input_uri: str, output_uri: str, s3_endpoint: Optional[str]) -> Dict[str, List]:
    """The volumes a job segments: {'volumes': [(uri, rel_name)], 'ignored': [uri]}.

    Reference segmentations (segmentation-N.nii*) and anything under the output prefix are
    ignored, so a job may point at a LiTS folder and write inside it.
    """
    root = storage.normalise(input_uri)
    out = storage.normalise(output_uri)
    files = storage.list_files(root, s3_endpoint)
    single = files == [root]
    volumes, ignored = [], []
    for uri in files:
        if not uri.endswith(inference.NIFTI_SUFFIXES):
            continue
        rel = os.path.basename(uri) if single else uri[len(root):].lstrip("/")
        if uri == out or uri.startswith(out.rstrip("/") + "/") or os.path.basename(uri).startswith("segmentation-"):
            ignored.append(uri)
            continue
        volumes.append((uri, inference.output_name(rel)))
    return {"volumes": volumes, "ignored": ignored}


# --- the job ----------------------------------------------------------------------------------

class JobRunner:
    """One bulk job's state and its driving thread (a Ray actor; see `submit_job`).

    Args:
        job_id: the id; the actor is named ACTOR_PREFIX + job_id in JOBS_NAMESPACE.
        request: {'input', 'output', 'overwrite'} (URIs already checked and normalised).
        app_name: the Serve application holding the model deployment.
        chunk: slices per model request.
        concurrency: volumes in flight; None: the cluster's CPUs / cpus_per_volume.
        cpus_per_volume: CPUs a volume task reserves. A task waits on the model for much of
            its time, so below 1 lets more volumes overlap on a CPU-only machine.
    """

    def __init__(self, job_id: str, request: Dict, app_name: str, chunk: int = 16,
                 concurrency: Optional[int] = None, s3_endpoint: Optional[str] = None, cpus_per_volume: float = 1.0):
        self.job_id = job_id
        self.request = dict(request)
        self.app_name = app_name
        self.chunk = chunk
        self.cpus_per_volume = cpus_per_volume
        self.concurrency = concurrency or max(1, min(256, int(ray.cluster_resources().get("CPU", 1) / cpus_per_volume)))
        self.s3_endpoint = s3_endpoint
        self.lock = threading.Lock()
        self.cancel_requested = threading.Event()
        self.state = "queued"
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
        if self.state not in FINAL_STATES:
            self.cancel_requested.set()
        return self.status()

    def status(self) -> Dict:
        with self.lock:
            counts = dict(self.counts)
            finished = counts["done"] + counts["skipped"] + counts["failed"]
            elapsed = ((self.finished_s or time.time()) - self.started_s) if self.started_s else 0.0
            return {
                "job_id": self.job_id,
                "state": self.state,
                "input": self.request["input"],
                "output": self.request["output"],
                "overwrite": bool(self.request.get("overwrite")),
                "model_id": self.model.get("model_id"),
                "counts": counts,
                "progress": round(finished / counts["total"], 4) if counts["total"] else (1.0 if self.state in FINAL_STATES else 0.0),
                "slices_segmented": self.slices,
                "chunks_resent": self.chunks_resent,
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

    def _run(self) -> None:
        self._set(state="running", started_s=time.time())
        self.times["started"] = _now()
        try:
            self._run_volumes()
            state = "cancelled" if self.cancel_requested.is_set() else "succeeded"
        except UserError as exc:
            state = "failed"
            self._set(error=str(exc))
        except Exception as exc:  # a bug or a lost cluster: the job fails, the actor stays to tell
            log.error("job %s: %s", self.job_id, traceback.format_exc())
            state = "failed"
            self._set(error=f"internal error: {type(exc).__name__}: {exc}")
        self._set(finished_s=time.time())
        self.times["finished"] = _now()
        try:
            self._write_summary(state)
        except Exception as exc:
            log.error("job %s: cannot write its summary: %s", self.job_id, exc)
            if state == "succeeded":
                state = "failed"
                self._set(error=f"cannot write the job summary: {exc}")
        self._set(state=state)

    def _run_volumes(self) -> None:
        self._set(model=describe_model(self.app_name))
        listing = list_inputs(self.request["input"], self.request["output"], self.s3_endpoint)
        volumes = listing["volumes"]
        with self.lock:
            self.counts["total"] = len(volumes)
            self.counts["ignored"] = len(listing["ignored"])
        if not volumes:
            raise UserError(f"no .nii or .nii.gz volumes under {self.request['input']} "
                            f"({len(listing['ignored'])} ignored: reference segmentations or outputs)")
        spec = inference.ModelSpec.from_dict(self.model).to_dict()
        pending = list(volumes)
        in_flight: Dict = {}
        while pending or in_flight:
            if self.cancel_requested.is_set():
                for ref in in_flight:
                    ray.cancel(ref)
                ray.wait(list(in_flight), num_returns=len(in_flight), timeout=30)
                return
            while pending and len(in_flight) < self.concurrency:
                uri, rel = pending.pop(0)
                ref = segment_volume_task.options(num_cpus=self.cpus_per_volume).remote(uri, rel, self.request["output"], spec, self.app_name,
                                                 bool(self.request.get("overwrite")), self.chunk, self.s3_endpoint)
                in_flight[ref] = uri
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.5)
            for ref in ready:
                uri = in_flight.pop(ref)
                try:
                    result = ray.get(ref)
                except (ray.exceptions.TaskCancelledError, ray.exceptions.RayTaskError) as exc:
                    if self.cancel_requested.is_set():
                        continue
                    result = {"input": uri, "status": "failed", "reason": f"worker failed: {exc}"}
                except ray.exceptions.WorkerCrashedError as exc:
                    result = {"input": uri, "status": "failed", "reason": f"worker crashed repeatedly: {exc}"}
                self._record(result)

    def _write_summary(self, state: str) -> None:
        summary = self.status()
        summary["state"] = state
        summary["model"] = self.model
        summary["volumes"] = sorted(self.results, key=lambda r: r.get("name") or r["input"])
        summary["nodes"] = sorted({r["node_id"] for r in self.results if r.get("node_id")})
        storage.write_bytes(summary["summary"], json.dumps(summary, indent=1).encode(), self.s3_endpoint)


# --- the job registry (named actors) ----------------------------------------------------------

def _actor(job_id: str):
    try:
        return ray.get_actor(ACTOR_PREFIX + job_id, namespace=JOBS_NAMESPACE)
    except ValueError:
        return None


def _job_ids() -> List[str]:
    names = ray.util.list_named_actors(all_namespaces=True)
    return [n["name"][len(ACTOR_PREFIX):] for n in names
            if n.get("namespace") == JOBS_NAMESPACE and n["name"].startswith(ACTOR_PREFIX)]


def submit_job(request: Dict, app_name: str, chunk: int = 16, concurrency: Optional[int] = None,
               s3_endpoint: Optional[str] = None, cpus_per_volume: float = 1.0) -> str:
    """Start a job on the cluster; return its id at once (the job runs in its own actor)."""
    _forget_old_jobs()
    job_id = uuid.uuid4().hex[:12]
    runner = ray.remote(JobRunner).options(
        name=ACTOR_PREFIX + job_id, namespace=JOBS_NAMESPACE, lifetime="detached", num_cpus=0,
        max_concurrency=8, max_restarts=0,
    ).remote(job_id, request, app_name, chunk, concurrency, s3_endpoint, cpus_per_volume)
    ray.get(runner.start.remote())
    return job_id


def get_job(job_id: str) -> Optional[Dict]:
    actor = _actor(job_id)
    if actor is None:
        return None
    try:
        return ray.get(actor.status.remote(), timeout=30)
    except ray.exceptions.RayActorError:
        return None


def cancel_job(job_id: str) -> Optional[Dict]:
    actor = _actor(job_id)
    return ray.get(actor.cancel.remote(), timeout=30) if actor else None


def list_jobs() -> List[Dict]:
    jobs = [j for j in (get_job(i) for i in _job_ids()) if j]
    return sorted(jobs, key=lambda j: j["times"]["submitted"], reverse=True)


def _forget_old_jobs() -> None:
    """Kill the actors of the oldest finished jobs beyond MAX_KEPT_JOBS (summaries stay)."""
    ids = _job_ids()
    if len(ids) < MAX_KEPT_JOBS:
        return
    finished = [j for j in list_jobs() if j["state"] in FINAL_STATES]
    for job in finished[MAX_KEPT_JOBS // 2:]:
        actor = _actor(job["job_id"])
        if actor:
            ray.kill(actor)
