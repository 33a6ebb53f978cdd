"""The training step, one epoch, validation and the schedule (torch; no Ray).

lits.train.training runs these inside each Ray Train worker; the fast test suite runs the very same
functions in one process, so "does training learn" is checked without a cluster. Collectives are
reached only through the `Collective` passed in, whose tensors live on the training device (NCCL
has no CPU tensors).

Shapes: batches are dicts of numpy arrays or CPU tensors, 'image' uint8 (N, S, S, C), 'mask' uint8
(N, S, S) (+ 'volume_id' (N,) str for validation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

from lits.model.devices import half_dtype
from lits.train.augment import AugmentConfig, IntensityConfig, random_affine, random_intensity
from lits.core.config import TrainConfig
from lits.train.losses import bce_dice_loss, ce_dice_loss
from lits.train.precise_bn import Reservoir
from lits.train.sampling import PatchBatches, poly_lr

METRIC_CLASSES = {"liver-tumour": (1, 2), "tumour": (2,)}


class Collective:
    """Sums and "every worker still has data" across the worker group; one worker: identities.

    "Every worker has data" is asked once per streamed batch: its flag is reduced in host memory
    over a gloo group (the default group when that is gloo), so the training loop never waits for
    the GPU to drain (an NCCL flag read back with .item() would, once per batch).

    Args:
        device: where the reduced sums live (the training device).
        world: number of workers; with world > 1 torch.distributed must be initialised, and every
            worker builds its Collective at the same point (a gloo group is a collective to create).
    """

    def __init__(self, device: torch.device, world: int = 1):
        self.device = device
        self.world = world
        self.host_group = None
        if world > 1:
            import torch.distributed as dist

            if dist.get_backend() != "gloo":
                self.host_group = dist.new_group(backend="gloo")

    def all_have(self, has: bool) -> bool:
        if self.world == 1:
            return has
        import torch.distributed as dist

        flag = torch.tensor([1 if has else 0], dtype=torch.int32)  # host memory, on purpose
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.host_group)
        return bool(flag.numpy()[0])

    def weighted_mean_(self, tensors, weight: float) -> float:
        """Replace each of `tensors` (on the device) by the workers' average weighted by their
        `weight`, in place; returns the weights' sum (lits.train.precise_bn)."""
        if self.world == 1:
            return weight
        import torch.distributed as dist

        flat = torch.cat([t.detach().reshape(-1).double() * weight for t in tensors]
                         + [torch.tensor([weight], dtype=torch.float64, device=tensors[0].device)])
        dist.all_reduce(flat)
        total = float(flat[-1])
        if total > 0:
            offset = 0
            for t in tensors:
                t.copy_((flat[offset:offset + t.numel()] / total).reshape(t.shape).to(t.dtype))
                offset += t.numel()
        return total

    def sum(self, array: np.ndarray) -> np.ndarray:
        if self.world == 1:
            return array
        import torch.distributed as dist

        t = torch.as_tensor(np.asarray(array, dtype=np.float64), device=self.device)
        dist.all_reduce(t)
        return t.cpu().numpy().astype(np.float64)


@dataclass(frozen=True)
class TrainState:
    """What the schedule carries from epoch to epoch (checkpointed with the weights)."""

    epoch: int = 0
    best_val_loss: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    plateau_scale: float = 1.0
    plateau_bad: int = 0
    stopped_early: bool = False
    starts: int = 0  # worker-group starts of this run: 1 + restarts after a lost worker or a re-run
    best_file: str = ""  # where the best weights were last written (lits.train.checkpoints.BestWeights)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def schedule_step(state: TrainState, val_loss: float, cfg: TrainConfig) -> Tuple[TrainState, bool]:
    """The state after an epoch that ended with `val_loss`; returns (new state, improved).

    Both schedules keep the best weights by val loss; only 'plateau' lowers the rate on a plateau
    and stops early (a poly run always runs its epochs: the rate is the schedule).
    """
    epoch = state.epoch + 1
    if val_loss < state.best_val_loss - 1e-6:
        return dataclasses.replace(state, epoch=epoch, best_val_loss=val_loss, best_epoch=epoch, bad_epochs=0,
                                   plateau_bad=0), True
    state = dataclasses.replace(state, epoch=epoch, bad_epochs=state.bad_epochs + 1, plateau_bad=state.plateau_bad + 1)
    if cfg.schedule == "plateau":
        if state.plateau_bad >= cfg.plateau_patience:
            state = dataclasses.replace(state, plateau_scale=state.plateau_scale * 0.1, plateau_bad=0)
        if state.bad_epochs >= cfg.patience:
            state = dataclasses.replace(state, stopped_early=True)
    return state, False


