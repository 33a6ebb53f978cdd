"""What training reads, checked before any worker starts (no Ray cluster needed).

`check_data` validates a prepare output (manifest, shards, columns, shapes against the model's
depth and the patch size) and returns a `DataInfo`: everything the driver and the workers need to
know about the splits, as one frozen record.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Dict, Tuple

from lits.core.config import TrainConfig
from lits.core.errors import UserError
from lits.core.schema import MANIFEST_NAME


@dataclass(frozen=True)
class DataInfo:
    """A checked prepared dataset.

    Attributes:
        image_shape: (H, W, C) of every slice.
        val_volumes: ids of the validation volumes (per-volume metrics index them).
        train_slices, val_slices: slice counts of the splits.
        manifest_sha256: of manifest.json (a run name is tied to its data).
        prepare_config: the PrepareConfig the data was made with (manifest's 'config').
        train_uris, val_uris, test_uris: the shards of each split.
        test_volumes: (volume id, CT URI, segmentation URI) of the test split's original volumes
            (NIfTI input only: image datasets have no geometry).
    """

    image_shape: Tuple[int, int, int]
    val_volumes: Tuple[str, ...]
    train_slices: int
    val_slices: int
    manifest_sha256: str
    prepare_config: Dict
    train_uris: Tuple[str, ...]
    val_uris: Tuple[str, ...]
    test_uris: Tuple[str, ...] = ()
    test_volumes: Tuple[Tuple[str, str, str], ...] = ()


def check_data(cfg: TrainConfig) -> DataInfo:
    """Validate the prepared dataset and return what workers need to know.

    Raises:
        UserError: a batch the workers cannot share evenly, no manifest, empty train or val split, missing shards, wrong columns or dtypes,
            mixed image sizes.
    """
    import pyarrow.parquet as pq  # here, not at import: patch_size serves benchmarks/gpu_all.py without fsspec

    from lits.core import shards, storage

    import ray.data.extensions  # noqa: F401  (so pyarrow reads Ray's tensor columns as tensors)

    worker_batch_size(cfg)
    data = storage.normalise(cfg.data)
    manifest_uri = storage.join(data, MANIFEST_NAME)
    if not storage.exists(manifest_uri):
        raise UserError(f"no {MANIFEST_NAME} under {cfg.data}: run workflows/prepare.py first and pass its --output as --data")
    raw = storage.read_bytes(manifest_uri)
    try:
        manifest = json.loads(raw)
        splits = manifest["splits"]
    except (ValueError, KeyError) as exc:
        raise UserError(f"{manifest_uri} is not a prepare manifest ({exc})") from exc
    for split in ("train", "val"):
        if not splits.get(split, {}).get("shards"):
            raise UserError(f"{cfg.data} has no {split} slices; prepare with more volumes or a non-zero --val-fraction")
    shapes = set()
    for split in ("train", "val"):
        for shard in splits[split]["shards"]:
            uri = storage.join(data, shard)
            fs, path = storage.filesystem(uri)
            try:
                with fs.open(path, "rb") as f:
                    schema = pq.read_schema(f)
            except FileNotFoundError as exc:
                raise UserError(f"{uri} is listed in the manifest but missing; re-run prepare") from exc
            except Exception as exc:
                raise UserError(f"{uri}: not a readable Parquet shard ({exc})") from exc
            missing = {"volume_id", "image", "mask"} - set(schema.names)
            if missing:
                raise UserError(f"{uri} lacks column(s) {sorted(missing)}; re-run prepare")
            shapes.add((shards.column_shape(schema, "image", uri), shards.column_shape(schema, "mask", uri)))
    if len(shapes) != 1:
        raise UserError(f"{cfg.data} mixes image sizes {sorted(s[0] for s in shapes)}; prepare all volumes with one --image-size")
    (image_shape, mask_shape), = shapes
    if image_shape[:2] != mask_shape or len(image_shape) != 3:
        raise UserError(f"{cfg.data}: image {image_shape} and mask {mask_shape} shapes disagree")
    factor = 2 ** (cfg.depth - 1)
    if image_shape[0] % factor or image_shape[1] % factor:
        raise UserError(f"image size {image_shape[:2]} is not divisible by 2^(depth-1) = {factor}; change --depth or --image-size")
    crop = patch_size(cfg, image_shape[0])
    if crop > image_shape[0] or crop % factor:
        raise UserError(f"--crop {crop} must be at most the image size {image_shape[0]} and divisible by 2^(depth-1) = {factor}")
    check_stages(cfg, manifest.get("config", {}))
    val_ids = sorted({v["volume_id"] for v in manifest["volumes"] if v["split"] == "val"})
    # The test split's original volumes (NIfTI input only: image datasets have no geometry).
    test_volumes = [(v["volume_id"], v["inputs"]["volume"], v["inputs"]["segmentation"]) for v in manifest["volumes"]
                    if v["split"] == "test" and v.get("format") == "nifti" and "inputs" in v]
    return DataInfo(
        image_shape=tuple(image_shape),
        val_volumes=tuple(val_ids),
        train_slices=splits["train"]["slices"],
        val_slices=splits["val"]["slices"],
        manifest_sha256=hashlib.sha256(raw).hexdigest(),
        prepare_config=manifest.get("config", {}),
        train_uris=tuple(storage.join(data, s) for s in splits["train"]["shards"]),
        val_uris=tuple(storage.join(data, s) for s in splits["val"]["shards"]),
        test_uris=tuple(storage.join(data, s) for s in splits.get("test", {}).get("shards", [])),
        test_volumes=tuple(test_volumes),
    )


def check_stages(cfg: TrainConfig, prepare_config: Dict) -> None:
    """UserError unless liver-box data (prepare --roi) and --first-stage come together, with a first
    stage that is a whole-slice liver-tumour model."""
    from lits.model import inference

    roi = bool(prepare_config.get("roi"))
    if roi and not cfg.first_stage:
        raise UserError(f"{cfg.data} holds liver-box crops (prepare --roi): they train a cascade's second stage; "
                        "pass --first-stage RUN/model, the whole-slice model that finds the liver")
    if cfg.first_stage and not roi:
        raise UserError(f"--first-stage needs liver-box crops: prepare {cfg.data}'s volumes again with --roi")
    if cfg.first_stage:
        spec, _ = inference.load_spec(cfg.first_stage)
        if spec.first_stage is not None or spec.task != "liver-tumour":
            raise UserError(f"--first-stage {cfg.first_stage}: a first stage must be a whole-slice liver-tumour model "
                            "(train.py on data prepared without --roi)")


def patch_size(cfg: TrainConfig, side: int) -> int:
    """The training patch side: cfg.crop, or half the slice side (at least 2^(depth-1))."""
    factor = 2 ** (cfg.depth - 1)
    return cfg.crop if cfg.crop else max(factor, side // 2 // factor * factor)


def worker_batch_size(cfg: TrainConfig) -> int:
    """Slices each worker takes per optimizer step: `cfg.batch_size` is the global batch, split evenly
    over the workers.

    Each worker streams 1/N of the split (Ray Data's equal split) in batches of batch_size / N, so an
    epoch makes the optimizer steps of one process at `cfg.batch_size`, and DDP's mean of the workers'
    gradients is the gradient of the whole batch: the same learning rate holds for any N.

    Raises:
        UserError: the batch does not divide by the workers.
    """
    if cfg.batch_size % cfg.workers:
        raise UserError(f"--batch-size {cfg.batch_size} is the global batch, split evenly over the {cfg.workers} "
                        f"workers: use a multiple of {cfg.workers}")
    return cfg.batch_size // cfg.workers


def epoch_steps(cfg: TrainConfig, info: DataInfo) -> int:
    """Optimizer steps of one epoch on `cfg.workers` workers: each streams an equal share of the train
    split in batches of `worker_batch_size` (the last one partial), each batch of slices giving
    (S / crop)^2 patch batches; capped by cfg.steps_per_epoch. About train_slices / batch_size x
    (S / crop)^2 for any number of workers."""
    side = info.image_shape[0]
    share = info.train_slices // cfg.workers
    steps = max(1, -(-share // worker_batch_size(cfg))) * (side // patch_size(cfg, side)) ** 2
    return min(steps, cfg.steps_per_epoch) if cfg.steps_per_epoch else steps
