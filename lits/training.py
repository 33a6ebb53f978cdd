"""Ray Train data-parallel U-Net training: data checks, train_loop_per_worker, trainer, export.

- Ingest: Ray Data reads the prepared shards listed in the manifest; each worker iterates its
  shard (`get_dataset_shard`) as numpy batches; augmentation runs on the worker's device.
- Checkpoint each epoch (rank 0): model, optimizer, epoch, history, best weights. Re-running
  with the same name and output resumes from it; a lost worker restarts the group from it.
- Rank 0 rewrites OUT/metrics.csv and OUT/curves.png each epoch; the driver exports OUT/model/
  (weights.pt, a state_dict loadable with weights_only=True, then config.json) at the end.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np
import pyarrow.parquet as pq

import lits
from lits import inference, storage
from lits.config import TrainConfig
from lits.errors import UserError
from lits.schema import CLASS_NAMES, MANIFEST_NAME

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
MATERIALIZE_FRACTION = 0.25  # of the cluster's object store
METRIC_CLASSES = {"liver-tumour": (1, 2), "tumour": (2,)}


# --- before any worker starts ------------------------------------------------------------------

def check_data(cfg: TrainConfig) -> Dict:
    """Validate the prepared dataset and return what workers need to know.

    Raises:
        UserError: no manifest, empty train or val split, missing shards, wrong columns or dtypes,
            mixed image sizes.
    """
    import ray.data.extensions  # noqa: F401  (so pyarrow reads Ray's tensor columns as tensors)

    data = storage.normalise(cfg.data)
    manifest_uri = storage.join(data, MANIFEST_NAME)
    if not storage.exists(manifest_uri, cfg.s3_endpoint):
        raise UserError(f"no {MANIFEST_NAME} under {cfg.data}: run workflows/prepare.py first and pass its --output as --data")
    raw = storage.read_bytes(manifest_uri, cfg.s3_endpoint)
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
            fs, path = storage.filesystem(uri, cfg.s3_endpoint)
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
            shapes.add((_tensor_shape(schema, "image", uri), _tensor_shape(schema, "mask", uri)))
    if len(shapes) != 1:
        raise UserError(f"{cfg.data} mixes image sizes {sorted(s[0] for s in shapes)}; prepare all volumes with one --image-size")
    (image_shape, mask_shape), = shapes
    if image_shape[:2] != mask_shape or len(image_shape) != 3:
        raise UserError(f"{cfg.data}: image {image_shape} and mask {mask_shape} shapes disagree")
    factor = 2 ** (cfg.depth - 1)
    if image_shape[0] % factor or image_shape[1] % factor:
        raise UserError(f"image size {image_shape[:2]} is not divisible by 2^(depth-1) = {factor}; change --depth or --image-size")
    val_ids = sorted({v["volume_id"] for v in manifest["volumes"] if v["split"] == "val"})
    # The test split's original volumes (NIfTI input only: image datasets have no geometry).
    test_volumes = [(v["volume_id"], v["inputs"]["volume"], v["inputs"]["segmentation"]) for v in manifest["volumes"]
                    if v["split"] == "test" and v.get("format") == "nifti" and "inputs" in v]
    return {
        "image_shape": list(image_shape),
        "val_volumes": val_ids,
        "train_slices": splits["train"]["slices"],
        "manifest_sha256": hashlib.sha256(raw).hexdigest(),
        "prepare_config": manifest.get("config", {}),
        "train_uris": [storage.join(data, s) for s in splits["train"]["shards"]],
        "val_uris": [storage.join(data, s) for s in splits["val"]["shards"]],
        "test_uris": [storage.join(data, s) for s in splits.get("test", {}).get("shards", [])],
        "test_volumes": test_volumes,
    }


def _tensor_shape(schema, column: str, uri: str):
    field = schema.field(column)
    shape = getattr(field.type, "shape", None)
    dtype = str(getattr(field.type, "value_type", getattr(field.type, "scalar_type", "")))
    if shape is None or dtype != "uint8":
        raise UserError(f"{uri}: column {column} is {field.type}, expected a uint8 tensor; re-run prepare")
    return tuple(int(s) for s in shape)


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

def _to_tensors(batch, device, channels_last: bool):
    import torch

    image = torch.from_numpy(np.require(batch["image"], requirements=["C", "W"])).to(device, non_blocking=True)
    image = image.permute(0, 3, 1, 2).float().div_(255.0)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    mask = torch.from_numpy(np.require(batch["mask"], requirements=["C", "W"])).to(device, non_blocking=True).long()
    return image, mask


def _target(mask, task: str):
    return (mask == 2).long() if task == "tumour" else mask


def _predict_labels(logits, task: str):
    import torch

    if task == "tumour":
        return (torch.sigmoid(logits[:, 0].float()) > 0.5).long() * 2
    return logits.argmax(dim=1)


def _autocast(cfg: TrainConfig, device):
    import contextlib

    import torch

    if cfg.amp == "off" or device.type != "cuda":
        return contextlib.nullcontext(), None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast("cuda", dtype=dtype), scaler


def train_loop_per_worker(config: Dict) -> None:
    """One data-parallel worker: train, validate, checkpoint, report; see the module doc."""
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from lits import metrics
    from lits.augment import random_affine
    from lits.losses import bce_dice_loss, ce_dice_loss
    from lits.model import UNet

    cfg = TrainConfig(**config["cfg"])
    info = config["info"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(cfg.cpus_per_worker)
    torch.manual_seed(cfg.seed)
    channels_last = device.type == "cuda"
    model = UNet(3, cfg.classes, cfg.base_width, cfg.depth)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    state = {"epoch": 0, "history": [], "best_val_loss": math.inf, "best_epoch": -1, "best_model": None,
             "bad_epochs": 0, "plateau_scale": 1.0, "plateau_bad": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            saved = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        model.load_state_dict(saved.pop("model"))
        optimizer.load_state_dict(saved.pop("optimizer"))
        state.update(saved)
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    # Where the group runs, recorded in every metrics row (which nodes trained, e.g. after a restart).
    nodes = [ray.get_runtime_context().get_node_id()]
    if world > 1:
        nodes = [None] * world
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    nodes = ";".join(sorted(set(nodes)))
    loss_fn = bce_dice_loss if cfg.task == "tumour" else ce_dice_loss
    autocast, scaler = _autocast(cfg, device)
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    val_index = {v: i for i, v in enumerate(info["val_volumes"])}
    classes = METRIC_CLASSES[cfg.task]
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")

    def all_sum(array: np.ndarray) -> np.ndarray:
        if world == 1:
            return array
        t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64))
        dist.all_reduce(t)
        return t.numpy()

    for epoch in range(state["epoch"], cfg.epochs):
        started = time.perf_counter()
        lr = cfg.lr * (0.1 if epoch >= cfg.lr_drop_epoch else 1.0) * state["plateau_scale"]
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        loss_sum, seen, steps = 0.0, 0, 0
        batches = iter(train_shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy",
                                                local_shuffle_buffer_size=4 * cfg.batch_size,
                                                local_shuffle_seed=cfg.seed + 7919 * epoch + rank))
        data_wait = 0.0
        while cfg.steps_per_epoch is None or steps < cfg.steps_per_epoch:
            waited = time.perf_counter()
            batch = next(batches, None)
            data_wait += time.perf_counter() - waited
            # DDP needs the same number of steps on every worker: stop when any shard runs dry.
            if world > 1:
                flag = torch.tensor([0.0 if batch is None else 1.0])
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                if flag.item() == 0:
                    break
            elif batch is None:
                break
            image, mask = _to_tensors(batch, device, channels_last)
            if cfg.augment:
                image, mask = random_affine(image, mask, generator)
            with autocast:
                logits = model(image)
                loss = loss_fn(logits, _target(mask, cfg.task))
            optimizer.zero_grad(set_to_none=True)
            if scaler:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            loss_sum += float(loss.detach()) * len(image)
            seen += len(image)
            steps += 1
        train_s = time.perf_counter() - started

        core.eval()
        volume_counts = np.zeros((len(val_index), len(classes), 3))
        slice_sums = np.zeros((len(classes), 2))  # per-slice Dice sum, IoU sum
        val_loss = np.zeros(2)  # sum, slices
        with torch.no_grad():
            for batch in val_shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy"):
                image, mask = _to_tensors(batch, device, channels_last)
                with autocast:
                    logits = core(image)
                    loss = loss_fn(logits, _target(mask, cfg.task))
                val_loss += (float(loss) * len(image), len(image))
                counts = metrics.overlap_counts(_predict_labels(logits, cfg.task).cpu().numpy(), mask.cpu().numpy(), classes)
                dice, iou = metrics.dice_iou(counts)
                slice_sums[:, 0] += dice.sum(0)
                slice_sums[:, 1] += iou.sum(0)
                for vid, c in zip(batch["volume_id"], counts):
                    volume_counts[val_index[str(vid)]] += c
        train_totals = all_sum(np.array([loss_sum, seen]))
        val_loss, slice_sums, volume_counts = all_sum(val_loss), all_sum(slice_sums), all_sum(volume_counts)
        volume_dice, volume_iou = metrics.dice_iou(volume_counts)
        row = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": train_totals[0] / max(1, train_totals[1]),
            "val_loss": val_loss[0] / max(1, val_loss[1]),
            "train_images": int(train_totals[1]),
            "seconds": round(time.perf_counter() - started, 2),
            "images_per_s_per_worker": round(train_totals[1] / world / max(train_s, 1e-9), 2),
            # share of the training time a worker spent waiting for its next batch (ingest-bound if high)
            "data_wait_fraction": round(data_wait / max(train_s, 1e-9), 3),
            "nodes": nodes,
        }
        for k, c in enumerate(classes):
            name = CLASS_NAMES[c]
            row[f"val_dice_{name}_slice"] = slice_sums[k, 0] / max(1, val_loss[1])
            row[f"val_iou_{name}_slice"] = slice_sums[k, 1] / max(1, val_loss[1])
            row[f"val_dice_{name}_volume"] = float(volume_dice[:, k].mean()) if len(val_index) else float("nan")
            row[f"val_iou_{name}_volume"] = float(volume_iou[:, k].mean()) if len(val_index) else float("nan")
        row = {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in row.items()}
        improved = row["val_loss"] < state["best_val_loss"] - 1e-6
        if improved:
            state.update(best_val_loss=row["val_loss"], best_epoch=epoch + 1, bad_epochs=0, plateau_bad=0,
                         best_model={k: v.detach().cpu().clone() for k, v in core.state_dict().items()})
        else:
            state["bad_epochs"] += 1
            state["plateau_bad"] += 1
            if state["plateau_bad"] >= cfg.plateau_patience:
                state["plateau_scale"] *= 0.1
                state["plateau_bad"] = 0
        stop = state["bad_epochs"] >= cfg.patience
        row["best_epoch"] = state["best_epoch"]
        state["history"].append(row)
        state["epoch"] = epoch + 1
        if stop:
            state["epoch"] = cfg.epochs  # a resumed run does not train past early stopping
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                torch.save({**state, "model": {k: v.cpu() for k, v in core.state_dict().items()},
                            "optimizer": optimizer.state_dict(), "stopped_early": stop},
                           os.path.join(tmp, STATE_FILE))
                write_metrics(cfg, state["history"])
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({k: v for k, v in row.items() if isinstance(v, (int, float))}, checkpoint=ckpt)
        if stop:
            break


# --- outputs -----------------------------------------------------------------------------------

def write_metrics(cfg: TrainConfig, history: List[Dict]) -> None:
    """OUT/metrics.csv (one row per epoch) and OUT/curves.png, both rewritten atomically."""
    buf = io.StringIO()
    fields: List[str] = []
    for row in history:  # rows of a run resumed from an older version may lack newer columns
        fields += [k for k in row if k not in fields]
    writer = csv.DictWriter(buf, fieldnames=fields, restval="")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    out = storage.normalise(cfg.output)
    storage.write_bytes(storage.join(out, "metrics.csv"), buf.getvalue().encode(), cfg.s3_endpoint)
    storage.write_bytes(storage.join(out, "curves.png"), curves_png(history), cfg.s3_endpoint)


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


def export_model(cfg: TrainConfig, info: Dict, checkpoint) -> Dict:
    """Write OUT/model/weights.pt (best weights, a plain state_dict) then OUT/model/config.json."""
    import torch

    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
    weights = state["best_model"] or state["model"]
    test_metrics = evaluate_split(cfg, info.get("test_uris", []), weights)
    history = state["history"]
    best = next((r for r in history if r["epoch"] == state["best_epoch"]), history[-1])
    prepare = info["prepare_config"]
    architecture = {"name": "UNet", "in_channels": 3, "out_channels": cfg.classes,
                    "base_width": cfg.base_width, "depth": cfg.depth}
    config = inference.model_config(
        architecture, cfg.task, image_size=prepare.get("image_size", info["image_shape"][0]),
        context=prepare.get("context", 0),
        extra={
            "package_version": lits.__version__,
            "training": {"data": storage.normalise(cfg.data), "manifest_sha256": info["manifest_sha256"],
                         "config": cfg.to_dict(), "epochs_run": len(history), "best_epoch": state["best_epoch"]},
            "val_metrics": {k: v for k, v in best.items() if k.startswith("val_")},
            "test_metrics": {k: v for k, v in test_metrics.items() if k != "per_volume"} if test_metrics else None,
        })
    out = storage.normalise(cfg.output)
    if test_metrics:
        storage.write_bytes(storage.join(out, "test_metrics.json"), json.dumps(test_metrics, indent=1).encode(), cfg.s3_endpoint)
    inference.save_model(storage.join(out, "model"), weights, config, cfg.s3_endpoint)
    return config


def evaluate_split(cfg: TrainConfig, uris: List[str], weights: Dict, batch_size: int = 32) -> Optional[Dict]:
    """Per-volume and per-slice Dice/IoU of `weights` on the prepared slices of `uris` (in-process).

    Per-volume scores sum intersections and sizes over a volume's prepared slices (all tumour
    slices, the kept fraction of the others), at the prepared resolution.
    """
    import ray.data.extensions  # noqa: F401
    import torch

    from lits import metrics
    from lits.model import UNet

    if not uris:
        return None
    model = UNet(3, cfg.classes, cfg.base_width, cfg.depth)
    model.load_state_dict(weights)
    model.eval()
    classes = METRIC_CLASSES[cfg.task]
    per_volume: Dict[str, np.ndarray] = {}
    slice_scores = []
    with torch.no_grad():
        for uri in uris:
            table = pq.read_table(io.BytesIO(storage.read_bytes(uri, cfg.s3_endpoint)), columns=["volume_id", "image", "mask"])
            images = table.column("image").combine_chunks().to_numpy_ndarray()
            masks = table.column("mask").combine_chunks().to_numpy_ndarray()
            vids = table.column("volume_id").to_pylist()
            for start in range(0, len(vids), batch_size):
                x = torch.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2).float().div_(255.0)
                pred = _predict_labels(model(x), cfg.task).numpy()
                counts = metrics.overlap_counts(pred, masks[start:start + batch_size], classes)
                slice_scores.append(np.stack(metrics.dice_iou(counts), axis=-1))
                for vid, c in zip(vids[start:start + batch_size], counts):
                    per_volume[vid] = per_volume.get(vid, 0) + c
    slice_scores = np.concatenate(slice_scores)  # (slices, classes, [dice, iou])
    names = sorted(per_volume, key=lambda v: int(v.split("-")[1]))
    volume_dice, volume_iou = metrics.dice_iou(np.stack([per_volume[v] for v in names]))
    result = {"volumes": len(names), "slices": int(slice_scores.shape[0]), "per_volume": {}}
    for k, c in enumerate(classes):
        name = CLASS_NAMES[c]
        result[f"dice_{name}_volume"] = float(volume_dice[:, k].mean())
        result[f"iou_{name}_volume"] = float(volume_iou[:, k].mean())
        result[f"dice_{name}_slice"] = float(slice_scores[:, k, 0].mean())
        result[f"iou_{name}_slice"] = float(slice_scores[:, k, 1].mean())
    for i, v in enumerate(names):
        result["per_volume"][v] = {f"dice_{CLASS_NAMES[c]}": float(volume_dice[i, k]) for k, c in enumerate(classes)}
    return result


def _segment_test_volume(volume_id: str, volume_uri: str, model_uri: str, out: str, s3_endpoint: Optional[str]) -> Optional[str]:
    """Segment one test volume with the exported model, as serving does (a Ray task); its mask URI,
    or None when the volume cannot be read any more."""
    from lits import inference, jobs
    from lits.errors import BadInputError

    spec, weights = inference.load_spec(model_uri, s3_endpoint)
    predictor = inference.Predictor(spec, weights)
    outputs = jobs.output_uris(out, volume_id)
    try:
        inference.segment_uri(volume_uri, outputs, spec, lambda images: inference.Done(predictor(images)), s3_endpoint)
    except BadInputError as exc:
        log.warning("test volume %s: %s", volume_id, exc)
        return None
    return outputs["mask"]


def evaluate_test_volumes(cfg: TrainConfig, info: Dict) -> Optional[Dict]:
    """The exported model on the test split's whole volumes at their original resolution: segment
    each (one Ray task, on a GPU when training used GPUs) into OUT/test_evaluation/predictions/,
    then the LiTS evaluation (lits.evaluation, the code evaluate.py runs) into OUT/test_evaluation/."""
    import ray

    from lits import evaluation

    if not info.get("test_volumes"):
        return None
    out = storage.join(storage.normalise(cfg.output), "test_evaluation")
    predictions = storage.join(out, "predictions")
    model_uri = storage.join(storage.normalise(cfg.output), "model")
    resources = {"num_gpus": 1} if cfg.num_gpus else {"num_cpus": cfg.cpus_per_worker}
    task = ray.remote(max_retries=1, **resources)(_segment_test_volume)
    refs = [task.remote(vid, vol, model_uri, predictions, cfg.s3_endpoint) for vid, vol, _ in info["test_volumes"]]
    masks = ray.get(refs)
    pairs = [(vid, mask, seg, vol) for (vid, vol, seg), mask in zip(info["test_volumes"], masks) if mask]
    if not pairs:
        return None
    log.info("evaluating %d test volume(s) at their original resolution", len(pairs))
    return evaluation.evaluate_pairs({"pairs": pairs}, out, {"pred": predictions, "ref": "the prepare input's test split",
                                                            "images": None}, cfg.s3_endpoint, evaluation.run_ray)


def build_trainer(cfg: TrainConfig, info: Dict):
    """The TorchTrainer for `cfg`: datasets, scaling, storage, failures, checkpoints."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    fs, _ = storage.arrow_filesystem(cfg.data, cfg.s3_endpoint)
    strip = (lambda u: u[len("s3://"):]) if storage.is_s3(cfg.data) else (lambda u: u)
    # Shard order reshuffled every epoch (reseeded per execution), reproducibly from the seed.
    train = ray.data.read_parquet([strip(u) for u in info["train_uris"]], filesystem=fs, columns=["image", "mask"],
                                  shuffle=ray.data.FileShuffleConfig(seed=cfg.seed))
    val = ray.data.read_parquet([strip(u) for u in info["val_uris"]], filesystem=fs, columns=["volume_id", "image", "mask"])
    # A split that fits comfortably in the object store is decoded once, not every epoch: the
    # Parquet reads then stop competing with the training step for CPU (measured on 2 cores:
    # workers waited 14-24% of the time for batches without this).
    h, w, c = info["image_shape"]
    budget = ray.cluster_resources().get("object_store_memory", 0) * MATERIALIZE_FRACTION
    if info["train_slices"] * h * w * (c + 1) < budget:
        train = train.materialize()
        val = val.materialize()
    out_fs, out_path = storage.arrow_filesystem(cfg.output, cfg.s3_endpoint)
    run_config = ray.train.RunConfig(
        name=cfg.name,
        storage_path=out_path,
        storage_filesystem=out_fs,
        failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
    )
    cpus = {"CPU": cfg.cpus_per_worker}
    scaling = ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.num_gpus > 0,
                                      resources_per_worker={"GPU": 1, **cpus} if cfg.num_gpus else cpus)
    return TorchTrainer(train_loop_per_worker, train_loop_config={"cfg": cfg.to_dict(), "info": info},
                        scaling_config=scaling, run_config=run_config, datasets={"train": train, "val": val})


