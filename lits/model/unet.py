"""The original project's U-Net, in PyTorch, with configurable width and depth.

Levels of widths w, 2w, 4w, ... (5 levels of 64..1024 by default, about 31 M parameters), two 3x3
convolutions with a normalisation and ReLU per level, 2x2 max-pool down, 2x2 transposed convolutions up,
skip concatenations, a 1x1 convolution to logits. Input (N, C, H, W) float; output logits
(N, classes, H, W); H and W must be divisible by 2 ** (depth - 1).

Normalisation: 'batch' (the original's BatchNorm; training validates with the better of its moving
average and statistics recomputed on whole slices, lits.train.precise_bn) or 'instance' (nnU-Net's
affine InstanceNorm, per image and channel, the same in training and inference). Models exported before 'norm' existed are 'batch'.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from lits.core.config import NORMS


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.BatchNorm2d(channels)


def _double_conv(c_in: int, c_out: int, norm: str) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        _norm(norm, c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        _norm(norm, c_out),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net.

    Args:
        in_channels: image channels (3).
        out_channels: 1 for the binary tumour task (sigmoid), 3 for liver-tumour (softmax).
        base_width: channels of the first level (64 in the original).
        depth: number of levels including the bottleneck (5 in the original).
        norm: 'batch' or 'instance' (module docstring).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, base_width: int = 64, depth: int = 5,
                 norm: str = "batch"):
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth must be >= 2, got {depth}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
        widths: List[int] = [base_width * 2 ** i for i in range(depth)]
        self.depth = depth
        self.down = nn.ModuleList()
        c = in_channels
        for w in widths:
            self.down.append(_double_conv(c, w, norm))
            c = w
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList()
        self.up_conv = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(w * 2, w, 2, stride=2))
            self.up_conv.append(_double_conv(w * 2, w, norm))
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < self.depth - 1:
                skips.append(x)
                x = self.pool(x)
        for up, conv, skip in zip(self.up, self.up_conv, reversed(skips)):
            x = conv(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
