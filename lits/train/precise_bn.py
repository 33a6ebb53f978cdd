"""Precise BatchNorm statistics: recomputed with an epoch's final weights on its whole slices.

BatchNorm's running statistics are a moving average (momentum 0.1) over the last ~10 training
batches: patches (a crop of the slice), normalised during training with their own batch's
statistics, taken while the weights move. Validation and inference normalise whole slices with the
stored statistics, and the validation Dice jumped between neighbouring epochs, now and then to zero
for one epoch, with weights that were fine (docs/benchmarks.md#a-validation-curve-you-can-trust).
Which stored statistics suit whole slices depends on the weights: statistics recomputed on whole
slices with the final weights ("precise BN": Wu & Johnson, "Rethinking BatchNorm", 2021; fvcore's
PreciseBN) removed the collapses of one recipe and halved the Dice of another.

So each epoch keeps a uniform sample of its whole slices (`Reservoir`, at most
`TrainConfig.precise_bn` per worker), `recalibrate` computes their statistics as BatchNorm's running
average does, exactly rather than as a moving average (the mean over all of them; the variance as
the mean of each batch's, each weighted by its size), averaged over the workers weighted by their
counts, and `lits.train.train_steps.validate_with_best_statistics` validates with both and keeps
whichever validates better over the group.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import numpy as np
import torch
from torch import nn

BATCH = 16  # slices per recalibration forward pass


class Reservoir:
    """A uniform sample of at most `size` images (patches or slices) of one epoch: reservoir
    sampling, each image streamed is kept with probability size / seen, whatever the epoch's length."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.size, self.rng = size, rng
        self.kept: List[np.ndarray] = []
        self.seen = 0

    def add(self, images) -> None:
        if self.size <= 0:
            return
        images = images.numpy() if torch.is_tensor(images) else np.asarray(images)
        for image in images:
            if len(self.kept) < self.size:
                self.kept.append(image.copy())
            else:
                j = int(self.rng.integers(0, self.seen + 1))
                if j < self.size:
                    self.kept[j] = image.copy()
            self.seen += 1

    def images(self) -> np.ndarray:
        return np.stack(self.kept) if self.kept else np.zeros((0, 1, 1, 3), np.uint8)


def batch_norms(model: nn.Module) -> List[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def recalibrate(model: nn.Module, images: np.ndarray, to_input: Callable[[np.ndarray], torch.Tensor],
                weighted_mean: Optional[Callable[[List[torch.Tensor], float], None]] = None,
                autocast=None, batch_size: int = BATCH) -> bool:
    """Replace `model`'s BatchNorm running statistics by their average over `images` (uint8
    (N, S, S, C) patches or slices; `to_input` makes the model's input of a slice batch), then by the
    workers' average weighted by their N (`weighted_mean(tensors, weight)` averages in place over
    the group; every worker must call this at the same point). False (and nothing changed) when the
    model has no BatchNorm or no worker had a slice."""
    norms = batch_norms(model)
    if not norms:
        return False
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum) for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
    model.train()
    with torch.no_grad(), (autocast if autocast is not None else torch.autocast("cpu", enabled=False)):
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            for m in norms:  # running += n/(seen+n) (batch - running): the exact average weighted by slices
                m.momentum = len(batch) / (start + len(batch))
            model(to_input(batch))
    tensors = [t for m in norms for t in (m.running_mean, m.running_var)]
    weight = float(len(images))
    total = weight
    if weighted_mean is not None:
        total = weighted_mean(tensors, weight)
    for m, (mean, var, tracked, momentum) in zip(norms, saved):
        m.momentum = momentum
        m.num_batches_tracked.copy_(tracked)  # a count of training batches, not of these passes
        if total <= 0:  # no worker saw a slice: keep what was there
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
    model.train(was_training)
    return total > 0
