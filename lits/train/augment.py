"""Seeded augmentation applied identically to images and masks (batched, on the training device).

The original's Keras ImageDataGenerator, as one random affine per sample: rotation, shift,
shear, zoom, horizontal and vertical flips; edges repeated ("nearest" fill). Images are sampled
bilinearly, masks with nearest neighbour so labels stay labels.
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
