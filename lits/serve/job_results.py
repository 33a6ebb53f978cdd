"""A job's volumes and their files over HTTP: the JSON API the results page reads (the page shows what
these answer, nothing else).

    GET /v1/jobs/{id}/volumes                 every volume result the job's shards hold (its summary's
                                              `volume_records`), in the order the volumes finished
    GET /v1/jobs/{id}/outputs/{kind}?name=N   the mask (.nii.gz), preview (PNG) or report (JSON) of the
                                              job's volume named N, read from the bucket by the ingress

The routes are plain functions on `router`, included by `lits.serve.serving` under /v1 with the token
dependency; they reach their ingress replica (`serving.Api`: its settings, queue, status threads) through
Serve's replica context. Files are served only for names the job's own records hold (done or skipped),
at the URIs `lits.core.naming` gives under the job's output, and only while the output is still inside
the server's allow-list (403 otherwise) and every file resolves inside the job's output.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime.
import json
import threading
from collections import OrderedDict
from typing import Dict, List

from fastapi import APIRouter, HTTPException, Response
from ray import serve

from lits.core import naming, storage
from lits.core.errors import BadInputError, UserError
from lits.serve import access, jobs
from lits.serve.job_progress import FINAL_STATES, read_volume_records

router = APIRouter()
KINDS = {"mask": "application/gzip", "preview": "image/png", "report": "application/json"}
CACHED_JOBS = 16  # finished jobs whose volume results this replica keeps (they never change)

_finished: "OrderedDict[str, List[Dict]]" = OrderedDict()
_finished_lock = threading.Lock()


def _replica():
    return serve.get_replica_context().servable_object


async def job_status(job_id: str) -> Dict:
    """What GET /v1/jobs/{id} answers (404 for an unknown id)."""
    replica = _replica()
    return replica.queue.status(job_id) or await replica._job_or_404(jobs.get_job, job_id)


def _checked_output(status: Dict, allow) -> str:
    try:
        return access.check_uri(status["output"], allow)
    except access.AccessError as exc:
        raise HTTPException(exc.status, f"job {status['job_id']}'s output: {exc}") from exc


def read_records(status: Dict, allow) -> List[Dict]:
    """The volume results written so far for the job whose status is `status` (all of them once it has
    ended; none while queued or before its first summary). Blocking: storage reads."""
    if status["state"] == "queued":
        return []
    _checked_output(status, allow)
    final = status["state"] in FINAL_STATES
    with _finished_lock:
        if final and status["job_id"] in _finished:
            _finished.move_to_end(status["job_id"])
            return _finished[status["job_id"]]
    try:
        access.check_resolved(status["summary"], allow, "read")
        summary = json.loads(storage.read_bytes(status["summary"]))
    except (UserError, ValueError):  # no summary yet (or a lost job's, unreadable): nothing written
        return []
    if summary.get("job_id") != status["job_id"] or "volume_records" not in summary:
        return []
    records = list(read_volume_records(summary))
    if final and summary.get("state") in FINAL_STATES:
        with _finished_lock:
            _finished[status["job_id"]] = records
            while len(_finished) > CACHED_JOBS:
                _finished.popitem(last=False)
    return records


@router.get("/jobs/{job_id}/volumes")
async def volumes(job_id: str) -> Dict:
    """The job's volume results: {'job_id', 'state', 'complete' (every result is in: the job has ended),
    'volumes': [{'input', 'name', 'status', 'reason' or the report's figures ('liver_volume_ml',
    'tumour_volume_ml', 'lesion_count', 'slices', 'seconds')}]}. Results reach the shards when a shard
    fills and when the job ends: a running job lists what is written."""
    status = await job_status(job_id)
    replica = _replica()
    records = await replica.light(read_records, status, replica.cfg.allow_prefixes)
    return {"job_id": job_id, "state": status["state"], "complete": status["state"] in FINAL_STATES,
            "volumes": records}


def read_output(status: Dict, records: List[Dict], kind: str, name: str, allow) -> bytes:
    """The bytes of output `kind` of the volume `name` of the job (HTTPException 404, 403 or 400)."""
    if not any(r.get("name") == name and r.get("status") in ("done", "skipped") for r in records):
        raise HTTPException(404, f"job {status['job_id']} has no segmented volume named {name!r}")
    output = _checked_output(status, allow)
    uri = naming.output_uris(output, name)[kind]
    try:
        access.check_uri(uri, allow)
        access.check_inside(uri, output)
        access.check_resolved(uri, allow, "read")
    except access.AccessError as exc:
        raise HTTPException(exc.status, str(exc)) from exc
    except BadInputError as exc:
        raise HTTPException(403, str(exc)) from exc
    try:
        return storage.read_bytes(uri)
    except UserError as exc:  # removed since the job wrote it
        raise HTTPException(404, str(exc)) from exc


@router.get("/jobs/{job_id}/outputs/{kind}", responses={200: {"content": {t: {} for t in KINDS.values()}}})
async def output(job_id: str, kind: str, name: str) -> Response:
    """One output of one volume of the job: `kind` mask, preview or report; `name` the volume's name in
    the job's results (its path below the input, without .nii/.nii.gz)."""
    if kind not in KINDS:
        raise HTTPException(404, f"no output kind {kind!r}; use one of {', '.join(KINDS)}")
    status = await job_status(job_id)
    replica = _replica()
    allow = replica.cfg.allow_prefixes
    records = await replica.light(read_records, status, allow)
    data = await replica.light(read_output, status, records, kind, name, allow)
    headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=60"}
    if kind == "mask":
        filename = naming.mask_name(name).rsplit("/", 1)[-1].replace('"', "_")
        headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    return Response(data, media_type=KINDS[kind], headers=headers)
