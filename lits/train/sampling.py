"""Tumour-aware batches and the learning-rate schedule of training (pure numpy; no Ray, no torch).

- `PatchBatches`: nnU-Net's patch sampling with forced foreground, for slices. Streamed batches of
  slices become batches of patches of which at least `fraction` are centred on tumour (tumour
  slices come from the batch or from a bounded reservoir of those already streamed). Works the
  same on a materialised split and on a stream of any length (memory is bounded by `capacity`
  slices), and needs no extra column: a slice has tumour when its mask holds label 2.
- `poly_lr`: nnU-Net's polynomial decay, lr * (1 - t)^0.9 over the whole run, after a linear
  warm-up.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterator, Optional, Tuple

import numpy as np

from lits.core.schema import TUMOUR


class PatchBatches:
    """Training batches of square patches, at least ceil(fraction * n) of them centred on tumour.

    Each streamed batch of full slices becomes (S // crop)^2 batches of `crop`-sized patches (an
    epoch therefore still covers as many pixels as one pass over the split, in 4x as many cheaper
    steps at crop = S / 2). In every patch batch the first ceil(fraction * n) patches are centred
    (with jitter) on a random tumour pixel of a tumour slice: one from the streamed batch, or one
    drawn from a bounded reservoir of the tumour slices streamed so far when the batch holds none.
    The other patches lie anywhere in their slice. crop = S gives whole slices (tumour slices still
    swapped in to reach the fraction).

    Args:
        crop: patch side in pixels (<= the slice side).
        fraction: least share of tumour-centred patches per batch (nnU-Net forces 1/3 foreground).
        capacity: reservoir size in slices (reservoir sampling keeps a uniform sample of all tumour
            slices streamed so far).
        rng: the only source of randomness.
        empty: `empty(shape, dtype)` -> (the array yielded, a writable numpy view of it): where the
            patches are cropped into. Default: numpy arrays; a CUDA worker passes page-locked torch
            tensors (lits.train.train_steps.pinned_empty), so the crop is the one host copy and the
            copy to the GPU is asynchronous.
    """

    def __init__(self, crop: int, fraction: float, capacity: int, rng: np.random.Generator,
                 empty: Optional[Callable[[tuple, np.dtype], tuple]] = None):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        self.crop = crop
        self.fraction = fraction
        self.capacity = capacity
        self.rng = rng
        self.empty = empty or _numpy_empty
        self.images = None  # (capacity, S, S, C) uint8, allocated on the first tumour slice
        self.masks = None
        self.filled = 0
        self.streamed = 0  # tumour slices offered to the reservoir so far
        self.swapped = 0  # tumour slices taken from the reservoir (for the metrics row)

    def _offer(self, image: np.ndarray, mask: np.ndarray) -> None:
        if self.images is None:
            self.images = np.empty((self.capacity,) + image.shape, image.dtype)
            self.masks = np.empty((self.capacity,) + mask.shape, mask.dtype)
        self.streamed += 1
        if self.filled < self.capacity:
            slot = self.filled
            self.filled += 1
        else:
            slot = int(self.rng.integers(0, self.streamed))
            if slot >= self.capacity:
                return
        self.images[slot] = image
        self.masks[slot] = mask

    def _corner(self, mask: np.ndarray, on_tumour: bool) -> Tuple[int, int]:
        side, crop = mask.shape[0], self.crop
        if on_tumour:
            ys, xs = np.nonzero(mask == TUMOUR)
            k = int(self.rng.integers(0, ys.size))
            jitter = self.rng.integers(-(crop // 4), crop // 4 + 1, size=2)
            y, x = ys[k] + jitter[0] - crop // 2, xs[k] + jitter[1] - crop // 2
        else:
            y, x = self.rng.integers(0, side - crop + 1, size=2)
        return int(np.clip(y, 0, side - crop)), int(np.clip(x, 0, side - crop))

    def __call__(self, batch: Dict[str, np.ndarray]) -> Iterator[Dict[str, np.ndarray]]:
        """Args: batch with 'image' uint8 (n, S, S, C) and 'mask' uint8 (n, S, S), numpy arrays or
        CPU tensors.
        Yields: (S // crop)^2 dicts with 'image' (n, crop, crop, C) and 'mask' (n, crop, crop) (as
        `empty` allocates them); the input is not modified."""
        image, mask = np.asarray(batch["image"]), np.asarray(batch["mask"])  # CPU tensors: no copy
        n, side = len(mask), mask.shape[1]
        if self.crop > side:
            raise ValueError(f"crop {self.crop} is larger than the slices ({side})")
        has_tumour = (mask == TUMOUR).reshape(n, -1).any(axis=1)
        if self.fraction > 0:  # the reservoir only serves forced tumour patches
            for i in np.nonzero(has_tumour)[0]:
                self._offer(image[i], mask[i])
        tumour_rows = np.nonzero(has_tumour)[0]
        forced = math.ceil(self.fraction * n) if (tumour_rows.size or self.filled) else 0
        for _ in range((side // self.crop) ** 2):
            image_out, out_image = self.empty((n, self.crop, self.crop) + image.shape[3:], image.dtype)
            mask_out, out_mask = self.empty((n, self.crop, self.crop), mask.dtype)
            order = self.rng.permutation(n)
            for j in range(n):
                src_image, src_mask = image[order[j]], mask[order[j]]
                on_tumour = j < forced
                if on_tumour and not has_tumour[order[j]]:
                    if tumour_rows.size and self.rng.random() < tumour_rows.size / (tumour_rows.size + self.filled):
                        pick = int(self.rng.choice(tumour_rows))
                        src_image, src_mask = image[pick], mask[pick]
                    else:
                        pick = int(self.rng.integers(0, self.filled))
                        src_image, src_mask = self.images[pick], self.masks[pick]
                        self.swapped += 1
                y, x = self._corner(src_mask, on_tumour)
                out_image[j] = src_image[y:y + self.crop, x:x + self.crop]
                out_mask[j] = src_mask[y:y + self.crop, x:x + self.crop]
            yield {"image": image_out, "mask": mask_out}


def _numpy_empty(shape: tuple, dtype) -> Tuple[np.ndarray, np.ndarray]:
    array = np.empty(shape, dtype)
    return array, array


def poly_lr(base_lr: float, progress: float, warmup: float = 0.0, exponent: float = 0.9) -> float:
    """Learning rate at `progress` in [0, 1] of the run.

    Linear warm-up from base_lr / 10 over the first `warmup` of the run, then nnU-Net's poly decay
    base_lr * (1 - progress) ** exponent (measured from the start of the run, as nnU-Net does).
    """
    progress = min(max(progress, 0.0), 1.0)
    if warmup > 0 and progress < warmup:
        return base_lr * (0.1 + 0.9 * progress / warmup)
    return base_lr * (1.0 - progress) ** exponent
