"""Ray Data assembly of `prepare`: find inputs, split by volume, slice in parallel, write shards.

Thin on purpose: the work per volume is lits.slicing.slice_volume (core, no Ray). This module
adds discovery, the split, Parquet shards with Ray tensor columns, the parallel map and the
commit protocol that keeps an output directory consistent:

1. shards are written under OUT/.staging-<run>/<split>/<volume_id>.parquet while the run goes;
2. once every volume is done, OUT/manifest.json is deleted first, then OUT/train|val|test are
   replaced by the staged ones, then the new manifest is written (atomically) last.

An interrupted run therefore leaves either the previous complete output or no manifest at all;
a manifest never claims shards that are not there.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
import uuid
from collections import defaultdict
from datetime import datetime, timezone
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import lits
from lits import storage
from lits.config import PrepareConfig
from lits.errors import BadInputError, UserError
from lits.schema import CATEGORY_NAMES, COLUMNS, MANIFEST_FORMAT, MANIFEST_NAME, SPLITS
from lits.slicing import SliceTable, VolumeTask, slice_volume

log = logging.getLogger(__name__)

_NIFTI = re.compile(r"(?:^|/)(volume|segmentation)-(\d+)\.nii(?:\.gz)?$")
_IMAGE = re.compile(r"(?:^|/)images/(?:.*/)?volume-(\d+)_slice_(\d+)\.(?:jpe?g|png)$", re.IGNORECASE)
_MASK = re.compile(r"(?:^|/)masks/(?:.*/)?volume-(\d+)_slice_(\d+)_mask\.(?:jpe?g|png)$", re.IGNORECASE)
STAGING_PREFIX = ".staging-"
PREVIEW_NAME = "preview.png"


# --- discovery and split -------------------------------------------------------------------

def _relative(uri: str, root: str) -> str:
    return uri[len(root):].lstrip("/")


def find_nifti_pairs(files: List[str], root: str) -> Tuple[Dict[str, Tuple[str, str]], List[Dict]]:
    """Pair volume-N / segmentation-N files found anywhere under root.

    Returns:
        ({volume_id: (volume_uri, segmentation_uri)}, failed entries for unpaired or duplicate files).
    """
    found: Dict[str, Dict[str, List[str]]] = defaultdict(lambda: defaultdict(list))
    for uri in files:
        m = _NIFTI.search(_relative(uri, root))
        if m:
            found[f"volume-{int(m.group(2))}"][m.group(1)].append(uri)
    pairs, failed = {}, []
    for vid in sorted(found, key=lambda v: int(v.split("-")[1])):
        vols, segs = found[vid]["volume"], found[vid]["segmentation"]
        if len(vols) > 1 or len(segs) > 1:
            for uri in vols + segs:
                failed.append({"input": uri, "reason": f"{vid} is present more than once ({len(vols)} volumes, {len(segs)} segmentations); keep one copy"})
        elif not segs:
            failed.append({"input": vols[0], "reason": f"no segmentation-{vid.split('-')[1]}.nii[.gz] found for it"})
        elif not vols:
            failed.append({"input": segs[0], "reason": f"no volume-{vid.split('-')[1]}.nii[.gz] found for it"})
        else:
            pairs[vid] = (vols[0], segs[0])
    return pairs, failed


def find_image_series(files: List[str], root: str) -> Tuple[Dict[str, List[Tuple[int, str, str]]], List[Dict]]:
    """Pair images/**/volume-N_slice_M.* with masks/**/volume-N_slice_M_mask.*.

    Returns:
        ({volume_id: [(slice M, image_uri, mask_uri), ...] sorted by M}, failed entries).
    """
    images, mask_files = {}, {}
    failed = []
    for uri in files:
        rel = _relative(uri, root)
        for pattern, into in ((_MASK, mask_files), (_IMAGE, images)):
            m = pattern.search(rel)
            if m:
                key = (int(m.group(1)), int(m.group(2)))
                if key in into:
                    failed.append({"input": uri, "reason": f"duplicate of {into[key]}; keep one copy"})
                else:
                    into[key] = uri
                break
    series: Dict[str, List[Tuple[int, str, str]]] = defaultdict(list)
    for key in sorted(set(images) | set(mask_files)):
        if key not in mask_files:
            failed.append({"input": images[key], "reason": f"no mask volume-{key[0]}_slice_{key[1]}_mask.* under masks/"})
        elif key not in images:
            failed.append({"input": mask_files[key], "reason": f"no image volume-{key[0]}_slice_{key[1]}.* under images/"})
        else:
            series[f"volume-{key[0]}"].append((key[1], images[key], mask_files[key]))
    return dict(series), failed


def assign_splits(volume_ids: List[str], val_fraction: float, test_fraction: float, seed: int) -> Dict[str, str]:
    """Split volumes (never slices) into train/val/test, seeded.

    Counts are round(n * fraction), at least one volume for a non-zero fraction as long as
    training keeps one; ids are sorted before the seeded shuffle, so the split does not depend
    on listing order.
    """
    ids = sorted(volume_ids)
    n = len(ids)
    order = np.random.default_rng(seed).permutation(n)
    counts = {}
    for name, fraction in (("test", test_fraction), ("val", val_fraction)):
        counts[name] = max(1, int(round(n * fraction))) if fraction > 0 else 0
    while counts["test"] + counts["val"] > max(0, n - 1):
        key = "test" if counts["test"] >= counts["val"] and counts["test"] > 0 else "val"
        counts[key] -= 1
    split = {}
    for rank, i in enumerate(order):
        split[ids[i]] = "test" if rank < counts["test"] else "val" if rank < counts["test"] + counts["val"] else "train"
    for name, fraction in (("val", val_fraction), ("test", test_fraction)):
        if fraction > 0 and counts[name] == 0:
            log.warning("%d volume(s) are too few for a %s split; it stays empty", n, name)
    return split


def discover(cfg: PrepareConfig) -> Tuple[List[VolumeTask], List[Dict], str]:
    """List the input and build one task per volume.

    Returns:
        (tasks sorted by volume id, failed entries, the format found).
    Raises:
        UserError: input missing, empty, or holding neither layout (or both, without --format).
    """
    root = storage.normalise(cfg.input)
    files = storage.list_files(root, cfg.s3_endpoint)
    pairs, nifti_failed = find_nifti_pairs(files, root) if cfg.format in ("auto", "nifti") else ({}, [])
    series, image_failed = find_image_series(files, root) if cfg.format in ("auto", "images") else ({}, [])
    has_nifti, has_images = bool(pairs or nifti_failed), bool(series or image_failed)
    if cfg.format == "auto" and has_nifti and has_images:
        raise UserError(f"{cfg.input} holds both NIfTI volumes and an images/ + masks/ dataset; choose one with --format nifti|images")
    fmt = cfg.format if cfg.format != "auto" else ("nifti" if has_nifti else "images" if has_images else "none")
    if fmt == "none" or (fmt == "nifti" and not has_nifti) or (fmt == "images" and not has_images):
        what = {"nifti": "volume-N.nii[.gz] + segmentation-N.nii[.gz] pairs",
                "images": "images/**/volume-N_slice_M.jpg + masks/**/volume-N_slice_M_mask.jpg files"}
        wanted = what.get(fmt) or f"{what['nifti']} or {what['images']}"
        raise UserError(f"no {wanted} under {cfg.input} ({len(files)} files looked at); check --input")
    failed = nifti_failed if fmt == "nifti" else image_failed
    ids = sorted(pairs if fmt == "nifti" else series, key=lambda v: int(v.split("-")[1]))
    splits = assign_splits(ids, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    tasks = []
    for vid in ids:
        if fmt == "nifti":
            tasks.append(VolumeTask(vid, splits[vid], "nifti", volume_uri=pairs[vid][0], segmentation_uri=pairs[vid][1]))
        else:
            rows = series[vid]
            tasks.append(VolumeTask(vid, splits[vid], "images", image_uris=tuple(r[1] for r in rows),
                                    mask_uris=tuple(r[2] for r in rows), slice_numbers=tuple(r[0] for r in rows)))
    return tasks, failed, fmt


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


def process_task(task: VolumeTask, cfg: PrepareConfig, staging: str) -> Dict:
    """Slice one volume and write its shard under staging; never raises for bad input.

    Returns:
        {'entry': manifest entry or None, 'failed': [{'input', 'reason'}], 'rows': kept slices}.
    """
    node_id = _node_id()
    try:
        result = slice_volume(task, cfg)
    except BadInputError as exc:
        return {"entry": None, "failed": [{"input": task.volume_uri or task.volume_id, "reason": str(exc)}], "node_id": node_id}
    except Exception as exc:  # a bug or an I/O failure must not take the whole run down
        log.exception("unexpected failure on %s", task.volume_id)
        return {"entry": None, "failed": [{"input": task.volume_uri or task.volume_id, "reason": f"{type(exc).__name__}: {exc}"}], "node_id": node_id}
    entry = dict(result.entry, node_id=node_id)
    if len(result.table):
        shard = f"{task.split}/{task.volume_id}.parquet"
        storage.write_bytes(storage.join(staging, shard), shard_bytes(result.table), cfg.s3_endpoint)
        entry["shard"] = shard
    else:
        entry["shard"] = None
    return {"entry": entry, "failed": result.failed, "node_id": node_id}


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


def run_ray(tasks: List[VolumeTask], cfg: PrepareConfig, staging: str) -> Iterator[Dict]:
    """Slice every task on the Ray cluster (one Ray Data task per volume); yield results as they land."""
    import ray

    items = [{"task": json.dumps(t.to_dict())} for t in tasks]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # One CPU per volume: the work is numpy/cv2/zlib, single-threaded per volume.
    ds = ds.map(_map_row, fn_kwargs={"cfg": cfg, "staging": staging}, num_cpus=1)
    # Ray Data reserves part of the cluster per operator by default; with one map operator that
    # reservation idles CPUs (benchmarks/prepare.py measures CPUs busy with it on and off).
    ds.context.op_resource_reservation_enabled = False
    for row in ds.iter_rows():
        yield json.loads(row["result"])


def run_local(tasks: List[VolumeTask], cfg: PrepareConfig, staging: str) -> Iterator[Dict]:
    """The same per-volume work in this process, one volume after another (benchmark baseline)."""
    for task in tasks:
        yield process_task(task, cfg, staging)


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
    """PNG contact sheet of kept slices (tumour slices first) from each split's first shards."""
    import ray.data.extensions  # noqa: F401  (registers the tensor type, so columns read back as arrays)

    from lits.reports import contact_sheet

    tiles = []
    for split in SPLITS:
        chosen = []
        for shard in manifest["splits"][split]["shards"][:3]:
            table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(staging, shard), s3_endpoint)))
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
    """Replace OUT's splits with the staged ones, then write the manifest (see module doc)."""
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
        staged = storage.join(staging, split)
        if storage.exists(staged, s3_endpoint):
            storage.move_tree(staged, storage.join(output, split), s3_endpoint)
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


def prepare(cfg: PrepareConfig, runner: Callable = run_ray, progress: Optional[Callable[[int, int, Dict], None]] = None) -> Dict:
    """Run the whole prepare stage and commit its output.

    Args:
        cfg: the stage's configuration.
        runner: `run_ray` (Ray must be initialised by the caller) or `run_local`.
        progress: called as (done, total, result) after each volume.
    Returns:
        The manifest (also written to OUT/manifest.json when at least one volume succeeded).
    Raises:
        UserError: missing or empty input, unwritable output.
    """
    started = time.perf_counter()
    output = storage.normalise(cfg.output)
    tasks, failed, fmt = discover(cfg)
    storage.check_writable(output, cfg.s3_endpoint)
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
