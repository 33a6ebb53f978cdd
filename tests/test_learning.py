"""Does training learn? The product's own step (lits.train.train_steps: patch sampler, loss, schedule,
augmentation) for a few dozen seeded steps on synthetic slices, in one process, no Ray.

Fails when the optimizer does not step, the loss does not reach the gradients, the sampler loses
the masks' alignment with the images, or the rate schedule is zero.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lits.core import ct, metrics
from lits.core.config import TrainConfig
from lits.model.unet import UNet
from lits.train.sampling import PatchBatches
from lits.core.synthetic import make_phantom
from lits.train.train_steps import (EpochContext, TrainState, autocast_for, epoch_random, predict_labels, to_tensors,
                                    train_one_epoch, train_step)

SIZE = 64


@pytest.fixture(scope="module")
def slices():
    """Liver slices of two seeded phantoms at 64 x 64: (images uint8 (N, 64, 64, 3), masks uint8 (N, 64, 64))."""
    images, masks = [], []
    for seed in (1, 2):
        phantom = make_phantom(np.random.default_rng(seed), size=SIZE, slices=24)
        zs = np.nonzero(phantom.labels.max(axis=(1, 2)) > 0)[0]
        images.append(ct.model_inputs(phantom.hu, zs, ct.freqhist_breaks(phantom.hu), 0, SIZE))
        masks.append(phantom.labels[zs])
    return np.concatenate(images), np.concatenate(masks)


def liver_dice(model, images, masks) -> float:
    model.eval()
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        pred = predict_labels(model(x), "liver-tumour").numpy()
    counts = metrics.overlap_counts(pred[None], masks[None], (1,))
    return float(metrics.dice_iou(counts)[0][0, 0])


def train(slices, steps_per_epoch: int = 25, epochs: int = 6):
    images, masks = slices
    torch.manual_seed(0)
    torch.set_num_threads(2)
    cfg = TrainConfig(data="-", output="-", epochs=epochs, batch_size=8, base_width=8, depth=3, lr=3e-3, crop=32)
    model = UNet(3, 3, cfg.base_width, cfg.depth, cfg.norm)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    ctx = EpochContext(TrainConfig(**{**cfg.to_dict(), "steps_per_epoch": steps_per_epoch}), model, optimizer,
                       torch.device("cpu"), steps_estimate=steps_per_epoch)
    rng = np.random.default_rng(0)
    before = liver_dice(model, images, masks)
    losses = []
    state = TrainState()
    for epoch in range(epochs):
        def batches():
            while True:
                idx = rng.integers(0, len(images), size=8)
                yield {"image": images[idx], "mask": masks[idx]}
        totals = train_one_epoch(ctx, state, batches(), epoch_random(cfg, 32, epoch, rank=0))
        losses.append(totals.loss_sum / totals.images)
        state = TrainState(epoch=epoch + 1)
    return before, liver_dice(model, images, masks), losses


def test_training_learns_liver(slices):
    before, after, losses = train(slices)
    # seeded, measured: loss per epoch 2.03 -> 1.09, liver Dice 0.12 -> 0.91 (150 steps)
    assert losses[-1] < 0.65 * losses[0], losses
    assert after > 0.85 and after > before + 0.5, (before, after)


def test_patches_keep_image_and_mask_aligned():
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 64, 64), np.uint8)
    masks[:, 20:40, 20:40] = 1
    masks[0, 28:32, 28:32] = 2
    images = np.repeat(masks[..., None] * 100, 3, axis=-1).astype(np.uint8)
    sampler = PatchBatches(32, 0.5, 8, rng)
    for out in sampler({"image": images, "mask": masks}):
        assert out["image"].shape == (4, 32, 32, 3) and out["mask"].shape == (4, 32, 32)
        np.testing.assert_array_equal(out["image"][..., 0], out["mask"] * 100)
        # at least half of every batch is centred on tumour (only slice 0 has any)
        assert (out["mask"] == 2).reshape(4, -1).any(axis=1).sum() >= 2
    assert sampler.filled == 1
    # a batch without tumour still gets tumour patches from the reservoir
    outs = list(sampler({"image": images[1:], "mask": masks[1:]}))
    assert len(outs) == 4 and all((o["mask"] == 2).reshape(3, -1).any(axis=1).sum() >= 2 for o in outs)
    assert sampler.swapped >= 8


def test_patches_go_where_the_allocator_says_with_the_same_values():
    """A CUDA worker crops into page-locked tensors (train_steps.pinned_empty): the batches are the
    allocator's objects, and hold what numpy's would with the same seed."""
    rng = np.random.default_rng(3)
    batch = {"image": rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
             "mask": rng.integers(0, 3, (4, 32, 32), dtype=np.uint8)}

    def tensors(shape, dtype):
        t = torch.empty(shape, dtype=torch.from_numpy(np.empty(0, dtype)).dtype)
        return t, t.numpy()

    plain = list(PatchBatches(16, 0.5, 8, np.random.default_rng(0))(batch))
    into = list(PatchBatches(16, 0.5, 8, np.random.default_rng(0), empty=tensors)(batch))
    assert len(plain) == len(into) == 4
    for a, b in zip(plain, into):
        assert torch.is_tensor(b["image"]) and torch.is_tensor(b["mask"])
        np.testing.assert_array_equal(a["image"], b["image"].numpy())
        np.testing.assert_array_equal(a["mask"], b["mask"].numpy())


def test_the_affine_is_drawn_and_built_on_the_images_device(monkeypatch):
    """No tensor is moved between devices inside the augmentation (on a GPU each move was a
    blocking host-to-device copy per step); a generator on another device is refused."""
    from lits.train.augment import random_affine

    moves, to = [], torch.Tensor.to

    def counted(t, *args, **kwargs):
        if any(isinstance(a, (torch.device, str)) for a in args) or "device" in kwargs:
            moves.append(args)
        return to(t, *args, **kwargs)

    image, mask = torch.rand(2, 3, 16, 16), torch.randint(0, 3, (2, 16, 16))
    monkeypatch.setattr(torch.Tensor, "to", counted)
    out_image, out_mask = random_affine(image, mask, torch.Generator().manual_seed(0))
    assert moves == [] and out_image.shape == image.shape and out_mask.dtype == torch.int64
    with pytest.raises(ValueError, match="generator"):
        random_affine(image.to("meta"), mask.to("meta"), torch.Generator())


@pytest.mark.parametrize("bf16", [True, False])
def test_gpu_branches_of_the_step_run_on_cpu(slices, bf16):
    """The lines a GPU run takes first (autocast, the fp16 GradScaler branch, channels_last, pinned
    copies skipped on CPU) run here too, so a first GPU run is not their first run."""
    images, masks = slices
    torch.manual_seed(0)
    cfg = TrainConfig(data="-", output="-", batch_size=4, base_width=4, depth=3, lr=1e-3)
    model = UNet(3, 3, cfg.base_width, cfg.depth, cfg.norm).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    autocast, scaler = autocast_for(cfg, torch.device("cpu"), bf16=bf16)
    assert (scaler is None) == bf16  # fp16 needs a GradScaler, bf16 does not
    image, mask = to_tensors({"image": images[:4], "mask": masks[:4]}, torch.device("cpu"), channels_last=True)
    assert image.is_contiguous(memory_format=torch.channels_last) and image.dtype == torch.float32
    before = [p.detach().clone() for p in model.parameters()]
    loss = train_step(model, optimizer, image, mask, cfg, torch.Generator().manual_seed(0), autocast, scaler)
    assert torch.isfinite(loss) and loss.item() > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert autocast_for(TrainConfig(data="-", output="-", amp="off"), torch.device("cpu"), bf16=True)[1] is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_step_on_cuda_learns_with_its_own_autocast(slices):
    """On a GPU machine: the step with the device's own autocast choice, pinned copies and
    channels_last lowers the loss (the same step the CPU tests run)."""
    images, masks = slices
    device = torch.device("cuda")
    torch.manual_seed(0)
    cfg = TrainConfig(data="-", output="-", batch_size=8, base_width=8, depth=3, lr=3e-3)
    model = UNet(3, 3, cfg.base_width, cfg.depth, cfg.norm).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    autocast, scaler = autocast_for(cfg, device)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for step in range(60):
        idx = np.arange(step * 8, step * 8 + 8) % len(images)
        image, mask = to_tensors({"image": images[idx], "mask": masks[idx]}, device, channels_last=True)
        losses.append(float(train_step(model, optimizer, image, mask, cfg, generator, autocast, scaler)))
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
