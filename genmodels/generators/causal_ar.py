"""Causal raster-order autoregressive generator: a GPT over discrete image tokens.

The baseline every other paradigm is compared with (VQGAN's transformer, Esser et al. 2021;
LlamaGen, Sun et al. 2024): the tokens of one grid, flattened in raster order, are modelled as
p(x | c) = prod_i p(x_i | x_<i, c) by a decoder-only transformer.

* The class is the start token: position 0 holds the class embedding (``num_classes + 1`` rows;
  the last row is the null class for classifier-free guidance, used with probability
  ``class_dropout`` in training), position i >= 1 holds the embedding of token i-1; the output
  at position i predicts token i. Learned absolute position embeddings (N, D).
* GPT-2 blocks: pre-LN, causal self-attention (``is_causal``), GELU MLP; final LayerNorm;
  ``head`` = Linear(D -> K) without bias. Init as GPT-2 / nanoGPT: N(0, 0.02), residual output
  projections N(0, 0.02 / sqrt(2 depth)).
* ``forward_loss`` = token-mean cross-entropy (teacher forcing); ``nll`` = bits per token.
* ``sample``: KV-cache decoding, classifier-free guidance, temperature, top-k, top-p (all
  through ``genmodels.sampling``).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from genmodels import sampling
from genmodels.generators.base import Generator, raster_suffix_start
from genmodels.nn.attention import Block, KVCache
from genmodels.nn.dropout import Dropout
from genmodels.tokenizers.base import TokenSpec


class CausalAR(Generator):
    """Class-conditional GPT over the raster sequence of one token grid.

    Args:
        vocab_size: K, the tokenizer's codebook size.
        token_shape: the token grid (e.g. ``(8, 8)``), or ``seq_len`` N for ``(N,)``.
        num_classes: C; label ``C`` is the null class.
        hidden_size, depth, num_heads, mlp_ratio: transformer size.
        dropout: on embeddings, attention output and MLP; attn_dropout: on attention weights.
        class_dropout: probability of the null class in training (for CFG), 0.1.
        norm_eps: LayerNorm epsilon (GPT-2: 1e-5).
    """

    def __init__(self, vocab_size: int, token_shape: Sequence[int] | None = None, seq_len: int | None = None,
                 num_classes: int = 1000, hidden_size: int = 512, depth: int = 8, num_heads: int = 8,
                 mlp_ratio: float = 4.0, dropout: float = 0.0, attn_dropout: float = 0.0, class_dropout: float = 0.1,
                 norm_eps: float = 1e-5) -> None:
        super().__init__()
        if token_shape is None and seq_len is None:
            raise ValueError("CausalAR needs token_shape (e.g. [8, 8]) or seq_len")
        token_shape = tuple(int(s) for s in (token_shape if token_shape is not None else (seq_len,)))
        if seq_len is not None and math.prod(token_shape) != seq_len:
            raise ValueError(f"CausalAR: seq_len={seq_len} does not match token_shape={token_shape}")
        self.spec = TokenSpec("discrete", (token_shape,), vocab_size=int(vocab_size))
        self.vocab_size, self.num_classes = int(vocab_size), int(num_classes)
        self.seq_len = math.prod(token_shape)
        self.class_dropout = class_dropout

        self.tok_embed = nn.Embedding(self.vocab_size, hidden_size)
        self.class_embed = nn.Embedding(self.num_classes + 1, hidden_size)   # row C = null class
        self.pos_embed = nn.Parameter(torch.zeros(1, self.seq_len, hidden_size))
        self.drop = Dropout(dropout)
        self.blocks = nn.ModuleList([
            Block(hidden_size, num_heads, mlp_ratio=mlp_ratio, norm_eps=norm_eps, drop=dropout, attn_drop=attn_dropout)
            for _ in range(depth)])
        self.norm = nn.LayerNorm(hidden_size, eps=norm_eps)
        self.head = nn.Linear(hidden_size, self.vocab_size, bias=False)

        self.apply(self._init_weights)
        nn.init.normal_(self.pos_embed, std=0.02)
        for blk in self.blocks:  # GPT-2: scale the residual projections by 1/sqrt(2 depth)
            nn.init.normal_(blk.attn.proj.weight, std=0.02 / math.sqrt(2 * depth))
            nn.init.normal_(blk.mlp.fc2.weight, std=0.02 / math.sqrt(2 * depth))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> tuple[str, ...]:
        return ("pos_embed",)

    # ------------------------------------------------------------------ network
    def _inputs(self, labels: torch.Tensor, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Embeddings of positions ``start .. start+T-1`` of ``[class, tokens...]``.

        ``tokens`` (B, T') are the image tokens feeding those positions: for start=0 the
        first position is the class and ``tokens`` feed positions 1..T'; for start>0 they
        feed positions start..start+T'-1."""
        parts = []
        if start == 0:
            parts.append(self.class_embed(labels)[:, None])
        if tokens.shape[1]:
            parts.append(self.tok_embed(tokens))
        x = torch.cat(parts, dim=1)
        return self.drop(x + self.pos_embed[:, start:start + x.shape[1]])

    def _transformer(self, x: torch.Tensor, caches: list[KVCache] | None = None) -> torch.Tensor:
        """Blocks + final norm + head: (B, T, D) -> logits (B, T, K). With ``caches`` and past
        positions cached, ``x`` must be the single newest position."""
        past = len(caches[0]) if caches else 0
        if past and x.shape[1] != 1:
            raise ValueError("with a filled KV cache pass exactly one new position")
        for i, blk in enumerate(self.blocks):
            x = blk(x, is_causal=(past == 0 and x.shape[1] > 1), cache=caches[i] if caches else None)
        return self.head(self.norm(x))

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: tokens (B, N), labels (B,) in [0, C] -> logits (B, N, K), where
        logits[:, i] predict tokens[:, i] from the class and tokens[:, :i]."""
        return self._transformer(self._inputs(labels, tokens[:, :-1]))

    # ------------------------------------------------------------------ likelihood
    def forward_loss(self, tokens: torch.Tensor, labels: torch.Tensor,
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Next-token cross-entropy averaged over all B*N tokens (nats) -> ``loss``; also
        ``acc`` (top-1 accuracy) and ``bpt`` (loss in bits per token)."""
        self.check_inputs(tokens, labels)
        tokens, labels = tokens.long(), labels.long()
        if self.training and self.class_dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device, generator=generator) < self.class_dropout
            labels = torch.where(drop, self.num_classes, labels)
        logits = self(tokens, labels).float()
        loss = F.cross_entropy(logits.transpose(1, 2), tokens)
        with torch.no_grad():
            acc = (logits.argmax(-1) == tokens).float().mean()
        return {"loss": loss, "acc": acc, "bpt": loss.detach() / math.log(2)}

    @torch.no_grad()
    def nll(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Exact negative log-likelihood of ``tokens`` given ``labels``, in bits per token:
        -log2 p(x | c) / N for each sample -> (B,). (The contract's "bits per dimension" with
        one token as the dimension; for bits per pixel multiply by N / (3 H W).) Uses the
        labels as given (no class dropout); call in eval mode (dropout off)."""
        self.check_inputs(tokens, labels)
        logits = self(tokens.long(), labels.long()).float()
        ce = F.cross_entropy(logits.transpose(1, 2), tokens.long(), reduction="none")
        return ce.mean(dim=1) / math.log(2)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, labels: torch.Tensor, *, cfg: float = 1.0, guidance_schedule: str = "constant",
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, num_steps: int | None = None,
               generator: torch.Generator | None = None, use_cache: bool = True,
               known_prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Ancestral sampling in raster order, one token per step.

        Args:
            labels: (B,) classes in [0, C] (C = null class: unconditional samples).
            cfg: classifier-free guidance weight w: logits = uncond + w (cond - uncond), the
                batch doubled as [cond; null]; w = 1 is plain conditional sampling (no doubling).
            guidance_schedule: how w moves with the fraction i / N of generated tokens
                (``sampling.guidance_weight``: constant, linear, power-cosine).
            temperature: logits are divided by it (after guidance).
            top_k: keep the k most likely tokens (0 = all). top_p: nucleus mass (1 = all).
            num_steps: must be None or N (one step per token).
            generator: every draw comes from it (``torch.multinomial(generator=...)``); a
                fresh randomly seeded one if None.
            use_cache: KV-cache decoding (one ``KVCache`` per block, only the newest token is
                fed); ``False`` recomputes the whole prefix each step -- same tokens.
            known_prefix: (B, P) tokens 0..P-1, given (out-painting, ``edit_tokens``): they are
                fed in one pass and only tokens P..N-1 are sampled.
        Returns tokens (B, N) int64. Call in eval mode (dropout off).
        """
        if num_steps is not None and num_steps != self.seq_len:
            raise ValueError(f"CausalAR samples one token per step: num_steps must be None or {self.seq_len}, "
                             f"got {num_steps}")
        sampling.check_knobs(temperature=temperature, top_k=top_k, top_p=top_p, cfg=cfg)
        sampling.check_schedule(guidance_schedule)
        labels = labels.long()
        self.check_inputs(None, labels)
        device = labels.device
        if generator is None:
            generator = torch.Generator(device=device)
            generator.seed()
        B, N = labels.shape[0], self.seq_len
        guided = cfg != 1.0
        cond_labels = sampling.with_null(labels, self.num_classes) if guided else labels
        caches = [KVCache() for _ in self.blocks] if use_cache else None
        tokens = torch.empty(B, 0, dtype=torch.long, device=device) if known_prefix is None else \
            known_prefix.to(device=device, dtype=torch.long)
        P = tokens.shape[1]
        for i in range(P, N):
            prefix = torch.cat([tokens, tokens]) if guided else tokens
            if use_cache:  # the first step feeds [class, known prefix], later ones the newest token
                x = self._inputs(cond_labels, prefix[:, -1:] if i > P else prefix, start=i if i > P else 0)
                logits = self._transformer(x, caches)[:, -1].float()
            else:
                logits = self._transformer(self._inputs(cond_labels, prefix))[:, -1].float()
            if guided:
                cond, uncond = logits.chunk(2)
                logits = sampling.guide(cond, uncond, sampling.guidance_weight(cfg, guidance_schedule, i / N))
            nxt = sampling.sample_categorical(logits, generator, temperature=temperature, top_k=top_k, top_p=top_p)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        return tokens

    @torch.no_grad()
    def edit_tokens(self, tokens: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, **knobs) -> torch.Tensor:
        """Zero-shot out-painting: the tokens before the first masked one (raster order) are
        given, the rest are sampled (``sample(known_prefix=...)``). tokens (B, N), mask (B, N)
        bool (True = regenerate), labels (B,). Only a mask that is a raster suffix works: a
        causal model cannot condition on the future, so in-painting is a ``GenmodelsError``
        (``raster_suffix_start``). Rows with different starts are edited one at a time."""
        self.check_inputs(tokens, labels.long())
        start = raster_suffix_start(mask.to(tokens.device), "CausalAR")
        if bool((start != start[0]).any()):
            return torch.cat([self.edit_tokens(tokens[i:i + 1], mask[i:i + 1], labels[i:i + 1], **knobs)
                              for i in range(tokens.shape[0])])
        return self.sample(labels, known_prefix=tokens[:, :int(start[0])], **knobs)
