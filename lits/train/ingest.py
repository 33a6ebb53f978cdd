"""Training ingest on Ray Data: the prepared splits as datasets, their batches as tensors.

- Read: `ray.data.read_parquet` of the shards the manifest lists, file order reshuffled on every
  epoch (reseeded per execution, reproducible from the run's seed).
- Materialise or stream: decided by `TrainConfig.ingest` ('auto' materialises when the decoded
  train + val splits fit in `materialize_gb`), never by which nodes happen to be up at launch: a
  materialised split is decoded once and its block order reshuffled every epoch; a streamed one is
  read again each epoch and competes with nothing on GPU nodes (the reads run on CPU nodes).
- Batches: `iter_torch_batches` with a collate that turns each Arrow batch's fixed-size binary
  columns into uint8 tensors in one copy (lits.core.shards.decode), prefetched in Ray's threads. They
  stay in pageable memory: a worker crops them into patches (lits.train.sampling), and a CUDA
  worker crops into page-locked memory, the copy the GPU reads asynchronously.

Shapes: a batch is {'image': uint8 (N, H, W, C), 'mask': uint8 (N, H, W)} (+ 'volume_id' str (N,)
for validation), CPU tensors.
"""

from __future__ import annotations

import logging
from typing import Dict, Iterator, Tuple

import numpy as np
from ray.data.collate_fn import ArrowBatchCollateFn

from lits.core import shards, storage
from lits.core.config import TrainConfig
from lits.train.train_data import DataInfo

log = logging.getLogger(__name__)


def decoded_bytes(info: DataInfo) -> int:
    """Bytes of the train and val splits once decoded (images and masks)."""
    h, w, c = info.image_shape
    return (info.train_slices + info.val_slices) * h * w * (c + 1)


def materialize(cfg: TrainConfig, info: DataInfo) -> bool:
    """Whether the splits are decoded once into the object store (True) or streamed every epoch."""
    if cfg.ingest != "auto":
        return cfg.ingest == "materialize"
    return decoded_bytes(info) <= cfg.materialize_gb * 2 ** 30


def datasets(cfg: TrainConfig, info: DataInfo) -> Tuple[object, object, bool]:
    """(train, val, materialised) Ray Datasets of the prepared splits in `info` (check_data's)."""
    import ray.data

    fs, _ = storage.arrow_filesystem(cfg.data)
    strip = (lambda u: u[len("s3://"):]) if storage.is_s3(cfg.data) else (lambda u: u)
    train = ray.data.read_parquet([strip(u) for u in info.train_uris], filesystem=fs,
                                  shuffle=ray.data.FileShuffleConfig(seed=cfg.seed)).select_columns(["image", "mask"])
    val = ray.data.read_parquet([strip(u) for u in info.val_uris], filesystem=fs).select_columns(["volume_id", "image", "mask"])
    stored = materialize(cfg, info)
    if stored:
        train, val = train.materialize(), val.materialize()
        if train.num_blocks() < len(info.train_uris):  # small shards are read into few blocks
            train = train.repartition(len(info.train_uris)).materialize()
        # Materialised blocks keep their order; this reorders them anew on every epoch (the seed
        # is combined with the execution index), as the file shuffle does for a stream.
        train = train.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=cfg.seed, reseed_after_execution=True))
    log.info("training data %s: %.2f GB decoded (--ingest %s, --materialize-gb %g)",
             "materialised" if stored else "streamed", decoded_bytes(info) / 1e9, cfg.ingest, cfg.materialize_gb)
    return train, val, stored


class SliceCollate(ArrowBatchCollateFn):
    """Arrow batch -> {'image', 'mask'} uint8 CPU tensors (+ 'volume_id' when `ids`).

    Args:
        image_shape: (H, W, C) of one slice (fixed_size_binary columns carry no shape in Ray's
            batches).
        ids: also return the batch's volume ids (validation).
    """

    def __init__(self, image_shape, ids: bool = False):
        self.image_shape = tuple(image_shape)
        self.ids = ids

    def __call__(self, batch) -> Dict:
        import torch

        out = {
            "image": torch.from_numpy(np.array(shards.decode(batch.column("image"), self.image_shape))),
            "mask": torch.from_numpy(np.array(shards.decode(batch.column("mask"), self.image_shape[:2]))),
        }
        if self.ids:
            out["volume_id"] = batch.column("volume_id").to_numpy(zero_copy_only=False)
        return out


def batches(shard, cfg: TrainConfig, info: DataInfo, shuffle_seed=None) -> Iterator[Dict]:
    """Batches of one worker's dataset shard, prefetched and collated in Ray's threads.

    Args:
        shard: `ray.train.get_dataset_shard(...)`.
        shuffle_seed: seed of the local shuffle buffer (training), None for validation order.
    """
    train = shuffle_seed is not None
    return shard.iter_torch_batches(
        batch_size=cfg.batch_size, collate_fn=SliceCollate(info.image_shape, ids=not train), device="cpu",
        prefetch_batches=cfg.prefetch_batches,
        local_shuffle_buffer_size=4 * cfg.batch_size if train else None, local_shuffle_seed=shuffle_seed)
