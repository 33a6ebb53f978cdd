"""Ray Train data-parallel U-Net training: data checks, train_loop_per_worker, trainer, export.

- Ingest (lits.train.ingest): Ray Data reads the prepared shards listed in the manifest; each worker
  iterates its shard (`get_dataset_shard`) as prefetched uint8 tensor batches, crops patches
  (lits.train.sampling) and augments them on the worker's device (lits.train.train_steps).
- A worker builds one EpochContext (model, optimizer, device, collective, autocast) and, each
  epoch, its randomness from (seed, epoch, rank) alone (train_steps.epoch_random), so a resumed
  run draws what an uninterrupted one would have.
- Checkpoints (lits.train.checkpoints, rank 0) on a timer and after the last epoch, uploaded in the
  background; re-running with the same name and output resumes from the newest; a lost worker
  restarts the group from it.
- Rank 0 rewrites OUT/metrics.csv each epoch and OUT/curves.png with each checkpoint; the driver
  exports OUT/model/ (weights.pt, a state_dict loadable with weights_only=True, then config.json).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

import numpy as np

import lits
from lits.train import checkpoints, split_evaluation
from lits.model import inference
from lits.core import reports, storage
from lits.runtime import worker_logs
from lits.core.config import TrainConfig
from lits.core.errors import UserError
from lits.core.schema import CLASS_NAMES
from lits.train.train_data import DataInfo, check_data, epoch_steps, patch_size, worker_batch_size

if TYPE_CHECKING:
    from lits.train.tracking import Tracking

log = logging.getLogger(__name__)



# --- before any worker starts ------------------------------------------------------------------

def check_resources(cfg: TrainConfig, strict: bool = True) -> None:
    """UserError when the cluster lacks the GPUs or CPUs asked for; with strict=False (a cluster
    joined by address, which an autoscaler may grow) a warning instead."""
    import ray

    have = ray.cluster_resources()
    if not strict:
        if cfg.num_gpus > have.get("GPU", 0) or cfg.workers * cfg.cpus_per_worker > have.get("CPU", 0):
            log.warning("the cluster has %d GPU(s) and %d CPU(s) now, the run asks %d GPU(s) and %d CPU(s): "
                        "training starts when the autoscaler has added nodes (a fixed cluster waits forever)",
                        int(have.get("GPU", 0)), int(have.get("CPU", 0)), cfg.num_gpus, cfg.workers * cfg.cpus_per_worker)
        return
    if cfg.num_gpus > have.get("GPU", 0):
        raise UserError(f"--num-gpus {cfg.num_gpus} asked, the Ray cluster has {int(have.get('GPU', 0))} GPU(s); "
                        "lower --num-gpus, add GPU nodes, or use --num-gpus 0 --num-workers N on CPUs")
    if cfg.workers * cfg.cpus_per_worker > have.get("CPU", 0):
        raise UserError(f"{cfg.workers} worker(s) x {cfg.cpus_per_worker} CPU asked, the Ray cluster has "
                        f"{int(have.get('CPU', 0))} CPUs; lower --num-workers or --cpus-per-worker")


# --- inside each worker --------------------------------------------------------------------------

def _metrics_row(ctx, state, totals, val, started: float) -> Dict:
    """Epoch `state.epoch`'s row of OUT/metrics.csv, summed over the group (every worker calls it).

    Args:
        ctx: the worker's lits.train.train_steps.EpochContext.
        state: the TrainState the epoch started from.
        totals, val: this worker's `train_one_epoch` totals and `validate` counts.
        started: time.perf_counter() at the epoch's start.
    """
    from lits.core import metrics
    from lits.train.train_steps import METRIC_CLASSES, learning_rate

    collective, world = ctx.collective, ctx.collective.world
    train_totals = collective.sum(np.array([totals.loss_sum, totals.images, totals.replaced]))
    val_loss, slice_sums, volume_counts = (collective.sum(v) for v in val)
    volume_dice, volume_iou = metrics.dice_iou(volume_counts)
    n_volumes = len(volume_counts)
    row = {
        "epoch": state.epoch + 1,
        "lr": learning_rate(ctx.cfg, state, 0.0),
        "train_loss": train_totals[0] / max(1, train_totals[1]),
        "val_loss": val_loss[0] / max(1, val_loss[1]),
        "train_images": int(train_totals[1]),
        "steps": totals.steps,  # optimizer steps (the same on every worker)
        # slices swapped in from the tumour reservoir so every batch holds cfg.tumour_fraction tumour
        "tumour_swapped": int(train_totals[2]),
        "seconds": round(time.perf_counter() - started, 2),
        "images_per_s_per_worker": round(train_totals[1] / world / max(totals.train_s, 1e-9), 2),
        # share of the training time a worker spent waiting for its next batch (ingest-bound if high)
        "data_wait_fraction": round(totals.data_wait_s / max(totals.train_s, 1e-9), 3),
        "nodes": ctx.nodes,
    }
    for k, c in enumerate(METRIC_CLASSES[ctx.cfg.task]):
        name = CLASS_NAMES[c]
        row[f"val_dice_{name}_slice"] = slice_sums[k, 0] / max(1, val_loss[1])
        row[f"val_iou_{name}_slice"] = slice_sums[k, 1] / max(1, val_loss[1])
        row[f"val_dice_{name}_volume"] = float(volume_dice[:, k].mean()) if n_volumes else float("nan")
        row[f"val_iou_{name}_volume"] = float(volume_iou[:, k].mean()) if n_volumes else float("nan")
    return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in row.items()}


def _group_nodes(world: int) -> str:
    """The Ray node ids the worker group runs on, ';'-joined and sorted (every worker calls it)."""
    import ray
    import torch.distributed as dist

    nodes = [ray.get_runtime_context().get_node_id()]
    if world > 1:
        nodes = [None] * world
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    return ";".join(sorted(set(nodes)))


def train_loop_per_worker(config: Dict) -> None:
    """One data-parallel worker: train, validate, checkpoint, report; see the module doc."""
    import ray.train
    import ray.train.torch
    import torch

    from lits.train import ingest
    from lits.train.train_steps import (Collective, EpochContext, TrainState, autocast_for, epoch_random,
                                        schedule_step, train_one_epoch, validate_with_best_statistics)

    cfg = TrainConfig(**config["cfg"])
    info = config["info"]
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(cfg.cpus_per_worker)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed patch and batch shapes: autotune each convolution once
    model, core, optimizer, saved = checkpoints.setup_model(cfg, device, ray.train.torch.prepare_model, ray.train.get_checkpoint())
    state, history, best = TrainState(), [], checkpoints.BestWeights(cfg)
    if saved:
        state, history = checkpoints.restored_state(saved), saved["history"]
    resumed_from = state.epoch if saved else None
    state = dataclasses.replace(state, starts=state.starts + 1)
    crop = patch_size(cfg, info.image_shape[0])
    autocast, scaler = autocast_for(cfg, device)
    ctx = EpochContext(cfg=cfg, model=model, optimizer=optimizer, device=device, steps_estimate=epoch_steps(cfg, info),
                       collective=Collective(device, world), autocast=autocast, scaler=scaler,
                       channels_last=device.type == "cuda", nodes=_group_nodes(world))
    val_index = {v: i for i, v in enumerate(info.val_volumes)}
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")

    last_saved = time.monotonic()
    while state.epoch < cfg.epochs and not state.stopped_early:
        started = time.perf_counter()
        draws = epoch_random(cfg, crop, state.epoch, rank, device)
        batches = iter(ingest.batches(train_shard, cfg, info, shuffle_seed=draws.shuffle_seed))
        totals = train_one_epoch(ctx, state, batches, draws)
        val, statistics = validate_with_best_statistics(ctx, totals.slices, lambda: ingest.batches(val_shard, cfg, info),
                                                        val_index)
        row = _metrics_row(ctx, state, totals, val, started)
        row["bn_statistics"] = statistics
        state, improved = schedule_step(state, row["val_loss"], cfg)
        if improved:
            best.improved(core)
        row.update(best_epoch=state.best_epoch, group_start=state.starts,
                   resumed_from_epoch="" if resumed_from is None else resumed_from)
        history.append(row)
        last = state.epoch >= cfg.epochs or state.stopped_early
        save = last or time.monotonic() - last_saved >= cfg.checkpoint_interval_s
        if save:
            last_saved = time.monotonic()
            if rank == 0:
                state = best.write(state)
        if rank == 0:
            write_metrics(cfg, history, curves=save)
            log.info(epoch_line(row, cfg.epochs))
        checkpoints.report_epoch(row, rank, save, lambda: {
            **state.to_dict(), "history": history,
            "model": {k: v.cpu() for k, v in core.state_dict().items()}, "optimizer": optimizer.state_dict()})
    best.wait()  # the exported model reads the last best weights once the workers have returned


# --- outputs -----------------------------------------------------------------------------------

def epoch_line(row: Dict, epochs: int) -> str:
    """One epoch for the console: 'epoch 12/30: loss 0.833 train, 0.943 val; val Dice liver 0.958,
    tumour 0.000 (per volume); 57 img/s per worker; 4.8 s; best epoch 12'."""
    dice = ", ".join(f"{k[len('val_dice_'):-len('_volume')]} {row[k]:.3f}" for k in row
                     if k.startswith("val_dice_") and k.endswith("_volume"))
    return (f"epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.3f} train, {row['val_loss']:.3f} val; "
            f"val Dice {dice} (per volume); {row['images_per_s_per_worker']:.0f} img/s per worker; "
            f"{row['seconds']:.1f} s; best epoch {row['best_epoch']}")


