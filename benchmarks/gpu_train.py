#!/usr/bin/env python
"""GPU training throughput of the 31 M-parameter U-Net at 256x256 (for a lent H100/H200).

Needs only torch, numpy and opencv (imports lits.model.unet and lits.train.losses, which import torch, numpy and cv2):

    python benchmarks/gpu_train.py [--batch 64] [--seconds 20]

Measures images/s of full training steps (forward, loss, backward, Adam) with bf16 autocast and
channels_last, with and without torch.compile, the card's own bf16 matmul peak, and model-FLOP
utilisation: the FLOPs of one training step per image (counted by torch's FlopCounterMode on the
model itself: forward 96.4 GFLOP at 256², forward + backward 288.8) x images/s / peak.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from lits.train.losses import ce_dice_loss  # noqa: E402
from lits.model.unet import UNet  # noqa: E402



def step_gflop(size: int = 256) -> float:
    """GFLOP of a forward + backward pass of one image (counted, not assumed; 288.8 at 256²)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = UNet(3, 3, 64, 5)
    with FlopCounterMode(display=False) as counter:
        model(torch.rand(1, 3, size, size)).sum().backward()
    return counter.get_total_flops() / 1e9


def matmul_peak(seconds: float = 3.0) -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            a @ b
        n += 10
        torch.cuda.synchronize()
    return 2 * 8192 ** 3 * n / (time.perf_counter() - t0) / 1e12


def train_rate(batch: int, seconds: float, compile_model: bool) -> float:
    torch.manual_seed(0)
    model = UNet(3, 3, 64, 5).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    step_model = torch.compile(model) if compile_model else model
    x = torch.randn(batch, 3, 256, 256, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (batch, 256, 256), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = ce_dice_loss(step_model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
        if n % 5 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return n * batch / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_train: no CUDA device; run it on a GPU machine")
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name()
    peak = matmul_peak()
    gflop = step_gflop()
    rows = []
    for compiled in ([False] if args.no_compile else [False, True]):
        rate = train_rate(args.batch, args.seconds, compiled)
        mfu = rate * gflop / 1e3 / peak
        rows.append((f"bf16 autocast, channels_last{', torch.compile' if compiled else ''}, batch {args.batch}", rate, mfu))
    print(f"\n### U-Net 31 M, 256x256 training on {name} (torch {torch.__version__}); bf16 matmul peak measured "
          f"{peak:.0f} TFLOP/s; {gflop:.1f} GFLOP per image per step\n")
    print("| configuration | images/s | model-FLOP utilisation |\n|---|---|---|")
    for label, rate, mfu in rows:
        print(f"| {label} | {rate:.0f} | {mfu:.0%} |")


if __name__ == "__main__":
    main()
