"""LLaMA-style transformer pieces (LlamaGen, Sun et al. 2024; FractalGen's AR levels).

* ``RMSNorm``: x / sqrt(mean(x^2) + eps) * weight, computed in float32 (Zhang & Sennrich 2019).
* ``SwiGLU``: w2(silu(w1 x) * w3 x) without biases, hidden size ``find_multiple(int(8 D / 3), 256)``
  (Shazeer 2020; 2816 for D = 1024).
* ``rope_2d`` / ``apply_rope``: 2-D rotary position embedding (Su et al. 2021) over a square grid:
  the first half of the head's frequency pairs rotate with the row index, the second half with the
  column index (base 1e4); ``num_prefix`` leading positions (class / condition tokens) get cos = sin
  = 0, so their queries and keys are ZERO (LlamaGen's and FractalGen's layout).
* ``LlamaBlock``: pre-RMSNorm causal self-attention (``attention.wqkv``, ``attention.wo``, no biases)
  and SwiGLU (``feed_forward.w1/w3/w2``), with resid / ffn dropout; a ``KVCache`` for decoding.

Parameter names follow LlamaGen's ``TransformerBlock`` (and so FractalGen's checkpoints).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genmodels.nn.attention import KVCache, scaled_dot_product_attention
from genmodels.nn.dropout import Dropout


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of ``k`` that is >= ``n``."""
    return n if n % k == 0 else n + k - (n % k)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim, in float32, cast back, times ``weight``."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class SwiGLU(nn.Module):
    """``dropout(w2(silu(w1 x) * w3 x))``; hidden ``find_multiple(int(2 * 4 D / 3), multiple_of)``."""

    def __init__(self, dim: int, multiple_of: int = 256, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = find_multiple(int(2 * (4 * dim) / 3), multiple_of)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.ffn_dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


def rope_2d(grid: int, head_dim: int, base: float = 10000.0, num_prefix: int = 1) -> torch.Tensor:
    """(num_prefix + grid^2, head_dim // 2, 2) table of (cos, sin) per position and frequency pair.

    Pair i < head_dim/4 rotates by ``row * f_i``, pair head_dim/4 + i by ``col * f_i``, with
    ``f_i = base^(-2i / (head_dim/2))``; positions in raster order after ``num_prefix`` zero rows.
    """
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))      # (head_dim/4,)
    t = torch.arange(grid, dtype=torch.float32)
    f = torch.outer(t, freqs)                                                            # (grid, head_dim/4)
    angles = torch.cat([f[:, None, :].expand(-1, grid, -1), f[None, :, :].expand(grid, -1, -1)], dim=-1)
    table = torch.stack([angles.cos(), angles.sin()], dim=-1).flatten(0, 1)             # (grid^2, half, 2)
    return torch.cat([torch.zeros(num_prefix, half, 2), table])


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x (B, T, H, head_dim) by ``table`` (T, head_dim/2, 2)."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = table[None, :, None, :, 0], table[None, :, None, :, 1]
    out = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], dim=-1)
    return out.flatten(3).type_as(x)


class LlamaAttention(nn.Module):
    """Causal multi-head attention with RoPE: fused ``wqkv`` and output ``wo``, no biases."""

    def __init__(self, dim: int, num_heads: int, resid_dropout: float = 0.0, attn_dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.attn_dropout = attn_dropout
        self.resid_dropout = Dropout(resid_dropout)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """x (B, T, C), rope (T, head_dim/2, 2) for these positions. Without a cache: causal over
        the T positions; with one: the T new positions follow the cached ones (T = 1 when decoding)."""
        B, T, C = x.shape
        q, k, v = self.wqkv(x).view(B, T, 3, self.num_heads, self.head_dim).unbind(2)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        causal = True
        if cache is not None:
            causal = len(cache) == 0 and T > 1
            if len(cache) and T > 1:
                raise ValueError("LlamaAttention decodes one position at a time once the cache is filled")
            k, v = cache.append(k, v)
        out = scaled_dot_product_attention(q, k, v, is_causal=causal,
                                             dropout_p=self.attn_dropout if self.training else 0.0)
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(B, T, C)))


class LlamaBlock(nn.Module):
    """``h = x + attention(attention_norm(x)); out = h + feed_forward(ffn_norm(h))``."""

    def __init__(self, dim: int, num_heads: int, norm_eps: float = 1e-5, resid_dropout: float = 0.0,
                 ffn_dropout: float = 0.0, attn_dropout: float = 0.0, multiple_of: int = 256) -> None:
        super().__init__()
        self.attention = LlamaAttention(dim, num_heads, resid_dropout, attn_dropout)
        self.feed_forward = SwiGLU(dim, multiple_of, ffn_dropout)
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.ffn_norm = RMSNorm(dim, norm_eps)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, cache)
        return h + self.feed_forward(self.ffn_norm(h))
