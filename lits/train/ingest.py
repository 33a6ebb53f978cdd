"""Training ingest on Ray Data: the prepared splits as datasets, their batches as tensors.

- Read: `ray.data.read_parquet` of the shards the manifest lists, file order reshuffled on every
  epoch (reseeded per execution, reproducible from the run's seed).
- Materialise or stream: decided by `TrainConfig.ingest` ('auto' materialises when the decoded
  train + val splits fit in `materialize_gb`), never by which nodes happen to be up at launch. The
  driver only builds lazy datasets; a materialised split is decoded once the worker group is placed,
  by read tasks on the trainers' own nodes (`PlacedIngest`), and its block order reshuffled every
  epoch; a streamed one is read again each epoch wherever Ray Data runs its reads.
- Batches: `iter_torch_batches` with a collate that turns each Arrow batch's fixed-size binary
  columns into uint8 tensors in one copy (lits.core.shards.decode), prefetched in Ray's threads. They
  stay in pageable memory: a worker crops them into patches (lits.train.sampling), and a CUDA
  worker crops into page-locked memory, the copy the GPU reads asynchronously.

Shapes: a batch is {'image': uint8 (N, H, W, C), 'mask': uint8 (N, H, W)} (+ 'volume_id' str (N,)
for validation), CPU tensors.
"""

from __future__ import annotations

import logging
import warnings
from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
from ray.data.collate_fn import ArrowBatchCollateFn
from ray.train import DataConfig

from lits.core import shards, storage
from lits.core.config import TrainConfig
from lits.train.train_data import DataInfo, worker_batch_size

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


def read(cfg: TrainConfig, uris, split: str, node: Optional[str] = None):
    """A lazy Ray Dataset of `split`'s shards `uris` (nothing is read until it executes).

    Args:
        split: 'train' (columns image, mask; file order reshuffled every execution) or 'val'
            (volume_id, image, mask).
        node: a Ray node id every task of the dataset is placed on (soft: elsewhere only if the node
            is gone); its shards are then repartitioned into as many blocks as files, so that the
            materialised blocks can be reordered every epoch (small shards are read into few blocks).
    """
    import ray.data
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    fs, _ = storage.arrow_filesystem(cfg.data)
    strip = (lambda u: u[len("s3://"):]) if storage.is_s3(cfg.data) else (lambda u: u)
    columns = ["image", "mask"] if split == "train" else ["volume_id", "image", "mask"]
    shuffle = ray.data.FileShuffleConfig(seed=cfg.seed) if split == "train" else None
    # A dataset keeps a copy of the DataContext it is created under: its scheduling strategy places
    # the read and repartition tasks of this dataset alone. Ray 2.60 deprecates it (removal announced
    # after January 2027) for per-operator label selectors; its warning is silenced here, once known.
    if not node:
        return ray.data.read_parquet([strip(u) for u in uris], filesystem=fs, shuffle=shuffle).select_columns(columns)
    context = ray.data.DataContext.get_current()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        saved, context.scheduling_strategy = context.scheduling_strategy, NodeAffinitySchedulingStrategy(node, soft=True)
        try:
            return ray.data.read_parquet([strip(u) for u in uris], filesystem=fs).select_columns(columns).repartition(len(uris))
        finally:
            context.scheduling_strategy = saved


def datasets(cfg: TrainConfig, info: DataInfo) -> Tuple[object, object, bool]:
    """(train, val, materialised): lazy Ray Datasets of the prepared splits in `info` (check_data's),
    and whether `PlacedIngest` materialises them once the worker group is placed. Nothing is read
    or materialised here, on the driver, before the workers exist."""
    stored = materialize(cfg, info)
    log.info("training data %s: %.2f GB decoded (--ingest %s, --materialize-gb %g)",
             "materialised on the trainers' nodes" if stored else "streamed", decoded_bytes(info) / 1e9, cfg.ingest,
             cfg.materialize_gb)
    return read(cfg, info.train_uris, "train"), read(cfg, info.val_uris, "val"), stored


def placed(cfg: TrainConfig, info: DataInfo, split: str, node_ids: Sequence[str]):
    """`split` decoded into the object stores of the nodes in `node_ids` (one per worker, in rank
    order), its shards dealt over the workers' nodes as the ranks are (a node with two workers reads
    twice the shards of a node with one), each node's part read by tasks placed there.

    Returns:
        The materialised split; for 'train', its blocks reordered anew on every execution (epoch).
    """
    import ray.data

    uris = info.train_uris if split == "train" else info.val_uris
    parts: Dict[str, list] = {}
    for i, uri in enumerate(uris):
        parts.setdefault(node_ids[i % len(node_ids)], []).append(uri)
    pieces = [read(cfg, part, split, node).materialize() for node, part in parts.items()]
    dataset = pieces[0].union(*pieces[1:]) if len(pieces) > 1 else pieces[0]
    if split == "train":
        # Materialised blocks keep their order; this reorders them anew on every epoch (the seed
        # is combined with the execution index), as the file shuffle does for a stream.
        dataset = dataset.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=cfg.seed, reseed_after_execution=True))
    return dataset


class PlacedIngest(DataConfig):
    """Ray Train's DataConfig, materialising the splits where the trainers run.

    Ray Train calls `configure` once the worker group is placed (in its dataset manager, on the
    driver's node), with the workers' node ids: a split that `materialize` keeps in the object store
    is read then by tasks on those nodes (`placed`), so its blocks live beside the workers that read
    them, are read again by a restarted group on its own nodes, and are freed with the group. A
    streamed split is split as it is (its reads run wherever Ray Data puts them, CPU nodes included).
    Either way Ray Data's equal `streaming_split` gives each worker the same number of slices, and
    prefers the blocks on its own node.
    """

    def __init__(self, cfg: TrainConfig, info: DataInfo):
        super().__init__()
        self.cfg, self.info = cfg, info

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        if materialize(self.cfg, self.info) and worker_node_ids:
            datasets = {name: placed(self.cfg, self.info, name, worker_node_ids) for name in datasets}
        return super().configure(datasets, world_size, worker_handles, worker_node_ids, **kwargs)


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
    size = worker_batch_size(cfg)  # the worker's part of the global --batch-size
    return shard.iter_torch_batches(
        batch_size=size, collate_fn=SliceCollate(info.image_shape, ids=not train), device="cpu",
        prefetch_batches=cfg.prefetch_batches,
        local_shuffle_buffer_size=4 * size if train else None, local_shuffle_seed=shuffle_seed)
