"""The generator contract (DESIGN.md, "Contracts").

A generator models the tokens of a tokenizer (see ``genmodels.tokenizers.base``):

* ``forward_loss(tokens, labels) -> dict`` with key ``loss`` (a scalar to minimise) and
  anything else worth logging;
* ``sample(labels, *, cfg, temperature, num_steps, generator) -> tokens`` -- all
  randomness is drawn from the given ``torch.Generator``, so a seeded generator gives
  the same tokens every time. The knobs mean the same for every generator
  (``genmodels.sampling``): ``cfg`` is w in ``uncond + w (cond - uncond)``, ``cfg = 1`` is no
  guidance and skips the unconditional pass, ``guidance_schedule`` names how w moves over
  the steps, ``top_k = 0`` / ``top_p = 1.0`` are off, ``temperature`` divides the logits (a
  diffusion head: scales the noise); a paper's own knob goes through its ``sampling.from_*``;
* ``nll(tokens, labels)`` -> bits per dimension, where the paradigm has an exact
  likelihood.

Class labels are int64 (B,); ``num_classes`` is the index of the null ("unconditional")
class used for classifier-free guidance.
"""
from __future__ import annotations

import torch
from torch import nn

from genmodels.errors import GenmodelsError
from genmodels.tokenizers.base import TokenSpec
from genmodels.utils.config import ConfigMixin


class Generator(ConfigMixin, nn.Module):
    """Base class; subclasses set ``self.spec`` (the TokenSpec they model)."""

    spec: TokenSpec
    num_classes: int

    def forward_loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, *, cfg: float = 1.0, temperature: float = 1.0,
               num_steps: int | None = None, generator: torch.Generator | None = None, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def nll(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no exact likelihood")

    def check_inputs(self, tokens: torch.Tensor | None, labels: torch.Tensor) -> None:
        """Raise a ValueError naming the problem if ``labels`` (B,) in [0, num_classes] or
        ``tokens`` (this generator's spec; ids in [0, vocab_size)) are malformed."""
        if labels.ndim != 1 or labels.dtype.is_floating_point:
            raise ValueError(f"labels must be int64 of shape (B,), got {labels.dtype} {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() > self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}] ({self.num_classes} = null class), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        if tokens is None:
            return
        self.spec.check(tokens)
        if tokens.shape[0] != labels.shape[0]:
            raise ValueError(f"{tokens.shape[0]} token rows but {labels.shape[0]} labels")
        vocab = self.spec.vocab_size
        if self.spec.kind == "discrete" and tokens.numel() and (tokens.min() < 0 or tokens.max() >= vocab):
            raise ValueError(f"token ids must lie in [0, {vocab}) (vocab_size), got "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")

    def check_training_labels(self, labels: torch.Tensor) -> None:
        """Data labels must lie in ``[0, num_classes)``: the null class ``num_classes`` is an
        internal label of classifier-free guidance (class dropout, unconditional sampling),
        never a data label. A ``GenmodelsError`` naming the range otherwise (one device sync)."""
        if labels.numel() and not bool(((labels >= 0) & (labels < self.num_classes)).all()):
            raise GenmodelsError(
                                 f"training labels must lie in [0, {self.num_classes}) (generator num_classes={self.num_classes}), got "
                                 f"[{int(labels.min())}, {int(labels.max())}]; set the generator's num_classes to the data's class count")

    def check_spec(self, spec: TokenSpec) -> None:
        """Raise a ``GenmodelsError`` naming the mismatching field if ``spec`` (the tokenizer's)
        is not what this generator was built for."""
        mine = self.spec
        dims, theirs = {len(s) for s in mine.shapes}, {len(s) for s in spec.shapes}
        if dims != theirs and 1 in theirs:
            raise GenmodelsError(
                f"generator {type(self).__name__} is built for a {max(dims)}D token grid (shapes={mine.shapes}) but "
                f"the tokenizer gives 1D tokens (shapes={spec.shapes}, e.g. TiTok): VAR needs 2D scales; MaskGIT, "
                f"causal AR and MAR take them with token_shape=[{spec.seq_len}]")
        for name in ("kind", "vocab_size", "channels", "shapes"):
            a, b = getattr(mine, name), getattr(spec, name)
            if a != b:
                raise GenmodelsError(f"generator {type(self).__name__} was built for tokens with {name}={a}, but the "
                                     f"tokenizer gives {name}={b}; set the generator's init_args to match the tokenizer")


def raster_suffix_start(mask: torch.Tensor, who: str) -> torch.Tensor:
    """Where the regenerated tokens start in each row of a raster-order (causal) model.

    mask (B, N) bool, True = regenerate -> P (B,) int64 such that row b regenerates exactly the
    tokens P[b] .. N-1 (out-painting of a region after everything known, in raster order).
    Any other mask is a ``GenmodelsError``: a causal model conditions token i on tokens < i
    only, so it cannot use known tokens that come after a regenerated one (in-painting)."""
    mask = mask.bool()
    N = mask.shape[1]
    start = torch.where(mask.any(1), mask.int().argmax(1), N)  # first regenerated token (N: none)
    suffix = torch.arange(N, device=mask.device)[None, :] >= start[:, None]
    if not bool((suffix == mask).all()):
        raise GenmodelsError(f"{who} generates tokens in raster order, each from the ones before it only, so it "
                             "can only out-paint a region that comes after everything known (e.g. the bottom rows); "
                             "this mask keeps known tokens after masked ones (in-painting)")
    return start
