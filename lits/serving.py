"""The Ray Serve application: a batching model deployment behind a FastAPI ingress.

    Api (FastAPI ingress, 0 CPU)  --handle-->  SegmentModel (N replicas, CPU or GPU, @serve.batch)
       POST /v1/segment  -> a Ray task preprocesses one uploaded volume, sends its slices
       POST /v1/jobs     -> a JobRunner actor (lits.jobs) fans volumes out to Ray tasks
    Every volume task sends chunks of slices to SegmentModel; @serve.batch gathers chunks of
    many volumes (and requests) into forward passes of at most max_batch_size slices.

Security: with a token configured every /v1 call needs `Authorization: Bearer <token>` (401;
a dependency of the `/v1` router, so no route can be added without it);
job URIs must lie under an allowed prefix (403) and carry no path tricks (400); request bodies
are size-limited (413); weights are only ever loaded with weights_only=True.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime.
import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
from typing import Dict, List, Optional, Sequence

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

import lits
from lits import inference, jobs, storage
from lits.config import ServeConfig
from lits.errors import UserError

log = logging.getLogger(__name__)

APP_NAME = "lits"
MODEL_DEPLOYMENT = "SegmentModel"
API_DEPLOYMENT = "Api"
TOKEN_ENV = "LITS_API_TOKEN"


def token_sha256(token: Optional[str]) -> Optional[str]:
    return hashlib.sha256(token.encode()).hexdigest() if token else None


# --- URI access rules (pure) -------------------------------------------------------------------

class AccessError(Exception):
    """A job URI the server refuses: `status` 400 (malformed) or 403 (outside the allow-list)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _normalise_allowed(prefix: str) -> str:
    uri = storage.normalise(prefix)
    return uri if storage.is_s3(uri) else os.path.realpath(uri)


def check_uri(uri: str, allow_prefixes: Sequence[str]) -> str:
    """The normalised URI when a job may use it; AccessError otherwise.

    Rules: s3:// or a local path (file:// or absolute); no '.' or '..' segment, NUL, backslash or
    control character; with no allow-list any s3:// URI and no local path; with one, the URI
    must equal an allowed prefix or lie under it (compared by path segment, local paths after
    resolving symlinks).
    """
    if not isinstance(uri, str) or not uri.strip():
        raise AccessError(400, "empty URI")
    if any(ord(c) < 32 for c in uri) or "\\" in uri:
        raise AccessError(400, f"{uri!r}: control characters and backslashes are not allowed in URIs")
    scheme = _SCHEME.match(uri)
    if scheme and scheme.group(0).lower() not in ("s3://", "file://"):
        raise AccessError(400, f"{uri!r}: unsupported scheme; use s3:// (or a local path where allowed)")
    path = uri[scheme.end():] if scheme else uri
    if any(seg in (".", "..") for seg in path.split("/")):
        raise AccessError(400, f"{uri!r}: '.' and '..' path segments are not allowed")
    local = not (scheme and scheme.group(0).lower() == "s3://")
    if local and not path.startswith("/"):
        raise AccessError(400, f"{uri!r}: local paths must be absolute")
    try:
        normal = storage.normalise(uri)
    except UserError as exc:
        raise AccessError(400, str(exc)) from exc
    if local:
        normal = os.path.realpath(normal)
    allowed = [_normalise_allowed(p) for p in allow_prefixes]
    if not allowed:
        if local:
            raise AccessError(403, f"{uri!r}: local paths are refused; start the server with --allow-prefix for them")
        return normal
    for prefix in allowed:
        if normal == prefix or normal.startswith(prefix.rstrip("/") + "/"):
            return normal
    raise AccessError(403, f"{uri!r} lies outside the allowed prefixes ({', '.join(allowed)})")


# --- the model deployment ----------------------------------------------------------------------

def _slices(chunks: List[np.ndarray]) -> int:
    return int(sum(len(c) for c in chunks))


