"""Multi-head self-attention with masks and a KV cache, and the transformer block.

One implementation for every paradigm: bidirectional (MaskGIT, MAR), causal (raster
AR), block-causal (VAR) -- the difference is only the mask passed in. Attention runs
through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU).

Parameter names follow timm's ``Block`` (``norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2``), which is what MAR's and FractalGen's checkpoints use.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KVCache:
    """Keys and values of past positions for incremental decoding.

    ``k``/``v`` have shape (B, heads, T_past, head_dim). ``append`` concatenates the new
    keys/values and returns the full tensors; ``enabled=False`` turns it into a no-op
    store (for equality tests of cached vs uncached decoding).
    """

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat([self.k, k], dim=2)
            self.v = torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]


class Attention(nn.Module):
    """Multi-head self-attention.

    Args:
        dim: model width C. num_heads: H (head_dim = C / H).
        qkv_bias: bias on the fused ``qkv`` projection: ``True``, ``False``, or ``"qv"`` --
            ``qkv`` has no bias, separate ``q_bias`` and ``v_bias`` parameters (zero init)
            and a constant zero key bias (BEiT / VAR's ``mat_qkv`` + ``q_bias``/``v_bias``).
        qk_norm: ``None`` or ``"l2"`` -- l2-normalise q and k per head and multiply q by a
            learned per-head scale ``exp(min(scale_mul, ln 100))`` (VAR's attention,
            initialised at ln 4); the softmax scale is then 1.
        attn_drop / proj_drop: dropout on attention weights / output.
        scale: softmax scale when ``qk_norm`` is None (default ``head_dim ** -0.5``; VAR
            without l2-norm uses ``0.25 / sqrt(head_dim)``).

    ``forward(x (B, T, C), attn_mask=None, is_causal=False, cache=None) -> (B, T, C)``.
    ``attn_mask`` is boolean (True = may attend) or additive float, broadcastable to
    (B, H, T, T_total). With a ``cache``, the new keys/values are appended and the queries
    attend to all cached positions (pass the mask for the new rows only).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool | str = True, qk_norm: str | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, scale: float | None = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if qkv_bias not in (True, False, "qv"):
            raise ValueError(f"qkv_bias must be True, False or 'qv', got {qkv_bias!r}")
        if scale is not None and qk_norm is not None:
            raise ValueError("scale is fixed to 1 with qk_norm='l2'; do not pass both")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias is True)
        if qkv_bias == "qv":
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.scale = scale
        self.proj = nn.Linear(dim, dim)
        self.attn_drop, self.proj_drop = attn_drop, nn.Dropout(proj_drop)
        self.qk_norm = qk_norm
        if qk_norm == "l2":
            self.scale_mul = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        elif qk_norm is not None:
            raise ValueError(f"qk_norm must be None or 'l2', got {qk_norm!r}")

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
            qkv = F.linear(x, self.qkv.weight, bias)
        else:
            qkv = self.qkv(x)
        q, k, v = qkv.view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        scale = self.scale
        if self.qk_norm == "l2":
            q = F.normalize(q, dim=-1) * self.scale_mul.clamp(max=4.605170185988092).exp()  # ln 100
            k = F.normalize(k, dim=-1)
            scale = 1.0
        if cache is not None:
            if is_causal and len(cache):
                raise ValueError("is_causal with a non-empty cache is ambiguous: pass an explicit attn_mask")
            k, v = cache.append(k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                             dropout_p=self.attn_drop if self.training else 0.0, scale=scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, T, C)))


class DropPath(nn.Module):
    """Stochastic depth (timm's ``DropPath``): in training, zero the whole residual branch
    of a sample with probability ``drop_prob`` and scale the kept ones by ``1/(1-p)``."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:g}"


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout. ``approximate='tanh'`` for VAR.

    ``hidden_drop`` is the dropout after the GELU (``None``: same as ``drop``, timm's
    ``Mlp``); BERT / MaskGIT have none there (``hidden_drop=0``).
    """

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0, approximate: str = "none",
                 hidden_drop: float | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)
        self.hidden_drop = self.drop if hidden_drop is None else nn.Dropout(hidden_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.hidden_drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Transformer block, pre-LN (ViT / GPT-2 / MAR) or post-LN (BERT / MaskGIT).

    pre-LN:  x = x + attn(norm1(x));  x = x + mlp(norm2(x))
    post-LN: x = norm1(x + attn(x));  x = norm2(x + mlp(x))

    ``mlp_hidden_drop``: dropout after the MLP's GELU (``None``: ``drop``, as timm; BERT: 0).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 norm_eps: float = 1e-6, drop: float = 0.0, attn_drop: float = 0.0, post_norm: bool = False,
                 mlp_hidden_drop: float | None = None) -> None:
        super().__init__()
        self.post_norm = post_norm
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop, hidden_drop=mlp_hidden_drop)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                cache: KVCache | None = None) -> torch.Tensor:
        if self.post_norm:
            x = self.norm1(x + self.attn(x, attn_mask, is_causal, cache))
            return self.norm2(x + self.mlp(x))
        x = x + self.attn(self.norm1(x), attn_mask, is_causal, cache)
        return x + self.mlp(self.norm2(x))
