"""VAR: Visual AutoRegressive modelling by next-scale prediction.

Tian et al., "Visual Autoregressive Modeling: Scalable Image Generation via Next-Scale
Prediction", NeurIPS 2024; official code FoundationVision/VAR (``models/var.py``,
``models/basic_var.py``, ``models/helpers.py``, ``trainer.py``).

An image is a pyramid of K token maps r_1..r_K (``patch_nums``, e.g. 1,2,3,...,16 per
side) from the multi-scale residual VQ-VAE (``genmodels.tokenizers.multiscale_vq``).
VAR factorises p(r_1, ..., r_K) = prod_k p(r_k | r_<k, class) (paper Sec. 3.2): all
tokens of scale k are predicted in parallel from the coarser scales. The transformer
sees, for scale k > 1, the accumulated reconstruction f_hat of scales < k,
area-downsampled to scale k's size (the quantizer's ``idxBl_to_var_input``); scale 1
is the class "start token". A block-causal mask lets every token attend to its own
and all coarser scales (paper Fig. 4).

Shapes: B batch, L = sum(pn^2) tokens, C width (64 * depth), V vocabulary, Cvae the
codebook dimension, D the condition width (= C).

Parameter names follow the official checkpoint except ``attn.qkv`` (official
``attn.mat_qkv``) and ``attn.scale_mul`` (official ``attn.scale_mul_1H11``);
``genmodels.checkpoints.var`` maps them. The official buffers ``lvl_1L``,
``attn_bias_for_masking`` and ``zero_k_bias`` are recomputed (not saved).

VAR needs the multi-scale quantizer at run time (teacher-forcing inputs, next-scale
inputs while sampling) but does not own it: ``bind_tokenizer`` keeps an unregistered
reference (like the official ``vae_proxy`` tuple), so the VQ-VAE's weights are not in
VAR's state dict and ``VAR.to(device)`` does not move it (``GeneratorModule`` holds the
tokenizer as its own submodule and binds it).

Deliberate difference from the official code: label dropout (``cond_drop_rate``) only
in training mode -- the official ``forward`` also drops labels in eval mode, so its
validation loss mixes in 10% unconditional predictions.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from genmodels import sampling
from genmodels.errors import GenmodelsError
from genmodels.generators.base import Generator
from genmodels.nn.adaln import modulate_1p
from genmodels.nn.attention import Attention, DropPath, KVCache, Mlp, ScaleCausalMask
from genmodels.nn.graphs import StepGraphs, static_state
from genmodels.tokenizers.base import TokenSpec

VAR_PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


class SharedAdaLin(nn.Linear):
    """Shared AdaLN projection (official ``SharedAdaLin``): cond (B, D) -> (B, 1, 6, C)."""

    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        C = self.weight.shape[0] // 6
        return super().forward(cond_BD).view(-1, 1, 6, C)


class AdaLNSelfAttn(nn.Module):
    """Transformer block with adaptive LayerNorm (official ``AdaLNSelfAttn``).

    The condition gives six (B, 1, C) vectors in the order gamma1, gamma2, scale1,
    scale2, shift1, shift2 -- from the block's own ``ada_lin`` (SiLU, Linear(D, 6C)) or,
    with ``shared_aln``, from the model's ``shared_ada_lin`` plus the block's ``ada_gss``::

        x = x + drop_path(attn(LN(x) * (1 + scale1) + shift1) * gamma1)
        x = x + drop_path(ffn(LN(x) * (1 + scale2) + shift2) * gamma2)

    ``LN`` (``ln_wo_grad``) has no affine parameters and serves both branches.
    """

    def __init__(self, embed_dim: int, cond_dim: int, num_heads: int, mlp_ratio: float = 4.0, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, norm_eps: float = 1e-6, shared_aln: bool = False,
                 attn_l2_norm: bool = True) -> None:
        super().__init__()
        self.C, self.D = embed_dim, cond_dim
        head_dim = embed_dim // num_heads
        self.attn = Attention(embed_dim, num_heads, qkv_bias="qv", qk_norm="l2" if attn_l2_norm else None,
                              attn_drop=attn_drop, proj_drop=drop,
                              scale=None if attn_l2_norm else 0.25 / math.sqrt(head_dim))
        self.ffn = Mlp(embed_dim, round(embed_dim * mlp_ratio), drop=drop, approximate="tanh", hidden_drop=0.0)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.shared_aln = shared_aln
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, embed_dim) / embed_dim ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * embed_dim))

    def ada_params(self, cond_BD: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The AdaLN vectors of a condition, each (B, 1, C): (gamma1, gamma2, 1 + scale1,
        1 + scale2, shift1, shift2). They depend on the class only, so a sampler computes them
        once per sample and passes them to every scale (``forward(..., ada=...)``)."""
        if self.shared_aln:
            gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + cond_BD).unbind(2)
        else:
            gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(cond_BD).view(-1, 1, 6, self.C).unbind(2)
        return gamma1, gamma2, scale1.add(1), scale2.add(1), shift1, shift2

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor | None, attn_bias: torch.Tensor | None = None,
                cache: KVCache | None = None, ada: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """x (B, l, C); cond_BD (B, D), or (B, 1, 6, C) from ``shared_ada_lin`` when shared;
        or ``ada``, the precomputed ``ada_params(cond_BD)``."""
        gamma1, gamma2, scale1p, scale2p, shift1, shift2 = self.ada_params(cond_BD) if ada is None else ada
        h = self.attn(modulate_1p(self.ln_wo_grad(x), shift1, scale1p), attn_bias, cache=cache)
        x = x + self.drop_path(h.mul_(gamma1))  # in place on the fresh attention output, as the official
        h = self.ffn(modulate_1p(self.ln_wo_grad(x), shift2, scale2p))
        return x + self.drop_path(h.mul(gamma2))


