"""The MaskGIT-VQGAN (Chang et al., CVPR 2022, google-research/maskgit): MaskGIT's 2D tokenizer.

A VQGAN (Esser et al. 2021) without attention layers: 256 px -> 16 x 16 tokens, 1024 codes x
256 dims, ``ch=128``, ``ch_mult=(1, 1, 2, 2, 4)``, 2 residual blocks per level in encoder
*and* decoder, 54.5M parameters. TiTok uses it as the teacher of its two-stage training
(proxy codes) and as the pixel decoder of its released two-stage models.

Layout and numerics follow the PyTorch port in bytedance/1d-tokenizer
(``modeling/modules/maskgit_vqgan.py``, from open-muse), whose converted JAX weights are
``maskgit-vqgan-imagenet-f16-256.bin``; the differences from the LDM conv net
(``genmodels/nn/conv.py``) are why it is its own module:

* every conv pads TF-"same" (``Conv2dSame``; all convs here have stride 1, so the pad is
  symmetric except for even kernels);
* residual-block convs and the encoder's ``conv_in`` have no bias;
* when a block changes the channel count, the 1x1 ``nin_shortcut`` maps the block's
  **output** (``h + nin(h)``), not its input -- a quirk of the port that the weights carry;
* downsampling is 2x2 average pooling; upsampling is nearest x2 then a 3x3 ``upsample_conv``;
* the mid section is two plain residual blocks (``mid.0``, ``mid.1``); ``decoder.up.{i}`` is
  indexed by resolution level (``up.0`` = full resolution) and run from ``up.{L-1}`` down.

Quantizer: the shared ``VectorQuantizer`` (plain squared-L2 lookup). The official network
works on images in [0, 1]; this tokenizer takes and returns [-1, 1] (genmodels contract).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from genmodels.nn.dropout import Dropout

from genmodels.errors import GenmodelsError
from genmodels.tokenizers.base import Tokenizer, TokenSpec
from genmodels.tokenizers.quantizers import VectorQuantizer


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding: total pad max((ceil(i/s) - 1) s + (k - 1) d + 1 - i, 0),
    split floor / ceil (left / right)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for i, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            p = max((math.ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)
            pads.append((p // 2, p - p // 2))
        (top, bottom), (left, right) = pads
        if top or bottom or left or right:
            x = F.pad(x, [left, right, top, bottom])
        return super().forward(x)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GN, SiLU, conv3x3, GN, SiLU, dropout, conv3x3 (no biases); + x, or + nin_shortcut(h) when the
    channel count changes (the shortcut maps the block output). (B, Cin, H, W) -> (B, Cout, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = Conv2dSame(in_channels, out_channels, 3, bias=False)
        self.norm2 = _norm(out_channels)
        self.dropout = Dropout(dropout)
        self.conv2 = Conv2dSame(out_channels, out_channels, 3, bias=False)
        self.changes_channels = in_channels != out_channels
        if self.changes_channels:
            self.nin_shortcut = Conv2dSame(out_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + (self.nin_shortcut(h) if self.changes_channels else x)


class Encoder(nn.Module):
    """Images (B, 3, H, W) in [0, 1] -> features (B, z_channels, H / 2^(L-1), W / 2^(L-1))."""

    def __init__(self, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 z_channels: int = 256, in_channels: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv_in = Conv2dSame(in_channels, ch, 3, bias=False)
        in_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            level = nn.Module()
            c_in, c_out = ch * in_mult[i], ch * mult
            level.block = nn.ModuleList([ResnetBlock(c_in if j == 0 else c_out, c_out, dropout)
                                         for j in range(num_res_blocks)])
            self.down.append(level)
        mid = ch * ch_mult[-1]
        self.mid = nn.ModuleList([ResnetBlock(mid, mid, dropout) for _ in range(num_res_blocks)])
        self.norm_out = _norm(mid)
        self.conv_out = Conv2dSame(mid, z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for block in level.block:
                h = block(h)
            if i != len(self.down) - 1:
                h = F.avg_pool2d(h, kernel_size=2, stride=2)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Features (B, z_channels, h, w) -> images in [0, 1] (unclamped), (B, 3, h 2^(L-1), w 2^(L-1))."""

    def __init__(self, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 z_channels: int = 256, out_channels: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        L = len(ch_mult)
        top = ch * ch_mult[-1]
        self.conv_in = Conv2dSame(z_channels, top, 3)
        self.mid = nn.ModuleList([ResnetBlock(top, top, dropout) for _ in range(num_res_blocks)])
        self.up = nn.ModuleList()
        for i in range(L):  # up[i] works at level i; built in that order, run from L-1 to 0
            level = nn.Module()
            c_in = top if i == L - 1 else ch * ch_mult[i + 1]
            c_out = ch * ch_mult[i]
            level.block = nn.ModuleList([ResnetBlock(c_in if j == 0 else c_out, c_out, dropout)
                                         for j in range(num_res_blocks)])
            if i != 0:
                level.upsample_conv = Conv2dSame(c_out, c_out, 3)
            self.up.append(level)
        self.norm_out = _norm(ch * ch_mult[0])
        self.conv_out = Conv2dSame(ch * ch_mult[0], out_channels, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for block in level.block:
                h = block(h)
            if i != 0:
                h = level.upsample_conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


class MaskGITVQGAN(Tokenizer):
    """MaskGIT's VQGAN tokenizer: images (B, 3, H, W) in [-1, 1] <-> (B, (H/f)^2) token ids, f = 2^(L-1).

    Args:
        codebook_size, z_channels: 1024 codes of dimension 256.
        ch, ch_mult, num_res_blocks, dropout: conv net (128, (1,1,2,2,4), 2, 0).
        image_size: training / token-grid size (256 -> 16 x 16 tokens).
        commitment_cost: beta of the VQ loss. with_encoder: False builds the decoder half only
            (TiTok's ``pixel_decoder`` + ``pixel_quantize``).
        rec_loss: ``"l1"`` or ``"l2"`` for ``losses``; vq_weight: weight of the VQ loss;
        dead_code_restart: see ``VectorQuantizer``.
    """

    def __init__(self, codebook_size: int = 1024, z_channels: int = 256, ch: int = 128,
                 ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2, dropout: float = 0.0,
                 image_size: int = 256, commitment_cost: float = 0.25, with_encoder: bool = True,
                 rec_loss: str = "l1", vq_weight: float = 1.0, dead_code_restart: int = 0) -> None:
        super().__init__()
        if rec_loss not in ("l1", "l2"):
            raise GenmodelsError(f"rec_loss must be 'l1' or 'l2', got {rec_loss!r}")
        self.downsample = 2 ** (len(ch_mult) - 1)
        if image_size % self.downsample:
            raise GenmodelsError(f"image_size={image_size} must be a multiple of 2^(len(ch_mult)-1)={self.downsample}")
        self.image_size, self.rec_loss, self.vq_weight = image_size, rec_loss, vq_weight
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, z_channels, 3, dropout) if with_encoder else None
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, z_channels, 3, dropout)
        self.quantize = VectorQuantizer(codebook_size, z_channels, commitment_cost, use_l2_norm=False,
                                        dead_code_restart=dead_code_restart)
        g = image_size // self.downsample
        self.spec = TokenSpec("discrete", ((g, g),), vocab_size=codebook_size, image_size=image_size)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        if self.encoder is None:
            raise GenmodelsError("this MaskGIT-VQGAN was built with_encoder=False (decoder only): it cannot encode")
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] % self.downsample or \
                images.shape[-2] % self.downsample:
            raise GenmodelsError(f"MaskGIT-VQGAN expects images (B, 3, H, W) with H, W multiples of "
                                 f"{self.downsample}, got {tuple(images.shape)}")
        return self.encoder((images + 1) / 2)

    # ------------------------------------------------------------------ tokens
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images in [-1, 1] -> ids (B, h*w) int64, raster order."""
        f = self._features(images)
        B, C = f.shape[:2]
        return self.quantize.nearest(f.permute(0, 2, 3, 1).reshape(-1, C)).view(B, -1)

    def decode_features(self, f: torch.Tensor) -> torch.Tensor:
        """Code vectors (B, C, h, w) -> images in [-1, 1], unclamped."""
        return self.decoder(f) * 2 - 1

    def codes_to_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h*w) or (B, h, w) ids -> (B, C, h, w) code vectors (square grid for the flat form)."""
        if tokens.ndim == 2:
            side = math.isqrt(tokens.shape[1])
            if side * side != tokens.shape[1]:
                raise GenmodelsError(f"tokens (B, {tokens.shape[1]}): not a square grid")
            tokens = tokens.view(tokens.shape[0], side, side)
        return self.quantize.get_codebook_entry(tokens.long()).permute(0, 3, 1, 2)

    def decode(self, tokens: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """ids (B, h*w) -> images in [-1, 1], clamped like the official ``decode`` unless ``clamp=False``."""
        if tokens.ndim == 2 and tokens.shape[1] == self.spec.seq_len:
            self.spec.check(tokens)
        img = self.decode_features(self.codes_to_features(tokens))
        return img.clamp(-1, 1) if clamp else img

    # ------------------------------------------------------------------ training
    def losses(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``loss = rec_loss + vq_weight * vq_loss`` (straight-through), plus usage / perplexity."""
        f = self._features(images)
        z_q, stats, vq_loss, _ = self.quantize(f.permute(0, 2, 3, 1))
        recon = self.decode_features(z_q.permute(0, 3, 1, 2))
        rec = (recon - images).abs().mean() if self.rec_loss == "l1" else F.mse_loss(recon, images)
        return dict(loss=rec + self.vq_weight * vq_loss, recon=recon, rec_loss=rec, vq_loss=vq_loss, **stats)

    def last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight
