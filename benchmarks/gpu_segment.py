#!/usr/bin/env python
"""GPU inference of the 31 M-parameter U-Net at 512x512 for one 512x512x500 volume (a lent H100/H200).

Needs only torch, numpy and opencv (imports lits.model.unet and lits.core.ct, no Ray, nibabel or scipy):

    python benchmarks/gpu_segment.py [--slices 500] [--batch 32]

Measures, for a synthetic HU volume: CPU preprocessing of every slice with prepare's functions
(windows + equalisation, one core), the forward passes (bf16 autocast, channels_last, uint8
probabilities back to the host, as lits.model.inference.Predictor.__call__ does), the forward passes
with the probabilities resized to 512x512 and argmaxed on the GPU, uint8 labels back to the host
(what a replica answers a volume task: Predictor.labels' torch path, lits.model.inference.labels_on_device),
and the latter with the preprocessing of chunk k+1 overlapping the GPU's work on chunk k (what a
bulk job's volume task does). --model-size 256 runs the model at 256^2 (prepare's default), so the
resize to 512 is real work. The issue's target: the whole volume in <= 3 s end to end.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lits.core import ct  # noqa: E402
from lits.model.unet import UNet  # noqa: E402


def preprocess(hu: np.ndarray, breaks: np.ndarray, zs: range) -> np.ndarray:
    return np.stack([ct.slice_image(hu, z, breaks, 0) for z in zs])


def forward(model, images: np.ndarray, labels_at: int = 0) -> np.ndarray:
    """uint8 probabilities (N, S, S, 3) on the host, or with labels_at uint8 labels (N, labels_at, labels_at)."""
    x = torch.from_numpy(images).cuda(non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        probs = torch.softmax(model(x).float(), dim=1).mul_(255).round_()
        if not labels_at:
            return probs.byte().permute(0, 2, 3, 1).cpu().numpy()
        if probs.shape[-1] != labels_at:
            probs = torch.nn.functional.interpolate(probs, size=(labels_at, labels_at), mode="bilinear", align_corners=False)
        return probs.argmax(1).byte().cpu().numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--slices", type=int, default=500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--model-size", type=int, default=512, help="the model's input size (slices are 512x512)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_segment: no CUDA device; run it on a GPU machine")
    torch.backends.cudnn.benchmark = True
    rng = np.random.default_rng(0)
    hu = rng.normal(40, 200, (args.slices, 512, 512)).clip(-1024, 3000).astype(np.int16)
    model = UNet(3, 3, 64, 5).cuda().eval().to(memory_format=torch.channels_last)

    t = time.perf_counter()
    breaks = ct.freqhist_breaks(hu)
    images = preprocess(hu, breaks, range(args.slices))
    if args.model_size != 512:
        images = np.stack([ct.resize_image(image, args.model_size) for image in images])
    t_pre = time.perf_counter() - t

    forward(model, images[: args.batch])  # warm-up (cudnn autotune)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for start in range(0, args.slices, args.batch):
        forward(model, images[start:start + args.batch])
    torch.cuda.synchronize()
    t_gpu = time.perf_counter() - t
    t = time.perf_counter()
    for start in range(0, args.slices, args.batch):
        forward(model, images[start:start + args.batch], labels_at=512)
    torch.cuda.synchronize()
    t_labels = time.perf_counter() - t

    # Overlapped: a thread preprocesses chunk k+1 while the GPU works on chunk k.
    t = time.perf_counter()
    breaks = ct.freqhist_breaks(hu)
    chunks = [range(s, min(args.slices, s + args.batch)) for s in range(0, args.slices, args.batch)]
    ready = [None] * len(chunks)
    events = [threading.Event() for _ in chunks]

    def producer():
        for i, zs in enumerate(chunks):
            ready[i] = preprocess(hu, breaks, zs)
            if args.model_size != 512:
                ready[i] = np.stack([ct.resize_image(image, args.model_size) for image in ready[i]])
            events[i].set()

    threading.Thread(target=producer, daemon=True).start()
    for i in range(len(chunks)):
        events[i].wait()
        forward(model, ready[i], labels_at=512)
    torch.cuda.synchronize()
    t_both = time.perf_counter() - t

    name = torch.cuda.get_device_name()
    print(f"\n### One 512x512x{args.slices} volume, U-Net 31 M at {args.model_size}^2, {name} (torch {torch.__version__})\n")
    print("| stage | seconds | slices/s |\n|---|---|---|")
    print(f"| preprocess (CPU, one core) | {t_pre:.2f} | {args.slices / t_pre:.0f} |")
    print(f"| forward, bf16, batch {args.batch}, probabilities to host | {t_gpu:.2f} | {args.slices / t_gpu:.0f} |")
    print(f"| forward + resize to 512 + argmax on the GPU, uint8 labels to host | {t_labels:.2f} | {args.slices / t_labels:.0f} |")
    print(f"| preprocess and forward + labels, overlapped | {t_both:.2f} | {args.slices / t_both:.0f} |")
    print("\nAdd reading (~0.5 s for 500 slices at 536 MB/s decode), post-processing and writing from "
          "benchmarks/segment.py's per-volume timings for the end-to-end figure.")


if __name__ == "__main__":
    main()