def learning_rate(cfg: TrainConfig, state: TrainState, epoch_progress: float) -> float:
    """The rate for the step at `epoch_progress` in [0, 1) of epoch `state.epoch`."""
    if cfg.schedule == "poly":
        return poly_lr(cfg.lr, (state.epoch + epoch_progress) / cfg.epochs, warmup=1.0 / cfg.epochs)
    return cfg.lr * (0.1 if state.epoch >= cfg.lr_drop_epoch else 1.0) * state.plateau_scale


def to_tensors(batch: Dict, device: torch.device, channels_last: bool):
    """(image float (N, C, S, S) in [0, 1], mask int64 (N, S, S)) on `device`.

    `batch` holds uint8 numpy arrays or CPU tensors (`pinned_empty`'s on a CUDA worker's training
    batches; others are page-locked here first, so the copy never blocks the host)."""
    pin = device.type == "cuda"

    def host(x):
        x = x if torch.is_tensor(x) else torch.from_numpy(np.require(x, requirements=["C", "W"]))
        return x.pin_memory() if pin and not x.is_pinned() else x  # page-locked: the copy is asynchronous

    image, mask = host(batch["image"]), host(batch["mask"])
    image = image.to(device, non_blocking=pin).permute(0, 3, 1, 2).float().div_(255.0)
    # the layout the model's weights have (channels_last is set before DDP wraps it): a channels_last
    # input to an NCHW model gives the 1x1 head's weight gradient other strides than DDP's bucket view
    image = image.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return image, mask.to(device, non_blocking=pin).long()


def pinned_empty(shape: tuple, dtype) -> Tuple[torch.Tensor, np.ndarray]:
    """A page-locked uint8/float CPU tensor and its numpy view: what a CUDA worker's `PatchBatches`
    crops into (the tensor is what travels on, so the caching host allocator sees the asynchronous
    copy that reads it before it reuses the memory)."""
    tensor = torch.empty(shape, dtype=torch.from_numpy(np.empty(0, dtype)).dtype, pin_memory=True)
    return tensor, tensor.numpy()


