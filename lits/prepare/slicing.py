"""One volume in, its kept training slices out: the per-volume work of `prepare`, without Ray.

The Ray Data adapter (lits.prepare.pipeline) calls `slice_volume` once per volume on a worker; the
benchmark's single-process baseline calls the very same function in a loop.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

from lits.core import ct, masks, roi, storage, volumes
from lits.core.config import PrepareConfig
from lits.core.errors import BadInputError
from lits.core.schema import CATEGORY_NAMES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VolumeTask:
    """One unit of prepare work: a NIfTI pair, or one volume's slices of the image dataset.

    The task knows nothing of its volume's split: prepare draws the split once every volume is
    done, over those that succeeded, and moves each shard into its split's folder when it commits.

    Attributes:
        volume_id: 'volume-N'.
        volume_uri, segmentation_uri: the NIfTI pair (format 'nifti').
        image_uris, mask_uris, slice_numbers: parallel lists, sorted by slice number (format 'images').
        memory_bytes: what slicing it needs at most, from its headers (`memory_bytes`); 0: unknown.
    """

    volume_id: str
    format: str
    volume_uri: str = ""
    segmentation_uri: str = ""
    image_uris: Tuple[str, ...] = ()
    mask_uris: Tuple[str, ...] = ()
    slice_numbers: Tuple[int, ...] = ()
    memory_bytes: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("image_uris", "mask_uris", "slice_numbers"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VolumeTask":
        d = dict(d)
        for key in ("image_uris", "mask_uris", "slice_numbers"):
            d[key] = tuple(d.get(key) or ())
        return cls(**d)


@dataclass
class SliceTable:
    """The kept slices of one volume, column by column (see lits.core.schema.COLUMNS).

    Attributes:
        volume_id: str.
        slice_index: int32 (N,), index along the original file's axial axis.
        category: int8 (N,).
        image: uint8 (N, S, S, C).
        mask: uint8 (N, S, S).
        spacing: float32 (3,), (x, y, z) mm of the original voxels (NaN when unknown).
    """

    volume_id: str
    slice_index: np.ndarray
    category: np.ndarray
    image: np.ndarray
    mask: np.ndarray
    spacing: np.ndarray

    def __len__(self) -> int:
        return int(self.slice_index.shape[0])


@dataclass
class VolumeResult:
    """What happened to one volume: its table (None on failure) and its manifest entry."""

    table: Optional[SliceTable]
    entry: Dict
    failed: List[Dict] = field(default_factory=list)


class Stopwatch:
    """Seconds per stage of one volume, measured back to back so that they sum to its total.

    `lap(name)` charges the time since the previous lap (or the start) to `name`; the manifest
    records `seconds()`: each stage and their sum as 'total'.
    """

    def __init__(self) -> None:
        self._stages: Dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self._stages[name] = self._stages.get(name, 0.0) + now - self._last
        self._last = now

    def seconds(self) -> Dict[str, float]:
        out = {name: round(s, 3) for name, s in self._stages.items()}
        out["total"] = round(sum(out.values()), 3)
        return out


def slice_rng(seed: int, volume_id: str) -> np.random.Generator:
    """The slice filter's generator: depends only on (seed, volume id), not on scheduling."""
    return np.random.default_rng([seed, zlib.crc32(volume_id.encode())])


def _counts(categories: np.ndarray) -> Dict[str, int]:
    bins = np.bincount(categories.astype(np.int64), minlength=3)
    return {name: int(bins[i]) for i, name in enumerate(CATEGORY_NAMES)}


def _empty_table(volume_id: str, size: int, spacing) -> SliceTable:
    return SliceTable(
        volume_id=volume_id,
        slice_index=np.zeros(0, np.int32),
        category=np.zeros(0, np.int8),
        image=np.zeros((0, size, size, 3), np.uint8),
        mask=np.zeros((0, size, size), np.uint8),
        spacing=np.asarray(spacing, np.float32),
    )


