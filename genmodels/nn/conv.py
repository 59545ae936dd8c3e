"""The LDM / VQGAN convolutional encoder and decoder, shared by every conv tokenizer.

One implementation builds:

* VAR's multi-scale VQVAE (``FoundationVision/VAR`` ``models/basic_vae.py``):
  ``ch=160, ch_mult=(1,1,2,2,4), num_res_blocks=2``, attention after every res block of
  the lowest-resolution level (``attn_levels=(4,)``, VAR's ``using_sa``), mid attention
  (``mid_attn=True``, VAR's ``using_mid_sa``), fused ``qkv`` attention
  (``attn_type="qkv"``). Encoder 44,107,872 and decoder 64,653,923 parameters at
  ``ch=160, z_channels=32``.
* LDM's / MAR's KL-16 VAE (``LTH14/mar`` ``models/vae.py``): ``ch=128``,
  ``double_z=True``, attention only in the encoder's 16x16 level
  (``attn_resolutions=(16,)`` at 256 px = ``attn_levels=(4,)``), none in the decoder
  levels, separate ``q, k, v`` 1x1 convs (``attn_type="separate"``).

Module names equal the official checkpoints' keys: ``conv_in``,
``down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut}``, ``down.{i}.attn.{j}``,
``down.{i}.downsample.conv``, ``mid.{block_1,attn_1,block_2}``, ``norm_out``,
``conv_out``; the decoder's ``up.{i}`` is indexed by resolution level (``up.0`` is the
full resolution, ``up.{L-1}`` the lowest) with ``up.{i}.upsample.conv`` for ``i > 0``.
Level ``i`` of either network works at resolution ``input / 2**i``.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from genmodels.nn.dropout import Dropout


def Normalize(channels: int) -> nn.GroupNorm:
    """GroupNorm(32, eps 1e-6, affine), as in LDM / VAR."""
    if channels % 32:
        raise ValueError(f"GroupNorm(32) needs channels divisible by 32, got {channels} (choose ch as a multiple of 32)")
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def ldm_attn_levels(resolution: int, attn_resolutions: Iterable[int], num_levels: int) -> tuple[int, ...]:
    """Translate LDM's ``attn_resolutions`` (feature-map sizes, e.g. ``(16,)`` at 256 px)
    to level indices: level ``i`` works at ``resolution // 2**i``."""
    wanted = set(int(r) for r in attn_resolutions)
    return tuple(i for i in range(num_levels) if resolution // 2 ** i in wanted)


class ResnetBlock(nn.Module):
    """GN, SiLU, conv3x3, GN, SiLU, dropout, conv3x3, plus a 1x1 ``nin_shortcut`` on the
    input when the channel count changes (identity otherwise). (B, Cin, H, W) -> (B, Cout, H, W)."""

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = Normalize(out_channels)
        self.dropout = Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # silu in place on the norm's fresh output (autograd-safe): out of place it took 12% of a
        # VQ-VAE decode on CPU, 5x the in-place time (benchmarks/var_sampling.py, official uses in place)
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=True)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual: GN, 1x1 q/k/v, softmax(q k^T / sqrt(C)) v,
    1x1 ``proj_out``. ``attn_type="qkv"``: one fused 1x1 conv ``qkv`` (C -> 3C, VAR);
    ``"separate"``: ``q``, ``k``, ``v`` 1x1 convs (LDM, MAR's KL-16). (B, C, H, W) -> same."""

    def __init__(self, channels: int, attn_type: str = "qkv") -> None:
        super().__init__()
        if attn_type not in ("qkv", "separate"):
            raise ValueError(f"attn_type must be 'qkv' (fused, VAR) or 'separate' (q/k/v, LDM), got {attn_type!r}")
        self.attn_type = attn_type
        self.norm = Normalize(channels)
        if attn_type == "qkv":
            self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        else:
            self.q = nn.Conv2d(channels, channels, 1)
            self.k = nn.Conv2d(channels, channels, 1)
            self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        if self.attn_type == "qkv":
            q, k, v = self.qkv(h).reshape(B, 3, C, H * W).unbind(1)
        else:
            q, k, v = (m(h).reshape(B, C, H * W) for m in (self.q, self.k, self.v))
        # (B, 1, HW, C) single head; SDPA's default scale is C^-0.5 as in LDM/VAR
        q, k, v = (t.transpose(1, 2).unsqueeze(1) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """2x down: zero-pad right/bottom by 1 then a 3x3 stride-2 conv (``with_conv``), or 2x2 average pooling."""

    def __init__(self, channels: int, with_conv: bool = True) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return F.avg_pool2d(x, 2, 2)


class Upsample(nn.Module):
    """2x up: nearest neighbour, then a 3x3 conv (``with_conv``)."""

    def __init__(self, channels: int, with_conv: bool = True) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


def _check_levels(levels: Sequence[int], num_levels: int, name: str) -> tuple[int, ...]:
    levels = tuple(int(i) for i in levels)
    bad = [i for i in levels if not 0 <= i < num_levels]
    if bad:
        raise ValueError(f"{name}={levels} has levels outside 0..{num_levels - 1} (there are len(ch_mult)={num_levels} levels)")
    return levels


def _mid(channels: int, dropout: float, mid_attn: bool, attn_type: str) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout)
    mid.attn_1 = AttnBlock(channels, attn_type) if mid_attn else nn.Identity()
    mid.block_2 = ResnetBlock(channels, channels, dropout)
    return mid


class Encoder(nn.Module):
    """Images (B, in_channels, H, W) -> latents (B, z_channels [x2 if double_z], H/2^(L-1), W/2^(L-1)),
    L = len(ch_mult).

    Args:
        ch: base width; level i has ``ch * ch_mult[i]`` channels.
        ch_mult: width multipliers, one per level; levels 0..L-2 end with a Downsample.
        num_res_blocks: ResnetBlocks per level.
        z_channels: latent channels; ``double_z`` doubles ``conv_out`` (KL-VAE: mean and log-variance).
        attn_levels: levels where an AttnBlock follows each ResnetBlock (VAR ``using_sa``:
            ``(L-1,)``; LDM ``attn_resolutions``: see ``ldm_attn_levels``).
        mid_attn: attention between the two mid blocks (VAR ``using_mid_sa``; LDM always).
        attn_type: ``"qkv"`` (fused, VAR) or ``"separate"`` (q/k/v, LDM).
        resamp_with_conv: strided conv (default) or average pooling for downsampling.
        conv_out_ks: kernel of ``conv_out`` (3 in LDM/VAR; MaskGIT-VQGAN uses 1).
    """

    def __init__(self, *, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 z_channels: int, in_channels: int = 3, double_z: bool = False, dropout: float = 0.0,
                 attn_levels: Sequence[int] = (), mid_attn: bool = True, attn_type: str = "qkv",
                 resamp_with_conv: bool = True, conv_out_ks: int = 3) -> None:
        super().__init__()
        self.num_levels = len(ch_mult)
        self.downsample_ratio = 2 ** (self.num_levels - 1)
        attn_levels = _check_levels(attn_levels, self.num_levels, "attn_levels")
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        in_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i in range(self.num_levels):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_mult[i], ch * ch_mult[i]
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if i in attn_levels:
                    level.attn.append(AttnBlock(block_in, attn_type))
            if i != self.num_levels - 1:
                level.downsample = Downsample(block_in, resamp_with_conv)
            self.down.append(level)
        self.mid = _mid(block_in, dropout, mid_attn, attn_type)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, conv_out_ks, 1,
                                  conv_out_ks // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != self.num_levels - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class Decoder(nn.Module):
    """Latents (B, z_channels, h, w) -> images (B, out_channels, h*2^(L-1), w*2^(L-1)); no final tanh/clamp.

    Args as ``Encoder``, plus ``blocks_per_level``: ResnetBlocks per level (default
    ``num_res_blocks + 1`` = 3, as in LDM and VAR). ``attn_levels`` index resolution levels
    like the encoder's (``L-1`` = lowest resolution, VAR's ``using_sa``; LDM's KL-16 decoder
    has none). Levels run from L-1 (after ``conv_in`` and ``mid``) up to 0; levels 1..L-1
    end with an Upsample.
    """

    def __init__(self, *, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 z_channels: int, out_channels: int = 3, dropout: float = 0.0, attn_levels: Sequence[int] = (),
                 mid_attn: bool = True, attn_type: str = "qkv", resamp_with_conv: bool = True,
                 blocks_per_level: int | None = None) -> None:
        super().__init__()
        self.num_levels = len(ch_mult)
        attn_levels = _check_levels(attn_levels, self.num_levels, "attn_levels")
        blocks_per_level = num_res_blocks + 1 if blocks_per_level is None else blocks_per_level
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = _mid(block_in, dropout, mid_attn, attn_type)
        levels: list[nn.Module] = []
        for i in reversed(range(self.num_levels)):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i]
            for _ in range(blocks_per_level):
                level.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if i in attn_levels:
                    level.attn.append(AttnBlock(block_in, attn_type))
            if i != 0:
                level.upsample = Upsample(block_in, resamp_with_conv)
            levels.insert(0, level)  # up[i] = level i
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, 1, 1)
        self._level_channels = tuple(ch * m for m in ch_mult)

    #: without autograd, decode in batch chunks whose largest activation stays under this many
    #: bytes: a full-resolution activation of a whole batch is one fresh mmap (and thousands of
    #: page faults) per layer and call, a chunk's is reused from the heap. Same values per sample.
    INFERENCE_CHUNK_BYTES = 16 << 20

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        B, _, h, w = z.shape
        if torch.is_grad_enabled():
            return self._forward(z)
        if z.device.type == "cpu":
            # oneDNN's 3x3 convolutions at these widths (32-128 channels, up to 256^2) run ~2x
            # faster on channels-last activations on the CPU (the weights stay as they are):
            # the decode of VAR's sampler 0.94 -> 0.75 s; float32 sums in another order
            z = z.contiguous(memory_format=torch.channels_last)
        L = self.num_levels
        per_sample = max(c * (h << (L - 1 - i)) * (w << (L - 1 - i)) for i, c in enumerate(self._level_channels))
        n = max(1, self.INFERENCE_CHUNK_BYTES // (per_sample * z.element_size()))
        out = torch.cat([self._forward(c) for c in z.split(n)]) if n < B else self._forward(z)
        return out.contiguous()

    def _forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i in reversed(range(self.num_levels)):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))
