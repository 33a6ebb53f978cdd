"""The Ray assembly of `prepare`: slice every volume in parallel, then split and commit.

Thin on purpose: finding inputs, checking headers and drawing the split are lits.prepare.discovery, the
work per volume is lits.prepare.slicing.slice_volume (core, no Ray), the shard layout is lits.core.shards. This
module adds the parallel run (one plain Ray task per volume, largest first, a bounded number in
flight, each reserving the memory its headers call for) and the commit protocol that keeps an
output consistent:

1. shards are written as OUT/.staging-<run>/<volume_id>.parquet while the run goes (a shard does
   not depend on its split);
2. once every volume is done, the split is drawn over the volumes that succeeded; then
   OUT/manifest.json is deleted first, OUT/train|val|test are emptied and each shard is moved into
   its split's folder, and the new manifest is written (atomically) last.

Drawing the split after slicing keeps prepare one pass over the data: a volume's voxels are read
once, by the task that slices it, and whatever fails (a header, a truncated stream, NaN HU, a
label 3) is out of the split before it is drawn.

An interrupted run therefore leaves either the previous complete output or no manifest at all;
a manifest never claims shards that are not there.
"""

from __future__ import annotations

import io
import json
import logging
import sys
import time
import uuid
from datetime import datetime, timezone
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
import pyarrow.parquet as pq

import lits
from lits.runtime import fanout
from lits.core import shards, storage
from lits.core.config import PrepareConfig
from lits.prepare.discovery import assign_splits, check_headers, discover
from lits.core.errors import BadInputError, UserError
from lits.core.schema import CATEGORY_NAMES, COLUMNS, MANIFEST_FORMAT, MANIFEST_NAME, SPLITS, volume_number
from lits.prepare.slicing import WORKER_BASE_BYTES, Stopwatch, VolumeTask, slice_volume

log = logging.getLogger(__name__)

STAGING_PREFIX = ".staging-"
PREVIEW_NAME = "preview.png"
# A volume is tried at most this often on Ray (a worker killed for memory or crashed, a network
# failure: storage.TransientError), then reported as failed.
MAX_TRIES = 3


# --- shards ----------------------------------------------------------------------------------

def _failure(task: VolumeTask, reason: str, node_id: Optional[str] = None) -> Dict:
    return {"volume_id": task.volume_id, "entry": None, "node_id": node_id,
            "failed": [{"input": task.volume_uri or task.volume_id, "reason": reason}]}