def check_pair(task: VolumeTask, volume_shape: Tuple[int, ...], segmentation_shape: Tuple[int, ...]) -> None:
    """BadInputError unless the segmentation's shape is its volume's."""
    if tuple(segmentation_shape) != tuple(volume_shape):
        raise BadInputError(
            f"{task.segmentation_uri}: shape {tuple(segmentation_shape)} differs from its volume's {tuple(volume_shape)} "
            f"({task.volume_uri}); the pair must match voxel for voxel"
        )


# What a worker holds besides one volume's arrays: the interpreter with numpy, cv2, pyarrow and
# Ray's worker (README Performance measures ~260 MB after the imports).
WORKER_BASE_BYTES = 384 << 20
# Small temporaries beside the arrays memory_bytes counts (Python objects, a slice's float32 copy).
SMALL_BYTES = 4 << 20


def _read_peak(header: volumes.Header) -> int:
    """Reading one file: its stored voxels and, for a scaled file, their float32 copy (one)."""
    return header.voxels * header.dtype.itemsize + (header.array_bytes if header.scaling else 0)


def memory_bytes(volume: volumes.Header, segmentation: volumes.Header, image_size: int) -> int:
    """The most memory slicing a pair takes, from what its headers declare (the peak of one volume).

    The largest of the stages' holdings: reading the volume (with the reader's buffers); the volume
    while its segmentation is read; both with the uint8 labels decoded from a non-uint8
    segmentation (and its chunk temporaries); the volume and labels with the histogram's pieces;
    with the block of slices ct.model_inputs gathers and every slice's image and mask as if all
    were kept; those slices with their Parquet shard. Plus the worker itself.
    tests/test_bounded_inputs.py checks it against the traced peak of int16 and scaled pairs.
    """
    buffers = volumes.READ_BUFFER_BYTES
    vol, labels = volume.array_bytes, segmentation.voxels  # labels: uint8 once decoded
    decoded = 0 if segmentation.dtype == np.uint8 and not segmentation.scaling else labels
    # volumes.as_labels converts 32 file slices (last axis) at a time: their rounded copy and a mask.
    chunk = 0 if not decoded else 32 * (segmentation.voxels // segmentation.shape[-1]) * (segmentation.dtype.itemsize + 2)
    # ct.freqhist_breaks' pieces: int16 keys (2 B per voxel), or float HU floored (4 B) and widened to int64 (8 B)
    histogram = min(volume.voxels, ct.HIST_PIECE) * (2 if volume.dtype == np.int16 and not volume.scaling else 12)
    gathered = ct.GATHER_SLICES * (vol // volume.geometry.canonical_shape[0])
    kept = volume.geometry.canonical_shape[0] * image_size * image_size * 4
    stages = (
        _read_peak(volume) + buffers,
        vol + _read_peak(segmentation) + buffers,
        vol + segmentation.array_bytes + decoded + chunk,
        vol + labels + histogram,
        vol + labels + gathered + kept,
        2 * kept,
    )
    return int(max(stages) + SMALL_BYTES + WORKER_BASE_BYTES)


def slice_nifti_pair(task: VolumeTask, cfg: PrepareConfig, clock: Optional[Stopwatch] = None) -> VolumeResult:
    """Read, validate and canonicalise a volume/segmentation pair; return its kept slices.

    The entry's 'seconds' holds each stage (read, validate, select, histogram, images, masks) as
    laps of `clock` (a new one when None), and their sum as 'total'.

    Raises:
        BadInputError: unreadable or invalid inputs (the caller records them as failed).
    """
    clock = clock or Stopwatch()
    hu_file, geometry = volumes.read_nifti(task.volume_uri, cfg.max_voxels)
    seg_file, _ = volumes.read_nifti(task.segmentation_uri, cfg.max_voxels)
    clock.lap("read")
    check_pair(task, hu_file.shape, seg_file.shape)
    volumes.check_hu(hu_file, task.volume_uri)
    labels_file = volumes.as_labels(seg_file, task.segmentation_uri)
    del seg_file
    clock.lap("validate")
    # The segmentation's voxels correspond to the volume's one for one, so both take the
    # volume's orientation (LiTS segmentation headers occasionally disagree in rounding only).
    hu = geometry.to_canonical(hu_file)
    labels = geometry.to_canonical(labels_file)
    categories = masks.categorise(labels)
    rng = slice_rng(cfg.seed, task.volume_id)
    keep = masks.select_slices(categories, cfg.keep_liver, cfg.keep_empty, rng)
    box = roi.training_box(labels, rng) if cfg.roi else None
    if cfg.roi:  # a cascade's second stage sees the slices of the liver's box, cropped to it
        within = np.zeros_like(keep)
        if box is not None:
            within[box[0]] = True
        keep &= within
        hu, labels = (hu[:, box[1], box[2]], labels[:, box[1], box[2]]) if box is not None else (hu, labels)
    kept_z = np.nonzero(keep)[0]
    spacing = np.asarray(geometry.canonical_spacing, np.float32)
    size = cfg.image_size
    table = _empty_table(task.volume_id, size, spacing)
    clock.lap("select")
    if kept_z.size:
        # The histogram ignores voxel order: the file-order array is one contiguous block. A crop's
        # third channel is equalised over the whole volume too, as inference does.
        breaks = ct.freqhist_breaks(hu_file) if cfg.context == 0 else np.zeros(1, np.float32)
        clock.lap("histogram")
        images = ct.model_inputs(hu, kept_z, breaks, cfg.context, size)
        clock.lap("images")
        mask_out = np.empty((kept_z.size, size, size), np.uint8)
        for i, z in enumerate(kept_z):
            mask_out[i] = ct.resize_mask(np.ascontiguousarray(labels[z]), size)
        table = SliceTable(
            volume_id=task.volume_id,
            slice_index=geometry.file_slice_index(kept_z).astype(np.int32),
            category=categories[kept_z].astype(np.int8),
            image=images,
            mask=mask_out,
            spacing=spacing,
        )
        clock.lap("masks")
    entry = {
        "volume_id": task.volume_id,
        "format": "nifti",
        "inputs": {"volume": task.volume_uri, "segmentation": task.segmentation_uri},
        "shape": list(geometry.shape),
        "canonical_shape": list(geometry.canonical_shape),
        "axcodes": geometry.axcodes,
        "affine": [list(r) for r in geometry.affine],
        "spacing": [float(s) for s in spacing],
        "dtype": str(hu_file.dtype),
        "voxel_bytes": int(hu_file.nbytes),
        "slices": _counts(categories),
        "kept": _counts(categories[kept_z]),
        "seconds": clock.seconds(),
    }
    if cfg.roi:
        entry["roi"] = roi.as_list(box) if box is not None else None
    return VolumeResult(table=table, entry=entry)


def _read_image(uri: str, cfg: PrepareConfig, flags: int) -> np.ndarray:
    """One slice file as uint8 (H, W, 3) RGB.

    Raises:
        BadInputError: unreadable, empty, truncated or not an image; one line naming `uri`, so
            that the caller drops this slice only.
    """
    try:
        data = storage.read_bytes(uri)
    except Exception as exc:
        raise BadInputError(f"{uri}: cannot read ({' '.join(str(exc).split())})") from exc
    if not data:
        # cv2.imdecode asserts on an empty buffer instead of returning None.
        raise BadInputError(f"{uri}: empty file (0 bytes); re-export this slice or remove it")
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error:
        image = None
    if image is None:
        raise BadInputError(f"{uri}: not a decodable JPEG/PNG image ({len(data)} bytes; truncated or not an image)")
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2RGB)


def slice_image_series(task: VolumeTask, cfg: PrepareConfig, clock: Optional[Stopwatch] = None) -> VolumeResult:
    """Decode one volume's converted slices: masks inverted to labels, images taken as they are.

    Per-file problems (an empty, truncated or undecodable image or mask file, a mask that is not
    a colour-mapped label mask) drop that slice and are reported in `failed`, one line naming the
    file; the rest of the volume goes on. Raises BadInputError when no slice survives. The entry's
    'seconds': 'masks' (decoding every mask), 'images' (the kept slices), and their 'total'.
    """
    clock = clock or Stopwatch()
    failed: List[Dict] = []
    labels: Dict[int, np.ndarray] = {}
    shapes = set()
    for number, mask_uri in zip(task.slice_numbers, task.mask_uris):
        try:
            label = masks.decode_colour_mask(_read_image(mask_uri, cfg, cv2.IMREAD_COLOR), mask_uri)
        except BadInputError as exc:
            failed.append({"input": mask_uri, "reason": str(exc)})
            continue
        labels[number] = label
        shapes.add(label.shape)
    if not labels:
        raise BadInputError(f"{task.volume_id}: none of its {len(task.mask_uris)} masks could be decoded")
    clock.lap("masks")
    numbers = np.array(sorted(labels), dtype=np.int64)
    categories = np.array([labels[n].max() for n in numbers], dtype=np.int8)
    keep = masks.select_slices(categories, cfg.keep_liver, cfg.keep_empty, slice_rng(cfg.seed, task.volume_id))
    image_uri = dict(zip(task.slice_numbers, task.image_uris))
    size = cfg.image_size
    cache: Dict[int, Optional[np.ndarray]] = {}

    def image_of(number: int) -> Optional[np.ndarray]:
        if number not in cache:
            try:
                cache[number] = _read_image(image_uri[number], cfg, cv2.IMREAD_COLOR)
            except BadInputError as exc:
                failed.append({"input": image_uri[number], "reason": str(exc)})
                cache[number] = None
        return cache[number]

    rows_index, rows_category, rows_image, rows_mask = [], [], [], []
    for i in np.nonzero(keep)[0]:
        number = int(numbers[i])
        image = image_of(number)
        if image is None:
            continue
        if image.shape[:2] != labels[number].shape:
            failed.append({"input": image_uri[number], "reason": f"image {image.shape[:2]} and mask {labels[number].shape} differ in size"})
            continue
        if cfg.context == 1:
            # 2.5-D from the converted images: their channel 0 is the liver window.
            neighbours = [numbers[max(i - 1, 0)], number, numbers[min(i + 1, len(numbers) - 1)]]
            channel0 = []
            for n in neighbours:
                other = image_of(int(n))
                channel0.append(other[..., 0] if other is not None and other.shape == image.shape else image[..., 0])
            image = ct.stack_context(np.stack(channel0), 1)
        rows_index.append(number)
        rows_category.append(categories[i])
        rows_image.append(ct.resize_image(image, size))
        rows_mask.append(ct.resize_mask(labels[number], size))
    spacing = np.full(3, np.nan, np.float32)
    table = _empty_table(task.volume_id, size, spacing)
    if rows_index:
        table = SliceTable(
            volume_id=task.volume_id,
            slice_index=np.array(rows_index, np.int32),
            category=np.array(rows_category, np.int8),
            image=np.stack(rows_image),
            mask=np.stack(rows_mask),
            spacing=spacing,
        )
    first_shape = sorted(shapes)[0]
    clock.lap("images")
    entry = {
        "volume_id": task.volume_id,
        "format": "images",
        "inputs": {"images": len(task.image_uris), "masks": len(task.mask_uris),
                   "first_image": task.image_uris[0], "first_mask": task.mask_uris[0]},
        "shape": [len(task.slice_numbers), int(first_shape[0]), int(first_shape[1])],
        "spacing": [None, None, None],
        "slices": _counts(categories),
        "kept": _counts(table.category),
        "seconds": clock.seconds(),
    }
    return VolumeResult(table=table, entry=entry, failed=failed)


def slice_volume(task: VolumeTask, cfg: PrepareConfig, clock: Optional[Stopwatch] = None) -> VolumeResult:
    """Dispatch on the task's format (`clock`: see slice_nifti_pair). Raises BadInputError for an
    unusable volume."""
    if task.format == "nifti":
        return slice_nifti_pair(task, cfg, clock)
    if task.format == "images":
        return slice_image_series(task, cfg, clock)
    raise ValueError(f"unknown task format {task.format!r}")
