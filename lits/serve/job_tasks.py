"""The volume tasks of bulk jobs, and the CPUs volume tasks (of jobs and uploads) may use.

A volume task reads, preprocesses and post-processes on a CPU worker, on as many threads as CPUs it
reserved (`model_client.task_threads`), and sends its slices, chunk by chunk, to the model
deployment, which answers labels at the volume's slice size (`model_client.ModelSubmit`, whose every
wait has a deadline and resends). A lost model replica never hangs the service:

- **The volume pool.** `serving.deploy` reserves the CPUs volume tasks may use in a placement group
  (`create_pool`) after the replicas are placed, leaving what the replicas hold (and what autoscaling
  may add) outside it. Every volume task of a job or an upload runs inside the pool, so a replica
  that dies frees CPUs no volume task can take, and its replacement is scheduled.

Outputs per input `INPUT/<rel>.nii[.gz]` (or DICOM series, `job_inputs`) are named by
`lits.core.naming`: the mask, the preview (a series' DICOM-SEG), then the report (written last: its presence with this model's id and the input's identity means done).
Every write is atomic, and a volume's outputs are all or nothing (`segment_volume`). Every file a
volume reads or writes is resolved and checked against the server's allow-list first, and every
file it writes against the job's own output.
"""

from __future__ import annotations

import json
import logging
import traceback
from typing import Dict, List, Optional, Sequence, Tuple, Union

import ray

from lits.serve import access
from lits.model import dicom_inference, inference
from lits.model.dicom_inference import SEG_KEY
from lits.core import dicom, naming, storage
from lits.core.errors import BadInputError, UserError
from lits.serve.job_spec import JOBS_FOLDER, JobSpec
from lits.serve.model_client import ModelSubmit, ModelUnavailable, task_threads

log = logging.getLogger(__name__)

POOL_PREFIX = "lits-volumes-"


# --- the volume pool ------------------------------------------------------------------------------

def pool_name(app_name: str) -> str:
    return POOL_PREFIX + app_name


def _pools(app_name: str, states=("CREATED",)) -> List:
    from ray.util.placement_group import PlacementGroup, placement_group_table

    return [PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))) for pg_id, info in placement_group_table().items()
            if info.get("name") == pool_name(app_name) and info.get("state") in states]


def find_pool(app_name: str):
    """The app's volume pool (a created placement group), or None."""
    found = _pools(app_name)
    return found[0] if found else None


def pool_shape(pg) -> Tuple[float, float]:
    """(CPUs the pool holds, CPUs of its largest bundle: the most one task in it may ask)."""
    from ray.util.placement_group import placement_group_table

    cpus = [float(b.get("CPU", 0)) for b in placement_group_table(pg)["bundles"].values()]
    return sum(cpus), max(cpus, default=0.0)


def remove_pool(app_name: str) -> None:
    from ray.util.placement_group import remove_placement_group

    for pg in _pools(app_name, ("CREATED", "PENDING", "PREPARED", "RESCHEDULING")):
        remove_placement_group(pg)


def create_pool(app_name: str, cpus: float, cpus_per_volume: float, timeout_s: float = 120) -> float:
    """Reserve `cpus` CPUs (bundles of max(1, cpus_per_volume)) for the volume tasks of `app_name`;
    returns the CPUs reserved. UserError when they cannot be had in `timeout_s`."""
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = max(1.0, float(cpus_per_volume))
    count = int(cpus // bundle)
    if count < 1:
        raise UserError(f"no CPU is left for volume tasks ({cpus:g} after the model replicas' reservation; each needs "
                        f"{bundle:g}): give the cluster more CPUs, or lower --cpus-per-replica / --max-replicas")
    remove_pool(app_name)
    pg = placement_group([{"CPU": bundle}] * count, strategy="PACK", name=pool_name(app_name), lifetime="detached")
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as exc:
        remove_placement_group(pg)
        raise UserError(f"could not reserve {count * bundle:g} CPUs for volume tasks in {timeout_s:.0f} s; "
                        "pass a smaller --volume-cpus") from exc
    return count * bundle


def in_pool(pg) -> Dict:
    """Task options that run a task inside the pool `pg` (any bundle); {} without one."""
    if pg is None:
        return {}
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=-1)}


# --- one volume -----------------------------------------------------------------------------------

def already_done(uris: Dict[str, str], model_id: str, source: Dict) -> bool:
    """True when the volume's report says this model segmented this very input (`source`, its
    `storage.identity` or `dicom.series_identity`) and its mask (and DICOM-SEG, for a series)
    exist (the report is written last). A report without an identity, or with another (the input
    was replaced, or another input wrote these names), is not done."""
    if not storage.exists(uris["report"]):
        return False
    try:
        report = json.loads(storage.read_bytes(uris["report"]))
    except (ValueError, UserError):
        return False
    return (isinstance(report, dict) and report.get("model_id") == model_id
            and report.get("input_identity") == source and storage.exists(uris["mask"])
            and (SEG_KEY not in uris or storage.exists(uris[SEG_KEY])))


def remove_outputs(uris: Dict[str, str]) -> None:
    """Delete a volume's outputs, the report first (it is what marks a volume done)."""
    for key in ["report"] + sorted(k for k in uris if k != "report"):
        storage.delete(uris[key])


Source = Union[str, dicom.Series]  # what a volume task segments: a NIfTI's URI or a DICOM series


