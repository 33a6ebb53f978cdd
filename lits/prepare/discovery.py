"""What prepare works on: find the inputs, check the NIfTI headers, and draw the split (no Ray).

The split is drawn last, over the volumes that were sliced successfully, so a bad file never
leaves val or test empty and fixing one moves few good volumes (see `assign_splits`).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Dict, List, Optional, Tuple

from lits.core import storage, volumes
from lits.core.config import PrepareConfig
from lits.core.errors import BadInputError, UserError
from lits.core.schema import volume_number
from lits.prepare.slicing import VolumeTask, check_pair, memory_bytes

log = logging.getLogger(__name__)

# Ids are ASCII digits: '\d' would also take '١٦' (Arabic-Indic) as 16, a second volume-16.
_NIFTI = re.compile(r"(?:^|/)(volume|segmentation)-([0-9]+)\.nii(?:\.gz)?$")
_IMAGE = re.compile(r"(?:^|/)images/(?:.*/)?volume-([0-9]+)_slice_([0-9]+)\.(?:jpe?g|png)$", re.IGNORECASE)
_MASK = re.compile(r"(?:^|/)masks/(?:.*/)?volume-([0-9]+)_slice_([0-9]+)_mask\.(?:jpe?g|png)$", re.IGNORECASE)
# The same names with any Unicode digits: reported, so that such a file is not silently skipped.
_ANY_DIGITS = re.compile(r"(?:^|/)(?:(?:volume|segmentation)-\d+\.nii(?:\.gz)?|volume-\d+_slice_\d+(?:_mask)?\.(?:jpe?g|png))$",
                         re.IGNORECASE)
_HEADER_THREADS = 16


def _relative(uri: str, root: str) -> str:
    return uri[len(root):].lstrip("/")


def non_ascii_ids(files: List[str], root: str) -> List[Dict]:
    """Failed entries for files named like inputs whose number is not ASCII digits."""
    failed = []
    for uri in files:
        rel = _relative(uri, root)
        if _ANY_DIGITS.search(rel) and any(c.isdigit() and not c.isascii() for c in storage.basename(rel)):
            failed.append({"input": uri, "reason": "its number is not written in ASCII digits 0-9; rename it "
                                                   "(e.g. volume-16.nii.gz) or move it out of the input"})
    return failed


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
    for vid in sorted(found, key=volume_number):
        vols, segs = found[vid]["volume"], found[vid]["segmentation"]
        if len(vols) > 1 or len(segs) > 1:
            for uri in vols + segs:
                failed.append({"input": uri, "reason": f"{vid} is present more than once ({len(vols)} volumes, {len(segs)} segmentations); keep one copy"})
        elif not segs:
            failed.append({"input": vols[0], "reason": f"no segmentation-{volume_number(vid)}.nii[.gz] found for it"})
        elif not vols:
            failed.append({"input": segs[0], "reason": f"no volume-{volume_number(vid)}.nii[.gz] found for it"})
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


def split_counts(n: int, val_fraction: float, test_fraction: float) -> Dict[str, int]:
    """Volumes per split: round(n * fraction), at least one for a non-zero fraction, one kept for training.

    Raises:
        UserError: n is too few to give every non-zero fraction a volume and keep one for training;
            the message names the fraction and the count.
    """
    counts = {}
    for name, fraction in (("test", test_fraction), ("val", val_fraction)):
        counts[name] = max(1, int(round(n * fraction))) if fraction > 0 else 0
    while counts["test"] + counts["val"] > max(0, n - 1):
        key = "test" if counts["test"] >= counts["val"] and counts["test"] > 0 else "val"
        counts[key] -= 1
    for name, fraction in (("val", val_fraction), ("test", test_fraction)):
        if fraction > 0 and counts[name] == 0:
            raise UserError(
                f"too few volumes ({n}) for a {name} split at --{name}-fraction {fraction} (training keeps one "
                f"volume and every non-zero fraction needs one); add volumes or pass --{name}-fraction 0"
            )
    counts["train"] = n - counts["test"] - counts["val"]
    return counts


def _rank(seed: int, volume_id: str) -> bytes:
    return hashlib.blake2b(volume_id.encode(), key=str(seed).encode(), digest_size=8).digest()


def assign_splits(volume_ids: List[str], val_fraction: float, test_fraction: float, seed: int) -> Dict[str, str]:
    """Split volumes (never slices) into train/val/test, seeded; counts from `split_counts`.

    Volumes are ranked by a keyed hash of (seed, id): test takes the first, val the next, train the
    rest. The split depends only on the seed and the set of ids, and adding or removing one volume
    moves at most a few others across a boundary (a shuffle of the sorted ids would reshuffle all).

    Raises:
        UserError: too few volumes for a non-empty split at a non-zero fraction (`split_counts`).
    """
    ranked = sorted(set(volume_ids), key=lambda v: (_rank(seed, v), v))
    counts = split_counts(len(ranked), val_fraction, test_fraction)
    split = {}
    for rank, vid in enumerate(ranked):
        split[vid] = "test" if rank < counts["test"] else "val" if rank < counts["test"] + counts["val"] else "train"
    return split


def discover(cfg: PrepareConfig) -> Tuple[List[VolumeTask], List[Dict], str]:
    """List the input and build one task per volume (no file is opened).

    Returns:
        (tasks sorted by volume id, failed entries, the format found).
    Raises:
        UserError: input missing, empty, or holding neither layout (or both, without --format).
    """
    root = storage.normalise(cfg.input)
    files = storage.list_files(root)
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
    if cfg.roi and fmt == "images":
        raise UserError(f"{cfg.input} holds a converted images/ + masks/ dataset: --roi crops a box around the liver "
                        "from a volume's HU, so it needs volume-N/segmentation-N NIfTI pairs")
    failed = (nifti_failed if fmt == "nifti" else image_failed) + non_ascii_ids(files, root)
    ids = sorted(pairs if fmt == "nifti" else series, key=volume_number)
    tasks = []
    for vid in ids:
        if fmt == "nifti":
            tasks.append(VolumeTask(vid, "nifti", volume_uri=pairs[vid][0], segmentation_uri=pairs[vid][1]))
        else:
            rows = series[vid]
            tasks.append(VolumeTask(vid, "images", image_uris=tuple(r[1] for r in rows),
                                    mask_uris=tuple(r[2] for r in rows), slice_numbers=tuple(r[0] for r in rows)))
    return tasks, failed, fmt


def _check_task(task: VolumeTask, cfg: PrepareConfig) -> Tuple[Optional[VolumeTask], Optional[Dict]]:
    try:
        volume = volumes.read_header(task.volume_uri, cfg.max_voxels)
        segmentation = volumes.read_header(task.segmentation_uri, cfg.max_voxels)
        check_pair(task, volume.shape, segmentation.shape)
    except BadInputError as exc:
        return None, {"input": task.volume_uri, "reason": str(exc)}
    return replace(task, memory_bytes=memory_bytes(volume, segmentation, cfg.image_size)), None


def check_headers(tasks: List[VolumeTask], cfg: PrepareConfig) -> Tuple[List[VolumeTask], List[Dict]]:
    """Read every NIfTI pair's two headers (one small read each, in threads) before any voxel.

    A pair whose header already condemns it (over --max-voxels, not 3-D, complex or RGB voxels,
    shapes that differ) fails here, without a task; the others get their memory estimate
    (`slicing.memory_bytes`). Image tasks pass through.

    Returns:
        (the tasks to run, in order, failed entries).
    """
    nifti = [t for t in tasks if t.format == "nifti"]
    if not nifti:
        return tasks, []
    with ThreadPoolExecutor(min(_HEADER_THREADS, len(nifti))) as pool:
        checked = dict(zip((t.volume_id for t in nifti), pool.map(lambda t: _check_task(t, cfg), nifti)))
    kept, failed = [], []
    for task in tasks:
        if task.format != "nifti":
            kept.append(task)
            continue
        ok, failure = checked[task.volume_id]
        if ok is not None:
            kept.append(ok)
        else:
            failed.append(failure)
    return kept, failed
