"""Precise BatchNorm statistics (lits.train.precise_bn): averages over an epoch's whole slices with its
final weights, and validation keeping the better of those and the moving average."""

from __future__ import annotations

import copy

import numpy as np
import torch

from lits.core.config import TrainConfig
from lits.model.unet import UNet
from lits.train.precise_bn import Reservoir, recalibrate
from lits.train.train_steps import EpochContext, EpochRandom, TrainState, to_tensors, train_one_epoch


def _input(images):
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def test_the_sample_is_uniform_and_bounded():
    """A reservoir: never more than its size; every image of a long epoch equally likely to stay."""
    kept = np.zeros(100)
    for trial in range(400):
        sample = Reservoir(10, np.random.default_rng(trial))
        for start in range(0, 100, 7):
            ids = np.arange(start, min(100, start + 7))
            sample.add(np.broadcast_to(ids[:, None, None, None], (len(ids), 2, 2, 3)).astype(np.uint8))
        assert sample.images().shape == (10, 2, 2, 3) and sample.seen == 100
        kept[sample.images()[:, 0, 0, 0]] += 1
    # each slice kept with probability 0.1: 40 of 400 trials expected; early and late slices alike
    assert kept.sum() == 4000 and 20 < kept[:10].mean() < 60 and 20 < kept[-10:].mean() < 60
    assert Reservoir(0, np.random.default_rng(0)).images().shape[0] == 0


def test_recalibration_gives_the_exact_mean_and_variance_of_the_slices():
    """The first BatchNorm's running mean and variance become its input's over all the slices,
    batch after batch (momentum None), not a moving average of the last batches."""
    torch.manual_seed(0)
    model = UNet(3, 3, 4, 2)
    images = np.random.default_rng(0).integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    images[20:] //= 4  # two populations: a moving average would lean to the last batches
    assert recalibrate(model, images, _input)
    conv, norm = model.down[0][0], model.down[0][1]
    with torch.no_grad():
        batches = [conv(_input(images[i:i + 16])) for i in range(0, 40, 16)]  # 16, 16 and 8 slices
    sizes = torch.tensor([16.0, 16.0, 8.0])
    mean = (torch.stack([b.mean((0, 2, 3)) for b in batches]) * sizes[:, None]).sum(0) / 40
    var = (torch.stack([b.var((0, 2, 3), unbiased=True) for b in batches]) * sizes[:, None]).sum(0) / 40
    assert torch.allclose(norm.running_mean, torch.cat(batches).mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(norm.running_mean, mean, atol=1e-5) and torch.allclose(norm.running_var, var, rtol=1e-4)
    assert norm.momentum == 0.1 and model.training and int(norm.num_batches_tracked) == 0  # as they were
    assert not recalibrate(UNet(3, 3, 4, 2, norm="instance"), images, _input)  # nothing to recompute


def _epoch_data():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    masks = rng.integers(0, 3, (16, 32, 32), dtype=np.uint8)
    return images, [{"image": images[i:i + 4], "mask": masks[i:i + 4]} for i in range(0, 16, 4)]


def _one_epoch(precise_bn: int):
    from lits.train.sampling import PatchBatches

    torch.manual_seed(0)
    cfg = TrainConfig(data="-", output="-", base_width=4, depth=2, batch_size=4, crop=8, augment=False,
                      precise_bn=precise_bn)
    model = UNet(3, 3, 4, 2)
    ctx = EpochContext(cfg, model, torch.optim.Adam(model.parameters(), 1e-3), torch.device("cpu"), steps_estimate=64)
    totals = train_one_epoch(ctx, TrainState(), iter(_epoch_data()[1]),
                             EpochRandom(torch.Generator().manual_seed(0), PatchBatches(8, 0.0, 64, np.random.default_rng(0))))
    return ctx, totals


def test_an_epoch_keeps_a_sample_of_its_whole_slices():
    """Whole slices (not the 8-pixel patches it trained on), all of them when they fit."""
    images, _ = _epoch_data()
    _, totals = _one_epoch(precise_bn=64)
    assert totals.slices.shape == (16, 32, 32, 3) and np.array_equal(totals.slices, images)
    assert _one_epoch(precise_bn=5)[1].slices.shape == (5, 32, 32, 3)
    assert _one_epoch(precise_bn=0)[1].slices.shape[0] == 0


def test_validation_keeps_the_statistics_that_validate_better(monkeypatch):
    """The moving average or the epoch's whole-slice statistics, whichever gives the lower val loss
    (here a stand-in loss: the first BatchNorm's mean distance to a target); the loser is undone."""
    from lits.train import train_steps

    ctx, totals = _one_epoch(precise_bn=64)
    norm = ctx.core.down[0][1]
    moving = norm.running_mean.clone()
    exact = copy.deepcopy(ctx.core)
    recalibrate(exact, totals.slices, lambda x: to_tensors({"image": x, "mask": x[..., 0]}, torch.device("cpu"), False)[0])
    assert not torch.allclose(moving, exact.down[0][1].running_mean, rtol=0.01)
    for target, expected, kept in ((exact.down[0][1].running_mean, "slices", exact.down[0][1].running_mean),
                                   (moving, "moving", moving)):
        norm.running_mean.copy_(moving)
        monkeypatch.setattr(train_steps, "validate", lambda ctx, batches, index, target=target: (
            np.array([float((ctx.core.down[0][1].running_mean - target).abs().sum()), 1.0]), None, None))
        result, chosen = train_steps.validate_with_best_statistics(ctx, totals.slices, lambda: iter(()), {})
        assert chosen == expected and torch.allclose(norm.running_mean, kept, atol=1e-6), chosen
        assert result[0][0] < 1e-5  # the result of the statistics kept
    ctx_off, totals_off = _one_epoch(precise_bn=0)
    assert train_steps.validate_with_best_statistics(ctx_off, totals_off.slices, lambda: iter(()), {})[1] == "moving"
