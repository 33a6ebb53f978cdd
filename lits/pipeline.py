"""Ray Data assembly of `prepare`: slice every volume in parallel, then split and commit.

Thin on purpose: finding inputs, checking headers and drawing the split are lits.discovery, the
work per volume is lits.slicing.slice_volume (core, no Ray). This module adds Parquet shards with
Ray tensor columns, the parallel map and the commit protocol that keeps an output consistent:

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
import time
import uuid
from datetime import datetime, timezone
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import lits
from lits import storage
from lits.config import PrepareConfig
from lits.discovery import assign_splits, check_headers, discover
from lits.errors import BadInputError, UserError
from lits.schema import CATEGORY_NAMES, COLUMNS, MANIFEST_FORMAT, MANIFEST_NAME, SPLITS
from lits.slicing import WORKER_BASE_BYTES, SliceTable, VolumeTask, slice_volume

log = logging.getLogger(__name__)

STAGING_PREFIX = ".staging-"
PREVIEW_NAME = "preview.png"
# A volume is tried at most this often on Ray (a worker killed for memory or crashed, a network
# failure: storage.TransientError), then reported as failed.
MAX_TRIES = 3


# --- shards ----------------------------------------------------------------------------------

def shard_bytes(table: SliceTable) -> bytes:
    """The Parquet bytes of one volume's slice table; image/mask are Ray tensor columns."""
    from ray.data.extensions import ArrowTensorArray

    n = len(table)
    columns = {
        "volume_id": pa.array([table.volume_id] * n, pa.string()),
        "slice_index": pa.array(table.slice_index, pa.int32()),
        "category": pa.array(table.category, pa.int8()),
        "image": ArrowTensorArray.from_numpy(table.image),
        "mask": ArrowTensorArray.from_numpy(table.mask),
        "spacing": pa.array([table.spacing.tolist()] * n, pa.list_(pa.float32(), 3)),
    }
    arrow = pa.table({name: columns[name] for name in COLUMNS})
    buf = io.BytesIO()
    # zstd: on a 512-matrix shard 27% smaller than snappy, faster to write, as fast to read.
    pq.write_table(arrow, buf, compression="zstd", compression_level=3, row_group_size=64)
    return buf.getvalue()


def _failure(task: VolumeTask, reason: str, node_id: Optional[str] = None) -> Dict:
    return {"volume_id": task.volume_id, "entry": None, "node_id": node_id,
            "failed": [{"input": task.volume_uri or task.volume_id, "reason": reason}]}


