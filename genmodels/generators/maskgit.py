"""MaskGIT: masked generative image transformer (Chang et al., CVPR 2022, arXiv:2202.04200).

A bidirectional (BERT) transformer learns to predict randomly masked discrete image tokens
given the class and the visible tokens (masked visual token modelling, paper Sec. 3.1);
sampling starts from an all-mask canvas and in ``T`` steps keeps the most confident
predictions and re-masks the rest, following a decreasing mask schedule (Sec. 3.2-3.3).

Architecture and training follow the PyTorch MaskGIT generator of TiTok
(bytedance/1d-tokenizer ``modeling/maskgit.py::ImageBert``, used for TiTok-L-32 / B-64):

* token ids (vocab = K + C + 2): ``0..K-1`` image codes, ``K`` = [MASK],
  ``K+1..K+C`` = class tokens, ``K+C+1`` = the null class (classifier-free guidance);
* input ``[class token, N image tokens]`` (N+1 positions), logits only for positions 1..N;
* BERT embeddings: word + learned absolute position + token-type row 0, LayerNorm (eps
  1e-12), dropout; post-LN blocks (exact GELU, no dropout after the GELU, hidden dropout
  0.1 on the attention output and the MLP output, attention-probability dropout 0.1);
  ``lm_head`` = Linear(hidden -> K) with bias (no MLM transform, no weight tying);
* parameter names map 1:1 onto the Hugging Face ``BertModel`` keys of the official
  ``generator_titok_*.bin`` (see ``genmodels/checkpoints/titok.py``; query/key/value
  are fused into ``attn.qkv``).

Training (``forward_loss``): t ~ U[0, 1), mask ratio r = schedule(t) (clamped to [1e-6, 1]),
``round(N r)`` (>= 1) positions chosen uniformly at random are replaced by [MASK]
(``ImageBert.masking_input_tokens``); loss = label-smoothed cross-entropy over all
positions with weight 1 on masked and ``unmasked_weight`` on visible tokens, normalised by
the sum of the weights (1d-tokenizer ``MLMLoss``; ``unmasked_weight=0`` is the paper's
loss on masked tokens only). The class is replaced by the null class with probability
``class_dropout`` (training mode only).

Differences from the original JAX MaskGIT (google-research/maskgit), for the record:
the JAX transformer has no token-type embedding and an MLM head Dense+GELU+LN followed by
the tied word embedding + bias (172.46M parameters for ImageNet 256 vs 172.65M here), its
GELU is the tanh approximation, and its decoding samples categorically with a log-prob
confidence -- available here as ``sample(..., decoding="maskgit")``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from genmodels import sampling
from genmodels.generators.base import Generator
from genmodels.sampling import gumbel_noise
from genmodels.nn.attention import Block
from genmodels.nn.dropout import Dropout
from genmodels.tokenizers.base import TokenSpec

MASK_SCHEDULES = ("arccos", "cosine", "linear")
GUIDANCE_SCHEDULES = sampling.GUIDANCE_SCHEDULES
DECODINGS = ("titok", "maskgit")


def mask_ratio(r: float | torch.Tensor, schedule: str = "arccos") -> float | torch.Tensor:
    """The mask schedule gamma(r): fraction of tokens masked at progress r in [0, 1].

    ``arccos``: arccos(r) / (pi/2) (1d-tokenizer); ``cosine``: cos(pi r / 2) (MaskGIT paper,
    Sec. 3.3, ``mask_schedule.py``); ``linear``: 1 - r. All decrease from 1 at r=0 to 0 at r=1.
    Works on Python floats (float64, as numpy in the official decoding) and tensors.
    """
    if schedule not in MASK_SCHEDULES:
        raise ValueError(f"mask_schedule must be one of {MASK_SCHEDULES}, got {schedule!r}")
    if isinstance(r, torch.Tensor):
        if schedule == "arccos":
            return torch.acos(r) / (math.pi * 0.5)
        if schedule == "cosine":
            return torch.cos(math.pi * 0.5 * r)
        return 1.0 - r
    if schedule == "arccos":
        return math.acos(r) / (math.pi * 0.5)
    if schedule == "cosine":
        return math.cos(math.pi * 0.5 * r)
    return 1.0 - r


class MaskGIT(Generator):
    """Class-conditional MaskGIT over one grid of discrete tokens.

    Args:
        vocab_size: K, the tokenizer's codebook size.
        token_shape: the token grid, e.g. ``(16, 16)`` (2D VQGAN) or ``(32,)`` (TiTok 1D);
            or give ``seq_len`` (N) for a 1D sequence ``(N,)``.
        num_classes: C; label ``C`` is the null class.
        hidden_size, depth, num_heads: transformer width / layers / heads.
        mlp_ratio or intermediate_size: MLP width (``intermediate_size`` wins if given).
        dropout: hidden dropout (embeddings, attention output, MLP output); attn_dropout:
            dropout on the attention probabilities (both 0.1 in BERT / MaskGIT / TiTok).
        class_dropout: probability of replacing the label by the null class in training.
        mask_schedule: ``arccos`` (1d-tokenizer), ``cosine`` (paper) or ``linear``; used for
            the training mask ratios and, by default, for decoding.
        label_smoothing: of the cross-entropy (0.1).
        unmasked_weight: loss weight of visible tokens (0.1 as 1d-tokenizer; 0 = paper).
        initializer_range: std of the normal init of Linear / Embedding weights (BERT, 0.02).
    """

    def __init__(self, vocab_size: int, token_shape: Sequence[int] | None = None, seq_len: int | None = None,
                 num_classes: int = 1000, hidden_size: int = 768, depth: int = 24, num_heads: int = 16,
                 mlp_ratio: float = 4.0, intermediate_size: int | None = None, dropout: float = 0.1,
                 attn_dropout: float = 0.1, class_dropout: float = 0.1, mask_schedule: str = "arccos",
                 label_smoothing: float = 0.1, unmasked_weight: float = 0.1, initializer_range: float = 0.02) -> None:
        super().__init__()
        if token_shape is None and seq_len is None:
            raise ValueError("MaskGIT needs token_shape (e.g. [16, 16]) or seq_len")
        if token_shape is None:
            token_shape = (int(seq_len),)
        token_shape = tuple(int(s) for s in token_shape)
        if seq_len is not None and math.prod(token_shape) != seq_len:
            raise ValueError(f"MaskGIT: seq_len={seq_len} does not match token_shape={token_shape} "
                             f"({math.prod(token_shape)} tokens)")
        if mask_schedule not in MASK_SCHEDULES:
            raise ValueError(f"MaskGIT.mask_schedule must be one of {MASK_SCHEDULES}, got {mask_schedule!r}")
        self.spec = TokenSpec("discrete", (token_shape,), vocab_size=int(vocab_size))
        self.vocab_size, self.num_classes = int(vocab_size), int(num_classes)
        self.seq_len = math.prod(token_shape)
        self.mask_token_id = self.vocab_size                        # K
        self.class_offset = self.vocab_size + 1                     # class c -> K + 1 + c; null -> K + C + 1
        self.class_dropout, self.mask_schedule = class_dropout, mask_schedule
        self.label_smoothing, self.unmasked_weight = label_smoothing, unmasked_weight
        intermediate_size = intermediate_size or int(hidden_size * mlp_ratio)

        # BERT embeddings (HF ``BertEmbeddings``: word + token_type(0) + position, LN, dropout)
        self.word_embeddings = nn.Embedding(self.vocab_size + self.num_classes + 2, hidden_size)
        self.position_embeddings = nn.Embedding(self.seq_len + 1, hidden_size)
        self.token_type_embeddings = nn.Embedding(2, hidden_size)  # only row 0 is used; 2 rows as BERT's checkpoint
        self.embed_norm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.embed_drop = Dropout(dropout)
        self.blocks = nn.ModuleList([
            Block(hidden_size, num_heads, mlp_ratio=intermediate_size / hidden_size, qkv_bias=True, norm_eps=1e-12,
                  drop=dropout, attn_drop=attn_dropout, post_norm=True, mlp_hidden_drop=0.0)
            for _ in range(depth)])
        if depth and self.blocks[0].mlp.fc1.out_features != intermediate_size:
            raise ValueError(f"MaskGIT: intermediate_size={intermediate_size} is not representable as a mlp_ratio "
                             f"of hidden_size={hidden_size}")
        self.lm_head = nn.Linear(hidden_size, self.vocab_size)
        self.initializer_range = initializer_range
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        """HF ``BertPreTrainedModel._init_weights``: N(0, 0.02) weights, zero bias, LN 1/0."""
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.initializer_range)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ presets
    @classmethod
    def imagenet256(cls, **overrides) -> "MaskGIT":
        """The paper's ImageNet 256x256 generator (Sec. 4.1, google-research/maskgit
        ``maskgit_class_cond_config``): VQGAN f16 (1024 codes) -> 16x16 tokens, 24 layers,
        width 768, 16 heads, MLP 3072, dropout 0.1, label smoothing 0.1, cosine schedule,
        loss on masked tokens only, no class dropout (the paper uses no guidance).
        172.65M parameters (the paper's 227M include the 54.5M VQGAN)."""
        kw = dict(vocab_size=1024, token_shape=(16, 16), num_classes=1000, hidden_size=768, depth=24, num_heads=16,
                  intermediate_size=3072, dropout=0.1, attn_dropout=0.1, class_dropout=0.0, mask_schedule="cosine",
                  label_smoothing=0.1, unmasked_weight=0.0)
        return cls(**{**kw, **overrides})

    @classmethod
    def titok(cls, num_tokens: int = 32, **overrides) -> "MaskGIT":
        """TiTok's generator (configs/infer/TiTok/titok_l32.yaml, b64): 4096 codes, ``num_tokens``
        1D tokens, 24 x 768, 16 heads, MLP 3072, arccos schedule, class dropout 0.1, MLMLoss."""
        kw = dict(vocab_size=4096, token_shape=(num_tokens,), num_classes=1000, hidden_size=768, depth=24,
                  num_heads=16, intermediate_size=3072, dropout=0.1, attn_dropout=0.1, class_dropout=0.1,
                  mask_schedule="arccos", label_smoothing=0.1, unmasked_weight=0.1)
        return cls(**{**kw, **overrides})

    #: sampling settings of the official releases (``sample(labels, **SAMPLE_PRESETS[name])``), in
    #: our convention. TiTok: configs/infer/TiTok/*.yaml + sample_imagenet_titok.py (softmax
    #: annealing on); its ``guidance_scale`` g maps through ``sampling.from_titok_guidance``
    #: (paper: l32 g=4.5, b64 g=3.0, guidance_decay linear; randomize_temperature 9.5 / 11.0).
    SAMPLE_PRESETS = {
        "maskgit-paper": dict(cfg=1.0, num_steps=8, choice_temperature=4.5, decoding="maskgit"),
        "titok-l32": dict(**sampling.from_titok_guidance(4.5, "linear"), choice_temperature=9.5, num_steps=8,
                          softmax_temperature_annealing=True, decoding="titok"),
        "titok-b64": dict(**sampling.from_titok_guidance(3.0, "linear"), choice_temperature=11.0, num_steps=8,
                          softmax_temperature_annealing=True, decoding="titok"),
    }

    def no_weight_decay(self) -> tuple[str, ...]:
        """1d-tokenizer's optimiser excludes every embedding table from weight decay."""
        return ("embeddings",)

    # ------------------------------------------------------------------ network
    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """tokens (B, N) ids in [0, K] (K = [MASK]); labels (B,) in [0, C] (C = null class)
        -> logits (B, N, K) over the image codes."""
        ids = torch.cat([(labels + self.class_offset).view(-1, 1), tokens], dim=1)
        x = self.word_embeddings(ids) + self.token_type_embeddings.weight[0]
        x = x + self.position_embeddings.weight[: ids.shape[1]]
        x = self.embed_drop(self.embed_norm(x))
        for blk in self.blocks:
            x = blk(x)
        return self.lm_head(x[:, 1:])

    # ------------------------------------------------------------------ training
    def mask_tokens(self, tokens: torch.Tensor, generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``ImageBert.masking_input_tokens``: (B, N) -> (masked tokens, bool mask (B, N))."""
        B, N = tokens.shape
        t = torch.rand(B, device=tokens.device, generator=generator)
        ratio = mask_ratio(t, self.mask_schedule).clamp(1e-6, 1.0)
        num_masked = (N * ratio).round().clamp(min=1)
        rank = torch.rand(B, N, device=tokens.device, generator=generator).argsort(dim=-1)
        mask = rank < num_masked[:, None]
        return torch.where(mask, self.mask_token_id, tokens), mask

    def forward_loss(self, tokens: torch.Tensor, labels: torch.Tensor,
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Masked-token loss. tokens (B, N) int64 in [0, K), labels (B,) in [0, C).

        Returns ``loss`` (weighted label-smoothed CE), ``acc`` (accuracy on masked tokens)
        and ``mask_ratio`` (mean fraction masked)."""
        self.check_inputs(tokens, labels)
        tokens, labels = tokens.long(), labels.long()
        masked, mask = self.mask_tokens(tokens, generator)
        if self.training and self.class_dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device, generator=generator) < self.class_dropout
            labels = torch.where(drop, self.num_classes, labels)
        logits = self(masked, labels)
        ce = F.cross_entropy(logits.transpose(1, 2).float(), tokens, reduction="none",
                             label_smoothing=self.label_smoothing)
        w = mask.float() + (~mask).float() * self.unmasked_weight
        loss = (ce * w).sum() / (w.sum() + 1e-8)
        with torch.no_grad():
            correct = (logits.argmax(-1) == tokens).float() * mask
            acc = (correct.sum(1) / mask.sum(1).clamp(min=1)).mean()
        return {"loss": loss, "acc": acc, "mask_ratio": mask.float().mean()}

    # ------------------------------------------------------------------ sampling
    def _guided_logits(self, ids: torch.Tensor, labels: torch.Tensor, cfg: float, schedule: str, step: int,
                       num_steps: int, guidance_pow: float) -> torch.Tensor:
        """Logits at decoding ``step`` with classifier-free guidance (``ImageBert.generate``).

        ``cfg`` is the weight w of ``uncond + w (cond - uncond)`` (1 = no guidance), moved by
        ``sampling.guidance_weight`` at progress step / T: constant w; linear 1 + (step/T)(w - 1)
        (MUSE; step 0 unguided and without the unconditional pass); power-cosine
        1 + (w - 1)(1 - cos(pi (step/T)^pow)) / 2 (MDT). The constant / linear forms use the
        official arithmetic ``cond + g (cond - uncond)`` with g = w_step - 1 (``guide(form="cond")``).
        """
        w = sampling.guidance_weight(cfg, schedule, step / num_steps, guidance_pow)
        if w == 1.0:
            return self(ids, labels).float()
        null = torch.full_like(labels, self.num_classes)
        cond, uncond = self(torch.cat([ids, ids]), torch.cat([labels, null])).float().chunk(2)
        return sampling.guide(cond, uncond, w, form="uncond" if schedule == "power-cosine" else "cond")

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, *, cfg: float = 1.0, temperature: float = 1.0, num_steps: int | None = 8,
               generator: torch.Generator | None = None, guidance_schedule: str = "linear",
               guidance_pow: float = 3.0, choice_temperature: float = 4.5, randomize_temperature: float | None = None,
               softmax_temperature_annealing: bool = False, mask_schedule: str | None = None,
               decoding: str = "titok", return_history: bool = False, known: torch.Tensor | None = None
               ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Iterative confidence-based decoding (paper Sec. 3.2; ``ImageBert.generate``).

        Per step s = 0..T-1 (ratio = (s+1)/T, tau = choice_temperature (1 - ratio)):
        logits (with guidance, see ``_guided_logits``) are divided by ``temperature`` (and,
        with ``softmax_temperature_annealing``, by 0.5 + 0.8 (1 - ratio)); every masked
        position is predicted, then
        ``decoding="titok"`` (1d-tokenizer): id = argmax(logits + tau g1), confidence =
        logit(id) + tau g2 (g1, g2 independent Gumbel noise) -- i.e. ids are sampled at the
        annealed temperature tau;
        ``decoding="maskgit"`` (JAX ``parallel_decode``): id ~ softmax(logits), confidence =
        log p(id) + tau g2.
        Known tokens get confidence +inf; the ``mask_len = clamp(floor(N gamma(ratio)), 1,
        #masked - 1)`` least confident tokens are re-masked (gamma = ``mask_schedule``, by
        default the training schedule); the last step keeps all predictions.

        Mapping of the generator contract's knobs: ``cfg`` = guidance weight w (1 = none;
        official TiTok ``guidance_scale`` g with constant/linear decay is ``cfg = 1 + g``,
        with power-cosine ``cfg = g``); ``temperature`` = softmax temperature dividing the
        logits (1 = official behaviour); ``choice_temperature`` (alias
        ``randomize_temperature``, TiTok's name) = tau_0 of the Gumbel noise, default 4.5
        (paper). ``num_steps`` = T (8). All noise comes from ``generator`` (a fresh
        randomly seeded one if None), never torch's global RNG.

        Args: labels (B,) in [0, C] (C = null class, i.e. unconditional samples); ``known``
        (B, N) ids: start decoding from these instead of an all-[MASK] canvas (zero-shot
        editing, ``edit_tokens``): only its [MASK] (= K) positions are generated, and the
        schedule runs over each row's masked count M (``mask_len = floor(M gamma(ratio))``;
        M = N without ``known``).
        Returns tokens (B, N) int64 in [0, K); with ``return_history`` also the list of the
        (B, N) ids after each step ([MASK] = K).
        """
        if randomize_temperature is not None:
            choice_temperature = randomize_temperature
        num_steps = 8 if num_steps is None else int(num_steps)
        mask_schedule = mask_schedule or self.mask_schedule
        sampling.check_schedule(guidance_schedule)
        if decoding not in DECODINGS:
            raise ValueError(f"decoding must be one of {DECODINGS}, got {decoding!r}")
        if mask_schedule not in MASK_SCHEDULES:
            raise ValueError(f"mask_schedule must be one of {MASK_SCHEDULES}, got {mask_schedule!r}")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        sampling.check_knobs(temperature=temperature, cfg=cfg)
        labels = labels.long()
        self.check_inputs(None, labels)
        device = labels.device
        if generator is None:
            generator = torch.Generator(device=device)
            generator.seed()
        B, N = labels.shape[0], self.seq_len
        if known is None:
            ids = torch.full((B, N), self.mask_token_id, dtype=torch.long, device=device)
        else:
            ids = known.to(device=device, dtype=torch.long).clone()
        n_total = (ids == self.mask_token_id).sum(-1, keepdim=True)  # M per row (N when sampling)
        history = []
        for step in range(num_steps):
            ratio = (step + 1) / num_steps
            tau = choice_temperature * (1.0 - ratio)
            is_mask = ids == self.mask_token_id
            logits = self._guided_logits(ids, labels, cfg, guidance_schedule, step, num_steps, guidance_pow)
            if temperature != 1.0:
                logits = logits / temperature
            if softmax_temperature_annealing:
                logits = logits / (0.5 + 0.8 * (1.0 - ratio))
            if decoding == "titok":
                noisy = logits + tau * gumbel_noise(tuple(logits.shape), generator, device) if tau != 0 else logits
                sampled = noisy.argmax(-1)
                score = logits.gather(-1, sampled[..., None]).squeeze(-1)
            else:
                sampled = (logits + gumbel_noise(tuple(logits.shape), generator, device)).argmax(-1)  # categorical
                score = logits.log_softmax(-1).gather(-1, sampled[..., None]).squeeze(-1)
            sampled = torch.where(is_mask, sampled, ids)
            if step == num_steps - 1:
                ids = sampled
            else:
                score = torch.where(is_mask, score, torch.inf)
                n_masked = is_mask.sum(-1, keepdim=True)
                mask_len = torch.floor(n_total.double() * mask_ratio(ratio, mask_schedule)).long()
                mask_len = torch.minimum(mask_len, n_masked - 1).clamp(min=1)
                confidence = score + tau * gumbel_noise(tuple(score.shape), generator, device) if tau != 0 else score
                cut_off = confidence.sort(dim=-1).values.gather(-1, mask_len - 1)
                ids = torch.where((confidence <= cut_off) & is_mask, self.mask_token_id, sampled)
            if return_history:
                history.append(ids.clone())
        return (ids, history) if return_history else ids

    @torch.no_grad()
    def edit_tokens(self, tokens: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, **knobs) -> torch.Tensor:
        """Zero-shot editing (in-/out-painting, class-conditional editing, as in the MaskGIT paper):
        decoding starts from the image's tokens with only the masked ones set to [MASK], and the
        mask schedule runs over the masked count (``sample(known=...)``).

        tokens (B, N) ids of the image, mask (B, N) bool (True = regenerate), labels (B,) the
        class to generate; ``knobs`` as ``sample``. Returns (B, N) ids, equal to ``tokens``
        outside the mask; an all-True mask gives exactly ``sample``'s tokens for the same seed."""
        self.check_inputs(tokens, labels.long())
        mask = mask.to(tokens.device).bool()
        return self.sample(labels, known=torch.where(mask, self.mask_token_id, tokens.long()), **knobs)
