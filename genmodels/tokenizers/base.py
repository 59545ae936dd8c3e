"""The tokenizer contract (DESIGN.md, "Contracts").

A tokenizer maps images (B, 3, H, W) in [-1, 1] to tokens and back:

* discrete tokenizers: ``encode(images) -> (B, L)`` int64 ids in ``[0, vocab_size)``;
* continuous tokenizers: ``encode(images) -> (B, L, channels)`` float.

``L = spec.seq_len`` is the total number of tokens. Multi-scale tokenizers (VAR)
concatenate their scales coarse-to-fine, each scale in raster order, so a single
scale is simply the special case ``len(spec.shapes) == 1``. Generators are built from
the ``TokenSpec`` alone and never look at the concrete tokenizer class (except VAR,
which takes the multi-scale quantizer explicitly).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from genmodels.utils.config import ConfigMixin


@dataclass(frozen=True)
class TokenSpec:
    """What a tokenizer's tokens look like.

    kind: ``"discrete"`` (ids), ``"continuous"`` (vectors) or ``"pixels"`` (the image itself,
        (B, channels, H, W) floats on a grid of ``vocab_size`` values per channel; shapes ((H, W),)).
    shapes: one grid shape per scale, coarse to fine: ``((16, 16),)`` for a 2D VQ-VAE,
        ``((1, 1), (2, 2), ..., (16, 16))`` for VAR, ``((32,),)`` for a 1D tokenizer.
    vocab_size: number of codes (discrete only).
    channels: token dimension (continuous only).
    """

    kind: Literal["discrete", "continuous", "pixels"]
    shapes: tuple[tuple[int, ...], ...]
    vocab_size: int | None = None
    channels: int | None = None
    image_size: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in ("discrete", "continuous", "pixels"):
            raise ValueError(f"TokenSpec.kind must be 'discrete', 'continuous' or 'pixels', got {self.kind!r}")
        if self.kind == "pixels" and not (self.vocab_size and self.channels):
            raise ValueError("a pixels TokenSpec needs vocab_size (values per channel) and channels")
        if self.kind == "discrete" and not self.vocab_size:
            raise ValueError("a discrete TokenSpec needs vocab_size")
        if self.kind == "continuous" and not self.channels:
            raise ValueError("a continuous TokenSpec needs channels")
        object.__setattr__(self, "shapes", tuple(tuple(int(s) for s in shape) for shape in self.shapes))

    @property
    def seq_len(self) -> int:
        """Total number of tokens L over all scales."""
        return sum(math.prod(s) for s in self.shapes)

    @property
    def scale_lens(self) -> list[int]:
        """Number of tokens per scale."""
        return [math.prod(s) for s in self.shapes]

    @property
    def grid(self) -> tuple[int, ...]:
        """Shape of the finest (last) scale."""
        return self.shapes[-1]

    def split(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """(B, L[, C]) -> one (B, *shape[, C]) tensor per scale."""
        parts = torch.split(tokens, self.scale_lens, dim=1)
        return [p.reshape(p.shape[0], *shape, *p.shape[2:]) for p, shape in zip(parts, self.shapes)]

    def check(self, tokens: torch.Tensor, name: str = "tokens") -> None:
        """Raise a ValueError naming the problem if ``tokens`` do not fit this spec."""
        want = {"discrete": (self.seq_len,), "continuous": (self.seq_len, self.channels),
                "pixels": (self.channels, *self.grid)}[self.kind]
        if tuple(tokens.shape[1:]) != want:
            raise ValueError(f"{name} have shape {tuple(tokens.shape)}, the tokenizer's spec expects (B, {', '.join(map(str, want))})")
        if self.kind == "discrete":
            if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
                raise ValueError(f"{name} must be integer ids for a discrete spec, got {tokens.dtype}")


class Tokenizer(ConfigMixin, nn.Module):
    """Base class: images in [-1, 1] <-> tokens described by ``self.spec``."""

    spec: TokenSpec

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def losses(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training losses for ``images``: must contain ``loss`` (to minimise, without
        the perceptual / adversarial terms, which the TokenizerModule adds) and
        ``recon`` (the reconstruction in [-1, 1], for those terms and for grids)."""
        raise NotImplementedError

    def last_layer(self) -> torch.Tensor | None:
        """Weight of the decoder's last layer, for VQGAN's adaptive GAN weight."""
        return None

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images)).clamp(-1, 1)