@serve.deployment(name=MODEL_DEPLOYMENT)
class SegmentModel:
    """Loads `model/` once per replica; answers chunks of slice images with probabilities.

    Args:
        model_uri: exported model folder.
        max_batch_size: slices per forward pass (also @serve.batch's limit, counted in slices).
        batch_wait_s: how long a batch waits for more slices.
        threads: torch intra-op threads on CPU.
    """

    def __init__(self, model_uri: str, max_batch_size: int = 32, batch_wait_s: float = 0.01, threads: int = 1,
                 s3_endpoint: Optional[str] = None):
        import torch

        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, threads))
        spec, weights = inference.load_spec(model_uri, s3_endpoint)
        self.predictor = inference.Predictor(spec, weights, max_batch=max_batch_size)
        self.max_batch_size = max_batch_size
        self.predict.set_max_batch_size(max_batch_size)
        self.predict.set_batch_wait_timeout_s(batch_wait_s)
        log.info("model %s (%s) loaded on %s", spec.model_id, spec.uri, self.predictor.device)

    def describe(self) -> Dict:
        return {**self.predictor.spec.to_dict(), "device": str(self.predictor.device),
                "max_batch_size": self.max_batch_size, "pid": os.getpid()}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=_slices)
    async def predict(self, chunks: List[np.ndarray]) -> List[np.ndarray]:
        """uint8 (n_i, S, S, 3) chunks -> uint8 (n_i, S, S, K) probabilities, one forward pass."""
        sizes = [len(c) for c in chunks]
        # The forward pass runs off the event loop: health checks and describe() stay answered.
        probs = await asyncio.to_thread(self.predictor, np.concatenate(chunks) if len(chunks) > 1 else chunks[0])
        return np.split(probs, np.cumsum(sizes)[:-1])


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
                                                cfg.cpus_per_replica, cfg.s3_endpoint)


# --- the HTTP API ------------------------------------------------------------------------------

api = FastAPI(
    title="LiTS liver-tumour segmentation",
    version=lits.__version__,
    description="Segment abdominal CT volumes (NIfTI) into background / liver / tumour, one at a time or "
                "bucket to bucket as bulk jobs.",
)


async def require_token(request: Request) -> None:
    """The token check of every /v1 route: this replica's `Api.authorise` (401 without the token)."""
    serve.get_replica_context().servable_object.authorise(request)


# Every route of this router needs the token: the check is the router's dependency, not a call
# each handler has to remember. Only /healthz (and the OpenAPI docs) live outside it.
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_token)])


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: str = Field(description="URI prefix (s3://bucket/prefix) holding .nii / .nii.gz volumes")
    output: str = Field(description="URI prefix for <name>_seg.nii.gz, <name>.json and _jobs/<id>.json")
    overwrite: bool = Field(False, description="recompute volumes whose outputs exist for this model")
    concurrency: Optional[int] = Field(None, ge=1, le=4096, description="volumes in flight (default: cluster CPUs)")