def write_metrics(cfg: TrainConfig, history: List[Dict], curves: bool = True) -> None:
    """OUT/metrics.csv (one row per epoch) and, with `curves`, OUT/curves.png, rewritten atomically."""
    out = storage.normalise(cfg.output)
    storage.write_bytes(storage.join(out, "metrics.csv"), reports.csv_bytes(history, ".6g"))
    if curves:
        storage.write_bytes(storage.join(out, "curves.png"), curves_png(history))


def curves_png(history: List[Dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].plot(epochs, [r["train_loss"] for r in history], label="train")
    axes[0].plot(epochs, [r["val_loss"] for r in history], label="val")
    axes[0].set(xlabel="epoch", ylabel="loss", title="loss")
    axes[0].legend()
    for key in history[0]:
        if key.startswith("val_dice_"):
            axes[1].plot(epochs, [r[key] for r in history], label=key[len("val_dice_"):].replace("_", " "))
    axes[1].set(xlabel="epoch", ylabel="Dice", title="validation Dice", ylim=(0, 1))
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def export_model(cfg: TrainConfig, info: DataInfo, checkpoint) -> Dict:
    """Write OUT/model/weights.pt (best weights, a plain state_dict) then OUT/model/config.json."""
    state = checkpoints.load_state(checkpoint)
    weights = checkpoints.best_weights(state)
    if cfg.num_gpus and info.test_uris:  # the 31 M model takes minutes on the driver's CPU
        import ray

        task = ray.remote(num_gpus=1, max_retries=1)(split_evaluation.evaluate_split)
        test_metrics = ray.get(task.remote(cfg, info.test_uris, weights))
    else:
        test_metrics = split_evaluation.evaluate_split(cfg, info.test_uris, weights)
    history = state["history"]
    best = next((r for r in history if r["epoch"] == state["best_epoch"]), history[-1])
    prepare = info.prepare_config
    architecture = {"name": "UNet", "in_channels": 3, "out_channels": cfg.classes,
                    "base_width": cfg.base_width, "depth": cfg.depth, "norm": cfg.norm}
    model_uri = storage.join(storage.normalise(cfg.output), "model")
    config = inference.model_config(
        architecture, cfg.task, image_size=prepare.get("image_size", info.image_shape[0]),
        context=prepare.get("context", 0), roi=bool(prepare.get("roi")),
        extra={
            **({"first_stage": copy_first_stage(cfg.first_stage, model_uri)} if cfg.first_stage else {}),
            "package_version": lits.__version__,
            "training": {"data": storage.normalise(cfg.data), "manifest_sha256": info.manifest_sha256,
                         "config": cfg.to_dict(), "epochs_run": len(history), "best_epoch": state["best_epoch"]},
            "val_metrics": {k: v for k, v in best.items() if k.startswith("val_")},
            "test_metrics": {k: v for k, v in test_metrics.items() if k != "per_volume"} if test_metrics else None,
        })
    out = storage.normalise(cfg.output)
    if test_metrics:
        storage.write_bytes(storage.join(out, "test_metrics.json"), json.dumps(test_metrics, indent=1).encode())
    inference.save_model(model_uri, weights, config)
    return config


FIRST_STAGE_FOLDER = "first_stage"


def copy_first_stage(first_stage: str, model_uri: str) -> str:
    """Copy the first stage's model (weights, then config.json) into MODEL/first_stage: a cascade is
    one folder that serves and moves as one. Returns the folder's name, relative to the model."""
    from lits.model.inference import CONFIG_NAME, WEIGHTS_NAME

    source = storage.normalise(first_stage)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        data = storage.read_bytes(storage.join(source, name))
        storage.write_bytes(storage.join(model_uri, FIRST_STAGE_FOLDER, name), data)
    return FIRST_STAGE_FOLDER


def build_trainer(cfg: TrainConfig, info: DataInfo, callbacks: Sequence = ()):
    """The TorchTrainer for `cfg`: datasets (materialised, if at all, where the workers are placed:
    ingest.PlacedIngest), scaling, storage, failures, checkpoints, Ray Train callbacks."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from lits.train import ingest

    train, val, _ = ingest.datasets(cfg, info)
    out_fs, out_path = storage.arrow_filesystem(cfg.output)
    run_config = ray.train.RunConfig(
        name=cfg.name,
        storage_path=out_path,
        storage_filesystem=out_fs,
        failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        # Ray Train's own INFO records (every report's metrics dict) only under --verbose: the
        # per-epoch line (epoch_line) says what a user watches
        logging_config=ray.train.LoggingConfig(log_level=worker_logs.ray_level()),
        callbacks=list(callbacks),
    )
    cpus = {"CPU": cfg.cpus_per_worker}
    scaling = ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.num_gpus > 0,
                                      resources_per_worker={"GPU": 1, **cpus} if cfg.num_gpus else cpus)
    return TorchTrainer(train_loop_per_worker, train_loop_config={"cfg": cfg.to_dict(), "info": info},
                        scaling_config=scaling, run_config=run_config, datasets={"train": train, "val": val},
                        dataset_config=ingest.PlacedIngest(cfg, info))


def claim_run(cfg: TrainConfig, info: DataInfo) -> bool:
    """Record which data run `cfg.name` trains on; refuse to resume it on other data.

    Returns:
        True when the run existed (training resumes from its latest checkpoint).
    Raises:
        UserError: the run was started on a different prepared dataset.
    """
    marker = storage.join(storage.normalise(cfg.output), cfg.name, "lits_run.json")
    if storage.exists(marker):
        previous = json.loads(storage.read_bytes(marker))
        if previous.get("manifest_sha256") != info.manifest_sha256:
            raise UserError(
                f"run {cfg.name!r} under {cfg.output} was trained on other data ({previous.get('data')}, another "
                "manifest); resuming would mix datasets: choose another --name or --output"
            )
        return True
    storage.write_bytes(marker, json.dumps({"data": storage.normalise(cfg.data), "manifest_sha256": info.manifest_sha256,
                                            "config": cfg.to_dict()}).encode())
    return False


def train(cfg: TrainConfig, info: Optional[DataInfo] = None, strict_resources: bool = True,
          tracking: Optional["Tracking"] = None) -> Dict:
    """Check, train (resuming when the run exists), export. Ray must be initialised by the caller.

    Args:
        cfg: the stage's configuration.
        info: `check_data(cfg)` when the caller already ran it (before starting Ray).
        strict_resources: refuse a run the cluster cannot host now (False on clusters that autoscale).
        tracking: an MLflow store to log the run to (lits.train.tracking), or None.
    Returns:
        The exported model's config.json content.
    """
    # Workers run in other directories: every URI they see must be absolute.
    cfg = dataclasses.replace(cfg, data=storage.normalise(cfg.data), output=storage.normalise(cfg.output))
    worker_batch_size(cfg)
    info = info or check_data(cfg)
    storage.check_writable(cfg.output)
    check_resources(cfg, strict_resources)
    if claim_run(cfg, info):
        log.info("run %s exists under %s: resuming from its latest checkpoint", cfg.name, cfg.output)
    log.info("training %s on %d %s worker(s): %d train slices, %d val volumes", cfg.name, cfg.workers,
             "GPU" if cfg.num_gpus else "CPU", info.train_slices, len(info.val_volumes))
    callbacks, run_id = [], None
    if tracking is not None:
        from lits.train import tracking as mlflow_tracking

        run_id = mlflow_tracking.start_run(tracking, cfg)
        callbacks.append(mlflow_tracking.EpochLogger(tracking, run_id))
    try:
        result = build_trainer(cfg, info, callbacks).fit()
        if result.checkpoint is None:
            raise UserError(f"training produced no checkpoint under {cfg.output}/{cfg.name}")
        config = export_model(cfg, info, result.checkpoint)
        summary = split_evaluation.evaluate_test_volumes(cfg, info)
    except BaseException:
        if run_id is not None:
            try:
                mlflow_tracking.finish(tracking, run_id, cfg, "FAILED")
            except Exception as exc:  # the training error is the one to see
                log.warning("MLflow: run %s not marked failed: %s", run_id, exc)
        raise
    if summary:
        config = dict(config, test_evaluation=summary)  # returned to the caller; config.json stays as exported
    if run_id is not None:
        mlflow_tracking.finish(tracking, run_id, cfg)
    return config
