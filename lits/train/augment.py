"""Seeded augmentation, batched, on the training device.

`random_affine`: the original's Keras ImageDataGenerator, as one random affine per sample applied
identically to images and masks: rotation, shift, shear, zoom (the scale augmentation: `--scale-aug`),
horizontal and vertical flips; edges repeated ("nearest" fill). Images are sampled bilinearly, masks
with nearest neighbour so labels stay labels.

`random_intensity`: nnU-Net's intensity augmentations on the images only (brightness, shift,
contrast, gamma, noise, blur; `--intensity-aug`), so a model sees livers and tumours at other HU
levels, doses and sharpness than its generator's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    rotation_deg: float = 10.0
    shift: float = 0.05  # fraction of the image side
    shear: float = 0.05  # radians
    zoom: float = 0.05  # scale in [1 - zoom, 1 + zoom]
    hflip: bool = True
    vflip: bool = True


def random_affine(image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator,
                  cfg: AugmentConfig = AugmentConfig()):
    """Transform a batch with one random affine per sample.

    Args:
        image: float (N, C, H, W).
        mask: int64 (N, H, W).
        generator: the only randomness, on the images' device: the affine is drawn and built
            there, so a CUDA step never waits for a host-to-device copy of it.
        cfg: ranges.
    Returns:
        (image, mask) of the same shapes and dtypes; the image keeps a channels_last layout.
    Raises:
        ValueError: the generator is on another device than the images.
    """
    n, device = image.shape[0], image.device
    if generator.device.type != device.type:
        raise ValueError(f"the augmentation's generator is on {generator.device}, the images on {device}")

    def uniform(lo, hi):
        return torch.rand(n, generator=generator, dtype=torch.float64, device=device) * (hi - lo) + lo

    def sign():
        return torch.where(torch.rand(n, generator=generator, device=device) < 0.5, -1.0, 1.0).double()

    angle = uniform(-cfg.rotation_deg, cfg.rotation_deg) * math.pi / 180
    shear = uniform(-cfg.shear, cfg.shear)
    scale = uniform(1 - cfg.zoom, 1 + cfg.zoom)
    tx, ty = uniform(-cfg.shift, cfg.shift) * 2, uniform(-cfg.shift, cfg.shift) * 2  # grid units span 2
    fx = sign() if cfg.hflip else torch.ones(n, dtype=torch.float64, device=device)
    fy = sign() if cfg.vflip else torch.ones(n, dtype=torch.float64, device=device)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # output -> input sampling grid: rotate, shear, scale, then flip
    a = torch.stack([torch.stack([cos, -sin + shear * cos], -1), torch.stack([sin, cos + shear * sin], -1)], -2)
    a = a / scale[:, None, None]
    a = a * torch.stack([fx, fy], -1)[:, :, None]
    theta = torch.cat([a, torch.stack([tx, ty], -1)[:, :, None]], dim=2).to(image.dtype)
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    image_out = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
    mask_out = F.grid_sample(mask[:, None].to(image.dtype), grid, mode="nearest", padding_mode="border",
                             align_corners=False)[:, 0].round().long()
    if image.is_contiguous(memory_format=torch.channels_last) and not image.is_contiguous():
        image_out = image_out.contiguous(memory_format=torch.channels_last)  # grid_sample returns NCHW
    return image_out, mask_out


@dataclass(frozen=True)
class IntensityConfig:
    """nnU-Net's intensity augmentations on the model's [0, 1] images, each drawn per sample with
    probability `p` (0: none, and no draw from the generator at all, so runs without it are the
    runs they were). Ranges as nnU-Net's defaults where the units carry over."""

    p: float = 0.0
    brightness: tuple = (0.75, 1.25)  # multiplicative
    shift: float = 0.1  # additive, a fraction of the range: a liver window ~15 HU brighter or darker
    contrast: tuple = (0.75, 1.25)  # around the sample's mean, clipped to its own range
    gamma: tuple = (0.7, 1.5)
    noise_sigma: float = 0.05  # Gaussian noise, sigma drawn in [0, noise_sigma]
    blur_sigma: tuple = (0.5, 1.0)  # pixels, separable Gaussian


def _gaussian_blur(image: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Each sample blurred by its own sigma (pixels, at most `max_sigma`): one separable 2-D Gaussian per
    sample, as grouped convolutions over the batch (N*C groups), edges repeated. The kernel's radius
    comes from `max_sigma` on the host, so a GPU never waits for the drawn sigmas."""
    n, c, h, w = image.shape
    radius = max(1, int(math.ceil(3 * max_sigma)))
    x = torch.arange(-radius, radius + 1, device=image.device, dtype=image.dtype)
    kernel = torch.exp(-0.5 * (x[None] / sigma[:, None].to(image.dtype).clamp_min(1e-3)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N*C, K)
    flat = image.reshape(1, n * c, h, w)
    flat = F.pad(flat, (radius, radius, 0, 0), mode="replicate")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=n * c)
    flat = F.pad(flat, (0, 0, radius, radius), mode="replicate")
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=n * c)
    return flat.reshape(n, c, h, w)


def random_intensity(image: torch.Tensor, generator: torch.Generator, cfg: IntensityConfig) -> torch.Tensor:
    """The image batch (N, C, H, W in [0, 1]) with `cfg`'s augmentations: each of brightness, shift,
    contrast, gamma, noise and blur applied to a sample with probability cfg.p, with one draw for all of
    a sample's channels (its windows of the same slice). Returns a new tensor in [0, 1], same layout."""
    if cfg.p <= 0 or image.shape[0] == 0:
        return image
    n, device = image.shape[0], image.device
    channels_last = image.is_contiguous(memory_format=torch.channels_last) and not image.is_contiguous()

    def draw(lo, hi):
        return (torch.rand(n, generator=generator, device=device) * (hi - lo) + lo).to(image.dtype)[:, None, None, None]

    def chosen():
        return (torch.rand(n, generator=generator, device=device) < cfg.p)[:, None, None, None]

    x = image.float() if image.dtype != torch.float32 else image.clone()
    x = torch.where(chosen(), x * draw(*cfg.brightness), x)
    x = torch.where(chosen(), x + draw(-cfg.shift, cfg.shift), x)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
    x = torch.where(chosen(), ((x - mean) * draw(*cfg.contrast) + mean).clamp(lo, hi), x)
    x = x.clamp_(0.0, 1.0)
    x = torch.where(chosen(), x.pow(draw(*cfg.gamma)), x)
    noisy = chosen()
    sigma = draw(0.0, cfg.noise_sigma)
    x = torch.where(noisy, x + torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype) * sigma, x)
    blurred = chosen()
    blur_sigma = draw(*cfg.blur_sigma).flatten()
    if device.type != "cpu" or bool(blurred.any()):  # a GPU blurs every sample and picks: no host sync
        x = torch.where(blurred, _gaussian_blur(x.contiguous(), blur_sigma, cfg.blur_sigma[1]), x)
    x = x.clamp_(0.0, 1.0).to(image.dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