class Api:
    """The HTTP API of one ingress replica (made a Serve deployment below, once its routes exist)."""

    def __init__(self, model, settings: Dict, app_name: str = APP_NAME):
        self.model = model
        self.cfg = ServeConfig(**settings)
        self.app_name = app_name
        self._spec: Optional[Dict] = None

    async def spec(self) -> Dict:
        if self._spec is None:
            self._spec = await self.model.describe.remote()
        return self._spec

    def authorise(self, request: Request) -> None:
        if not self.cfg.token_sha256:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token_sha256(token.strip()) or "", self.cfg.token_sha256):
            raise HTTPException(401, "missing or wrong API token: send 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})

    def access(self, uri: str) -> str:
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
    async def healthz(self) -> Dict:
        spec = await self.spec()
        return {"status": "ok", "model_id": spec["model_id"], "model": spec["uri"], "version": lits.__version__}

    @v1.post("/segment", responses={200: {"content": {"application/gzip": {}},
                                          "description": "the mask as .nii.gz; the report in X-LiTS-Report"}})
    async def segment(self, request: Request, name: str = "upload") -> Response:
        """Body: one .nii or .nii.gz file. Returns the uint8 label mask with the input's shape and
        affine as .nii.gz; the per-volume report (JSON) is in the X-LiTS-Report header."""
        data = await self.read_body(request)
        if not data:
            raise HTTPException(400, "empty body: POST the bytes of one .nii or .nii.gz file")
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:100] or "upload"
        result = await jobs.segment_upload_task.remote(data, safe, inference.ModelSpec.from_dict(await self.spec()).to_dict(),
                                                       self.app_name, self.cfg.chunk)
        if "error" in result:
            raise HTTPException(422, result["error"])
        stem = safe[:-7] if safe.endswith(".nii.gz") else safe[:-4] if safe.endswith(".nii") else safe
        return Response(result["mask"], media_type="application/gzip", headers={
            "X-LiTS-Report": json.dumps(result["report"], separators=(",", ":")),
            "Content-Disposition": f'attachment; filename="{stem}_seg.nii.gz"',
        })

    @v1.post("/jobs", status_code=202)
    async def create_job(self, body: JobRequest) -> Dict:
        """Start a bulk job: every volume under `input` -> mask + report under `output`."""
        job = {"input": self.access(body.input), "output": self.access(body.output), "overwrite": body.overwrite}
        if not await asyncio.to_thread(storage.exists, job["input"], self.cfg.s3_endpoint):
            raise HTTPException(404, f"input {body.input} does not exist")
        job_id = await asyncio.to_thread(jobs.submit_job, job, self.app_name, self.cfg.chunk,
                                         body.concurrency or self.cfg.job_concurrency, self.cfg.s3_endpoint,
                                         self.cfg.cpus_per_volume)
        return {"job_id": job_id, "status": f"/v1/jobs/{job_id}"}

    @v1.get("/jobs")
    async def list_all(self) -> List[Dict]:
        found = await asyncio.to_thread(jobs.list_jobs)
        return [{k: j[k] for k in ("job_id", "state", "input", "output", "counts", "progress", "times")} for j in found]

    @staticmethod
    async def _job_or_404(action, job_id: str) -> Dict:
        job = await asyncio.to_thread(action, job_id) if re.fullmatch(r"[0-9a-f]{12}", job_id) else None
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return job

    @v1.get("/jobs/{job_id}")
    async def get(self, job_id: str) -> Dict:
        return await self._job_or_404(jobs.get_job, job_id)

    @v1.delete("/jobs/{job_id}")
    async def cancel(self, job_id: str) -> Dict:
        """Stop submitting volumes, cancel those in flight; finished volumes stay."""
        return await self._job_or_404(jobs.cancel_job, job_id)


api.include_router(v1)
# The ingress is applied after include_router: Serve binds the routes it finds on `api` to Api.
Api = serve.deployment(name=API_DEPLOYMENT, ray_actor_options={"num_cpus": 0})(serve.ingress(api)(Api))


def build_app(cfg: ServeConfig, app_name: str = APP_NAME):
    """The whole application: the HTTP API in front of the model deployment."""
    return Api.bind(model_deployment(cfg), cfg.to_dict(), app_name)


def deploy(cfg: ServeConfig, http: bool = True, app_name: str = APP_NAME):
    """Start Serve (HTTP on cfg.host:cfg.port, or no proxy) and run the app; returns its handle.

    Without http only the model deployment runs (what a local `segment.py` needs).
    """
    if http:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        return serve.run(build_app(cfg, app_name), name=app_name, route_prefix="/")
    serve.start(proxy_location="Disabled", logging_config={"log_level": "WARNING"})
    return serve.run(model_deployment(cfg), name=app_name, route_prefix=None, logging_config={"log_level": "WARNING"})
