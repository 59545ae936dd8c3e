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

from genmodels.nn.dropout import Dropout, dropout


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` (q (B, H, T, d), k / v (B, H, S, d) -> (B, H, T, d)),
    except on the CPU with ``dropout_p > 0``: there torch takes its math path anyway
    (materialised (T, S) weights) and draws the dropout mask with its slow CPU Bernoulli;
    this spells the same math out with :func:`genmodels.nn.dropout.dropout`'s mask."""
    if dropout_p == 0.0 or q.device.type != "cpu" or torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    w = (q * s) @ k.transpose(-2, -1)
    if is_causal:
        T, S = w.shape[-2:]
        w = w.masked_fill(~torch.ones(T, S, dtype=torch.bool, device=w.device).tril(), float("-inf"))  # top-left, as torch
    if attn_mask is not None:
        w = w.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else w + attn_mask
    return dropout(w.softmax(-1), dropout_p) @ v


class _L2NormScaled(torch.autograd.Function):
    """``F.normalize(x, dim=-1) * s`` with a hand-written backward (training only).

    Forward: the same ops as ``F.normalize`` (x / max(||x||, eps)), so the same floats.
    Backward, y = x / n: dx = (g s - y <g s, y>) / n (or g s / eps where n <= eps, the clamp),
    ds = sum of g * y over the dims s broadcasts. Autograd of ``F.normalize`` takes ~3 more
    passes over x for the norm's and the division's backward; this is ~20 % of the q / k
    normalisation of a VAR training step (hand-written: torch has no fused normalize op)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, s: torch.Tensor, eps: float) -> torch.Tensor:
        n = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(eps)
        y = x / n
        ctx.save_for_backward(y, n, s)
        ctx.eps = eps
        return y * s

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        y, n, s = ctx.saved_tensors
        gs = g * s
        dx = None
        if ctx.needs_input_grad[0]:
            # where the norm was clamped to eps, dx = g s / eps: the projection term is masked
            # on the (..., 1) row sums, not by a where over all of dx
            c = (gs * y).sum(-1, keepdim=True).mul_(n > ctx.eps)
            dx = torch.addcmul(gs, y, c, value=-1.0).div_(n)
        ds = None
        if ctx.needs_input_grad[1]:
            gy = g * y
            dims = [i for i in range(gy.ndim) if s.ndim < gy.ndim - i or s.shape[i - gy.ndim + s.ndim] == 1]
            ds = gy.sum(dims, keepdim=True).view(s.shape) if dims else gy
        return dx, ds, None


def l2_normalize(x: torch.Tensor, scale: torch.Tensor | None = None, eps: float = 1e-12) -> torch.Tensor:
    """``F.normalize(x, dim=-1)`` times ``scale`` (broadcasting against x), e.g. VAR's q / k."""
    if torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_compiling():
        return _L2NormScaled.apply(x, x.new_ones(()) if scale is None else scale, eps)
    y = F.normalize(x, dim=-1, eps=eps)
    return y if scale is None else y * scale


class ScaleCausalMask:
    """VAR's block-causal training mask (a token attends to every token of its own and earlier
    scales), kept as the scale boundaries ``ends`` (cumulative token counts, last = L) instead
    of an (L, L) tensor. :meth:`attend` runs one masked attention over the tokens of all but
    the last ``tail`` scales and, for each of those last scales, one mask-free attention of its
    queries over the keys of every scale up to its own: the same softmax rows (a masked score
    is exp(-inf) = 0), a third fewer scores at VAR's 256-px scales, and no mask on the largest
    blocks (fwd + bwd of one d8 block: ~83 -> ~61-67 ms on one CPU thread)."""

    def __init__(self, ends: list[int] | tuple[int, ...], tail: int = 2) -> None:
        self.ends = tuple(int(e) for e in ends)
        self.tail = max(0, min(tail, len(self.ends) - 1))
        head = self.ends[len(self.ends) - 1 - self.tail]
        lvl = torch.cat([torch.full((b - a,), i) for i, (a, b) in enumerate(zip((0,) + self.ends, self.ends))])
        self.head_mask = (lvl[:head, None] >= lvl[None, :head])

    def dense(self) -> torch.Tensor:
        """The (L, L) boolean mask (True = may attend)."""
        lvl = torch.cat([torch.full((b - a,), i) for i, (a, b) in enumerate(zip((0,) + self.ends, self.ends))])
        return lvl[:, None] >= lvl[None, :]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
               scale: float | None = None) -> torch.Tensor:
        """q, k, v (B, H, L, d) -> (B, H, L, d), stored as a transposed contiguous (B, L, H, d)
        (so the caller's ``transpose(1, 2).reshape(B, L, H * d)`` is a view, not a copy).

        The query blocks are a ``split`` of q (backward: one ``cat``) and the key / value
        prefixes come from :func:`prefixes` (backward: partial in-place adds), not slices,
        whose backward would zero-fill a full-size gradient per slice and add them up."""
        head = self.head_mask.shape[0]
        ends = self.ends[len(self.ends) - self.tail:]
        lens = (head,) + ends
        qs = q.split([head] + [b - a for a, b in zip(lens, ends)], dim=2)
        ks, vs = prefixes(k, lens), prefixes(v, lens)
        outs = [scaled_dot_product_attention(qs[0], ks[0], vs[0], attn_mask=self.head_mask.to(q.device),
                                             dropout_p=dropout_p, scale=scale)]
        for qi, ki, vi in zip(qs[1:], ks[1:], vs[1:]):
            outs.append(scaled_dot_product_attention(qi, ki, vi, dropout_p=dropout_p, scale=scale))
        return torch.cat([o.transpose(1, 2) for o in outs], dim=1).transpose(1, 2)


class _Prefixes(torch.autograd.Function):
    """Views x[:, :, :n] for each n in ``lens`` (the longest = x's length); backward adds the
    shorter gradients into a copy of the longest one, in place on its first rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lens: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        ctx.lens = lens
        return tuple(x[:, :, :n] for n in lens)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        lens = ctx.lens
        longest = max(range(len(lens)), key=lens.__getitem__)
        g = grads[longest]
        dx = g.clone() if g is not None else None
        for i, (n, g) in enumerate(zip(lens, grads)):
            if g is not None and i != longest:
                if dx is None:
                    dx = g.new_zeros(g.shape[:2] + (lens[longest],) + g.shape[3:])
                dx[:, :, :n] += g
        return dx, None


def prefixes(x: torch.Tensor, lens: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """x (B, H, T, d) -> the views x[:, :, :n] for n in ``lens``; with autograd, one gradient
    buffer for all of them (see ``_Prefixes``). Without a length equal to T, plain slices."""
    if max(lens) == x.shape[2] and torch.is_grad_enabled() and x.requires_grad \
            and not torch.compiler.is_compiling():
        return _Prefixes.apply(x, tuple(lens))
    return tuple(x[:, :, :n] for n in lens)


class KVCache:
    """Keys and values of past positions for incremental decoding.

    ``k``/``v`` have shape (B, heads, T_past, head_dim). ``append`` adds the new keys/values
    and returns the full tensors. Without ``capacity`` it concatenates (a new tensor per
    call); with ``capacity`` (the most positions it will ever hold) it allocates one
    (B, heads, capacity, head_dim) buffer per k and v at the first append and writes each new
    chunk in place, returning views of the filled part: no reallocation and copying of the
    past at every step (the same values, so the same attention outputs).
    """

    def __init__(self, capacity: int | None = None) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.capacity = capacity
        self._buf: tuple[torch.Tensor, torch.Tensor] | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.capacity is None:
            if self.k is None:
                self.k, self.v = k, v
            else:
                self.k = torch.cat([self.k, k], dim=2)
                self.v = torch.cat([self.v, v], dim=2)
            return self.k, self.v
        start = len(self)
        end = start + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KVCache(capacity={self.capacity}) cannot hold {end} positions")
        if self._buf is None:
            B, H, _, D = k.shape
            self._buf = (k.new_empty(B, H, self.capacity, D), v.new_empty(B, H, self.capacity, v.shape[-1]))
        kb, vb = self._buf
        kb[:, :, start:end].copy_(k)
        vb[:, :, start:end].copy_(v)
        self.k, self.v = kb[:, :, :end], vb[:, :, :end]
        return self.k, self.v

    def rewind(self, n: int) -> None:
        """Keep only the first n positions (a buffered cache: the next append writes at n)."""
        if self._buf is None or n == 0:
            self.k = self.v = None
            return
        if self.capacity is None or n > len(self):
            raise ValueError(f"KVCache.rewind({n}): needs a buffered cache holding >= {n} positions")
        self.k, self.v = self._buf[0][:, :, :n], self._buf[1][:, :, :n]

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
    (B, H, T, T_total), or a :class:`ScaleCausalMask` (VAR's training sequence). With a ``cache``, the new keys/values are appended and the queries
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
        self.attn_drop, self.proj_drop = attn_drop, Dropout(proj_drop)
        self.qk_norm = qk_norm
        if qk_norm == "l2":
            self.scale_mul = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        elif qk_norm is not None:
            raise ValueError(f"qk_norm must be None or 'l2', got {qk_norm!r}")

    def qkv_bias(self) -> torch.Tensor | None:
        """The bias of the fused ``qkv`` projection (``[q_bias | 0 | v_bias]`` with ``"qv"``)."""
        if self.q_bias is not None:
            return torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        return self.qkv.bias

    def forward_rows(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Attention outputs at some query rows only: x (B, T, C), rows (B, T) bool with the same
        number m of True per sample -> (B, m, C). Keys and values come from all T rows (no
        mask, no cache); each output row equals ``forward(x)`` at that row (the queries and the
        softmax of one row do not depend on the others). Skips 2/3 of the q projection, the
        attention of the other rows and their output projection."""
        B, T, C = x.shape
        w, b = self.qkv.weight, self.qkv_bias()
        xq = x[rows].view(B, -1, C)
        q = F.linear(xq, w[:C], None if b is None else b[:C])
        kv = F.linear(x, w[C:], None if b is None else b[C:])
        q = q.view(B, -1, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = kv.view(B, T, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        scale = self.scale
        if self.qk_norm == "l2":
            q = l2_normalize(q, self.scale_mul.clamp(max=4.605170185988092).exp())  # ln 100
            k = l2_normalize(k)
            scale = 1.0
        out = scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0,
                                             scale=scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, -1, C)))

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
            q = l2_normalize(q, self.scale_mul.clamp(max=4.605170185988092).exp())  # ln 100
            k = l2_normalize(k)
            scale = 1.0
        if cache is not None:
            if is_causal and len(cache):
                raise ValueError("is_causal with a non-empty cache is ambiguous: pass an explicit attn_mask")
            k, v = cache.append(k, v)
        p = self.attn_drop if self.training else 0.0
        if isinstance(attn_mask, ScaleCausalMask):
            if cache is not None or is_causal:
                raise ValueError("a ScaleCausalMask is the whole training sequence: no cache, no is_causal")
            out = attn_mask.attend(q, k, v, dropout_p=p, scale=scale)
        else:
            out = scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=p,
                                               scale=scale)
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
        self.drop = Dropout(drop)
        self.hidden_drop = self.drop if hidden_drop is None else Dropout(hidden_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fuse_linear_act(x, self.fc1, self.training):
            # inference on the CPU: fc1 and the GELU in one oneDNN call (torch's own op, the one
            # inductor emits): the activation is applied while the tile is in cache, not in a
            # second pass over (rows, hidden) floats; the same values up to float32 rounding
            h = torch.ops.mkldnn._linear_pointwise(x, self.fc1.weight, self.fc1.bias, "gelu", [],
                                                   self.act.approximate)
            return self.fc2(h)
        return self.drop(self.fc2(self.hidden_drop(self.act(self.fc1(x)))))


_ONEDNN_LINEAR_POINTWISE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _fuse_linear_act(x: torch.Tensor, fc: nn.Linear, training: bool) -> bool:
    """Whether ``fc`` + its activation may run as one oneDNN call: CPU inference (no autograd,
    eval mode: no dropout), float32 or bfloat16 weights and input of one dtype, no autocast,
    not while torch.compile traces (inductor fuses by itself)."""
    return (_ONEDNN_LINEAR_POINTWISE and not training and not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dtype == fc.weight.dtype and x.dtype in (torch.float32, torch.bfloat16) and fc.bias is not None
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


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

    def forward_rows(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Pre-LN block output at some rows only (no mask): x (B, T, C), rows (B, T) bool with the
        same number m of True per sample -> (B, m, C), equal to ``forward(x)[rows]``. For a last
        block whose other rows nobody reads (MAR's decoder: only the tokens predicted now)."""
        if self.post_norm:
            raise NotImplementedError("forward_rows is for pre-LN blocks")
        B, T, C = x.shape
        x_rows = x[rows].view(B, -1, C) + self.attn.forward_rows(self.norm1(x), rows)
        return x_rows + self.mlp(self.norm2(x_rows))
