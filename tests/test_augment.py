"""Intensity and scale augmentation (lits.train.augment): each transform does what it says, per
sample, on all of a sample's channels alike, seeded; off means untouched (no draw either)."""

import math

import numpy as np
import pytest
import torch

from lits.core.config import TrainConfig
from lits.train.augment import AugmentConfig, IntensityConfig, random_affine, random_intensity
from lits.train.train_steps import train_step
from lits.model.unet import UNet

# Every transform at identity: a test switches on the one it checks.
IDENTITY = dict(p=1.0, brightness=(1.0, 1.0), shift=0.0, contrast=(1.0, 1.0), gamma=(1.0, 1.0), noise_sigma=0.0,
                blur_sigma=(1e-3, 1e-3))


def images(n=8, seed=0, lo=0.3, hi=0.7):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g) * (hi - lo) + lo


def test_off_is_untouched_and_draws_nothing():
    x, g = images(), torch.Generator().manual_seed(5)
    state = g.get_state()
    assert random_intensity(x, g, IntensityConfig(p=0.0)) is x
    assert torch.equal(g.get_state(), state)  # runs without it draw what they drew before


def test_identity_ranges_change_nothing():
    x = images()
    y = random_intensity(x, torch.Generator().manual_seed(0), IntensityConfig(**IDENTITY))
    assert torch.allclose(y, x, atol=1e-5)


def test_brightness_multiplies_each_sample_by_one_factor_for_all_channels():
    x = images()
    y = random_intensity(x, torch.Generator().manual_seed(1), IntensityConfig(**{**IDENTITY, "brightness": (0.8, 1.2)}))
    ratio = y / x
    per_sample = ratio.flatten(1)
    assert torch.allclose(per_sample, per_sample[:, :1].expand_as(per_sample), atol=1e-5)  # one factor per sample
    factors = per_sample[:, 0]
    assert ((factors >= 0.8 - 1e-6) & (factors <= 1.2 + 1e-6)).all()
    assert factors.std() > 0.02  # samples drawn apart


def test_shift_adds_one_offset_per_sample():
    x = images()
    y = random_intensity(x, torch.Generator().manual_seed(2), IntensityConfig(**{**IDENTITY, "shift": 0.1}))
    d = (y - x).flatten(1)
    assert torch.allclose(d, d[:, :1].expand_as(d), atol=1e-5)
    assert d[:, 0].abs().max() <= 0.1 + 1e-6 and d[:, 0].std() > 0.01


def test_contrast_scales_around_the_mean_within_the_samples_range():
    x = images()
    y = random_intensity(x, torch.Generator().manual_seed(3), IntensityConfig(**{**IDENTITY, "contrast": (1.5, 1.5)}))
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    expected = torch.minimum(torch.maximum((x - mean) * 1.5 + mean, x.amin(dim=(1, 2, 3), keepdim=True)),
                             x.amax(dim=(1, 2, 3), keepdim=True))
    assert torch.allclose(y, expected, atol=1e-5)
    assert y.std() > x.std() * 1.2


def test_gamma_and_the_unit_range():
    x = images(lo=0.0, hi=1.0)
    y = random_intensity(x, torch.Generator().manual_seed(4), IntensityConfig(**{**IDENTITY, "gamma": (2.0, 2.0)}))
    assert torch.allclose(y, x ** 2, atol=1e-5)
    bright = random_intensity(x, torch.Generator().manual_seed(4), IntensityConfig(**{**IDENTITY, "brightness": (3.0, 3.0)}))
    assert float(bright.min()) >= 0.0 and float(bright.max()) == 1.0  # clipped to the images' range


def test_noise_is_zero_mean_with_the_drawn_sigma():
    x = torch.full((64, 3, 32, 32), 0.5)
    y = random_intensity(x, torch.Generator().manual_seed(6), IntensityConfig(**{**IDENTITY, "noise_sigma": 0.05}))
    d = (y - x).flatten(1)
    assert abs(float(d.mean())) < 2e-3
    sigmas = d.std(dim=1)
    assert float(sigmas.max()) <= 0.055 and float(sigmas.max()) > 0.04 and float(sigmas.min()) < 0.01