def process_task(task: VolumeTask, cfg: PrepareConfig, staging: str) -> Dict:
    """Slice one volume and write its shard as staging/<volume_id>.parquet; never raises for bad input.

    Returns:
        {'volume_id', 'entry': manifest entry (its 'shard' the staged file name, or None when no
        slice was kept; its 'seconds' the slicing stages, 'encode' and 'write', and their sum as
        'total') or None, 'failed': [{'input', 'reason'}], 'node_id'}.
    Raises:
        storage.TransientError: a network failure (Ray tries the task again, see run_ray).
    """
    node_id = _node_id()
    clock = Stopwatch()
    try:
        result = slice_volume(task, cfg, clock)
        entry = dict(result.entry, node_id=node_id, shard=None)
        if len(result.table):
            entry["shard"] = f"{task.volume_id}.parquet"
            data = shards.encode(result.table)
            clock.lap("encode")
            storage.write_bytes(storage.join(staging, entry["shard"]), data)
            clock.lap("write")
        entry["seconds"] = clock.seconds()
    except Exception as exc:  # a bad file, a bug or an I/O failure must not take the whole run down
        if storage.is_transient(exc):
            raise storage.TransientError(f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(exc, BadInputError):
            log.exception("unexpected failure on %s", task.volume_id)
        reason = str(exc) if isinstance(exc, BadInputError) else f"{type(exc).__name__}: {exc}"
        return _failure(task, reason, node_id)
    return {"volume_id": task.volume_id, "entry": entry, "failed": result.failed, "node_id": node_id}


def _node_id() -> Optional[str]:
    # Ray is imported by then on a Ray worker; the single-process loop must not pay the import
    # (0.4 s, outside every stage of the volume it would fall on).
    ray = sys.modules.get("ray")
    try:
        return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
    except Exception:  # outside Ray (the single-process baseline)
        return None


# --- run and commit --------------------------------------------------------------------------

def memory_request(task: VolumeTask, node_memory: List[float], attempt: int = 1) -> int:
    """The memory a prepare task reserves on Ray: its estimate from its headers (`memory_bytes`;
    WORKER_BASE_BYTES when it has none: images), doubled on each further attempt, at most the
    largest node's memory so that it can be scheduled at all."""
    wanted = max(task.memory_bytes, WORKER_BASE_BYTES) << (attempt - 1)
    largest = int(max(node_memory, default=0))
    if largest and wanted > largest:
        if attempt == 1:
            log.warning("%s wants %.1f GiB, more than any node's %.1f GiB; asking for that",
                        task.volume_id, wanted / 2**30, largest / 2**30)
        return largest
    return wanted


def _slice_on_worker(task: VolumeTask, cfg: PrepareConfig, staging: str) -> Dict:
    return process_task(task, cfg, staging)


def run_ray(tasks: List[VolumeTask], cfg: PrepareConfig, staging: str) -> Iterator[Dict]:
    """Slice every task on the Ray cluster, one Ray task (one CPU) per volume; yield results as they land.

    Volumes go largest first (a big volume started last would finish alone, with the other CPUs
    idle), two per CPU in flight as the cluster grows, asking the autoscaler for a CPU per volume
    not yet done (lits.runtime.fanout). Each task reserves `memory_request` from its own
    headers. A volume whose task died (killed for memory, crashed, a network failure:
    storage.TransientError) is submitted again with twice the memory (at most a node's), at most
    MAX_TRIES times in all; then it is yielded as failed.
    """
    import ray

    nodes = [n.get("Resources", {}).get("memory", 0) for n in ray.nodes() if n.get("Alive")]
    cfg_ref = ray.put(cfg)

    def place(args, attempt):
        memory = memory_request(args[0], nodes, attempt)
        return {"memory": memory}, memory

    def retry(args, attempt, exc) -> bool:
        if attempt >= MAX_TRIES:
            return False
        log.warning("%s died on Ray (%s): trying again with %.1f GiB", args[0].volume_id, type(exc).__name__,
                    memory_request(args[0], nodes, attempt + 1) / 2**30)
        return True

    # No Ray retries: with max_retries != 0 Ray retries a task killed for memory without end
    # (task_oom_retries is -1 by default); `retry` tries again with more memory instead.
    remote = ray.remote(num_cpus=1, max_retries=0)(_slice_on_worker)
    ordered = sorted(tasks, key=lambda t: (-t.memory_bytes, t.volume_id))
    for outcome in fanout.fan_out(remote, [(t, cfg_ref, staging) for t in ordered], place, fanout.window,
                                  ask_cpus=1, retry=retry):
        if outcome.error is None:
            yield outcome.value
            continue
        task = outcome.args[0]
        yield _failure(task, f"{task.volume_id}: its Ray task died in all {MAX_TRIES} tries (killed for memory, "
                             f"crashed, or a network failure; the last reserved {outcome.ticket / 2**30:.1f} GiB); "
                             "see the Ray logs, and run it alone or on a larger node")


def run_local(tasks: List[VolumeTask], cfg: PrepareConfig, staging: str) -> Iterator[Dict]:
    """The same per-volume work in this process, one volume after another (benchmark baseline)."""
    for task in tasks:
        try:
            yield process_task(task, cfg, staging)
        except storage.TransientError as exc:
            yield _failure(task, f"{task.volume_id}: {exc}; try again when the storage answers")


def _clean_stale_staging(output: str) -> None:
    fs, path = storage.filesystem(output)
    try:
        fs.invalidate_cache()
        children = fs.ls(path, detail=False) if fs.exists(path) else []
    except Exception:
        return
    for child in children:
        if storage.basename(child).startswith(STAGING_PREFIX):
            log.info("removing %s left by an interrupted run", child)
            storage.delete(storage.join(output, storage.basename(child)))


def preview(staging: str, manifest: Dict, per_split: int = 4) -> bytes:
    """PNG contact sheet of kept slices (tumour slices first) from each split's first staged shards
    (this run's, so lits.core.shards' current layout: no Ray Data import, ~0.8 s, on the driver)."""
    from lits.core.reports import contact_sheet

    tiles = []
    for split in SPLITS:
        chosen = []
        for shard in manifest["splits"][split]["shards"][:3]:
            staged = storage.join(staging, storage.basename(shard))
            table = pq.read_table(io.BytesIO(storage.read_bytes(staged)))
            images = shards.decode(table.column("image"), shards.column_shape(table.schema, "image", staged))
            mask_column = shards.decode(table.column("mask"), shards.column_shape(table.schema, "mask", staged))
            for i in np.argsort(-np.asarray(table.column("category")), kind="stable")[:per_split]:
                caption = f"{split} {table.column('volume_id')[int(i)]} z{table.column('slice_index')[int(i)]}"
                chosen.append((caption, images[i], mask_column[i], int(table.column("category")[int(i)])))
        chosen.sort(key=lambda t: -t[3])
        tiles += [(c, im, m) for c, im, m, _ in chosen[:per_split]]
    return contact_sheet(tiles)


def commit(output: str, staging: str, manifest: Dict) -> None:
    """Replace OUT's splits with the staged shards, each into its split's folder, then write the
    manifest (see module doc)."""
    storage.delete(storage.join(output, MANIFEST_NAME))
    try:
        picture = preview(staging, manifest)
    except Exception:  # a picture must never cost the run
        log.warning("could not draw %s", PREVIEW_NAME, exc_info=True)
        picture = None
    storage.delete(storage.join(output, PREVIEW_NAME))
    manifest["preview"] = PREVIEW_NAME if picture else None
    for split in SPLITS:
        storage.delete(storage.join(output, split))
    for split in SPLITS:  # the split decides a shard's folder only now
        for shard in manifest["splits"][split]["shards"]:
            storage.move_file(storage.join(staging, storage.basename(shard)), storage.join(output, shard))
    storage.delete(staging)
    if picture:
        storage.write_bytes(storage.join(output, PREVIEW_NAME), picture)
    storage.write_bytes(storage.join(output, MANIFEST_NAME), json.dumps(manifest, indent=1).encode())


def build_manifest(cfg: PrepareConfig, fmt: str, entries: List[Dict], failed: List[Dict], seconds: float) -> Dict:
    entries = sorted(entries, key=lambda e: volume_number(e["volume_id"]))
    splits = {}
    for split in SPLITS:
        members = [e for e in entries if e["split"] == split]
        splits[split] = {
            "volumes": len(members),
            "slices": sum(sum(e["kept"].values()) for e in members),
            "kept": {c: sum(e["kept"][c] for e in members) for c in CATEGORY_NAMES},
            "shards": [e["shard"] for e in members if e.get("shard")],
        }
    totals = {
        "volumes": len(entries),
        "failed_inputs": len(failed),
        "slices": {c: sum(e["slices"][c] for e in entries) for c in CATEGORY_NAMES},
        "kept": {c: sum(e["kept"][c] for e in entries) for c in CATEGORY_NAMES},
    }
    return {
        "format_version": MANIFEST_FORMAT,
        "package": "lits",
        "package_version": lits.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input": storage.normalise(cfg.input),
        "input_format": fmt,
        "config": cfg.to_dict(),
        "columns": list(COLUMNS),
        "seconds": round(seconds, 2),
        "totals": totals,
        "splits": splits,
        "volumes": entries,
        "failed": failed,
    }


def place(entries: List[Dict], failed: List[Dict], cfg: PrepareConfig) -> None:
    """Draw the split over the volumes that succeeded; set each entry's split and final shard path.

    Raises:
        UserError: too few volumes succeeded for a non-empty val or test split (the failed inputs
            are logged first, so that the one-line error can point at them).
    """
    try:
        splits = assign_splits([e["volume_id"] for e in entries], cfg.val_fraction, cfg.test_fraction, cfg.seed)
    except UserError as exc:
        for f in failed:
            log.warning("failed: %s: %s", f["input"], f["reason"])
        listed = " (listed above)" if failed else ""
        raise UserError(f"{len(entries)} volume(s) succeeded and {len(failed)} input(s) failed{listed}: {exc}") from None
    for e in entries:
        e["split"] = splits[e["volume_id"]]
        if e["shard"]:
            e["shard"] = f"{e['split']}/{e['shard']}"


def prepare(cfg: PrepareConfig, runner: Callable = run_ray, progress: Optional[Callable[[int, int, Dict], None]] = None) -> Dict:
    """Run the whole prepare stage and commit its output.

    Args:
        cfg: the stage's configuration.
        runner: `run_ray` (Ray must be initialised by the caller) or `run_local`.
        progress: called as (done, total, result) after each volume.
    Returns:
        The manifest (also written to OUT/manifest.json when at least one volume succeeded). Its
        'timeline' holds the seconds from the start at which the headers were checked and the first
        and the last volume were done; 'seconds' is the whole call up to the commit.
    Raises:
        UserError: missing or empty input, unwritable output, too few good volumes for the split.
    """
    started = time.perf_counter()
    timeline: Dict[str, float] = {}

    def mark(name: str) -> None:
        timeline[name] = round(time.perf_counter() - started, 3)

    output = storage.normalise(cfg.output)
    tasks, failed, fmt = discover(cfg)
    storage.check_writable(output)
    tasks, header_failed = check_headers(tasks, cfg)
    failed += header_failed
    _clean_stale_staging(output)
    staging = storage.join(output, f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}")
    entries: List[Dict] = []
    mark("headers_checked")
    try:
        for done, result in enumerate(runner(tasks, cfg, staging), start=1):
            mark("first_volume_done" if done == 1 else "last_volume_done")
            failed.extend(result["failed"])
            if result["entry"] is not None:
                entries.append(result["entry"])
            if progress:
                progress(done, len(tasks), result)
        timeline.setdefault("last_volume_done", timeline.get("first_volume_done", 0.0))
        if entries:
            place(entries, failed, cfg)
        manifest = build_manifest(cfg, fmt, entries, failed, time.perf_counter() - started)
        manifest["timeline"] = timeline
        if entries:
            commit(output, staging, manifest)
        else:
            storage.delete(staging)
    except BaseException:
        # Keep the previous output intact; staged shards of this run are of no use.
        try:
            storage.delete(staging)
        except Exception:
            log.warning("could not remove %s; the next run into %s removes it", staging, output)
        raise
    return manifest
