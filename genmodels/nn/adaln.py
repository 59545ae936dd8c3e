"""Adaptive LayerNorm helpers (DiT, VAR, MAR's DiffLoss MLP)."""
from __future__ import annotations

import torch


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN modulation ``x * (1 + scale) + shift`` (DiT eq. in §3.2)."""
    return x * (1 + scale) + shift
