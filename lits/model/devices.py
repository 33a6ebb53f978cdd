"""Facts about the device a model runs on (torch alone: importable where nothing else of lits is)."""

from __future__ import annotations

from typing import Optional, Tuple


def half_dtype(capability: Optional[Tuple[int, int]]):
    """The autocast dtype for a CUDA card of compute `capability`: bf16 where the card computes it
    natively (8.0, Ampere, and later), fp16 on older cards (torch.cuda.is_bf16_supported() also
    counts slow emulation); None for no card (CPU: full precision). Training and serving both ask here."""
    import torch

    if capability is None:
        return None
    return torch.bfloat16 if capability[0] >= 8 else torch.float16
