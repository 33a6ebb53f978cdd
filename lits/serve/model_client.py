"""Talking to the model deployment: its name, handles, describe(), chunks sent with deadlines and
resends, and the upload task (POST /v1/segment).

Every caller reaches `SegmentModel` (lits.serve.serving) the same way: a handle by name
(`model_handle(app_name)`), made where it is used (the ingress, a job's actor, a volume task), and
every wait on an answer has a deadline (`call_model`): a chunk whose replica was lost, or that got
no answer in time, is sent again (`RETRIES` times, with back-off), then `ModelUnavailable`.

A chunk's deadline runs while the model works on it, not while it queues. A lost replica is
found by Serve itself: the handle's answer raises (an actor error) for every chunk the replica
held, queued or running, and those are sent again at once. A chunk without an answer after its
deadline is resent only when the model made no progress in that time (`model_progress`: the
replica's running batch started, or its last batch ended, within the deadline); while the model
is busy the chunk keeps its place in the queue and the wait starts again (not a try). Jobs bound
how much they queue (`lits.serve.job_capacity.ModelWindow`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import ray

from lits.model import inference
from lits.core.errors import BadInputError

log = logging.getLogger(__name__)

MODEL_DEPLOYMENT = "SegmentModel"
RETRIES = 5  # per chunk, when the model replica that held it is lost or does not answer in time
RETRY_WAIT_S = 2.0
MODEL_WAIT_S = 60.0  # the longest a chunk may go unanswered while the model makes no progress
PROGRESS_WAIT_S = 10.0  # the longest wait for a replica's progress()
ZIP_MAGIC = b"PK\x03\x04"  # an upload that starts so is a zip of one DICOM series


def _replica_lost(exc: BaseException) -> bool:
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    lost = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, BackPressureError,
            DeploymentUnavailableError)
    return isinstance(exc, lost) or "ActorDied" in type(exc).__name__ or "Unavailable" in type(exc).__name__


class ModelUnavailable(RuntimeError):
    """The model deployment gave no answer within every try's deadline."""


def model_progress(handle, wait_s: float) -> bool:
    """Whether the model deployment behind `handle` made progress in the last `wait_s` (a batch
    started or ended then: `SegmentModel.progress`); False when it does not answer that quickly."""
    try:
        state = handle.progress.remote().result(timeout_s=min(wait_s, PROGRESS_WAIT_S))
        return min(state["since_start_s"], state["since_end_s"]) < wait_s
    except Exception as exc:  # no answer, or a deployment without progress(): no sign of progress
        log.debug("model progress unknown: %s: %s", type(exc).__name__, exc)
        return False


def call_model(send, what: str, wait_s: float = MODEL_WAIT_S, resent: Optional[List[int]] = None, size: int = 0,
               busy: Optional[Callable[[], bool]] = None):
    """`send()` (a DeploymentResponse) until it answers: each try waits at most `wait_s`; a timed-out
    try is cancelled and a lost replica's is sent again, `RETRIES` times with back-off. `busy()`
    (e.g. `model_progress`): when it says the model progressed meanwhile, a timed-out wait starts
    again instead (the chunk is queued behind others' work, not lost)."""
    response = send()
    tries = 1
    while True:
        try:
            return response.result(timeout_s=wait_s)
        except Exception as exc:
            timed_out = isinstance(exc, TimeoutError)
            if not (timed_out or _replica_lost(exc)):
                raise
            if timed_out and busy is not None and busy():
                continue
            if timed_out:
                response.cancel()
            if tries > RETRIES:
                raise ModelUnavailable(f"the model deployment did not answer {what} in {tries} tries of "
                                       f"{wait_s:.0f} s (last: {type(exc).__name__})") from exc
            log.warning("model %s (%s); sending %s again (try %d of %d)", "timed out" if timed_out else "replica lost",
                        type(exc).__name__, what, tries, RETRIES)
            time.sleep(RETRY_WAIT_S * tries)
            if resent is not None:
                resent.append(size)
            response = send()
            tries += 1