def test_blur_is_a_normalised_gaussian_of_the_drawn_sigma():
    x = torch.zeros(2, 3, 33, 33)
    x[:, :, 16, 16] = 1.0
    y = random_intensity(x, torch.Generator().manual_seed(7), IntensityConfig(**{**IDENTITY, "blur_sigma": (1.0, 1.0)}))
    profile = y[0, 0, 16, 14:19]
    g1 = np.exp(-0.5 * np.arange(-2, 3) ** 2)
    g1 /= np.exp(-0.5 * np.arange(-3, 4) ** 2).sum()
    assert np.allclose(profile.numpy(), g1 * g1[2], atol=1e-4)  # separable: row profile times the centre weight
    assert float(y[0, 0].sum()) == pytest.approx(1.0, abs=1e-4)
    assert torch.equal(y[0, 0], y[0, 2])  # channels alike


def test_probability_picks_a_share_of_samples_and_the_seed_fixes_which():
    x = images(n=400)
    cfg = IntensityConfig(**{**IDENTITY, "p": 0.3, "shift": 0.1})
    y = random_intensity(x, torch.Generator().manual_seed(8), cfg)
    changed = ((y - x).flatten(1).abs().max(dim=1).values > 1e-6).float().mean()
    assert 0.22 < float(changed) < 0.38
    assert torch.equal(y, random_intensity(x, torch.Generator().manual_seed(8), cfg))
    assert not torch.equal(y, random_intensity(x, torch.Generator().manual_seed(9), cfg))


def test_layout_and_dtype_kept():
    x = images().contiguous(memory_format=torch.channels_last)
    y = random_intensity(x, torch.Generator().manual_seed(0), IntensityConfig(p=1.0))
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


def test_scale_augmentation_zooms_within_its_range():
    # a centred disc of radius 8: its area after the affine's zoom is area * s^2 (no rotation/shear/shift)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    disc = (((yy - 31.5) ** 2 + (xx - 31.5) ** 2) <= 64).long()
    mask = disc[None].repeat(200, 1, 1)
    cfg = AugmentConfig(rotation_deg=0, shift=0, shear=0, zoom=0.3, hflip=False, vflip=False)
    _, out = random_affine(mask[:, None].float(), mask, torch.Generator().manual_seed(0), cfg)
    scale = torch.sqrt(out.flatten(1).sum(1).float() / disc.sum())
    assert float(scale.min()) < 0.8 and float(scale.max()) > 1.2
    assert float(scale.min()) > 0.65 and float(scale.max()) < 1.35


def test_train_step_applies_the_configured_augmentation():
    torch.manual_seed(0)
    model = UNet(3, 3, base_width=4, depth=2)
    image, mask = images(n=4), torch.zeros(4, 32, 32, dtype=torch.long)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    for intensity in (0.0, 1.0):
        cfg = TrainConfig(data="-", output="-", base_width=4, depth=2, intensity_aug=intensity, scale_aug=0.0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        train_step(model, optimizer, image, mask, cfg, torch.Generator().manual_seed(1))
    # the same affine draws with zoom 0 both times, then intensity on the second run only
    affine_only, _ = random_affine(image, mask, torch.Generator().manual_seed(1), AugmentConfig(zoom=0.0))
    assert torch.allclose(seen[0], affine_only, atol=1e-6)
    assert not torch.allclose(seen[1], seen[0], atol=1e-3)


@pytest.mark.parametrize("field,value", [("intensity_aug", 1.5), ("intensity_aug", -0.1), ("scale_aug", 0.6)])
def test_out_of_range_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(data="-", output="-", **{field: value})


def test_defaults_keep_the_original_augmentation():
    cfg = TrainConfig(data="-", output="-")
    assert cfg.intensity_aug == 0.0 and math.isclose(cfg.scale_aug, AugmentConfig().zoom)