def overlap_counts(pred: torch.Tensor, ref: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """lits.core.metrics.overlap_counts on the device: int64 (N, len(classes), 3) of
    (intersection, pred size, ref size), liver as label >= 1, tumour as label == 2."""
    out = []
    for c in classes:
        p = (pred >= c) if c == 1 else (pred == c)
        r = (ref >= c) if c == 1 else (ref == c)
        out.append(torch.stack([(p & r).flatten(1).sum(1), p.flatten(1).sum(1), r.flatten(1).sum(1)], dim=-1))
    return torch.stack(out, dim=1)


def dice_iou(counts: torch.Tensor):
    """lits.core.metrics.dice_iou on the device (both empty -> 1), float64."""
    inter, p, r = (counts[..., i].double() for i in range(3))
    empty = (p + r) == 0
    dice = torch.where(empty, 1.0, 2 * inter / (p + r).clamp(min=1))
    iou = torch.where(empty, 1.0, inter / (p + r - inter).clamp(min=1))
    return dice, iou


def target(mask: torch.Tensor, task: str) -> torch.Tensor:
    return (mask == 2).long() if task == "tumour" else mask


def predict_labels(logits: torch.Tensor, task: str) -> torch.Tensor:
    if task == "tumour":
        return (torch.sigmoid(logits[:, 0].float()) > 0.5).long() * 2
    return logits.argmax(dim=1)


def loss_function(cfg: TrainConfig) -> Callable:
    """loss(logits, target) of cfg's task, with cfg.lesion_loss's per-lesion term."""
    loss = bce_dice_loss if cfg.task == "tumour" else ce_dice_loss
    return functools.partial(loss, lesion_weight=cfg.lesion_loss)


def autocast_for(cfg: TrainConfig, device: torch.device, bf16: Optional[bool] = None):
    """(autocast context, GradScaler or None) for `device`.

    bf16 where the GPU computes it natively (compute capability >= 8: A100, A10G, H100), fp16 with
    a GradScaler on older GPUs (is_bf16_supported() also counts slow emulation); nothing on CPU.
    `bf16` overrides the capability check (tests exercise both branches on CPU).
    """
    if cfg.amp == "off" or (device.type != "cuda" and bf16 is None):
        return contextlib.nullcontext(), None
    if bf16 is None:  # the rule serving follows too
        bf16 = half_dtype(torch.cuda.get_device_capability(device)) is torch.bfloat16
    dtype = torch.bfloat16 if bf16 else torch.float16
    scaler = None if bf16 else torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    return torch.autocast(device.type, dtype=dtype), scaler


def train_step(model, optimizer, image: torch.Tensor, mask: torch.Tensor, cfg: TrainConfig,
               generator: torch.Generator, autocast=contextlib.nullcontext(), scaler=None) -> torch.Tensor:
    """One optimizer step on a batch (augmented when cfg.augment); returns the detached loss."""
    if cfg.augment:
        image, mask = random_affine(image, mask, generator, AugmentConfig(zoom=cfg.scale_aug))
        image = random_intensity(image, generator, IntensityConfig(p=cfg.intensity_aug))
    with autocast:
        loss = loss_function(cfg)(model(image), target(mask, cfg.task))
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.detach()


@dataclass(frozen=True)
class EpochContext:
    """What one worker trains with, fixed while an epoch runs (and, in a Ray Train worker, for the
    life of the worker group): passed whole to `train_one_epoch`, `validate` and the metrics row.

    Args:
        cfg: the stage's configuration.
        model: the model as placed (DDP-wrapped in a group of workers); trained.
        optimizer: over `model`'s parameters; its rate is set step by step (`learning_rate`).
        device: the training device.
        steps_estimate: steps one epoch is expected to take (the unit of `learning_rate`'s progress).
        collective: sums and "every worker has data" over the group (one worker when None).
        autocast, scaler: `autocast_for`'s pair (no autocast, no scaler by default).
        channels_last: images in channels_last memory format (a CUDA worker).
        nodes: the Ray node ids the group runs on, ';'-joined, for the metrics rows.
    """

    cfg: TrainConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    steps_estimate: int = 1
    collective: Optional[Collective] = None
    autocast: ContextManager = contextlib.nullcontext()
    scaler: Optional[torch.amp.GradScaler] = None
    channels_last: bool = False
    nodes: str = ""

    def __post_init__(self):
        if self.collective is None:
            object.__setattr__(self, "collective", Collective(self.device))

    @property
    def core(self) -> torch.nn.Module:
        """The model without its DDP wrapper, which validation runs: a DDP forward may broadcast
        buffers across the group, and the workers' validation shards differ in length."""
        return getattr(self.model, "module", self.model)


@dataclass(frozen=True)
class EpochRandom:
    """One worker's randomness for one epoch (see `epoch_random`).

    Args:
        augment: the draws of `random_affine` (a torch.Generator on the training device).
        sampler: the patch sampler with its own numpy Generator, or None for batches used whole.
        shuffle_seed: seed of the ingest's local shuffle buffer (lits.train.ingest.batches).
    """

    augment: torch.Generator
    sampler: Optional[PatchBatches] = None
    shuffle_seed: Optional[int] = None


def epoch_random(cfg: TrainConfig, crop: int, epoch: int, rank: int,
                 device: torch.device = torch.device("cpu")) -> EpochRandom:
    """Worker `rank`'s randomness in epoch `epoch` (0-based), a function of (cfg.seed, epoch, rank) alone
    (and of the device type: a CUDA generator draws other numbers than a CPU one from the same seed).

    One root, np.random.SeedSequence(cfg.seed), spawned per epoch and then per rank: the node at
    spawn key (epoch, rank) is what `root.spawn(epoch + 1)[epoch].spawn(rank + 1)[rank]` returns,
    built directly. Its three children seed augmentation, patch sampling and the shuffle buffer.
    SeedSequence hashes the key into the state, so no two (epoch, rank) share a stream, and a
    group restarted or resumed at epoch e draws what an uninterrupted run drew at e. The sampler
    (its tumour reservoir included) is new every epoch for the same reason: a checkpoint does not
    hold it. The data order a worker sees also depends on Ray Data's parallel reads, which no seed fixes.
    On a CUDA device the augmentation draws there and the patches are cropped into page-locked memory.
    """
    augment, patches, shuffle = np.random.SeedSequence(cfg.seed, spawn_key=(epoch, rank)).spawn(3)
    cuda = device.type == "cuda"
    return EpochRandom(
        augment=torch.Generator(device=device).manual_seed(int(augment.generate_state(1, np.uint64)[0])),
        sampler=PatchBatches(crop, cfg.tumour_fraction, 16 * cfg.batch_size, np.random.default_rng(patches),
                             empty=pinned_empty if cuda else None),
        shuffle_seed=int(shuffle.generate_state(1)[0]))


@dataclass
class EpochTotals:
    loss_sum: float = 0.0
    images: int = 0
    steps: int = 0
    data_wait_s: float = 0.0
    train_s: float = 0.0
    replaced: int = 0
    slices: Optional[np.ndarray] = None  # a uniform sample of the epoch's whole slices (lits.train.precise_bn)


def train_one_epoch(ctx: EpochContext, state: TrainState, batches: Iterator[Dict[str, np.ndarray]],
                    draws: EpochRandom) -> EpochTotals:
    """Train epoch `state.epoch` over `batches` (each turned into patch batches by `draws.sampler`)
    until any worker's shard runs dry (DDP needs equal step counts) or cfg.steps_per_epoch steps;
    the rate follows `learning_rate` step by step over `ctx.steps_estimate` steps per epoch.
    `totals.slices` holds a uniform sample of up to cfg.precise_bn of the epoch's whole slices
    (`validate_with_best_statistics` recomputes BatchNorm's statistics on them)."""
    cfg, sampler = ctx.cfg, draws.sampler
    totals = EpochTotals()
    swapped_before = sampler.swapped if sampler is not None else 0
    started = time.perf_counter()
    losses = []  # device tensors: one host sync per epoch, not per step
    sample = Reservoir(cfg.precise_bn, np.random.default_rng([cfg.seed, state.epoch]))
    ctx.model.train()
    while cfg.steps_per_epoch is None or totals.steps < cfg.steps_per_epoch:
        waited = time.perf_counter()
        batch = next(batches, None)
        totals.data_wait_s += time.perf_counter() - waited
        if not ctx.collective.all_have(batch is not None):
            break
        sample.add(batch["image"])
        for patches in (sampler(batch) if sampler is not None else (batch,)):
            if cfg.steps_per_epoch is not None and totals.steps >= cfg.steps_per_epoch:
                break
            lr = learning_rate(cfg, state, totals.steps / max(1, ctx.steps_estimate))
            for group in ctx.optimizer.param_groups:
                group["lr"] = lr
            image, mask = to_tensors(patches, ctx.device, ctx.channels_last)
            loss = train_step(ctx.model, ctx.optimizer, image, mask, cfg, draws.augment, ctx.autocast, ctx.scaler)
            losses.append(loss * len(image))
            totals.images += len(image)
            totals.steps += 1
    totals.loss_sum = float(torch.stack(losses).sum()) if losses else 0.0
    totals.slices = sample.images()
    totals.train_s = time.perf_counter() - started
    totals.replaced = sampler.swapped - swapped_before if sampler is not None else 0  # this epoch's
    return totals


def validate_with_best_statistics(ctx: EpochContext, slices: Optional[np.ndarray], batches: Callable[[], Iterator[Dict]],
                                  volume_index: Dict[str, int]):
    """`validate` (with a fresh `batches()`), with whichever BatchNorm statistics validate better over
    the group: the moving average training left, or the exact ones of the epoch's final weights on
    its whole `slices` (lits.train.precise_bn); the model keeps them. Every worker calls it at the
    same point and makes the same choice. Returns (validate's result, 'moving' or 'slices')."""
    from lits.train.precise_bn import batch_norms, recalibrate

    norms = batch_norms(ctx.core)
    result = validate(ctx, batches(), volume_index)
    if not ctx.cfg.precise_bn or not norms or slices is None:
        return result, "moving"
    kept = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    to_input = lambda x: to_tensors({"image": x, "mask": x[..., 0]}, ctx.device, ctx.channels_last)[0]  # noqa: E731
    if not recalibrate(ctx.core, slices, to_input, ctx.collective.weighted_mean_, ctx.autocast):
        return result, "moving"
    again = validate(ctx, batches(), volume_index)
    before, after = ctx.collective.sum(result[0]), ctx.collective.sum(again[0])
    if after[0] / max(1.0, after[1]) <= before[0] / max(1.0, before[1]):
        return again, "slices"
    for m, (mean, var, tracked) in zip(norms, kept):
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.num_batches_tracked.copy_(tracked)
    return result, "moving"


def validate(ctx: EpochContext, batches: Iterator[Dict], volume_index: Dict[str, int]):
    """Loss and overlap counts of `ctx.core` on `batches` (this worker's part; the caller sums over
    workers). Counts accumulate on the device: one copy to the host per epoch, not one per batch.

    Args:
        volume_index: {volume id: row of `volume_counts`}.
    Returns:
        (val_loss [sum, slices], slice_sums (classes, [dice sum, iou sum]),
         volume_counts (volumes, classes, 3) intersections and sizes per volume), numpy float64.
    """
    cfg, device, model = ctx.cfg, ctx.device, ctx.core
    classes: Sequence[int] = METRIC_CLASSES[cfg.task]
    volume_counts = torch.zeros((len(volume_index), len(classes), 3), dtype=torch.float64, device=device)
    slice_sums = torch.zeros((len(classes), 2), dtype=torch.float64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    slices = 0
    loss_fn = loss_function(cfg)
    model.eval()
    with torch.no_grad():
        for batch in batches:
            image, mask = to_tensors(batch, device, ctx.channels_last)
            with ctx.autocast:
                logits = model(image)
                loss = loss_fn(logits, target(mask, cfg.task))
            loss_sum += loss.double() * len(image)
            slices += len(image)
            counts = overlap_counts(predict_labels(logits, cfg.task), mask, classes)
            dice, iou = dice_iou(counts)
            slice_sums += torch.stack([dice.sum(0), iou.sum(0)], dim=-1)
            rows = torch.tensor([volume_index[str(v)] for v in batch["volume_id"]], device=device)
            volume_counts.index_add_(0, rows, counts.double())
    val_loss = np.array([float(loss_sum), slices], dtype=np.float64)
    return val_loss, slice_sums.cpu().numpy(), volume_counts.cpu().numpy()
