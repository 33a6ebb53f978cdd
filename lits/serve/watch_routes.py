"""The watches' HTTP API (`lits.serve.watches`), included under /v1 with the token dependency:

    POST   /v1/watches        {input, output, poll_s, overwrite, max_jobs} -> 202 {watch_id, status};
                              503 (one line) when the output's store ignores conditional writes
    GET    /v1/watches        every watch registered with this server's job records
    GET    /v1/watches/{id}   what it saw: counts per state, pending keys, failures and why, lag p50/p95;
                              ?entries=N also N of its keys (key, state, reason, job, lag, when it moved): the
                              first by key, or with &order=recent the latest to move (the page's table)
    DELETE /v1/watches/{id}   stop it (outputs, state and running jobs stay)

The first of these calls in an ingress replica (and serve.py at start) resumes the registered watches
that have no runner in the cluster: a restarted server takes its watches up again.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime.
import asyncio
import re
from typing import Dict, List, Literal, Optional

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from lits.core.errors import UserError
from lits.serve import access, watches
from lits.serve.job_spec import JobSpec
from lits.serve.watch_state import WatchSpec

router = APIRouter()
MAX_ROWS = 5000  # entries one status may list (?entries=N): the page shows the latest to move
_resumed: Dict[int, bool] = {}  # replica (id of its Api object) -> its watches resumed


class WatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: str = Field(description="URI prefix (s3://bucket/prefix) where volumes land")
    output: str = Field(description="URI prefix for the masks, reports and the watch's state (_watches/<id>/)")
    poll_s: float = Field(10.0, ge=0.05, le=3600, description="seconds between two listings of the input")
    overwrite: bool = Field(False, description="recompute volumes whose outputs exist for this model")
    max_jobs: int = Field(4, ge=1, le=256, description="jobs of this watch running at once")


def job_template(replica) -> JobSpec:
    """The settings every job of a watch gets from the server (`serving.job_spec`'s, input and output
    left to each object)."""
    cfg = replica.cfg
    most = cfg.replicas if cfg.replicas is not None else cfg.max_replicas
    return JobSpec(input="-", output="-", app_name=replica.app_name, chunk=cfg.chunk, concurrency=cfg.job_concurrency,
                   cpus_per_volume=cfg.cpus_per_volume, allow=cfg.allow_prefixes, wait_s=cfg.model_wait_s,
                   reserve_cpus=None if cfg.volume_cpus is not None else most * cfg.cpus_per_replica,
                   jobs_state=replica.jobs_state)


async def _replica_resumed():
    replica = serve.get_replica_context().servable_object
    if not _resumed.get(id(replica)):
        try:
            await replica.light(watches.resume, job_template(replica), replica.cfg.single_server_watches)
        except UserError as exc:
            raise HTTPException(503, str(exc)) from exc
        _resumed[id(replica)] = True
    return replica


def _checked_id(watch_id: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{12}", watch_id):
        raise HTTPException(404, f"no watch {watch_id!r}")
    return watch_id


@router.post("/watches", status_code=202)
async def create_watch(body: WatchRequest) -> Dict:
    """Start watching `input`: every NIfTI object landing there is segmented into `output` once it is
    unchanged across two polls; a replaced one again; a deleted one is left alone."""
    replica = await _replica_resumed()
    template = job_template(replica)
    try:
        inp = access.check_uri(body.input, replica.cfg.allow_prefixes)
        out = access.check_uri(body.output, replica.cfg.allow_prefixes)
        access.check_job_uris(inp, out, template.jobs_state)
    except access.AccessError as exc:
        raise HTTPException(exc.status, str(exc)) from exc
    spec = WatchSpec(input=inp, output=out, poll_s=body.poll_s, overwrite=body.overwrite, max_jobs=body.max_jobs)
    try:
        watch_id = await asyncio.to_thread(watches.start_watch, spec, template, True, True,
                                           replica.cfg.single_server_watches)
    except UserError as exc:
        raise HTTPException(503, str(exc)) from exc
    return {"watch_id": watch_id, "status": f"/v1/watches/{watch_id}"}


@router.get("/watches")
async def list_watches() -> List[Dict]:
    replica = await _replica_resumed()
    found = await replica.light(watches.registered, replica.jobs_state)
    return [{"watch_id": w["watch"]["watch_id"], "input": w["watch"]["input"], "output": w["watch"]["output"],
             "deleted": bool(w.get("deleted"))} for w in found]


@router.get("/watches/{watch_id}")
async def get_watch(watch_id: str, entries: int = Query(0, ge=0, le=MAX_ROWS, description="also list this many of its keys"),
                    order: Literal["key", "recent"] = Query("key", description="the keys listed: the first by key, "
                                                            "or the latest to move (done, failed, submitted, seen)")
                    ) -> Dict:
    replica = await _replica_resumed()
    found: Optional[Dict] = await replica.light(watches.get_watch, _checked_id(watch_id), replica.jobs_state, entries,
                                                order)
    if found is None:
        raise HTTPException(404, f"no watch {watch_id!r}")
    return found


@router.delete("/watches/{watch_id}")
async def delete_watch(watch_id: str) -> Dict:
    replica = await _replica_resumed()
    found = await asyncio.to_thread(watches.delete_watch, _checked_id(watch_id), replica.jobs_state)
    if found is None:
        raise HTTPException(404, f"no watch {watch_id!r}")
    return found
