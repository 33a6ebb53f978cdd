import numpy as np
import pytest
import torch

from lits.train import losses
from lits.core import metrics
from lits.train.augment import AugmentConfig, random_affine
from lits.model.unet import UNet, count_parameters


def test_unet_shapes_and_parameter_count():
    full = UNet(3, 1, base_width=64, depth=5)
    assert 31_000_000 < count_parameters(full) < 31_100_000  # the original's ~31 M
    small = UNet(3, 3, base_width=8, depth=4)
    x = torch.randn(2, 3, 64, 48)
    assert small(x).shape == (2, 3, 64, 48)
    assert UNet(3, 1, base_width=4, depth=3)(torch.randn(1, 3, 32, 32)).shape == (1, 1, 32, 32)
    with pytest.raises(ValueError):
        UNet(depth=1)


def test_soft_dice_and_losses_by_hand():
    p = torch.tensor([1.0, 0.5, 0.0, 0.0])
    t = torch.tensor([1.0, 1.0, 0.0, 1.0])
    # (2 * 1.5 + 1) / (1.5 + 3 + 1) = 4 / 5.5
    assert losses.soft_dice(p, t).item() == pytest.approx(4 / 5.5)
    # binary: logits 0 -> p 0.5 everywhere; BCE = ln 2; Dice over 4 pixels with 2 positives:
    # (2 * 1 + 1) / (2 + 2 + 1) = 0.6
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[1, 0], [1, 0]]])
    assert losses.bce_dice_loss(logits, target).item() == pytest.approx(np.log(2) + 0.4, rel=1e-6)
    # 3-class: uniform logits -> CE = ln 3; p = 1/3; liver (2 px): (2*2/3+1)/(4/3+2+1) = (7/3)/(13/3)
    logits = torch.zeros(1, 3, 2, 2)
    target = torch.tensor([[[1, 1], [2, 0]]])
    liver = (2 * 2 / 3 + 1) / (4 / 3 + 2 + 1)
    tumour = (2 * 1 / 3 + 1) / (4 / 3 + 1 + 1)
    assert losses.ce_dice_loss(logits, target).item() == pytest.approx(np.log(3) + 1 - (liver + tumour) / 2, rel=1e-6)
    # a perfect prediction has (almost) zero loss
    perfect = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 40
    assert losses.ce_dice_loss(perfect, target).item() < 1e-3


def test_dice_iou_counts_and_empty_rule():
    ref = np.array([[[0, 1, 1, 2]], [[0, 0, 0, 0]]])
    pred = np.array([[[1, 1, 0, 2]], [[0, 0, 0, 0]]])
    counts = metrics.overlap_counts(pred, ref)
    # liver = label >= 1: pred {0,1,3}, ref {1,2,3}: inter 2, sizes 3, 3
    assert counts[0].tolist() == [[2, 3, 3], [1, 1, 1]]
    dice, iou = metrics.dice_iou(counts)
    assert dice[0].tolist() == pytest.approx([2 / 3, 1.0]) and iou[0].tolist() == pytest.approx([0.5, 1.0])
    assert dice[1].tolist() == [1.0, 1.0]  # both empty
    d, _ = metrics.dice_iou(np.array([0, 3, 0]))
    assert d == 0.0


def test_augmentation_keeps_image_and_mask_aligned():
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(8, 64, 64, dtype=torch.long)
    mask[:, 10:40, 12:30] = 1
    mask[:, 20:28, 15:22] = 2
    image = mask[:, None].repeat(1, 3, 1, 1).float() * 100  # the image draws the mask
    out_image, out_mask = random_affine(image, mask, g, AugmentConfig(rotation_deg=15, shift=0.1, shear=0.1, zoom=0.1))
    assert out_mask.dtype == torch.long and set(out_mask.unique().tolist()) <= {0, 1, 2}
    assert not torch.equal(out_mask, mask)  # something happened
    from_image = (out_image[:, 0] / 100).round().long()
    assert (from_image == out_mask).float().mean() > 0.98  # differences only on edges (bilinear vs nearest)
    # same seed, same result
    again = random_affine(image, mask, torch.Generator().manual_seed(0), AugmentConfig(rotation_deg=15, shift=0.1, shear=0.1, zoom=0.1))
    assert torch.equal(again[1], out_mask)


def test_flip_only_augmentation_is_exact():
    g = torch.Generator().manual_seed(3)
    mask = torch.randint(0, 3, (16, 8, 8))
    image = mask[:, None].float()
    cfg = AugmentConfig(rotation_deg=0, shift=0, shear=0, zoom=0)
    out_image, out_mask = random_affine(image, mask, g, cfg)
    assert torch.equal(out_image[:, 0].long(), out_mask)
    for i in range(16):
        assert any(torch.equal(out_mask[i], m) for m in (mask[i], mask[i].flip(0), mask[i].flip(1), mask[i].flip(0).flip(1)))
