#!/usr/bin/env python
"""Training throughput on CPU: images/s per worker through Ray Train + Ray Data ingest against
the same model fed from in-memory tensors in one process, and the full-width model's speed; then
ingest alone (no model): 256² slices/s per CPU core through Ray Data and the training collate, for
both shard layouts, streamed from Parquet and materialised, and the cores one GPU needs.

    python benchmarks/train.py [--volumes 12] [--image-size 128] [--base-width 16]
    python benchmarks/train.py --ingest-only

Prints markdown tables (paste them into README).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lits.prepare import pipeline
from lits.train import training  # noqa: E402
from lits.train.augment import random_affine  # noqa: E402
from lits.core.config import PrepareConfig, SynthConfig, TrainConfig  # noqa: E402
from lits.train.losses import ce_dice_loss  # noqa: E402
from lits.model.unet import UNet  # noqa: E402
from lits.core.synthetic import synthesize  # noqa: E402


def in_memory_rate(images: np.ndarray, masks: np.ndarray, width: int, depth: int, batch: int, threads: int,
                   steps: int, warmup: int = 2) -> float:
    """Images/s of the training step (augmentation included) on tensors already in memory."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = UNet(3, 3, width, depth)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    y_all = torch.from_numpy(masks).long()
    n = len(x_all)
    for step in range(warmup + steps):
        if step == warmup:
            t0 = time.perf_counter()
        idx = torch.randint(0, n, (batch,), generator=g)
        x, y = random_affine(x_all[idx], y_all[idx], g)
        opt.zero_grad()
        ce_dice_loss(model(x), y).backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def format_one_copy(src: str, dst: str) -> None:
    """Rewrite the shards of a prepared folder with Ray tensor columns (the format-1 layout)."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowTensorArray

    from lits.core import shards

    shutil.copytree(src, dst)
    for split in ("train", "val", "test"):
        for name in (os.listdir(os.path.join(dst, split)) if os.path.isdir(os.path.join(dst, split)) else []):
            path = os.path.join(dst, split, name)
            table = pq.read_table(path)
            for column in ("image", "mask"):
                rows = shards.decode(table.column(column), shards.column_shape(table.schema, column, path))
                table = table.set_column(table.schema.get_field_index(column), column, ArrowTensorArray.from_numpy(rows))
            pq.write_table(pa.table(table.columns, names=table.column_names), path, compression="zstd",
                           compression_level=3, row_group_size=64)


def ingest_rate(files, image_shape, layout: str, materialise: bool, batch: int, passes: int = 3) -> float:
    """Slices/s delivered as uint8 torch batches by Ray Data (files read, decoded, collated)."""
    import ray.data

    from lits.train import ingest

    ds = ray.data.read_parquet(files).select_columns(["image", "mask"])
    if materialise:
        ds = ds.materialize()
    collate = ingest.SliceCollate(image_shape) if layout == "fixed" else None
    rows, started = 0, None
    for epoch in range(passes + 1):  # the first pass warms the workers and the page cache
        if epoch == 1:
            started = time.perf_counter()
        for b in ds.iter_torch_batches(batch_size=batch, collate_fn=collate, device="cpu", prefetch_batches=2):
            rows += len(b["image"]) if epoch else 0
    return rows / (time.perf_counter() - started)


def ingest_table(args) -> str:
    """Ingest alone at 256²: slices/s per core for both layouts, streamed and materialised."""
    import json

    import ray

    vol, prep = os.path.join(args.workdir, "volumes-256"), os.path.join(args.workdir, "prepared-256")
    old = prep + "-format1"
    if not os.path.exists(os.path.join(prep, "manifest.json")):
        synthesize(SynthConfig(output=vol, volumes=16, size=256, slices=128))
        pipeline.prepare(PrepareConfig(input=vol, output=prep, image_size=256, keep_liver=1.0, keep_empty=0.2,
                                       val_fraction=0.0, test_fraction=0.0), pipeline.run_local)
    if not os.path.exists(old):
        format_one_copy(prep, old)
    manifest = json.load(open(os.path.join(prep, "manifest.json")))
    shape = (256, 256, 3)
    cpus = 2
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = []
    for layout, root in (("tensor columns (format 1)", old), ("fixed_size_binary (format 2)", prep)):
        files = [os.path.join(root, s) for s in manifest["splits"]["train"]["shards"]]
        for materialise in (False, True):
            rate = ingest_rate(files, shape, "fixed" if "binary" in layout else "tensor", materialise, args.batch_size)
            per_core = rate / cpus
            rows.append([layout, "materialised" if materialise else "streamed from Parquet", f"{rate:.0f}",
                         f"{per_core:.0f}", f"{args.gpu_rate / per_core:.1f}"])
    ray.shutdown()
    slices = manifest["splits"]["train"]["slices"]
    return (f"\n### ingest alone, 256² slices ({slices} slices, {cpus} CPUs, batch {args.batch_size}, "
            f"{platform.machine()})\n\n" + _markdown(
                ["shard layout", "path", "slices/s", "slices/s per core", f"cores to feed {args.gpu_rate:.0f} img/s"], rows))


def _markdown(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--volumes", type=int, default=12)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--base-width", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workdir", default=os.path.join(ROOT, "bench-output", "train"))
    p.add_argument("--skip-full", action="store_true", help="skip the 31 M-parameter model")
    p.add_argument("--ingest-only", action="store_true", help="only the ingest table")
    p.add_argument("--gpu-rate", type=float, default=2000.0, help="images/s one GPU trains (H200, 256²)")
    args = p.parse_args()
    if args.ingest_only:
        print(ingest_table(args))
        return

    vol, prep, run = (os.path.join(args.workdir, d) for d in ("volumes", "prepared", "run"))
    if not os.path.exists(os.path.join(prep, "manifest.json")):
        synthesize(SynthConfig(output=vol, volumes=args.volumes, size=256, slices=96))
        pipeline.prepare(PrepareConfig(input=vol, output=prep, image_size=args.image_size, keep_liver=0.5,
                                       keep_empty=0.1), pipeline.run_local)
    threads = os.cpu_count() or 1
    from lits.core import shards

    train = os.path.join(prep, "train")
    tables = [shards.read_columns(open(os.path.join(train, n), "rb").read()) for n in sorted(os.listdir(train))]
    images = np.concatenate([t["image"] for t in tables])
    masks = np.concatenate([t["mask"] for t in tables])
    memory = in_memory_rate(images, masks, args.base_width, 5, args.batch_size, threads, steps=3 * len(images) // args.batch_size // 2)

    import ray

    ray.init(address="local", num_cpus=threads + 1, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    import shutil

    shutil.rmtree(run, ignore_errors=True)
    cfg = TrainConfig(data=prep, output=run, num_workers=1, cpus_per_worker=threads, epochs=args.epochs,
                      batch_size=args.batch_size, base_width=args.base_width, lr=1e-3, name="bench")
    training.train(cfg)
    ray.shutdown()
    with open(os.path.join(run, "metrics.csv")) as f:
        rates = [float(r["images_per_s_per_worker"]) for r in csv.DictReader(f)]
    ingest = max(rates[1:] or rates)  # the first epoch pays worker start-up and imports

    print(f"\n### training throughput, {platform.machine()}, {threads} cores, torch {torch.__version__}\n")
    rows = [
        [f"U-Net w{args.base_width} d5, {args.image_size}², batch {args.batch_size}, in-memory tensors, 1 process x {threads} threads",
         f"{memory:.1f}", "1.00"],
        [f"same, Ray Train worker ({threads} CPUs) fed by Ray Data (best of epochs 2..{args.epochs})", f"{ingest:.1f}",
         f"{ingest / memory:.2f}"],
    ]
    if not args.skip_full:
        rng = np.random.default_rng(0)  # the step's cost does not depend on pixel values
        full = in_memory_rate(rng.integers(0, 256, (8, 256, 256, 3), dtype=np.uint8),
                              rng.integers(0, 3, (8, 256, 256), dtype=np.uint8), 64, 5, 4, threads, steps=3, warmup=1)
        rows.append([f"U-Net w64 d5 (31 M parameters), 256², batch 4, in-memory, {threads} threads", f"{full:.2f}", "-"])
    print(_markdown(["configuration", "images/s per worker", "ingest / in-memory"], rows))
    print(ingest_table(args))


if __name__ == "__main__":
    main()