def process_task(task: VolumeTask, cfg: PrepareConfig, staging: str) -> Dict:
    """Slice one volume and write its shard as staging/<volume_id>.parquet; never raises for bad input.

    Returns:
        {'volume_id', 'entry': manifest entry (its 'shard' the staged file name, or None when no
        slice was kept) or None, 'failed': [{'input', 'reason'}], 'node_id'}.
    Raises:
        storage.TransientError: a network failure (Ray tries the task again, see run_ray).
    """
    node_id = _node_id()
    try:
        result = slice_volume(task, cfg)
        entry = dict(result.entry, node_id=node_id, shard=None)
        if len(result.table):
            entry["shard"] = f"{task.volume_id}.parquet"
            storage.write_bytes(storage.join(staging, entry["shard"]), shard_bytes(result.table), cfg.s3_endpoint)
    except Exception as exc:  # a bad file, a bug or an I/O failure must not take the whole run down
        if storage.is_transient(exc):
            raise storage.TransientError(f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(exc, BadInputError):
            log.exception("unexpected failure on %s", task.volume_id)
        reason = str(exc) if isinstance(exc, BadInputError) else f"{type(exc).__name__}: {exc}"
        return _failure(task, reason, node_id)
    return {"volume_id": task.volume_id, "entry": entry, "failed": result.failed, "node_id": node_id}


def _node_id() -> Optional[str]:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # outside Ray (the single-process baseline)
        return None


# --- run and commit --------------------------------------------------------------------------

def _map_row(row: Dict, cfg: PrepareConfig, staging: str) -> Dict:
    task = VolumeTask.from_dict(json.loads(row["task"]))
    return {"result": json.dumps(process_task(task, cfg, staging))}


def memory_request(tasks: List[VolumeTask], node_memory: List[float]) -> int:
    """The memory every prepare task reserves: the largest task's estimate from its headers (Ray
    Data sets resources per operator, not per row), at most the largest node's memory so that it
    can be scheduled at all; WORKER_BASE_BYTES when no task has an estimate (images)."""
    wanted = max([t.memory_bytes for t in tasks] + [WORKER_BASE_BYTES])
    largest = int(max(node_memory, default=0))
    if largest and wanted > largest:
        log.warning("the largest volume wants %.1f GiB, more than any node's %.1f GiB; asking for that",
                    wanted / 2**30, largest / 2**30)
        return largest
    return wanted


def _ray_pass(tasks: List[VolumeTask], cfg: PrepareConfig, staging: str, memory: int) -> Iterator[Dict]:
    """One Ray Data task per volume, each tried once; a task that dies drops only its volume."""
    import ray

    items = [{"task": json.dumps(t.to_dict())} for t in tasks]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # One CPU per volume: the work is numpy/cv2/zlib, single-threaded per volume. No Ray retries:
    # with max_retries != 0 Ray retries a task killed for memory without end (task_oom_retries
    # is -1 by default), so run_ray retries whole passes itself. Ray 2.60 deprecates passing
    # max_retries this way (removal announced for 2.64) and offers no named parameter for it yet.
    ds = ds.map(_map_row, fn_kwargs={"cfg": cfg, "staging": staging}, num_cpus=1, memory=memory, max_retries=0)
    # Ray Data reserves part of the cluster per operator by default; with one map operator that
    # reservation idles CPUs (benchmarks/prepare.py measures CPUs busy with it on and off).
    ds.context.op_resource_reservation_enabled = False
    ds.context.max_errored_blocks = -1  # a dead task drops its volume's block, not the run
    for row in ds.iter_rows():
        yield json.loads(row["result"])


def run_ray(tasks: List[VolumeTask], cfg: PrepareConfig, staging: str) -> Iterator[Dict]:
    """Slice every task on the Ray cluster (one Ray Data task per volume); yield results as they land.

    Every task reserves `memory_request`. A volume whose task died (killed for memory, crashed, a
    network failure: storage.TransientError) is tried again after the others, with twice the
    memory (at most a node's), at most MAX_TRIES times in all; then it is yielded as failed.
    """
    import ray

    nodes = [n.get("Resources", {}).get("memory", 0) for n in ray.nodes() if n.get("Alive")]
    memory, largest = memory_request(tasks, nodes), int(max(nodes, default=0))
    pending = list(tasks)
    for attempt in range(1, MAX_TRIES + 1):
        if not pending:
            return
        done = set()
        for result in _ray_pass(pending, cfg, staging, memory):
            done.add(result["volume_id"])
            yield result
        pending = [t for t in pending if t.volume_id not in done]
        if pending and attempt < MAX_TRIES:
            memory = min(2 * memory, largest) if largest else 2 * memory
            log.warning("%d volume(s) died on Ray (killed for memory, crashed, or a network failure): trying "
                        "again with %.1f GiB each: %s", len(pending), memory / 2**30, " ".join(t.volume_id for t in pending))
    for task in pending:
        yield _failure(task, f"{task.volume_id}: its Ray task died in all {MAX_TRIES} tries (killed for memory, "
                             f"crashed, or a network failure; the last reserved {memory / 2**30:.1f} GiB); see the "
                             "Ray logs, and run it alone or on a larger node")


def run_local(tasks: List[VolumeTask], cfg: PrepareConfig, staging: str) -> Iterator[Dict]:
    """The same per-volume work in this process, one volume after another (benchmark baseline)."""
    for task in tasks:
        try:
            yield process_task(task, cfg, staging)
        except storage.TransientError as exc:
            yield _failure(task, f"{task.volume_id}: {exc}; try again when the storage answers")


def _clean_stale_staging(output: str, s3_endpoint: Optional[str]) -> None:
    fs, path = storage.filesystem(output, s3_endpoint)
    try:
        fs.invalidate_cache()
        children = fs.ls(path, detail=False) if fs.exists(path) else []
    except Exception:
        return
    for child in children:
        if storage.basename(child).startswith(STAGING_PREFIX):
            log.info("removing %s left by an interrupted run", child)
            storage.delete(storage.join(output, storage.basename(child)), s3_endpoint)


def preview(staging: str, manifest: Dict, s3_endpoint: Optional[str], per_split: int = 4) -> bytes:
    """PNG contact sheet of kept slices (tumour slices first) from each split's first staged shards."""
    import ray.data.extensions  # noqa: F401  (registers the tensor type, so columns read back as arrays)

    from lits.reports import contact_sheet

    tiles = []
    for split in SPLITS:
        chosen = []
        for shard in manifest["splits"][split]["shards"][:3]:
            staged = storage.join(staging, storage.basename(shard))
            table = pq.read_table(io.BytesIO(storage.read_bytes(staged, s3_endpoint)))
            images = _tensor_column(table, "image")
            mask_column = _tensor_column(table, "mask")
            for i in np.argsort(-np.asarray(table.column("category")), kind="stable")[:per_split]:
                caption = f"{split} {table.column('volume_id')[int(i)]} z{table.column('slice_index')[int(i)]}"
                chosen.append((caption, images[i], mask_column[i], int(table.column("category")[int(i)])))
        chosen.sort(key=lambda t: -t[3])
        tiles += [(c, im, m) for c, im, m, _ in chosen[:per_split]]
    return contact_sheet(tiles)


def _tensor_column(table: pa.Table, name: str) -> np.ndarray:
    column = table.column(name).combine_chunks()
    if hasattr(column, "to_numpy_ndarray"):
        return column.to_numpy_ndarray()
    return column.to_numpy()


def commit(output: str, staging: str, manifest: Dict, s3_endpoint: Optional[str]) -> None:
    """Replace OUT's splits with the staged shards, each into its split's folder, then write the
    manifest (see module doc)."""
    storage.delete(storage.join(output, MANIFEST_NAME), s3_endpoint)
    try:
        picture = preview(staging, manifest, s3_endpoint)
    except Exception:  # a picture must never cost the run
        log.warning("could not draw %s", PREVIEW_NAME, exc_info=True)
        picture = None
    storage.delete(storage.join(output, PREVIEW_NAME), s3_endpoint)
    manifest["preview"] = PREVIEW_NAME if picture else None
    for split in SPLITS:
        storage.delete(storage.join(output, split), s3_endpoint)
    for split in SPLITS:  # the split decides a shard's folder only now
        for shard in manifest["splits"][split]["shards"]:
            storage.move_file(storage.join(staging, storage.basename(shard)), storage.join(output, shard), s3_endpoint)
    storage.delete(staging, s3_endpoint)
    if picture:
        storage.write_bytes(storage.join(output, PREVIEW_NAME), picture, s3_endpoint)
    storage.write_bytes(storage.join(output, MANIFEST_NAME), json.dumps(manifest, indent=1).encode(), s3_endpoint)


def build_manifest(cfg: PrepareConfig, fmt: str, entries: List[Dict], failed: List[Dict], seconds: float) -> Dict:
    entries = sorted(entries, key=lambda e: int(e["volume_id"].split("-")[1]))
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
        The manifest (also written to OUT/manifest.json when at least one volume succeeded).
    Raises:
        UserError: missing or empty input, unwritable output, too few good volumes for the split.
    """
    started = time.perf_counter()
    output = storage.normalise(cfg.output)
    tasks, failed, fmt = discover(cfg)
    storage.check_writable(output, cfg.s3_endpoint)
    tasks, header_failed = check_headers(tasks, cfg)
    failed += header_failed
    _clean_stale_staging(output, cfg.s3_endpoint)
    staging = storage.join(output, f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}")
    entries: List[Dict] = []
    try:
        for done, result in enumerate(runner(tasks, cfg, staging), start=1):
            failed.extend(result["failed"])
            if result["entry"] is not None:
                entries.append(result["entry"])
            if progress:
                progress(done, len(tasks), result)
        if entries:
            place(entries, failed, cfg)
        manifest = build_manifest(cfg, fmt, entries, failed, time.perf_counter() - started)
        if entries:
            commit(output, staging, manifest, cfg.s3_endpoint)
        else:
            storage.delete(staging, cfg.s3_endpoint)
    except BaseException:
        # Keep the previous output intact; staged shards of this run are of no use.
        try:
            storage.delete(staging, cfg.s3_endpoint)
        except Exception:
            log.warning("could not remove %s; the next run into %s removes it", staging, output)
        raise
    return manifest