def source_files(source: Source) -> Sequence[str]:
    return source.files if isinstance(source, dicom.Series) else (source,)


def _segment(source: Source, uris: Dict[str, str], spec: inference.ModelSpec, submit: inference.Submit,
             chunk: int, threads: int, identity: Dict) -> Dict:
    if isinstance(source, dicom.Series):
        return dicom_inference.segment_series(source, uris, spec, submit, chunk, threads, source=identity)
    return inference.segment_uri(source, uris, spec, submit, chunk, threads, source=identity)


def _segment_all_or_nothing(uri: Source, uris: Dict[str, str], spec: inference.ModelSpec, submit: inference.Submit, *,
                            overwrite: bool, chunk: int, threads: int) -> Optional[Dict]:
    """The report, or None when this model's outputs of this input exist and `overwrite` is off.

    The input's identity is taken before it is read: replaced while it is segmented, the report
    names the older identity and the next job recomputes it (never the reverse)."""
    source = dicom.series_identity(uri) if isinstance(uri, dicom.Series) else storage.identity(uri)
    done_before = already_done(uris, spec.model_id, source)
    if done_before and not overwrite:
        return None
    if not done_before:
        remove_outputs(uris)
    try:
        return _segment(uri, uris, spec, submit, chunk, threads, source)
    except BaseException:
        try:
            if not already_done(uris, spec.model_id, source):
                remove_outputs(uris)
        except Exception as exc:  # the first failure is the one to report
            log.warning("volume %s: could not remove its partial outputs: %s", source_name(uri), exc)
        raise


def check_outputs(uris: Dict[str, str], output: str, allow: Sequence[str]) -> None:
    """BadInputError unless each of a volume's outputs resolves inside the allow-list and inside the
    job's `output`, outside its summaries' folder (`JOBS_FOLDER`): checked before anything is
    removed or written."""
    summaries = storage.join(storage.normalise(output), JOBS_FOLDER)
    for key in sorted(uris):
        access.check_resolved(uris[key], allow, "write")
        access.check_inside(uris[key], output)
        if uris[key].startswith(summaries + "/"):
            raise BadInputError(f"refused to write {uris[key]}: the job summaries' folder {summaries} holds no outputs")


def source_name(source: Source) -> str:
    return source.folder if isinstance(source, dicom.Series) else source


def segment_volume(uri: Source, rel_name: str, output: str, spec: inference.ModelSpec, submit: inference.Submit, *,
                   overwrite: bool, chunk: int, allow: Sequence[str] = (), threads: int = 1) -> Dict:
    """One volume (a NIfTI's URI or a DICOM series) of a job (what `segment_volume_task` runs, on
    `threads` threads); never raises for a bad volume. A series also gets '<rel>_seg.dcm', its
    DICOM-SEG (`dicom_inference.series_outputs`).

    Outputs are all or nothing: stale ones (another model's, or a half-written earlier try) are
    removed before the volume is segmented, and whatever this call wrote is removed again when it
    stops before the report (a cancel's KeyboardInterrupt, a failed write). So no mask or preview
    lies under its final name without this model's report, and no report describes another
    model's mask or another input. With an allow-list, the input and every output must resolve
    inside it (a symlink out of it fails the volume before anything is read or written); every
    output must lie inside `output` (`check_outputs`).

    Returns:
        {'input', 'name', 'status': 'done'|'skipped'|'failed', 'reason' when failed, report figures when done;
         a series also 'series_uid'}.
    """
    series = isinstance(uri, dicom.Series)
    uris = dicom_inference.series_outputs(output, rel_name) if series else naming.output_uris(output, rel_name)
    result = {"input": source_name(uri), "name": rel_name, **({"series_uid": uri.series_uid} if series else {})}
    try:
        for path in source_files(uri):
            access.check_resolved(path, allow, "read")
        check_outputs(uris, output, allow)
        report = _segment_all_or_nothing(uri, uris, spec, submit, overwrite=overwrite, chunk=chunk, threads=threads)
    except (UserError, ModelUnavailable) as exc:  # a bad volume, a symlink out, an unwritable output, no model
        return {**result, "status": "failed", "reason": str(exc)}
    except Exception as exc:
        log.error("volume %s: %s", source_name(uri), traceback.format_exc())
        return {**result, "status": "failed", "reason": f"internal error: {type(exc).__name__}: {exc}"}
    if report is None:
        return {**result, "status": "skipped"}
    return {**result, "status": "done", "slices": report["slices"], "seconds": report["seconds"]["total"],
            "liver_volume_ml": report["liver_volume_ml"], "tumour_volume_ml": report["tumour_volume_ml"],
            "lesion_count": report["lesion_count"]}


@ray.remote(num_cpus=1, max_retries=2)
def segment_volume_task(uri: Source, rel_name: str, job: JobSpec, model: inference.ModelSpec) -> Dict:
    """`segment_volume` of one of `job`'s volumes on a Ray worker, on as many threads as the task
    reserved CPUs, its chunks sent to the model deployment of `job.app_name` (which serves `model`)."""
    resent: List[int] = []
    result = segment_volume(uri, rel_name, job.output, model, ModelSubmit(job.app_name, resent, job.wait_s),
                            overwrite=job.overwrite, chunk=job.chunk, allow=job.allow, threads=task_threads())
    result["node_id"] = ray.get_runtime_context().get_node_id()
    if result["status"] == "done":
        result["chunks_resent"] = len(resent)
    return result
