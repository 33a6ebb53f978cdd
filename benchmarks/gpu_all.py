#!/usr/bin/env python
"""The GPU numbers of the product's own code, in one run on a lent card (torch, numpy, opencv only).

    python benchmarks/gpu_all.py                # on a CUDA machine: tables to paste into docs/benchmarks.md
    python benchmarks/gpu_all.py --smoke        # the same paths at tiny sizes on the CPU (the fast suite runs it)

What runs is production code, imported, not a copy (no Ray, nibabel, scipy or fsspec is imported):
  - training: `lits.train.train_steps.train_one_epoch` over `PatchBatches` (the worker's patch
    sampler, `epoch_random`'s, cropping into page-locked memory on a card), with augmentation,
    `autocast_for`'s precision, channels_last and cudnn.benchmark as a CUDA worker has them, at the
    default batch (TrainConfig.batch_size) and patch (train_data.patch_size) of prepare's default
    slices. Reported: images/s, model-FLOP utilisation (FLOPs of one step per image, counted by
    torch's FlopCounterMode on the model, x images/s / the card's bf16 matmul peak measured here),
    and the step's split: data (cropping and the copy to the device, timed alone), compute (the
    rest of the step) and the all-reduce of the model's gradients (timed alone: DDP overlaps part of
    it with the backward pass, so compute + all-reduce is an upper bound of a 2-worker step);
  - the all-reduce: float32 gradients of the model's size, 2 processes over NCCL when the machine
    has 2 or more GPUs, else one process (a one-rank group: what a lone card pays) — over gloo on
    the CPU with --smoke;
  - serving: `lits.model.inference.Predictor` (mirroring on, labels upsampled and argmaxed on the
    device, uint8 labels back to the host, as a Serve replica answers) over one 512x512x500 volume
    preprocessed at the model's size, for a sweep of serving batch sizes: volumes/s and slices/s.
--smoke numbers are CPU numbers of toy sizes: they check the script, they measure nothing.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lits.core.config import PrepareConfig, TrainConfig  # noqa: E402
from lits.model.inference import ModelSpec, Predictor  # noqa: E402
from lits.model.unet import UNet, count_parameters  # noqa: E402
from lits.train.train_data import patch_size  # noqa: E402
from lits.train.train_steps import (EpochContext, TrainState, autocast_for, epoch_random, to_tensors,  # noqa: E402
                                    train_one_epoch)


@dataclass(frozen=True)
class Sizes:
    slice_side: int  # prepared slices (the model's size)
    width: int
    depth: int
    batch: int
    steps: int  # timed training steps
    volume_slices: int
    volume_side: int  # the volume's slice size: labels come back at it
    serve_batches: tuple
    matmul: int
    grad_world: int  # processes of the all-reduce


def sizes(args) -> Sizes:
    if args.smoke:
        return Sizes(32, 4, 3, 4, 8, 6, 64, (2, 4), 256, 2)
    cfg = TrainConfig(data="-", output="-")
    world = 2 if torch.cuda.device_count() >= 2 else 1
    return Sizes(PrepareConfig(input="-", output="-").image_size, cfg.base_width, cfg.depth, args.batch or cfg.batch_size,
                 args.steps, 500, 512, tuple(args.serve_batches), 8192, world)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, n: int, seconds: float) -> float:
    """Measured bf16 matmul TFLOP/s of the device (n x n x n products)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b
    sync(device)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            a @ b
        count += 10
        sync(device)
    return 2 * n ** 3 * count / (time.perf_counter() - t0) / 1e12