def claim_run(cfg: TrainConfig, info: Dict) -> bool:
    """Record which data run `cfg.name` trains on; refuse to resume it on other data.

    Returns:
        True when the run existed (training resumes from its latest checkpoint).
    Raises:
        UserError: the run was started on a different prepared dataset.
    """
    marker = storage.join(storage.normalise(cfg.output), cfg.name, "lits_run.json")
    if storage.exists(marker, cfg.s3_endpoint):
        previous = json.loads(storage.read_bytes(marker, cfg.s3_endpoint))
        if previous.get("manifest_sha256") != info["manifest_sha256"]:
            raise UserError(
                f"run {cfg.name!r} under {cfg.output} was trained on other data ({previous.get('data')}, another "
                "manifest); resuming would mix datasets: choose another --name or --output"
            )
        return True
    storage.write_bytes(marker, json.dumps({"data": storage.normalise(cfg.data), "manifest_sha256": info["manifest_sha256"],
                                            "config": cfg.to_dict()}).encode(), cfg.s3_endpoint)
    return False


def train(cfg: TrainConfig, info: Optional[Dict] = None, strict_resources: bool = True) -> Dict:
    """Check, train (resuming when the run exists), export. Ray must be initialised by the caller.

    Args:
        cfg: the stage's configuration.
        info: `check_data(cfg)` when the caller already ran it (before starting Ray).
        strict_resources: refuse a run the cluster cannot host now (False on clusters that autoscale).
    Returns:
        The exported model's config.json content.
    """
    # Workers run in other directories: every URI they see must be absolute.
    cfg = dataclasses.replace(cfg, data=storage.normalise(cfg.data), output=storage.normalise(cfg.output))
    info = info or check_data(cfg)
    storage.check_writable(cfg.output, cfg.s3_endpoint)
    check_resources(cfg, strict_resources)
    if claim_run(cfg, info):
        log.info("run %s exists under %s: resuming from its latest checkpoint", cfg.name, cfg.output)
    log.info("training %s on %d %s worker(s): %d train slices, %d val volumes", cfg.name, cfg.workers,
             "GPU" if cfg.num_gpus else "CPU", info["train_slices"], len(info["val_volumes"]))
    result = build_trainer(cfg, info).fit()
    if result.checkpoint is None:
        raise UserError(f"training produced no checkpoint under {cfg.output}/{cfg.name}")
    config = export_model(cfg, info, result.checkpoint)
    summary = evaluate_test_volumes(cfg, info)
    if summary:
        config = dict(config, test_evaluation=summary)  # returned to the caller; config.json stays as exported
    return config
