"""The Ray Serve application: a batching model deployment behind a FastAPI ingress.

    Api (FastAPI ingress, 0 CPU)  --handle-->  SegmentModel (N replicas, CPU or GPU, @serve.batch)
       POST /v1/segment  -> a Ray task (lits.serve.model_client) preprocesses one uploaded volume, sends its slices
       POST /v1/jobs     -> a job actor (lits.serve.job_runner) fans volumes out to Ray tasks (lits.serve.job_tasks)
    Every caller reaches SegmentModel through lits.serve.model_client (a handle by the app's name,
    deadlines and resends); outputs are named by lits.core.naming.
    Every volume task sends chunks of slices to SegmentModel; @serve.batch gathers chunks of
    many volumes (and requests) into forward passes of at most max_batch_size slices.

Reliability: volume tasks run in the app's volume pool (a placement group beside the replicas'
CPUs, `lits.serve.job_tasks`; jobs add CPUs that join the cluster, `lits.serve.job_capacity`), so a replica
that dies is always replaced; every wait on the model has a deadline. The ingress takes many
requests at once (light routes never queue behind uploads) and runs at most `max_uploads` uploads
together; job status is read off the upload path.

Security: with a token configured every request but /healthz and the docs needs
`Authorization: Bearer <token>` (401), checked with the body limits before the body is read by
`lits.serve.http_guard.Guard`, and again by the `/v1` router's dependency; job URIs must lie
under an allowed prefix (403) and carry no path tricks (400); weights are only ever loaded with
weights_only=True. At most `max_jobs` jobs run at once, the others wait queued
(`lits.serve.job_queue`).
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime.
import asyncio
import concurrent.futures
import json
import logging
import os
import re
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

import lits
from lits.model import inference
from lits.serve import http_guard, job_tasks, jobs, model_client, results_page
from lits.serve.job_queue import JobQueue
from lits.serve.job_spec import JobSpec, default_jobs_state
from lits.core import naming, storage
from lits.serve.access import AccessError, check_job_uris, check_uri
from lits.core.config import ServeConfig
from lits.core.errors import UserError
from lits.runtime import worker_logs

log = logging.getLogger(__name__)

APP_NAME = "lits"
API_DEPLOYMENT = "Api"
API_MAX_ONGOING = 1000  # requests one ingress replica takes at once (Serve's default, 5, starves /healthz)


token_sha256 = http_guard.token_sha256  # UserError for a token no client could send


# --- the model deployment ----------------------------------------------------------------------

def _slices(chunks: List[np.ndarray]) -> int:
    return int(sum(len(c) for c in chunks))


@serve.deployment(name=model_client.MODEL_DEPLOYMENT)
class SegmentModel:
    """Loads `model/` once per replica; answers chunks of slice images with labels at each chunk's
    slice size: probabilities are resized and argmaxed here, on the GPU when the replica has one
    (`Predictor.labels`), so volume tasks get uint8 labels instead of resizing probabilities.

    Args:
        model_uri: exported model folder.
        max_batch_size: slices per forward pass (also @serve.batch's limit, counted in slices).
        batch_wait_s: how long a batch waits for more slices.
        threads: torch intra-op threads on CPU (and OpenCV's, which resizes there).
    """

    def __init__(self, model_uri: str, max_batch_size: int = 32, batch_wait_s: float = 0.01, threads: int = 1,
                 volumes_per_replica: int = 3):
        import cv2
        import torch

        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, threads))
        cv2.setNumThreads(max(1, int(threads)))
        self.predictor, self.first_stage = inference.load_predictors(model_uri, max_batch=max_batch_size)
        self.max_batch_size = max_batch_size
        self.volumes_per_replica = volumes_per_replica
        self.batch_started = self.batch_ended = time.monotonic()  # a new replica counts as progress
        self.busy_s = 0.0  # seconds spent in forward passes since the replica started (ModelWindow reads it)
        self.predict.set_max_batch_size(max_batch_size)
        self.predict.set_batch_wait_timeout_s(batch_wait_s)
        log.info("model %s (%s) loaded on %s", self.predictor.spec.model_id, model_uri, self.predictor.device)

    def describe(self) -> Dict:
        return {**self.predictor.spec.to_dict(), "device": str(self.predictor.device),
                "max_batch_size": self.max_batch_size, "volumes_per_replica": self.volumes_per_replica,
                "pid": os.getpid()}

    def progress(self) -> Dict:
        """Seconds since this replica's latest batch started and ended (how `model_progress` tells a
        busy model from a stuck one), and its forward-pass seconds so far (`ModelWindow`'s busy fraction)."""
        now = time.monotonic()
        running = now - self.batch_started if self.batch_started > self.batch_ended else 0.0
        return {"since_start_s": now - self.batch_started, "since_end_s": now - self.batch_ended,
                "busy_s": self.busy_s + running, "now": now, "pid": os.getpid()}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=_slices)
    async def predict(self, chunks: List[np.ndarray], shapes: List[Tuple[int, int]], stages: List[str]) -> List[Tuple]:
        """uint8 (n_i, S, S, 3) chunks, their volumes' (H, W) and stages ('' the model, FIRST_STAGE a
        cascade's first) -> per chunk (uint8 (n_i, H, W) labels, uint8 (n_i, S, S) model-size labels
        or None), one forward pass per stage present in the batch."""
        # The forward pass runs off the event loop: health checks, describe() and progress() stay answered.
        self.batch_started = time.monotonic()
        try:
            return await asyncio.to_thread(inference.labels_by_stage, self.predictor, self.first_stage, chunks,
                                           [tuple(s) for s in shapes], stages)
        finally:
            self.batch_ended = time.monotonic()
            self.busy_s += self.batch_ended - self.batch_started


def model_deployment(cfg: ServeConfig):
    """SegmentModel bound to cfg: replicas or autoscaling, resources, batching."""
    options = {
        "ray_actor_options": {"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.num_gpus_per_replica},
        # Requests are chunks; a replica must hold enough of them to fill a batch of slices.
        "max_ongoing_requests": max(64, 4 * cfg.max_batch_size // cfg.chunk),
        "health_check_period_s": 5,
        # One access-log line per chunk would bury everything else; failures still log.
        "logging_config": {"log_level": "WARNING"},
    }
    if cfg.replicas is not None:
        options["num_replicas"] = cfg.replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": max(2, 2 * cfg.max_batch_size // cfg.chunk),
        }
    return SegmentModel.options(**options).bind(storage.normalise(cfg.model), cfg.max_batch_size, cfg.batch_wait_s,
                                                cfg.cpus_per_replica, cfg.volumes_per_replica)


# --- the HTTP API ------------------------------------------------------------------------------

api = FastAPI(
    title="LiTS liver-tumour segmentation",
    version=lits.__version__,
    description="Segment abdominal CT volumes (NIfTI) into background / liver / tumour, one at a time or "
                "bucket to bucket as bulk jobs.",
)


def _replica():
    return serve.get_replica_context().servable_object


# Every request passes the Guard first: the token and the body limits before the body is read.
api.add_middleware(http_guard.Guard, settings=lambda: _replica().guard)


@api.exception_handler(RequestValidationError)
async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with FastAPI's usual detail, JSON-safe whatever was sent (NaN included)."""
    return JSONResponse(status_code=422, content={"detail": http_guard.validation_detail(exc.errors())})


async def require_token(request: Request, credentials: Optional[HTTPAuthorizationCredentials] = Security(
        HTTPBearer(auto_error=False, description="the server's LITS_API_TOKEN"))) -> None:
    """The token check of every /v1 route: this replica's `Api.authorise` (401 without the token).
    Declared as HTTP bearer security, so the docs' "Authorize" sends it."""
    _replica().authorise(request)


async def require_json(request: Request) -> None:
    """415 unless the body is declared JSON (FastAPI would read another body as a string)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json" and not kind.endswith("+json"):
        raise HTTPException(415, f"the body must be JSON sent with 'Content-Type: application/json' "
                                 f"(got {kind or 'no Content-Type'})")


# Every route of this router needs the token: the check is the router's dependency, not a call
# each handler has to remember. Only /healthz (and the OpenAPI docs) live outside it.
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_token)])
OPEN_PATHS = ("/healthz", api.docs_url, api.openapi_url, api.redoc_url, api.swagger_ui_oauth2_redirect_url)


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: str = Field(description="URI prefix (s3://bucket/prefix) holding .nii / .nii.gz volumes")
    output: str = Field(description=f"URI prefix for {naming.OUTPUTS_TEXT} and _jobs/<id>.json")
    overwrite: bool = Field(False, description="recompute volumes whose outputs exist for this model")
    concurrency: Optional[int] = Field(None, ge=1, le=4096, description="volumes in flight (default: the volume pool's CPUs / cpus_per_volume)")


class Api:
    """The HTTP API of one ingress replica (made a Serve deployment below, once its routes exist).

    Light routes (/healthz, job status) never wait behind uploads: the deployment takes
    API_MAX_ONGOING requests at once, uploads queue on a semaphore of `max_uploads` inside it, and
    job status calls run on their own threads. It reaches the model deployment as every other
    caller does, through `lits.serve.model_client` by the app's name; `model` (the bound deployment) is
    taken only so that the application deploys the model with the ingress."""

    def __init__(self, model, settings: Dict, app_name: str = APP_NAME):
        self.cfg = ServeConfig(**settings)
        self.app_name = app_name
        self.jobs_state = self.cfg.jobs_state or default_jobs_state()
        self._spec: Optional[Dict] = None
        self._pool = None
        self._uploads: Optional[asyncio.Semaphore] = None
        self._light = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="status")
        self.queue = JobQueue(self.cfg.max_jobs)
        self.guard = http_guard.GuardSettings(
            token_sha256=self.cfg.token_sha256, open_paths=OPEN_PATHS, upload_bytes=self.cfg.max_body_mb * 1024 * 1024,
            grace_s=self.cfg.body_grace_s, min_rate=self.cfg.min_body_kbps * 1024)

    async def spec(self) -> Dict:
        if self._spec is None:
            try:
                self._spec = await model_client.describe_async(self.app_name, self.cfg.model_wait_s)
            except asyncio.TimeoutError as exc:
                raise HTTPException(503, f"the model deployment did not answer in {self.cfg.model_wait_s:.0f} s; "
                                         "try again when its replica has started") from exc
        return self._spec

    async def light(self, fn, *args):
        """Run a short blocking call (job status, a record) on the status threads."""
        return await asyncio.get_running_loop().run_in_executor(self._light, fn, *args)

    def authorised(self, request: Request) -> bool:  # the token, or on a read the results pages' session cookie
        return results_page.signed_in(request, self.cfg.token_sha256)

    def authorise(self, request: Request) -> None:
        if not self.authorised(request):
            raise HTTPException(401, http_guard.UNAUTHORISED, headers={"WWW-Authenticate": "Bearer"})

    def access(self, field: str, uri: str) -> str:
        try:
            uri.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise HTTPException(400, f"{field} {uri!r}: not valid Unicode (a lone surrogate at character "
                                     f"{exc.start}); send the URI as UTF-8 text") from exc
        try:
            return check_uri(uri, self.cfg.allow_prefixes)
        except AccessError as exc:
            raise HTTPException(exc.status, str(exc)) from exc

    async def read_body(self, request: Request) -> bytes:
        limit = self.cfg.max_body_mb * 1024 * 1024
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"body of {int(declared)} bytes exceeds the limit of {self.cfg.max_body_mb} MB")
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise HTTPException(413, f"body exceeds the limit of {self.cfg.max_body_mb} MB")
            parts.append(part)
        return b"".join(parts)

    @api.get("/healthz")
    async def healthz(self, request: Request) -> Dict:
        """Open to all; the model's location only with the token (it names the server's storage)."""
        spec = await self.spec()
        found = {"status": "ok", "model_id": spec["model_id"], "version": lits.__version__}
        return {**found, "model": spec["uri"]} if self.authorised(request) else found

    def _submit_upload(self, data: bytes, name: str, spec: inference.ModelSpec):
        if self._pool is None:
            self._pool = job_tasks.find_pool(self.app_name)
        task = model_client.segment_upload_task.options(num_cpus=self.cfg.cpus_per_volume, **job_tasks.in_pool(self._pool))
        return task.remote(data, name, spec, self.app_name, self.cfg.chunk, self.cfg.model_wait_s)

    @v1.post("/segment", responses={200: {"content": {"application/gzip": {}},
                                          "description": "the mask as .nii.gz; the report in X-LiTS-Report"}})
    async def segment(self, request: Request, name: str = "upload") -> Response:
        """Body: one .nii or .nii.gz file (answered by its uint8 label mask, the input's shape and
        affine, as .nii.gz) or a .zip of one DICOM series (by its DICOM-SEG); the report (JSON) is
        in the X-LiTS-Report header."""
        if self._uploads is None:
            self._uploads = asyncio.Semaphore(self.cfg.max_uploads)
        spec = inference.ModelSpec.from_dict(await self.spec())
        # The Guard has read the body (within its limit and deadline): a slow client holds no slot.
        data = await self.read_body(request)
        if not data:
            raise HTTPException(400, "empty body: POST one .nii or .nii.gz file, or a .zip of one DICOM series")
        async with self._uploads:
            safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:100] or "upload"
            # Putting the body into the object store copies it: off the event loop.
            ref = await asyncio.to_thread(self._submit_upload, data, safe, spec)
            del data
            try:
                result = await ref
            except Exception as exc:  # the model gone for good, a bug or a lost worker: one line
                cause = getattr(exc, "cause", None)
                if isinstance(cause, model_client.ModelUnavailable):
                    raise HTTPException(503, str(cause)) from exc
                log.error("upload %s: %s", safe, exc)
                raise HTTPException(500, f"internal error while segmenting {safe}: {type(exc).__name__}") from exc
        if "error" in result:
            raise HTTPException(422, result["error"])
        return Response(result["body"], media_type=result["media_type"], headers={
            "X-LiTS-Report": json.dumps(result["report"], separators=(",", ":")),
            "Content-Disposition": f'attachment; filename="{result["filename"]}"'})

    @v1.post("/jobs", status_code=202, dependencies=[Depends(require_json)])
    async def create_job(self, body: JobRequest) -> Dict:
        """Start a bulk job: every volume under `input` -> mask + report under `output`. Over
        `max_jobs` running jobs it waits, state 'queued'."""
        job = job_spec(self.cfg, self.app_name, self.access("input", body.input), self.access("output", body.output),
                       body.overwrite, body.concurrency, self.jobs_state)
        try:  # an output over the job records or over its own input: one line, before anything runs
            check_job_uris(job.input, job.output, job.jobs_state)
        except AccessError as exc:
            raise HTTPException(exc.status, str(exc)) from exc
        try:
            if not await asyncio.to_thread(storage.exists, job.input):
                raise HTTPException(404, f"input {body.input} does not exist")
            blocking = file_in_the_way(job.output)
            if blocking:
                raise HTTPException(400, f"output {body.output}: {blocking} is an existing file; name a folder")
            job_id = await self.queue.submit(job)
        except UserError as exc:  # storage unreachable or refusing: the server cannot take jobs now
            raise HTTPException(503, str(exc)) from exc
        return {"job_id": job_id, "status": f"/v1/jobs/{job_id}",
                "state": "queued" if self.queue.status(job_id) else "running"}

    @v1.get("/jobs")
    async def list_all(self) -> List[Dict]:
        found = [self.queue.status(j["job_id"]) or j for j in await self.light(jobs.list_jobs, self.jobs_state)]
        return [{k: j[k] for k in ("job_id", "state", "input", "output", "counts", "progress", "times")} for j in found]

    async def _job_or_404(self, action, job_id: str) -> Dict:
        valid = re.fullmatch(r"[0-9a-f]{12}", job_id)
        job = await self.light(action, job_id, self.jobs_state) if valid else None
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return job

    @v1.get("/jobs/{job_id}")
    async def get(self, job_id: str) -> Dict:
        return self.queue.status(job_id) or await self._job_or_404(jobs.get_job, job_id)

    @v1.delete("/jobs/{job_id}")
    async def cancel(self, job_id: str) -> Dict:
        """Stop submitting volumes, cancel those in flight; finished volumes stay. A queued job is removed."""
        return await self.queue.cancel(job_id) or await self._job_or_404(jobs.cancel_job, job_id)


results_page.mount(api, v1)  # /v1, with the JSON routes the pages read (lits.serve.job_results), then the pages
# The ingress is applied after include_router: Serve binds the routes it finds on `api` to Api.
# Many requests at once: a light call must never wait at the proxy behind uploads (they queue inside).
Api = serve.deployment(name=API_DEPLOYMENT, ray_actor_options={"num_cpus": 0},
                       max_ongoing_requests=API_MAX_ONGOING)(serve.ingress(api)(Api))


def build_app(cfg: ServeConfig, app_name: str = APP_NAME):
    """The whole application: the HTTP API in front of the model deployment."""
    return Api.bind(model_deployment(cfg), cfg.to_dict(), app_name)


def replica_cpus(cfg: ServeConfig) -> tuple:
    """(CPUs the replicas placed at deploy hold, CPUs they may hold at max_replicas)."""
    placed = cfg.replicas if cfg.replicas is not None else cfg.min_replicas
    most = cfg.replicas if cfg.replicas is not None else cfg.max_replicas
    return placed * cfg.cpus_per_replica, most * cfg.cpus_per_replica


def job_reserve_cpus(cfg: ServeConfig) -> Optional[float]:
    """CPUs a job leaves to the replicas when it grows (`JobCapacity`'s reserve_cpus): an elastic
    pool (no --volume-cpus) grows with the cluster, never into the CPUs the replicas may take;
    a fixed pool does not grow (None)."""
    return None if cfg.volume_cpus is not None else replica_cpus(cfg)[1]


def file_in_the_way(output: str) -> Optional[str]:
    """The existing file a local output folder would have to be created over (the output itself or
    a parent), else None; S3 prefixes have no such file."""
    if storage.is_s3(output):
        return None
    path = output
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return None if os.path.isdir(path) else path


def job_spec(cfg: ServeConfig, app_name: str, input: str, output: str, overwrite: bool = False,
             concurrency: Optional[int] = None, jobs_state: Optional[str] = None) -> JobSpec:
    """A job on the app `app_name` deployed from `cfg`: `input` and `output` already checked and
    normalised; `concurrency` None takes cfg.job_concurrency, `jobs_state` None cfg.jobs_state."""
    return JobSpec(input=input, output=output, app_name=app_name, overwrite=overwrite, chunk=cfg.chunk,
                   concurrency=concurrency or cfg.job_concurrency, cpus_per_volume=cfg.cpus_per_volume,
                   allow=cfg.allow_prefixes, wait_s=cfg.model_wait_s, reserve_cpus=job_reserve_cpus(cfg),
                   jobs_state=jobs_state or cfg.jobs_state)


def volume_cpus(cfg: ServeConfig) -> float:
    """CPUs for the volume pool: cfg.volume_cpus, else what is free now (the replicas are placed)
    less what autoscaling up to max_replicas would take."""
    if cfg.volume_cpus is not None:
        return cfg.volume_cpus
    import ray

    placed, most = replica_cpus(cfg)
    return ray.available_resources().get("CPU", 0.0) - (most - placed)


def deploy(cfg: ServeConfig, http: bool = True, app_name: str = APP_NAME):
    """Start Serve (HTTP on cfg.host:cfg.port, or no proxy), run the app and reserve its volume
    pool (`job_tasks.create_pool`); returns the model deployment's handle.

    Without http only the model deployment runs (what a local `segment.py` needs). Without
    cfg.volume_cpus the pool is elastic: when no CPU is free at deploy (a `CPU: 0` head whose
    replicas took the only CPU node's), the app starts without one and jobs use the CPU nodes that
    join (`lits.serve.job_capacity`), asking the autoscaler for them.
    """
    if http:
        # Serve's controller and proxy log at WARNING unless --verbose (lits.runtime.worker_logs)
        serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config={"log_level": worker_logs.ray_level()})
        handle = serve.run(build_app(cfg, app_name), name=app_name, route_prefix="/")
    else:
        serve.start(proxy_location="Disabled", logging_config={"log_level": "WARNING"})
        handle = serve.run(model_deployment(cfg), name=app_name, route_prefix=None,
                           logging_config={"log_level": "WARNING"})
    free = volume_cpus(cfg)
    if cfg.volume_cpus is None and free < max(1.0, cfg.cpus_per_volume):
        job_tasks.remove_pool(app_name)
        log.warning("app %s: no CPU is free for volume tasks now; jobs take CPU nodes as they join (and ask the "
                    "autoscaler for them); uploads wait for one", app_name)
        return handle
    try:
        cpus = job_tasks.create_pool(app_name, free, cfg.cpus_per_volume)
    except UserError:
        serve.delete(app_name)
        raise
    log.info("app %s: %g CPUs reserved for volume tasks", app_name, cpus)
    return handle


def undeploy(app_name: str = APP_NAME) -> None:
    """Remove the app and free its volume pool."""
    serve.delete(app_name)
    job_tasks.remove_pool(app_name)
