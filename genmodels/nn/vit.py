"""Vision-Transformer pieces in the CLIP / open_clip layout (Radford et al. 2021), as TiTok uses them.

``ResidualAttentionBlock`` is the pre-LN block of open_clip's ``transformer.py`` (and of
1d-tokenizer's ``modeling/modules/blocks.py``):

    x = x + attn(ln_1(x));   x = x + c_proj(GELU(c_fc(ln_2(x))))

with exact GELU, LayerNorm eps 1e-5 and the parameter names of ``nn.MultiheadAttention``
(``attn.in_proj_weight`` (3W, W), ``attn.in_proj_bias``, ``attn.out_proj``), so official
state dicts load without renaming. Attention runs batch-first through
``F.scaled_dot_product_attention``.

``VIT_SIZES``: the TiTok width / depth / heads table (``small`` 512/8/8, ``base`` 768/12/12,
``large`` 1024/24/16; MLP ratio 4).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "small": (512, 8, 8),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


def vit_size(size: str | Sequence[int], name: str = "size") -> tuple[int, int, int]:
    """``"small" | "base" | "large"`` or ``[width, depth, heads]`` -> (width, depth, heads)."""
    if isinstance(size, str):
        if size not in VIT_SIZES:
            raise ValueError(f"{name} must be one of {sorted(VIT_SIZES)} or [width, depth, heads], got {size!r}")
        return VIT_SIZES[size]
    size = tuple(int(s) for s in size)
    if len(size) != 3 or size[0] % size[2]:
        raise ValueError(f"{name} must be [width, depth, heads] with width divisible by heads, got {list(size)}")
    return size  # type: ignore[return-value]


class MultiheadSelfAttention(nn.Module):
    """Self-attention with ``nn.MultiheadAttention``'s parameters (packed ``in_proj``, bias, ``out_proj``).

    (B, T, W) -> (B, T, W); softmax scale head_dim^-0.5.
    """

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, W = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(B, T, 3, self.num_heads, -1).permute(
            2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, W))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block (open_clip / TiTok). (B, T, W) -> (B, T, W)."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = MultiheadSelfAttention(width, num_heads)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(hidden, width))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def xavier_init_(module: nn.Module) -> None:
    """The MAE-style init of MAR's and FractalGen's official code: every ``nn.Linear``
    xavier-uniform with zero bias, every ``nn.LayerNorm`` weight 1 / bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