def step_gflop(s: Sizes, crop: int, device: torch.device) -> float:
    """GFLOP of a forward + backward pass of one crop x crop image (counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = UNet(3, 3, s.width, s.depth).to(device)
    with FlopCounterMode(display=False) as counter:
        model(torch.rand(1, 3, crop, crop, device=device)).sum().backward()
    return counter.get_total_flops() / 1e9


def slices(s: Sizes, n: int, seed: int = 0) -> dict:
    """n prepared-like slices: uint8 images (n, S, S, 3), masks with liver and a tumour (n, S, S)."""
    rng = np.random.default_rng(seed)
    side = s.slice_side
    image = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    mask = np.zeros((n, side, side), np.uint8)
    mask[:, side // 4: 3 * side // 4, side // 4: 3 * side // 4] = 1
    mask[:, side // 2 - side // 16: side // 2 + side // 16, side // 2 - side // 16: side // 2 + side // 16] = 2
    return {"image": torch.from_numpy(image), "mask": torch.from_numpy(mask)}  # CPU tensors, as Ray's collate


def train_rates(s: Sizes, device: torch.device) -> dict:
    """Training images/s and the step's split, through train_one_epoch."""
    cfg = TrainConfig(data="-", output="-", batch_size=s.batch, base_width=s.width, depth=s.depth)
    crop = patch_size(cfg, s.slice_side)
    per_batch = (s.slice_side // crop) ** 2  # patch batches per streamed batch of slices
    streamed = slices(s, s.batch)
    torch.manual_seed(cfg.seed)
    model = UNet(3, cfg.classes, cfg.base_width, cfg.depth, cfg.norm)
    cuda = device.type == "cuda"
    model = (model.to(memory_format=torch.channels_last) if cuda else model).to(device)  # as setup_model places it
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    autocast, scaler = autocast_for(cfg, device)

    def epoch(steps: int, number: int):
        run = TrainConfig(**{**cfg.to_dict(), "steps_per_epoch": steps})
        ctx = EpochContext(run, model, optimizer, device, steps_estimate=steps, autocast=autocast, scaler=scaler,
                           channels_last=cuda)
        batches = iter([streamed] * (steps // per_batch + 1))
        sync(device)
        return train_one_epoch(ctx, TrainState(epoch=number), batches, epoch_random(run, crop, number, 0, device))

    epoch(max(2, s.steps // 4), 0)  # warm-up: cudnn autotuning, the caching allocators
    totals = epoch(s.steps, 1)
    step_s = totals.train_s / totals.steps
    # data alone: the worker's cropping and copy to the device, for as many steps
    sampler = epoch_random(cfg, crop, 2, 0, device).sampler
    sync(device)
    t0, done = time.perf_counter(), 0
    while done < totals.steps:
        for patches in sampler(streamed):
            to_tensors(patches, device, cuda)
            done += 1
    sync(device)
    data_s = (time.perf_counter() - t0) / done
    return {"crop": crop, "images_per_s": totals.images / totals.train_s, "step_s": step_s, "data_s": data_s,
            "params": count_parameters(model), "steps": totals.steps}


def _allreduce_worker(rank: int, world: int, port: int, numel: int, cuda: bool, repeats: int, results) -> None:
    import torch.distributed as dist

    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        grads = torch.ones(numel, dtype=torch.float32, device=device)
        for _ in range(3):
            dist.all_reduce(grads)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            dist.all_reduce(grads)
        sync(device)
        results[rank] = (time.perf_counter() - t0) / repeats
    finally:
        dist.destroy_process_group()


def allreduce_s(numel: int, world: int, cuda: bool, repeats: int) -> float:
    """Seconds of one all-reduce of `numel` float32 over `world` processes (the slowest rank's)."""
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    if world == 1:
        results = {}
        _allreduce_worker(0, 1, port, numel, cuda, repeats, results)
        return results[0]
    results = mp.Manager().dict()
    mp.spawn(_allreduce_worker, args=(world, port, numel, cuda, repeats, results), nprocs=world, join=True)
    return max(results.values())


def serve_rates(s: Sizes, device: torch.device) -> list:
    """(batch, seconds per volume) of Predictor.labels over one volume, mirroring on."""
    model = UNet(3, 3, s.width, s.depth)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    spec = ModelSpec(uri="(benchmark)", model_id="0" * 16, task="liver-tumour", out_channels=3, base_width=s.width,
                     depth=s.depth, image_size=s.slice_side, context=0, mirror=True)
    volume = slices(s, s.volume_slices, seed=1)["image"].numpy()
    rows = []
    for batch in s.serve_batches:
        predictor = Predictor(spec, buf.getvalue(), device=device.type, max_batch=batch, tta=True)
        predictor.labels([volume[:batch]], [(s.volume_side, s.volume_side)])  # warm-up (cudnn autotuning)
        sync(device)
        t0 = time.perf_counter()
        for start in range(0, len(volume), batch):
            labels, _ = predictor.labels([volume[start:start + batch]], [(s.volume_side, s.volume_side)])[0]
        sync(device)
        assert labels.dtype == np.uint8 and labels.shape[1:] == (s.volume_side, s.volume_side)
        rows.append((batch, time.perf_counter() - t0))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (checks the script; measures nothing)")
    p.add_argument("--batch", type=int, default=0, help="training batch (default: TrainConfig's)")
    p.add_argument("--steps", type=int, default=60, help="timed training steps")
    p.add_argument("--serve-batches", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    args = p.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        sys.exit("gpu_all: no CUDA device; run it on a GPU machine (or --smoke to check the script on the CPU)")
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True  # as a CUDA training worker sets it
    s = sizes(args)
    card = (f"{torch.cuda.get_device_name(device)} x{torch.cuda.device_count()}" if cuda
            else "CPU (--smoke: toy sizes, not a GPU number)")
    peak = matmul_peak(device, s.matmul, 0.5 if args.smoke else 3.0)
    train = train_rates(s, device)
    gflop = step_gflop(s, train["crop"], device)
    grad_s = allreduce_s(train["params"], s.grad_world, cuda, 3 if args.smoke else 20)
    serve = serve_rates(s, device)
    report(s, card, peak, gflop, train, grad_s, serve)


def report(s: Sizes, card: str, peak: float, gflop: float, train: dict, grad_s: float, serve: list) -> None:
    print(f"\n### {card}; torch {torch.__version__}; bf16 matmul peak measured {peak:.3g} TFLOP/s\n")
    print(f"U-Net {train['params'] / 1e6:.2f} M parameters (width {s.width}, depth {s.depth}); training on "
          f"{train['crop']}x{train['crop']} patches of {s.slice_side}x{s.slice_side} slices, batch {s.batch}, "
          f"augmentation on; {gflop:.4g} GFLOP per image per step\n")
    mfu = train["images_per_s"] * gflop / 1e3 / peak
    print("| training | img/s | model-FLOP utilisation | step ms | data ms | compute ms | all-reduce ms |")
    print("|---|---|---|---|---|---|---|")
    print(f"| train_one_epoch, {train['steps']} steps | {train['images_per_s']:.1f} | {mfu:.1%} | "
          f"{train['step_s'] * 1e3:.1f} | {train['data_s'] * 1e3:.1f} | {(train['step_s'] - train['data_s']) * 1e3:.1f} | "
          f"{grad_s * 1e3:.1f} |")
    grad_mb = train["params"] * 4 / 1e6
    print(f"\nall-reduce of {grad_mb:.3g} MB of float32 gradients over {s.grad_world} process(es): "
          f"{grad_s * 1e3:.2f} ms\n")
    print(f"| serving batch | volumes/s | slices/s | s per {s.volume_side}x{s.volume_side}x{s.volume_slices} volume |")
    print("|---|---|---|---|")
    for batch, seconds in serve:
        print(f"| {batch} | {1 / seconds:.3f} | {s.volume_slices / seconds:.1f} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
