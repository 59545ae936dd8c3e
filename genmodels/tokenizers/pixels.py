"""Pixels as a tokenizer: the identity, nothing to train (FractalGen, Li et al. 2025).

Two views of the same 8-bit image, chosen by ``output``:

* ``"normalized"`` (FractalGen): tokens are the image (B, 3, S, S) float, normalised with the
  ImageNet mean / std as the official code feeds its models (``(x01 - mean) / std``, NOT
  [-1, 1]); ``TokenSpec("pixels", ((S, S),), vocab_size=256, channels=3)``: "pixels, 256
  values per channel, image side S". ``decode`` inverts it to [-1, 1].
* ``"ids"`` (a causal raster AR over pixels, the likelihood baseline): tokens are the 8-bit
  values as ids (B, 3 S^2) int64 in raster order (row, column, channel R G B);
  ``TokenSpec("discrete", ((S, 3 S),), vocab_size=256)``.

Images come in [-1, 1] from 8-bit data (``x / 127.5 - 1``); ids are ``round((x + 1) * 127.5)``.
"""
from __future__ import annotations

import torch

from genmodels.errors import GenmodelsError
from genmodels.tokenizers.base import Tokenizer, TokenSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OUTPUTS = ("normalized", "ids")


class Pixels(Tokenizer):
    """Identity tokenizer over ``image_size`` x ``image_size`` RGB images (see module doc).

    Args:
        image_size: S, the image side the generator is built for.
        output: ``"normalized"`` (FractalGen) or ``"ids"`` (discrete 8-bit ids, raster order).
    """

    def __init__(self, image_size: int = 64, output: str = "normalized") -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise GenmodelsError(f"Pixels.output must be one of {OUTPUTS}, got {output!r}")
        if int(image_size) < 1:
            raise GenmodelsError(f"Pixels.image_size must be >= 1, got {image_size}")
        self.image_size, self.output = int(image_size), output
        S = self.image_size
        if output == "normalized":
            self.spec = TokenSpec("pixels", ((S, S),), vocab_size=256, channels=3, image_size=S)
        else:
            self.spec = TokenSpec("discrete", ((S, 3 * S),), vocab_size=256, image_size=S)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _check(self, images: torch.Tensor) -> None:
        S = self.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, S, S):
            raise GenmodelsError(f"Pixels(image_size={S}) takes images (B, 3, {S}, {S}), got {tuple(images.shape)}; "
                                 "set the data's image_size to the tokenizer's")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) in [-1, 1] -> normalised (B, 3, S, S) or ids (B, 3 S^2)."""
        self._check(images)
        if self.output == "ids":
            ids = ((images.float() + 1) * 127.5).round().clamp(0, 255).long()
            return ids.permute(0, 2, 3, 1).reshape(images.shape[0], -1)
        return ((images.float() + 1) / 2 - self.mean) / self.std

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Inverse of ``encode`` -> images (B, 3, S, S) in [-1, 1]."""
        S = self.image_size
        if self.output == "ids":
            x = tokens.reshape(tokens.shape[0], S, S, 3).permute(0, 3, 1, 2).float()
            return x / 127.5 - 1
        return (tokens.float() * self.std + self.mean) * 2 - 1

    def losses(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        raise GenmodelsError("the Pixels tokenizer has nothing to train: give it to the GeneratorModule as "
                             "model.init_args.tokenizer (no tokenizer_ckpt needed)")
