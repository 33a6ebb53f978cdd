"""The per-lesion Dice term (blob loss): components, the masking, and what it adds to the losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lits.core.config import TrainConfig
from lits.train import losses
from lits.train.train_steps import loss_function


def _batch():
    """Two 4x4 samples: sample 0 holds lesion A (2 px) and lesion B (1 px) and a false positive;
    sample 1 holds lesion C, two diagonal pixels (one lesion under 8-connectivity)."""
    tumour = torch.zeros(2, 4, 4, dtype=torch.bool)
    tumour[0, 0, 0] = tumour[0, 0, 1] = True  # A
    tumour[0, 3, 3] = True  # B
    tumour[1, 1, 1] = tumour[1, 2, 2] = True  # C
    probs = torch.zeros(2, 4, 4)
    probs[0, 0, 0], probs[0, 0, 1] = 0.5, 1.0  # A: 1.5
    probs[0, 3, 3] = 0.2  # B
    probs[0, 2, 0] = 0.25  # false positive in sample 0
    probs[1, 1, 1] = probs[1, 2, 2] = 1.0  # C found
    return probs, tumour


def test_components_are_numbered_across_the_batch_with_diagonals_joined():
    _, tumour = _batch()
    components, sample = losses.lesion_components(tumour)
    assert sample.tolist() == [0, 0, 1]
    assert components[0, 0, 0] == components[0, 0, 1] != components[0, 3, 3]
    assert components[1, 1, 1] == components[1, 2, 2] == 3
    assert set(components.unique().tolist()) == {0, 1, 2, 3}
    assert (components > 0).eq(tumour).all()


def test_each_lesion_is_scored_by_hand_with_the_other_lesions_masked_out():
    probs, tumour = _batch()
    a = (2 * 1.5 + 1) / (0.25 + 1.5 + 2 + 1)  # B's 0.2 is not in A's denominator
    b = (2 * 0.2 + 1) / (0.25 + 0.2 + 1 + 1)  # nor A's 1.5 in B's
    c = (2 * 2 + 1) / (0 + 2 + 2 + 1)
    assert losses.lesion_dice(probs, tumour).item() == pytest.approx((a + b + c) / 3, rel=1e-6)
    assert losses.lesion_dice(probs, torch.zeros_like(tumour)) is None


def test_a_missed_small_lesion_weighs_as_much_as_a_found_large_one():
    tumour = torch.zeros(1, 32, 32, dtype=torch.bool)
    tumour[0, 2:22, 2:22] = True  # 400 px
    tumour[0, 28, 28] = True  # 1 px, missed
    probs = tumour.float().clone()
    probs[0, 28, 28] = 0.0
    batch = losses.soft_dice(probs, tumour.float()).item()
    per_lesion = losses.lesion_dice(probs, tumour).item()
    assert batch > 0.99
    assert per_lesion == pytest.approx((1.0 + 1 / 2) / 2, abs=1e-3)  # (801/801 + 1/2) / 2


def test_the_term_is_added_with_its_weight_and_only_where_there_is_tumour():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    target = torch.zeros(2, 8, 8, dtype=torch.int64)
    target[:, 1:7, 1:7] = 1
    target[0, 2:4, 2:4] = 2
    target[1, 5, 5] = 2
    base = losses.ce_dice_loss(logits, target).item()
    term = 1 - losses.lesion_dice(torch.softmax(logits, 1)[:, 2], target == 2).item()
    assert term > 0.5
    assert losses.ce_dice_loss(logits, target, lesion_weight=2.0).item() == pytest.approx(base + 2 * term, rel=1e-6)
    no_tumour = torch.where(target == 2, 1, target)
    assert losses.ce_dice_loss(logits, no_tumour, lesion_weight=2.0).item() == pytest.approx(
        losses.ce_dice_loss(logits, no_tumour).item(), rel=1e-6)
    binary = torch.randn(2, 1, 8, 8)
    bterm = 1 - losses.lesion_dice(torch.sigmoid(binary[:, 0]), target == 2).item()
    assert losses.bce_dice_loss(binary, (target == 2).long(), lesion_weight=1.0).item() == pytest.approx(
        losses.bce_dice_loss(binary, (target == 2).long()).item() + bterm, rel=1e-6)


def test_the_missed_small_lesion_gets_the_gradient_the_config_asks_for():
    """With the term, the logit of a 1-pixel lesion the model is unsure of (tumour p 0.2, background
    confident elsewhere) is pushed towards tumour many times harder; CE spreads 1/1024 per pixel."""
    target = torch.zeros(1, 32, 32, dtype=torch.int64)
    target[0, 2:22, 2:22] = 2
    target[0, 28, 28] = 2
    logits = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 4
    logits[0, :, 28, 28] = torch.tensor([1.0, 0.0, 0.0])  # the small lesion: background p 0.58, tumour 0.21

    def push(weight: float) -> float:
        x = logits.clone().requires_grad_(True)
        loss_function(TrainConfig(data="-", output="-", lesion_loss=weight))(x, target).backward()
        return -x.grad[0, 2, 28, 28].item()  # descent raises the tumour logit by this

    assert push(0.0) > 0
    assert push(1.0) > 10 * push(0.0)


def test_the_weight_is_checked():
    with pytest.raises(ValueError, match="lesion_loss"):
        TrainConfig(data="-", output="-", lesion_loss=-1)
    assert np.isclose(TrainConfig(data="-", output="-").lesion_loss, 0.0)