class _Pending:
    """A chunk sent to the model deployment; `.result()` waits with a deadline and resends.

    The answer is the chunk's labels at `shape`, the volume's (H, W), and its model-size labels
    (`SegmentModel.predict`)."""

    def __init__(self, handle, images: np.ndarray, shape: Tuple[int, int], resent: Optional[List[int]] = None,
                 wait_s: float = MODEL_WAIT_S, stage: str = ""):
        self.handle = handle
        self.images = images
        self.shape = tuple(int(s) for s in shape)
        self.stage = stage
        self.resent = resent if resent is not None else []
        self.wait_s = wait_s
        self.response = handle.predict.remote(images, self.shape, stage)

    def result(self):
        """The answer; each try waits at most `wait_s` (`call_model`), so no timeout is taken here."""
        first = [self.response]

        def send():
            return first.pop() if first else self.handle.predict.remote(self.images, self.shape, self.stage)

        return call_model(send, f"{len(self.images)} slices", self.wait_s, self.resent, len(self.images),
                          busy=lambda: model_progress(self.handle, self.wait_s))


class ModelSubmit:
    """A volume's `inference.Submit` to the model deployment of `app_name`: labels come back at
    the volume's slice size (`answers_labels`). The handle is made when a volume first needs it."""

    answers_labels = True

    def __init__(self, app_name: str, resent: Optional[List[int]] = None, wait_s: float = MODEL_WAIT_S):
        self.app_name = app_name
        self.resent = resent
        self.wait_s = wait_s
        self.handle = None

    def __call__(self, images: np.ndarray, shape: Tuple[int, int], stage: str = "") -> _Pending:
        """Send a chunk: to the model, or with stage=FIRST_STAGE to a cascade's first stage."""
        if self.handle is None:
            self.handle = model_handle(self.app_name)
        return _Pending(self.handle, images, shape, self.resent, self.wait_s, stage)


# Volume and upload tasks are batch work: at this niceness the OS gives the CPU first to what must
# answer quickly on the same node (the HTTP proxy, the ingress: /healthz and job status, the model
# replica). A niceness only ever rises, so a reused worker stays a batch worker.
BATCH_NICENESS = 10


def _batch_priority() -> None:
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) < BATCH_NICENESS:
            os.setpriority(os.PRIO_PROCESS, 0, BATCH_NICENESS)
    except (AttributeError, OSError):  # not on this platform, or not permitted: run as it is
        pass


def task_threads() -> int:
    """Threads a volume task may keep busy: the CPUs it reserved (at least one). OpenCV's pool is
    sized to match (it would otherwise start one thread per core of the node). Also lowers the
    task's OS priority to BATCH_NICENESS (threads started afterwards inherit it)."""
    import cv2

    _batch_priority()

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    threads = max(1, int(round(cpus)))
    cv2.setNumThreads(threads)
    return threads


def model_handle(app_name: str):
    from ray import serve

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # one "router started" line per worker otherwise
    return serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name=app_name)


def describe_model(app_name: str, wait_s: float = MODEL_WAIT_S) -> Dict:
    """The deployed model's spec (ModelSpec as a dict) plus batching facts."""
    handle = model_handle(app_name)
    return call_model(lambda: handle.describe.remote(), "describe()", wait_s)


async def describe_async(app_name: str, wait_s: float = MODEL_WAIT_S) -> Dict:
    """`describe_model` from an event loop (the ingress): asyncio.TimeoutError after `wait_s`."""
    return await asyncio.wait_for(model_handle(app_name).describe.remote(), timeout=wait_s)


# --- the upload task ------------------------------------------------------------------------------

@ray.remote(num_cpus=1, max_retries=0)
def segment_upload_task(data: bytes, name: str, spec: inference.ModelSpec, app_name: str, chunk: int,
                        wait_s: float = MODEL_WAIT_S) -> Dict:
    """Segment an upload (POST /v1/segment): NIfTI bytes answer their mask as .nii.gz; a zip of one
    DICOM series (`dicom_inference.segment_zip`) answers its DICOM-SEG. {'body', 'media_type',
    'filename', 'report'}, or {'error'} (one line)."""
    from lits.core import naming
    from lits.model import dicom_inference

    submit = ModelSubmit(app_name, None, wait_s)
    try:
        if data[:4] == ZIP_MAGIC:
            seg, _, report = dicom_inference.segment_zip(data, name, spec, submit, chunk, task_threads())
            stem = name[:-4] if name.lower().endswith(".zip") else name
            return {"body": seg, "media_type": "application/dicom", "filename": stem + naming.SEG_SUFFIX, "report": report}
        mask, report = inference.segment_bytes(data, name, spec, submit, chunk, task_threads())
    except BadInputError as exc:
        return {"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
    return {"body": mask, "media_type": "application/gzip", "filename": naming.mask_name(naming.strip_nifti(name)),
            "report": report}