class AdaLNBeforeHead(nn.Module):
    """AdaLN before the classifier head: LN(x) * (1 + scale) + shift, (scale, shift) from cond."""

    def __init__(self, C: int, D: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.C, self.D = C, D
        self.ln_wo_grad = nn.LayerNorm(C, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * C))

    def ada_params(self, cond_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 + scale, shift), each (B, 1, C): once per sample in the sampler."""
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return scale.add(1), shift

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor | None,
                ada: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        scale1p, shift = self.ada_params(cond_BD) if ada is None else ada
        return modulate_1p(self.ln_wo_grad(x_BLC), shift, scale1p)


class VAR(Generator):
    """Next-scale prediction transformer (official ``VAR`` + ``build_vae_var``).

    Args:
        vocab_size: V, codebook size of the multi-scale VQ-VAE (4096).
        Cvae: codebook dimension (32).
        patch_nums: side of each scale's token map, coarse to fine (256 px:
            1,2,3,4,5,6,8,10,13,16; 512 px: 1,2,3,4,6,9,13,18,24,32).
        num_classes: class count; label ``num_classes`` is the null class.
        depth: number of blocks. ``embed_dim`` defaults to 64 * depth, ``num_heads`` to
            depth and ``drop_path_rate`` to 0.1 * depth / 24 (``build_vae_var``).
        mlp_ratio, drop_rate, attn_drop_rate, norm_eps: as the official.
        shared_aln: one AdaLN projection for all blocks plus a per-block ``ada_gss``
            (the 512 px d36 model).
        cond_drop_rate: label dropout for classifier-free guidance (0.1).
        attn_l2_norm: l2-normalised q/k with a learned per-head scale (released models).
        init_adaln, init_adaln_gamma, init_head, init_std: ``VAR.init_weights`` (README
            commands: init_adaln_gamma 1e-3 for d16/d20, 1e-4 d24, 1e-5 d30, 5e-6 d36;
            ``init_std < 0`` means sqrt(1 / 3C)).
        label_smoothing: of the token cross-entropy (``--ls``, default 0).
        pg, pg0, pgwp: progressive training (``--pg/--pg0/--pgwp``): during the first
            ``pg`` fraction of training the model learns scales up to ``prog_si``, rising
            from ``pg0`` to the last; a new scale's loss weight warms up over ``pgwp``
            (fraction of training). Needs ``set_train_progress`` called every step.
    """

    BF16_PARTS = ("blocks",)  # genmodels.precision: the trunk in bfloat16 for the bf16 tier; head and sampling float32

    def __init__(self, vocab_size: int = 4096, Cvae: int = 32, patch_nums: Sequence[int] = VAR_PATCH_NUMS_256,
                 num_classes: int = 1000, depth: int = 16, embed_dim: int | None = None, num_heads: int | None = None,
                 mlp_ratio: float = 4.0, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float | None = None, norm_eps: float = 1e-6, shared_aln: bool = False,
                 cond_drop_rate: float = 0.1, attn_l2_norm: bool = True, init_adaln: float = 0.5,
                 init_adaln_gamma: float = 1e-5, init_head: float = 0.02, init_std: float = -1.0,
                 label_smoothing: float = 0.0, pg: float = 0.0, pg0: int = 4, pgwp: float = 0.0) -> None:
        super().__init__()
        embed_dim = 64 * depth if embed_dim is None else embed_dim
        num_heads = depth if num_heads is None else num_heads
        drop_path_rate = 0.1 * depth / 24 if drop_path_rate is None else drop_path_rate
        if embed_dim % num_heads:
            raise ValueError(f"VAR: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.patch_nums = tuple(int(p) for p in patch_nums)
        if len(self.patch_nums) < 2:
            raise ValueError(f"VAR needs at least two scales, got patch_nums={self.patch_nums}")
        self.V, self.Cvae, self.num_classes = vocab_size, Cvae, num_classes
        self.depth, self.C, self.D, self.num_heads = depth, embed_dim, embed_dim, num_heads
        self.cond_drop_rate, self.label_smoothing = cond_drop_rate, label_smoothing
        self.pg, self.pg0, self.pgwp = pg, pg0, pgwp
        self.prog_si, self.prog_wp = -1, 1.0  # progressive stage (-1: all scales) and its loss warm-up
        self._progress_set = False
        self.spec = TokenSpec("discrete", tuple((p, p) for p in self.patch_nums), vocab_size=vocab_size)
        self.L = sum(p * p for p in self.patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        self.begin_ends = []
        cur = 0
        for p in self.patch_nums:
            self.begin_ends.append((cur, cur + p * p))
            cur += p * p
        self._tokenizer: tuple = ()  # (tokenizer,) -- a tuple so it is not a registered submodule

        # 1. input embedding of the teacher-forcing / next-scale features
        C = embed_dim
        init_std_auto = math.sqrt(1 / C / 3)
        self.word_embed = nn.Linear(Cvae, C)
        # 2. class embedding (row num_classes = null class) and the start position
        self.class_emb = nn.Embedding(num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C))
        # 3. absolute position per token and level (scale) embedding
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, C))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), C)
        for t in (self.class_emb.weight, self.pos_start, self.pos_1LC, self.lvl_embed.weight):
            nn.init.trunc_normal_(t.data, mean=0, std=init_std_auto)
        # 4. blocks
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(self.D, 6 * C)) if shared_aln else nn.Identity()
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]  # linear stochastic depth
        self.blocks = nn.ModuleList([
            AdaLNSelfAttn(C, self.D, num_heads, mlp_ratio, drop_rate, attn_drop_rate, dpr[i], norm_eps, shared_aln,
                          attn_l2_norm) for i in range(depth)])
        # 5. block-causal mask: token i sees token j iff scale(j) <= scale(i) (Fig. 4)
        lvl = torch.cat([torch.full((p * p,), i) for i, p in enumerate(self.patch_nums)]).view(1, self.L, 1)
        self.register_buffer("lvl_1L", lvl[:, :, 0].contiguous(), persistent=False)
        self.register_buffer("attn_bias_for_masking", torch.where(lvl >= lvl.transpose(1, 2), 0.0, -torch.inf)
                             .reshape(1, 1, self.L, self.L), persistent=False)
        # 6. classifier head
        self.head_nm = AdaLNBeforeHead(C, self.D, norm_eps)
        self.head = nn.Linear(C, vocab_size)
        self.init_weights(init_adaln, init_adaln_gamma, init_head, init_std)

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02,
                     init_std: float = -1.0) -> None:
        """Official ``VAR.init_weights``: trunc-normal Linear/Embedding weights (std sqrt(1/3C)
        when ``init_std < 0``), zero biases, head x init_head, head AdaLN x init_adaln,
        attn.proj / ffn.fc2 / sqrt(2 depth), block AdaLN scale/shift rows x init_adaln and
        gamma rows x init_adaln_gamma. pos_start / pos_1LC keep their constructor init."""
        if init_std < 0:
            init_std = (1 / self.C / 3) ** 0.5
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight.data, std=init_std)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    m.bias.data.zero_()
        if init_head >= 0:
            self.head.weight.data.mul_(init_head)
            self.head.bias.data.zero_()
        self.head_nm.ada_lin[-1].weight.data.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.data.zero_()
        for block in self.blocks:
            block.attn.proj.weight.data.div_(math.sqrt(2 * self.depth))
            block.ffn.fc2.weight.data.div_(math.sqrt(2 * self.depth))
            if block.shared_aln:
                block.ada_gss.data[:, :, 2:].mul_(init_adaln)
                block.ada_gss.data[:, :, :2].mul_(init_adaln_gamma)
            else:
                block.ada_lin[-1].weight.data[2 * self.C:].mul_(init_adaln)
                block.ada_lin[-1].weight.data[:2 * self.C].mul_(init_adaln_gamma)
                block.ada_lin[-1].bias.data.zero_()

    @property
    def trunk_dtype(self) -> torch.dtype:
        """dtype of the transformer blocks: float32, or bfloat16 after ``blocks.to(torch.bfloat16)``
        (the bf16 tier's sampling copy, ``genmodels.precision``); embeddings, head and sampling
        stay float32."""
        return next(self.blocks.parameters()).dtype

    def no_weight_decay(self) -> tuple[str, ...]:
        """Name fragments excluded from weight decay (official ``train.py`` nowd_keys); 1-D
        parameters and biases are excluded anyway."""
        return ("pos_1LC", "pos_start", "lvl_embed", "gamma", "beta", "ada_gss", "scale_mul")

    # ------------------------------------------------------------------ the quantizer
    def bind_tokenizer(self, tokenizer: nn.Module) -> None:
        """Keep a (non-registered) reference to the frozen multi-scale VQ-VAE: VAR needs its
        quantizer for the teacher-forcing inputs and the next-scale inputs while sampling,
        but its weights are not part of VAR's state dict (official ``vae_proxy``)."""
        quant = getattr(tokenizer, "quantize", tokenizer)
        for name in ("idxBl_to_var_input", "get_next_autoregressive_input", "embedding"):
            if not hasattr(quant, name):
                raise TypeError(f"VAR.bind_tokenizer: {type(tokenizer).__name__} has no multi-scale quantizer "
                                f"(missing {name!r}); VAR needs genmodels.tokenizers.multiscale_vq.VQVAE")
        pn = tuple(getattr(quant, "patch_nums", None) or getattr(quant, "v_patch_nums", ()))
        for name, mine, theirs in (("patch_nums", self.patch_nums, pn),
                                   ("vocab_size", self.V, quant.embedding.weight.shape[0]),
                                   ("Cvae", self.Cvae, quant.embedding.weight.shape[1])):
            if mine != theirs:
                raise ValueError(f"VAR was built with {name}={mine} but the tokenizer has {name}={theirs}; "
                                 "set the generator's init_args to match the tokenizer")
        self._tokenizer = (tokenizer,)

    @property
    def tokenizer(self) -> nn.Module:
        if not self._tokenizer:
            raise RuntimeError("VAR needs its multi-scale VQ-VAE: call generator.bind_tokenizer(tokenizer) first "
                               "(GeneratorModule does this after loading the frozen tokenizer)")
        return self._tokenizer[0]

    @property
    def quantizer(self) -> nn.Module:
        return getattr(self.tokenizer, "quantize", self.tokenizer)

    # ------------------------------------------------------------------ transformer
    def get_logits(self, h: torch.Tensor, cond_BD: torch.Tensor | None,
                   ada: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """h (B, l, C), cond (B, D) (or ``ada`` = ``head_nm.ada_params(cond)``) -> logits (B, l, V) in float32."""
        return self.head(self.head_nm(h.float(), cond_BD, ada=ada).float()).float()

    def forward(self, labels: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor | None, prog_si: int = -1) -> torch.Tensor:
        """Teacher-forced logits (official ``VAR.forward(label_B, x_BLCv_wo_first_l)``).

        labels (B,) int64; x_BLCv_wo_first_l (B, L - first_l, Cvae): the quantizer's
        ``idxBl_to_var_input``. With ``prog_si >= 0`` only scales 0..prog_si are used.
        Returns logits (B, L, V) (or (B, end of scale prog_si, V)), float32.
        """
        ed = self.begin_ends[prog_si][1] if prog_si >= 0 else self.L
        B = labels.shape[0]
        with torch.autocast(device_type=labels.device.type, enabled=False):
            if self.training and self.cond_drop_rate > 0:
                labels = torch.where(torch.rand(B, device=labels.device) < self.cond_drop_rate, self.num_classes, labels)
            sos = cond_BD = self.class_emb(labels)
            sos = sos.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
            if prog_si == 0:
                x_BLC = sos
            else:
                x_BLC = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l[:, :ed - self.first_l].float())), dim=1)
            x_BLC = x_BLC + (self.lvl_embed(self.lvl_1L[:, :ed].expand(B, -1)) + self.pos_1LC[:, :ed])
        # the block-causal mask as scale boundaries: the last two scales attend without a mask
        attn_bias = ScaleCausalMask([e for _, e in self.begin_ends if e <= ed])
        cond_BD_or_gss = self.shared_ada_lin(cond_BD)
        dev = x_BLC.device.type
        main_type = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x_BLC.dtype
        x_BLC, cond_BD_or_gss = x_BLC.to(main_type), cond_BD_or_gss.to(main_type)
        for block in self.blocks:
            x_BLC = block(x_BLC, cond_BD_or_gss, attn_bias)
        logits = self.get_logits(x_BLC.float(), cond_BD)
        if prog_si == 0:  # keep word_embed in the graph (DDP), as the official
            logits = logits + (self.word_embed.weight[0, 0] * 0 + self.word_embed.bias[0] * 0)
        return logits

    # ------------------------------------------------------------------ training
    def set_train_progress(self, step: int, total_steps: int, warmup_steps: int = 0) -> None:
        """Progressive training schedule (official ``train.py``/``trainer.py``): the stage
        ``prog_si`` is ``pg0`` during warm-up, then rises linearly to the last scale at
        ``pg * total_steps``; the newest scale's loss weight ramps over ``pgwp * total_steps``
        steps from its stage's first step (floor 0.01), except in the first stage. Stateless
        in ``step``, so resumed runs follow the same schedule. No-op when ``pg == 0``."""
        self._progress_set = True
        if not self.pg:
            self.prog_si, self.prog_wp = -1, 1.0
            return
        K = len(self.patch_nums)

        def stage(g: int) -> int:
            if g <= warmup_steps:
                return self.pg0
            if g >= total_steps * self.pg:
                return K - 1
            progress = min(max((g - warmup_steps) / (total_steps * self.pg - warmup_steps), 0), 1)
            return self.pg0 + round(progress * (K - 1 - self.pg0))

        si = stage(step)
        lo, hi = 0, step  # first step of the current stage (stage() is non-decreasing)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if stage(mid) < si else (lo, mid)
        prog_it = step - lo + 1
        wp_it = self.pgwp * total_steps
        prog_wp = max(min(prog_it / wp_it, 1), 0.01) if wp_it > 0 else 1.0
        if si == self.pg0:
            prog_wp = 1.0  # no ramp in the first stage: the LR warm-up covers it
        self.prog_si, self.prog_wp = (-1 if si == K - 1 else si), prog_wp

    def forward_loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Token-mean cross-entropy over all scales (official ``VARTrainer.train_step``).

        tokens (B, L) int64, scales concatenated coarse to fine; labels (B,) int64.
        The teacher-forcing input comes from the bound quantizer's ``idxBl_to_var_input``.
        Logs ``loss_mean`` / ``loss_tail`` (CE over all tokens / the last scale, without
        label smoothing) and ``acc_mean`` / ``acc_tail`` (%).
        """
        self.spec.check(tokens)
        if self.pg and self.training and not self._progress_set:
            raise RuntimeError("VAR(pg > 0): progressive training needs generator.set_train_progress(step, "
                               "total_steps, warmup_steps) before each training step")
        B = tokens.shape[0]
        idx_Bl = list(tokens.split(self.spec.scale_lens, dim=1))
        with torch.no_grad():
            x_BLCv = self.quantizer.idxBl_to_var_input(idx_Bl)
        prog_si = self.prog_si if self.training else -1
        logits = self(labels, x_BLCv, prog_si=prog_si)
        ed = logits.shape[1]
        target = tokens[:, :ed]
        ce = F.cross_entropy(logits.reshape(-1, self.V), target.reshape(-1), label_smoothing=self.label_smoothing,
                             reduction="none").view(B, ed)
        lw = ce.new_full((1, ed), 1.0 / self.L)  # uniform 1/L per token: a token mean
        if prog_si >= 0:
            bg = self.begin_ends[prog_si][0]
            lw[:, bg:ed] *= min(max(self.prog_wp, 0.0), 1.0)
        loss = ce.mul(lw).sum(dim=-1).mean()
        out = {"loss": loss}
        with torch.no_grad():
            lg = logits.detach()
            out["loss_mean"] = (ce.detach().mean() if self.label_smoothing == 0 else
                                F.cross_entropy(lg.reshape(-1, self.V), target.reshape(-1)))
            # a hit: the target's logit is the row's largest (amax + gather: ~10x cheaper than argmax
            # on the CPU; a tie for the largest counts as a hit, argmax would pick one of them)
            hit = lg.gather(-1, target.unsqueeze(-1)).squeeze(-1) >= lg.amax(-1)
            out["acc_mean"] = hit.float().mean() * 100
            if ed == self.L:
                last = self.patch_nums[-1] ** 2
                out["loss_tail"] = (ce.detach()[:, -last:].mean() if self.label_smoothing == 0 else F.cross_entropy(
                    lg[:, -last:].reshape(-1, self.V), target[:, -last:].reshape(-1)))
                out["acc_tail"] = (hit[:, -last:]).float().mean() * 100
        return out

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def autoregressive_infer_cfg(self, labels: torch.Tensor, *, cfg: float = 1.0, guidance_schedule: str = "linear",
                                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                                 generator: torch.Generator | None = None, more_smooth: bool = False,
                                 use_cache: bool = True, known: tuple[torch.Tensor, torch.Tensor] | None = None,
                                 cuda_graphs: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-scale sampling (official ``VAR.autoregressive_infer_cfg``).

        For each scale k = 0..K-1: run the transformer on scale k's input (keys/values of
        coarser scales come from a ``KVCache``, or, with ``use_cache=False``, the whole
        prefix is recomputed under the block-causal mask), guide the logits with weight
        w_k = ``sampling.guidance_weight(cfg, guidance_schedule, k / (K - 1))`` (the
        genmodels convention: ``uncond + w (cond - uncond)``), divide by ``temperature``,
        mask to top-k / top-p IN PLACE (``sampling.filter_logits_``) and draw with
        ``torch.multinomial(generator=...)``. The drawn codes are upsampled, refined by phi
        and accumulated into f_hat, whose area-downsampled copy is the next scale's input.
        ``cfg == 1`` skips the null-class half of the batch.

        The official knobs map as ``sampling.from_var``: its ``cfg`` c is ``cfg = 1 + c,
        guidance_schedule="linear"`` (its ``(1 + t) cond - t uncond`` with t = c k / (K-1));
        its ``top_p = 0`` (off) is our ``top_p = 1``. README FID setting: c = 1.5, top_k 900,
        top_p 0.96, i.e. ``cfg=2.5, guidance_schedule="linear", top_k=900, top_p=0.96``.

        ``known`` = (tokens (B, L), mask (B, L) bool, True = generate): zero-shot editing
        (``edit_tokens``): at every scale the drawn codes outside the mask are replaced by the
        image's own codes of that scale (teacher forcing) before f_hat accumulates them.

        labels (B,) int64 (``num_classes`` = unconditional). Returns (tokens (B, L) int64,
        f_hat (B, Cvae, pn_K, pn_K)); with ``more_smooth`` (visualisation only) f_hat comes
        from Gumbel-softmax mixtures of codes, computed (as the official) from the logits
        that top-k / top-p already masked, not from the returned tokens.

        ``cuda_graphs``: run each scale's blocks as a CUDA graph (``nn.graphs.StepGraphs``),
        recorded at the first call for this batch size and replayed after: the KV caches and
        AdaLN vectors live in buffers kept for the model (``nn.graphs.static_state``); the
        same tokens. On a CPU the same static buffers run eagerly. Needs ``use_cache``.
        """
        sampling.check_knobs(temperature=temperature, top_k=top_k, top_p=top_p, cfg=cfg)
        if cuda_graphs and not use_cache:
            raise GenmodelsError("VAR sampling: cuda_graphs=True replays the KV-cache steps; use_cache must be True")
        sampling.check_schedule(guidance_schedule)
        quant = self.quantizer
        labels = labels.long()
        self.check_inputs(None, labels)
        B, K = labels.shape[0], len(self.patch_nums)
        guided = cfg != 1.0
        if guided:
            labels = sampling.with_null(labels, self.num_classes)
        sos = cond_BD = self.class_emb(labels)
        n = sos.shape[0]
        lvl_pos = self.lvl_embed(self.lvl_1L) + self.pos_1LC
        next_token_map = (sos.unsqueeze(1).expand(n, self.first_l, -1) + self.pos_start.expand(n, self.first_l, -1)
                          + lvl_pos[:, :self.first_l])
        f_hat = sos.new_zeros(B, self.Cvae, self.patch_nums[-1], self.patch_nums[-1])
        caches = [KVCache(capacity=self.L) for _ in self.blocks]  # one buffer per block, filled scale by scale
        cond_BD_or_gss = self.shared_ada_lin(cond_BD)
        dt = self.trunk_dtype  # bfloat16 when the blocks were cast for the bf16 tier; the head stays float32
        # the AdaLN vectors depend on the class only: once per sample, not once per scale
        ada = [block.ada_params(cond_BD_or_gss.to(dt)) for block in self.blocks]
        head_ada = self.head_nm.ada_params(cond_BD)
        if cuda_graphs:
            graphs, caches, static_ada = self._static_sampling_state(n, dt, sos.device, ada)
            for dst, src in zip(static_ada, ada):
                for d, a in zip(dst, src):
                    d.copy_(a)
            ada = static_ada
        prefix: list[torch.Tensor] = []
        tokens = []
        cur_L = 0
        for si, pn in enumerate(self.patch_nums):
            ratio = si / (K - 1)
            cur_L += pn * pn
            if cuda_graphs:
                x = graphs(si, self._cached_step(caches, ada, cur_L - pn * pn), next_token_map.to(dt))
            elif use_cache:
                x = next_token_map.to(dt)
                for block, cache, a in zip(self.blocks, caches, ada):
                    x = block(x, None, None, cache=cache, ada=a)
            else:
                prefix.append(next_token_map.to(dt))
                x = torch.cat(prefix, dim=1)
                mask = self.attn_bias_for_masking[:, :, :cur_L, :cur_L].to(x.dtype)
                for block, a in zip(self.blocks, ada):
                    x = block(x, None, mask, ada=a)
                x = x[:, cur_L - pn * pn:]
            if guided:
                # the head is affine (W h + b) and the guidance weights sum to 1, so guiding its
                # input equals guiding the logits (float32 rounding aside): one head matmul on B
                # rows instead of 2B, no (2B, l, V) logits
                w = sampling.guidance_weight(cfg, guidance_schedule, ratio)
                h = self.head_nm(x.float(), None, ada=head_ada).float()
                logits_BlV = self.head(sampling.guide(h[:B], h[B:], w, form="var")).float()
            else:
                logits_BlV = self.get_logits(x, None, ada=head_ada)
            if temperature != 1.0:
                logits_BlV = logits_BlV / temperature
            # in place, as the official sample_with_top_k_top_p_: the smoothed codes below see the mask
            _, cand = sampling.filter_logits_with_candidates_(logits_BlV, top_k, top_p)
            idx_Bl = sampling.sample_categorical(logits_BlV, generator, candidates=cand)
            if known is not None:
                bg, ed = self.begin_ends[si]
                idx_Bl = torch.where(known[1][:, bg:ed], idx_Bl, known[0][:, bg:ed])
            tokens.append(idx_Bl)
            if not more_smooth:
                h_BlC = quant.embedding(idx_Bl)
            else:  # official: MaskGIT-style smoothed codes, for visualisation only
                gum_t = max(0.27 * (1 - ratio * 0.95), 0.005)
                h_BlC = (sampling.gumbel_softmax(logits_BlV.mul(1 + ratio), gum_t, generator)
                         @ quant.embedding.weight.unsqueeze(0))
            h_BChw = h_BlC.transpose(1, 2).reshape(B, self.Cvae, pn, pn)
            f_hat, next_map = quant.get_next_autoregressive_input(si, K, f_hat, h_BChw)
            if si != K - 1:
                next_map = next_map.view(B, self.Cvae, -1).transpose(1, 2)
                next_token_map = self.word_embed(next_map) + lvl_pos[:, cur_L:cur_L + self.patch_nums[si + 1] ** 2]
                if guided:
                    next_token_map = next_token_map.repeat(2, 1, 1)
        return torch.cat(tokens, dim=1), f_hat

    def _cached_step(self, caches: list[KVCache], ada: list[tuple[torch.Tensor, ...]], start: int):
        """One scale's blocks on its tokens x (n, pn^2, C), the caches rewound to the scale's first
        position ``start`` (so the step can run again: CUDA-graph warm-up and capture)."""
        def step(x: torch.Tensor) -> torch.Tensor:
            for block, cache, a in zip(self.blocks, caches, ada):
                cache.rewind(start)
                x = block(x, None, None, cache=cache, ada=a)
            return x
        return step

    def _static_sampling_state(self, n: int, dtype: torch.dtype, device: torch.device,
                               ada: list[tuple[torch.Tensor, ...]]):
        """(StepGraphs, KV caches, AdaLN buffers) for batch rows n (``nn.graphs.static_state``)."""
        return static_state(self, (n, dtype, str(device)), lambda: (
            StepGraphs(device), [KVCache(capacity=self.L) for _ in self.blocks],
            [tuple(a.clone() for a in block_ada) for block_ada in ada]))

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, *, cfg: float = 1.0, guidance_schedule: str = "linear",
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, num_steps: int | None = None,
               generator: torch.Generator | None = None, more_smooth: bool = False,
               use_cache: bool = True, fastvar_prune: Sequence[float] | None = None,
               cuda_graphs: bool = False) -> torch.Tensor:
        """Sample token pyramids (B, L) int64 for class ``labels`` (B,); see
        ``autoregressive_infer_cfg``. ``num_steps`` must be None or K (VAR has one step per
        scale). The README's FID setting (official cfg 1.5, top_k 900, top_p 0.96) is
        ``cfg=2.5, guidance_schedule="linear", top_k=900, top_p=0.96`` (``sampling.from_var``).
        ``fastvar_prune`` (APPROXIMATE tier, off by default): ``fastvar_infer_cfg``.
        ``cuda_graphs``: replay each scale's blocks as a CUDA graph (exact tier, GPU)."""
        self._check_steps(num_steps)
        if fastvar_prune:
            return fastvar_infer_cfg(self, labels, fastvar_prune, cfg=cfg, guidance_schedule=guidance_schedule,
                                     temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)[0]
        return self.autoregressive_infer_cfg(labels, cfg=cfg, guidance_schedule=guidance_schedule,
                                             temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                                             more_smooth=more_smooth, use_cache=use_cache,
                                             cuda_graphs=cuda_graphs)[0]

    @torch.no_grad()
    def sample_images(self, labels: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Sample and decode: images (B, 3, H, W) in [-1, 1] (the official sampler returns
        the same images mapped to [0, 1]). Decodes the sampler's f_hat, so ``more_smooth``
        is honoured."""
        self._check_steps(kwargs.pop("num_steps", None))
        prune = kwargs.pop("fastvar_prune", None)
        _, f_hat = (fastvar_infer_cfg(self, labels, prune, **kwargs) if prune
                    else self.autoregressive_infer_cfg(labels, **kwargs))
        return self.tokenizer.fhat_to_img(f_hat).clamp(-1, 1)

    @torch.no_grad()
    def edit_tokens(self, tokens: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, *,
                    num_steps: int | None = None, **knobs: Any) -> torch.Tensor:
        """Zero-shot in-/out-painting and class-conditional editing (the paper's zero-shot generalisation): at every
        scale the tokens outside the mask are teacher-forced to the image's own tokens of that
        scale and the masked ones are sampled; the accumulated f_hat (the next scale's input)
        follows the mixed codes. tokens (B, L) the image's pyramid (``encode``), mask (B, L) bool
        (True = regenerate; each scale its own footprint), labels (B,); ``knobs`` as ``sample``.
        An all-True mask gives exactly ``sample``'s tokens for the same seed."""
        self._check_steps(num_steps)
        if knobs.get("more_smooth"):
            raise GenmodelsError("VAR.edit_tokens: more_smooth mixes codes for visualisation; editing teacher-forces "
                                 "codes, leave more_smooth off")
        self.check_inputs(tokens, labels.long())
        known = (tokens.long(), mask.to(tokens.device).bool())
        return self.autoregressive_infer_cfg(labels, known=known, **knobs)[0]

    def _check_steps(self, num_steps: int | None) -> None:
        if num_steps is not None and num_steps != len(self.patch_nums):
            raise ValueError(f"VAR samples one step per scale: num_steps must be None or {len(self.patch_nums)} "
                             f"(len(patch_nums)), got {num_steps}")


# ---------------------------------------------------------------------- approximate tier
@torch.no_grad()
def fastvar_infer_cfg(var: VAR, labels: torch.Tensor, prune: Sequence[float], *, cfg: float = 1.0,
                      guidance_schedule: str = "linear", temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """APPROXIMATE sampler (opt-in knob ``fastvar_prune``, never the default): cached token
    pruning after FastVAR (Guo et al., "FastVAR: Linear Visual Autoregressive Modeling via
    Cached Token Pruning", ICCV 2025, arXiv 2503.23367).

    ``prune`` (p_1, ..., p_m) are the fractions of tokens NOT forwarded at the last m scales
    (FastVAR's 2K setting prunes 50 % at its second-last and 75 % at its last scale, i.e.
    ``(0.5, 0.75)``). At such a scale only the "pivotal" tokens go through the transformer:
    the ``ceil((1 - p) pn^2)`` positions whose input embedding lies farthest (squared L2)
    from the scale's mean input (FastVAR's high-frequency criterion), each row of the
    (guided) batch on its own; the other positions take the previous scale's last hidden
    state, area-resized to this scale ("cached token restoration"). Keys/values of pruned
    positions never enter the KV cache, so later scales attend to fewer keys. Everything
    else (guidance, top-k / top-p, quantizer) is ``VAR.autoregressive_infer_cfg``'s; with
    ``prune`` all zeros it draws the same tokens. Returns (tokens (B, L), f_hat).
    The paper reports a <1 % quality drop at 2.7x on Infinity / HART; measure ΔFID for
    your model (``benchmarks/approx_tier.py``).
    """
    prune = [float(p) for p in prune]
    K = len(var.patch_nums)
    if len(prune) > K - 1 or any(not 0.0 <= p < 1.0 for p in prune):
        raise ValueError(f"fastvar_prune: at most {K - 1} fractions in [0, 1) (one per final scale), got {prune}")
    ratio_at = [0.0] * (K - len(prune)) + prune
    sampling.check_knobs(temperature=temperature, top_k=top_k, top_p=top_p, cfg=cfg)
    sampling.check_schedule(guidance_schedule)
    quant = var.quantizer
    labels = labels.long()
    var.check_inputs(None, labels)
    B = labels.shape[0]
    guided = cfg != 1.0
    if guided:
        labels = sampling.with_null(labels, var.num_classes)
    sos = cond_BD = var.class_emb(labels)
    n = sos.shape[0]
    lvl_pos = var.lvl_embed(var.lvl_1L) + var.pos_1LC
    next_token_map = (sos.unsqueeze(1).expand(n, var.first_l, -1) + var.pos_start.expand(n, var.first_l, -1)
                      + lvl_pos[:, :var.first_l])
    f_hat = sos.new_zeros(B, var.Cvae, var.patch_nums[-1], var.patch_nums[-1])
    caches = [KVCache() for _ in var.blocks]
    dt = var.trunk_dtype
    cond_BD_or_gss = var.shared_ada_lin(cond_BD).to(dt)
    tokens, prev_h, cur_L = [], None, 0
    for si, pn in enumerate(var.patch_nums):
        cur_L += pn * pn
        x = next_token_map.to(dt)
        keep = None
        if ratio_at[si] > 0 and prev_h is not None:
            n_keep = max(1, math.ceil((1 - ratio_at[si]) * pn * pn))
            score = (x - x.mean(1, keepdim=True)).pow(2).sum(-1)  # (n, pn^2)
            keep = score.topk(n_keep, dim=1).indices.unsqueeze(-1).expand(-1, -1, x.shape[-1])
            x = x.gather(1, keep)
        for block, cache in zip(var.blocks, caches):
            x = block(x, cond_BD_or_gss, None, cache=cache)
        if keep is not None:
            pp = int(round(math.sqrt(prev_h.shape[1])))
            restored = F.interpolate(prev_h.transpose(1, 2).reshape(n, -1, pp, pp), size=(pn, pn), mode="area")
            x = restored.flatten(2).transpose(1, 2).to(x.dtype).scatter(1, keep, x)
        prev_h = x
        logits_BlV = var.get_logits(x, cond_BD)
        if guided:
            w = sampling.guidance_weight(cfg, guidance_schedule, si / (K - 1))
            logits_BlV = sampling.guide(logits_BlV[:B], logits_BlV[B:], w, form="var")
        if temperature != 1.0:
            logits_BlV = logits_BlV / temperature
        _, cand = sampling.filter_logits_with_candidates_(logits_BlV, top_k, top_p)
        idx_Bl = sampling.sample_categorical(logits_BlV, generator, candidates=cand)
        tokens.append(idx_Bl)
        h_BChw = quant.embedding(idx_Bl).transpose(1, 2).reshape(B, var.Cvae, pn, pn)
        f_hat, next_map = quant.get_next_autoregressive_input(si, K, f_hat, h_BChw)
        if si != K - 1:
            next_map = next_map.view(B, var.Cvae, -1).transpose(1, 2)
            next_token_map = var.word_embed(next_map) + lvl_pos[:, cur_L:cur_L + var.patch_nums[si + 1] ** 2]
            if guided:
                next_token_map = next_token_map.repeat(2, 1, 1)
    return torch.cat(tokens, dim=1), f_hat
