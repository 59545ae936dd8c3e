"""U-ViT as a MaskGIT transformer (Bao et al., CVPR 2023, "All are worth words"), TiTok-S-128's generator.

A pre-LN ViT whose blocks are split into ``in_blocks``, a ``mid_block`` and ``out_blocks``
with long skip connections: the output of in-block ``i`` is concatenated with the input of
out-block ``depth/2 - 1 - i`` and projected back by that block's ``skip_linear``
(2W -> W), like a U-Net:

    x = embeddings(ids) + pos_embed
    for b in in_blocks:  x = b(x); skips.push(x)
    x = mid_block(x)
    for b in out_blocks: x = b(skip_linear([x, skips.pop()]))
    logits = lm_head(norm(x))[:, 1:]

Everything else -- the token layout ``[class token, N image tokens]`` (vocab K + C + 2),
class dropout, the masked-token loss, confidence-based decoding and its knobs -- is MaskGIT's
(``genmodels.generators.maskgit.MaskGIT``, which this class subclasses; only the network
differs), as in 1d-tokenizer where ``UViTBert`` subclasses ``ImageBert``
(``modeling/maskgit.py``; blocks ``modeling/modules/blocks.py::UViTBlock``).

Blocks: qkv without bias, LayerNorm eps 1e-5, exact GELU, no dropout (the official
``UViTBert`` passes none); parameter names equal the official ``generator_titok_s128.bin``
(``embeddings``, ``pos_embed``, ``{in_blocks,mid_block,out_blocks}.*.{norm1, attn.qkv,
attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``out_blocks.*.skip_linear``, ``norm``, ``lm_head``).
TiTok-S-128's generator: width 1024, 20 layers (10 + 1 + 10 blocks), 16 heads, MLP 4096:
295.0M parameters.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from genmodels.generators.maskgit import MaskGIT
from genmodels.nn.attention import Block


class UViTBlock(Block):
    """Pre-LN ``Block`` with an optional long-skip input: ``skip_linear(cat[x, skip])`` first."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, skip: bool = False) -> None:
        super().__init__(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=False, norm_eps=1e-5)
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        return super().forward(x)


class UViTBert(MaskGIT):
    """MaskGIT with a U-ViT network. Arguments as ``MaskGIT`` (``depth`` = in + out blocks, even;
    ``dropout`` / ``attn_dropout`` are accepted for config compatibility and must be 0, as the
    official network has none)."""

    def __init__(self, vocab_size: int, token_shape: Sequence[int] | None = None, seq_len: int | None = None,
                 num_classes: int = 1000, hidden_size: int = 1024, depth: int = 20, num_heads: int = 16,
                 mlp_ratio: float = 4.0, intermediate_size: int | None = None, dropout: float = 0.0,
                 attn_dropout: float = 0.0, class_dropout: float = 0.1, mask_schedule: str = "arccos",
                 label_smoothing: float = 0.1, unmasked_weight: float = 0.1, initializer_range: float = 0.02) -> None:
        if depth % 2:
            raise ValueError(f"UViTBert: depth={depth} must be even (depth/2 in-blocks and out-blocks + a mid block)")
        if dropout or attn_dropout:
            raise ValueError("UViTBert has no dropout (dropout and attn_dropout must be 0)")
        # MaskGIT sets up the token layout, the loss and the sampling; its BERT network is replaced
        super().__init__(vocab_size, token_shape, seq_len, num_classes, hidden_size, 0, num_heads, mlp_ratio,
                         intermediate_size, 0.0, 0.0, class_dropout, mask_schedule, label_smoothing,
                         unmasked_weight, initializer_range)
        for name in ("word_embeddings", "position_embeddings", "token_type_embeddings", "embed_norm", "embed_drop",
                     "blocks", "lm_head"):
            if hasattr(self, name):
                delattr(self, name)
        ratio = (intermediate_size or int(hidden_size * mlp_ratio)) / hidden_size
        self.embeddings = nn.Embedding(self.vocab_size + self.num_classes + 2, hidden_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.seq_len + 1, hidden_size))
        self.in_blocks = nn.ModuleList([UViTBlock(hidden_size, num_heads, ratio) for _ in range(depth // 2)])
        self.mid_block = UViTBlock(hidden_size, num_heads, ratio)
        self.out_blocks = nn.ModuleList([UViTBlock(hidden_size, num_heads, ratio, skip=True)
                                         for _ in range(depth // 2)])
        self.norm = nn.LayerNorm(hidden_size)
        self.lm_head = nn.Linear(hidden_size, self.vocab_size)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_uvit)

    @staticmethod
    def _init_uvit(m: nn.Module) -> None:
        """1d-tokenizer ``UViTBert._init_weights``: trunc-normal(0.02) Linear / Embedding, zero bias, LN 1 / 0."""
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @classmethod
    def titok_s128(cls, **overrides) -> "UViTBert":
        """TiTok-S-128's generator (configs/infer/TiTok/titok_s128.yaml): 4096 codes, 128 tokens, 1000 classes."""
        kw = dict(vocab_size=4096, seq_len=128, num_classes=1000, hidden_size=1024, depth=20, num_heads=16,
                  intermediate_size=4096)
        return cls(**{**kw, **overrides})

    #: official TiTok-S-128 sampling (sample_imagenet_titok.py): power-cosine g 6.9 -> cfg 6.9, tau 2.8, 64 steps
    SAMPLE_PRESETS = {**MaskGIT.SAMPLE_PRESETS,
                      "titok-s128": dict(cfg=6.9, guidance_schedule="power-cosine", choice_temperature=2.8,
                                         num_steps=64, softmax_temperature_annealing=True, decoding="titok")}

    def no_weight_decay(self) -> tuple[str, ...]:
        return ("embeddings", "pos_embed")

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """tokens (B, N) ids in [0, K] (K = [MASK]); labels (B,) in [0, C] (C = null) -> logits (B, N, K)."""
        ids = torch.cat([(labels + self.class_offset).view(-1, 1), tokens], dim=1)
        x = self.embeddings(ids) + self.pos_embed[:, :ids.shape[1]]
        skips = []
        for blk in self.in_blocks:
            x = blk(x)
            skips.append(x)
        x = self.mid_block(x)
        for blk in self.out_blocks:
            x = blk(x, skips.pop())
        return self.lm_head(self.norm(x)[:, 1:])
