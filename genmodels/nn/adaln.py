"""Adaptive LayerNorm helpers (DiT, VAR, MAR's DiffLoss MLP)."""
from __future__ import annotations

import torch


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN modulation ``x * (1 + scale) + shift`` (DiT Sec. 3.2; VAR's ``AdaLNSelfAttn``).

    The shift is added in place to the fresh product (autograd-safe: the product's backward
    needs only ``x`` and ``scale``), as the official VAR code writes it; one allocation fewer.
    """
    return modulate_1p(x, shift, scale.add(1))


def modulate_1p(x: torch.Tensor, shift: torch.Tensor, scale1p: torch.Tensor) -> torch.Tensor:
    """``modulate`` with ``scale1p = 1 + scale`` computed once by the caller (a sampler that
    applies one condition at many steps); the same float result."""
    return x.mul(scale1p).add_(shift)
