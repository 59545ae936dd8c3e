"""FractalGen: fractal generative models in pixel space (Li, Sun, Fan & He, 2025, "Fractal
Generative Models"; official code LTH14/fractalgen).

The model is a recursion of generators (paper Fig. 2, Sec. 3). Level l sees an image of side
``img_l`` as ``(img_l / img_{l+1})^2`` patches of side ``img_{l+1}`` and outputs, for every patch,
the condition of the next level, which models that patch the same way; the last level is a
``PixelLoss``, a 3-step autoregressive model over a pixel's R, G, B values (256-way each):

    p(x) = prod_{patches i} p(x_i | x_<i or visible, c)   with each factor itself a FractalGen.

* ``ARLevel`` (FractalAR; LlamaGen-style): [condition, patch_1, ..., patch_L] through causal
  RMSNorm / SwiGLU / 2-D RoPE blocks (the condition position's RoPE is zero); the output at position i
  conditions patch i. Sampling decodes one patch per step with a KV cache.
* ``MARLevel`` (FractalMAR; MAR, Li et al. 2024): bidirectional blocks over [guiding pixel?, cond4
  .. cond0, patches], masked patches replaced by ``mask_token``; five conditions per patch go down:
  the middle output and its four neighbours' (top, right, bottom, left; zero at the border).
  Training masks a PER-SAMPLE ratio r ~ truncnorm on [0, 1] (mean 1, std 0.25), ``ceil(L r)``
  patches; only the masked patches go down. (``mask_ratio_std`` widens it: with the official 0.25 a
  level of L = 4 patches sees 3 visible patches in 0.3 % of its training samples, so small models
  on short budgets never learn the last steps of their own sampler; see benchmarks/results/fractal.md.) The NLL pass masks ``randint(L) + 1`` patches.
  For the 256-px models levels > 0 first model the patch's mean colour (the guiding pixel) with
  their own PixelLoss and condition on it (``pix_proj``).
* ``PixelLoss``: [cond, R, G, B] embeddings through causal blocks; logits of channel c are
  ``h_c . codebook_c^T + bias_c`` (tied codebooks). Targets: de-normalise, ``x 255 + 0.01 N(0,1)``,
  round. Training loss ``(r_weight CE_R + CE_G + CE_B) / (r_weight + 2)``, eval (NLL) the plain mean.

Conditioning: level 0 embeds the class (``class_emb``), or ``fake_latent`` for the null class, for
the 10 % of training samples whose label is dropped, and for EVERY sample in eval mode (so ``nll``
is unconditional, as the official ``compute_nll``).

Sampling is depth-first (official; fractalgen#7): each step of level l samples its patches by
running all deeper levels to completion. ``cfg`` w (``uncond + w (cond - uncond)``, our convention)
follows ``guidance_schedule`` across level 0's steps; deeper levels get level 0's current w as a
constant. The PixelLoss applies w to the logits after the official filter: where the conditional
probability is below ``filter_threshold``, the unconditional logit is raised to
``max(uncond, cond - max cond + max uncond)``. ``temperature`` DIVIDES the logits (our convention);
the official PixelLoss temperature T multiplies them: pass ``sampling.from_fractal_temperature(T)``
(= 1 / T). Every draw comes from the given ``torch.Generator``, in the official order (including the
quantisation noise of each PixelLoss step), so a seeded run replays the official RNG stream.

Tokens are images normalised with the ImageNet mean / std (``genmodels.tokenizers.pixels.Pixels``).
Parameter names are the official ones (``class_emb``, ``fake_latent``, ``generator.*``,
``next_fractal.*``): the official checkpoints load 1:1 (``genmodels.checkpoints.fractal``).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from genmodels.errors import GenmodelsError
from genmodels.generators.base import Generator
from genmodels.generators.mar import truncnorm_mask_ratio
from genmodels.nn.attention import Block, KVCache
from genmodels.nn.llama import LlamaBlock, rope_2d
from genmodels.nn.vit import xavier_init_
from genmodels.sampling import GUIDANCE_SCHEDULES, guidance_weight, guide
from genmodels.tokenizers.base import TokenSpec
from genmodels.tokenizers.pixels import IMAGENET_MEAN, IMAGENET_STD

GENERATOR_TYPES = ("ar", "mar")


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(N, 3, H, W) -> (N, (H/p)(W/p), 3 p p): patches in raster order, channel-major features."""
    N, C, H, W = x.shape
    x = x.reshape(N, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(N, (H // p) * (W // p), C * p * p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of ``patchify`` for a square grid: (N, L, 3 p p) -> (N, 3, sqrt(L) p, sqrt(L) p)."""
    N, L, _ = x.shape
    h = math.isqrt(L)
    x = x.reshape(N, h, h, 3, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(N, 3, h * p, h * p)


class _Bias(nn.Module):
    """The logit bias (1, V) of a tied-embedding output layer (official ``MlmLayer``)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, vocab))


# ============================================================================ PixelLoss
def filtered_guidance(cond: torch.Tensor, uncond: torch.Tensor, w: float, threshold: float) -> torch.Tensor:
    """FractalGen's CFG filter, then ``uncond + w (cond - uncond)``. Where the conditional probability
    is below ``threshold``, the unconditional logit is raised to ``max(uncond, cond - max cond + max
    uncond)``, so guidance cannot promote a value the conditional model finds very unlikely: its
    guided logit stays at least ``log(p_max / p)`` below the conditional favourite's. (..., V)."""
    low = cond.softmax(-1) < threshold
    raised = torch.maximum(uncond, cond - cond.amax(-1, keepdim=True) + uncond.amax(-1, keepdim=True))
    return guide(cond, torch.where(low, raised, uncond), w)



class PixelLoss(nn.Module):
    """The last level: p(R, G, B | c) = p(R|c) p(G|R,c) p(B|R,G,c), 256 values each.

    Args: c_channels (condition width), width, depth, num_heads, r_weight (training weight of the
    red channel's CE; the official training script uses 5).
    """

    def __init__(self, c_channels: int, width: int, depth: int, num_heads: int, r_weight: float = 1.0) -> None:
        super().__init__()
        self.r_weight = r_weight
        self.cond_proj = nn.Linear(c_channels, width)
        self.r_codebook = nn.Embedding(256, width)
        self.g_codebook = nn.Embedding(256, width)
        self.b_codebook = nn.Embedding(256, width)
        self.ln = nn.LayerNorm(width, eps=1e-6)
        self.blocks = nn.ModuleList([Block(width, num_heads, 4.0, qkv_bias=True, norm_eps=1e-6)
                                     for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.r_mlm, self.g_mlm, self.b_mlm = _Bias(256), _Bias(256), _Bias(256)
        self.register_buffer("pix_mean", torch.tensor(IMAGENET_MEAN), persistent=False)
        self.register_buffer("pix_std", torch.tensor(IMAGENET_STD), persistent=False)
        self.reset_constants()
        for cb in (self.r_codebook, self.g_codebook, self.b_codebook):
            nn.init.normal_(cb.weight, std=0.02)
        xavier_init_(self)

    def reset_constants(self) -> None:
        """(Re)compute the non-persistent buffers (after ``to_empty``)."""
        self.pix_mean = torch.tensor(IMAGENET_MEAN, device=self.pix_mean.device)
        self.pix_std = torch.tensor(IMAGENET_STD, device=self.pix_std.device)

    def _codebooks(self) -> tuple[nn.Embedding, nn.Embedding, nn.Embedding]:
        return self.r_codebook, self.g_codebook, self.b_codebook

    def quantize(self, target: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised pixels (N, 3) -> ids (N, 3) in [0, 255]: ``round((x std + mean) 255 + 0.01 n)``
        (the small noise breaks the ties of round-half-to-even, as the official code)."""
        x = target.reshape(target.shape[0], 3) * self.pix_std + self.pix_mean
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (x * 255 + 1e-2 * noise).round().clamp(0, 255).long()  # the clamp only guards bad inputs

    def _head(self, h: torch.Tensor, c: int) -> torch.Tensor:
        """Channel c's logits (..., 256) from hidden states (..., width), in float32."""
        return h.float() @ self._codebooks()[c].weight.float().t() + (self.r_mlm, self.g_mlm, self.b_mlm)[c].bias

    def logits(self, ids: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (N, 3, 256) for pixel ids (N, 3) given the middle condition (N, c)."""
        x = torch.cat([self.cond_proj(cond).unsqueeze(1), self.r_codebook(ids[:, 0:1]),
                       self.g_codebook(ids[:, 1:2]), self.b_codebook(ids[:, 2:3])], dim=1)
        x = self.ln(x)
        for block in self.blocks:
            x = block(x, is_causal=True)
        x = self.norm(x)
        return torch.stack([self._head(x[:, c], c) for c in range(3)], dim=1)

    def forward(self, target: torch.Tensor, cond_list: Sequence[torch.Tensor],
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean loss over N pixels (N, 3[, 1, 1]) given ``cond_list[0]`` (N, c) (nats)."""
        ids = self.quantize(target, generator)
        ce = F.cross_entropy(self.logits(ids, cond_list[0]).transpose(1, 2), ids, reduction="none")  # (N, 3)
        if self.training:
            loss = (self.r_weight * ce[:, 0] + ce[:, 1] + ce[:, 2]) / (self.r_weight + 2)
        else:
            loss = ce.mean(dim=1)
        return loss.mean()

    @torch.no_grad()
    def sample(self, cond_list: Sequence[torch.Tensor], guided: bool, cfg: float, temperature: float,
               filter_threshold: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised pixels (N, 3) for conditions (N or 2N [cond | uncond], c), R then G then B, with a
        KV cache over the 4-token sequence."""
        cond = cond_list[0]
        n_all = cond.shape[0]
        n = n_all // 2 if guided else n_all
        caches = [KVCache() for _ in self.blocks]
        ids = torch.zeros(n, 3, dtype=torch.long, device=cond.device)
        x = self.cond_proj(cond).unsqueeze(1)
        for c in range(3):
            # the official re-quantises the partial pixel at every step: the same draw keeps the RNG stream
            torch.randn((n_all, 3), generator=generator, device=cond.device)
            h = self.ln(x)
            for block, cache in zip(self.blocks, caches):
                h = block(h, cache=cache)
            logits = self._head(self.norm(h)[:, 0], c) / temperature
            if guided:
                logits = filtered_guidance(logits[:n], logits[n:], cfg, filter_threshold)
            ids[:, c] = torch.multinomial(logits.softmax(-1), 1, generator=generator).reshape(-1)
            if c < 2:
                x = self._codebooks()[c](ids[:, c]).unsqueeze(1)
                x = torch.cat([x, x]) if guided else x
        return (ids.float() / 255 - self.pix_mean) / self.pix_std


# ============================================================================ levels
NextSample = Callable[[list, float], torch.Tensor]


class ARLevel(nn.Module):
    """Causal (raster) transformer over the L = seq_len patches of side ``patch_size`` (LlamaGen blocks).

    Input [cond_emb(cond_list[0]), patch_emb(patch_1..L)] + ``pos_embed_learned``, ``patch_emb_ln``,
    blocks, ``norm``; the output at position i (i = 0..L-1) is the middle condition of patch i+1.
    Dropout as the official ``ModelArgs``: residual 0.1, FFN 0.1, attention 0.
    """

    def __init__(self, seq_len: int, patch_size: int, cond_embed_dim: int, embed_dim: int, num_blocks: int,
                 num_heads: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.seq_len, self.patch_size = seq_len, patch_size
        grid = math.isqrt(seq_len)
        self.patch_emb = nn.Linear(3 * patch_size ** 2, embed_dim)
        self.patch_emb_ln = nn.LayerNorm(embed_dim, eps=1e-6)
        self.pos_embed_learned = nn.Parameter(torch.zeros(1, seq_len + 1, embed_dim))
        self.cond_emb = nn.Linear(cond_embed_dim, embed_dim)
        self.blocks = nn.ModuleList([LlamaBlock(embed_dim, num_heads, 1e-5, resid_dropout=dropout, ffn_dropout=dropout)
                                     for _ in range(num_blocks)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_dim = embed_dim // num_heads
        self.register_buffer("rope", rope_2d(grid, self.head_dim, 10000.0, num_prefix=1), persistent=False)
        nn.init.normal_(self.pos_embed_learned, std=0.02)
        xavier_init_(self)

    def reset_constants(self) -> None:
        """(Re)compute the non-persistent RoPE table (after ``to_empty``)."""
        self.rope = rope_2d(math.isqrt(self.seq_len), self.head_dim, 10000.0, num_prefix=1).to(self.rope.device)

    def predict(self, patches: torch.Tensor, cond_list: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """patches (N, L, 3 p p), conditions (N, c) -> [middle (N, L, D)] (teacher forcing)."""
        x = torch.cat([self.cond_emb(cond_list[0]).unsqueeze(1), self.patch_emb(patches)], dim=1)
        x = self.patch_emb_ln(x + self.pos_embed_learned[:, :x.shape[1]])
        for block in self.blocks:
            x = block(x, self.rope[:x.shape[1]])
        return [self.norm(x)[:, :-1]]

    def forward(self, imgs: torch.Tensor, cond_list: Sequence[torch.Tensor], generator: torch.Generator | None = None):
        """imgs (N, 3, H, W) -> every patch (N L, 3, p, p), its conditions [(N L, D)], guiding loss 0."""
        patches = patchify(imgs, self.patch_size)
        middle = self.predict(patches, cond_list)[0]
        N, L, _ = patches.shape
        p = self.patch_size
        return patches.reshape(N * L, 3, p, p), [middle.reshape(N * L, -1)], imgs.new_zeros(())

    @torch.no_grad()
    def sample(self, cond_list: list, guided: bool, cfg: float, schedule: str, num_iter: int,
               next_sample: NextSample, generator: torch.Generator | None = None) -> torch.Tensor:
        """One patch per step (``num_iter`` is ignored: always L steps, as official), KV-cached:
        only the new position runs through the blocks. cond (N or 2N, c) -> (N, 3, H, W)."""
        cond = cond_list[0]
        n = cond.shape[0] // 2 if guided else cond.shape[0]
        L, p = self.seq_len, self.patch_size
        caches = [KVCache() for _ in self.blocks]
        patches = cond.new_zeros(n, L, 3 * p * p)
        token = self.cond_emb(cond)
        for step in range(L):
            x = self.patch_emb_ln(token + self.pos_embed_learned[:, step]).unsqueeze(1)
            rope = self.rope[step:step + 1]
            for block, cache in zip(self.blocks, caches):
                x = block(x, rope, cache)
            middle = self.norm(x)[:, 0]
            w = guidance_weight(cfg, schedule, (step + 1) / L) if guided else 1.0
            patch = next_sample([middle], w).reshape(n, -1)
            patches[:, step] = patch
            token = self.patch_emb(torch.cat([patch, patch]) if guided else patch)
        return unpatchify(patches, p)


class MARLevel(nn.Module):
    """Bidirectional masked transformer over L patches (official fractalgen ``MAR``; see module doc).

    Sequence [pix_proj(guiding pixel)?, cond_emb(cond_{num_conds-1}), ..., cond_emb(cond_0), patches]
    with masked patches replaced by ``mask_token``, + ``pos_embed_learned``, ``patch_emb_ln``, timm-style
    blocks (qkv bias, GELU MLP x4, LayerNorm eps 1e-6), ``norm``.
    """

    def __init__(self, seq_len: int, patch_size: int, cond_embed_dim: int, embed_dim: int, num_blocks: int,
                 num_heads: int, attn_dropout: float = 0.1, proj_dropout: float = 0.1, num_conds: int = 5,
                 guiding_pixel: bool = False, mask_ratio_std: float = 0.25) -> None:
        super().__init__()
        self.seq_len, self.patch_size, self.mask_ratio_std = seq_len, patch_size, float(mask_ratio_std)
        self.num_conds, self.guiding_pixel = num_conds, bool(guiding_pixel)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.patch_emb = nn.Linear(3 * patch_size ** 2, embed_dim)
        self.patch_emb_ln = nn.LayerNorm(embed_dim, eps=1e-6)
        self.cond_emb = nn.Linear(cond_embed_dim, embed_dim)
        if self.guiding_pixel:
            self.pix_proj = nn.Linear(3, embed_dim)
        self.pos_embed_learned = nn.Parameter(torch.zeros(1, seq_len + num_conds + self.guiding_pixel, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, 4.0, qkv_bias=True, norm_eps=1e-6,
                                           drop=proj_dropout, attn_drop=attn_dropout) for _ in range(num_blocks)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.normal_(self.pos_embed_learned, std=0.02)
        xavier_init_(self)
        if self.guiding_pixel:  # built after the init, as official (it has its own)
            self.guiding_pixel_loss = PixelLoss(cond_embed_dim, width=128, depth=3, num_heads=4, r_weight=5.0)

    def predict(self, patches: torch.Tensor, mask: torch.Tensor, cond_list: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """patches (N, L, 3 p p), mask (N, L) (1 = masked), conditions -> [middle, top, right, bottom,
        left] each (N, L, D); a neighbour outside the grid is zero."""
        x = self.patch_emb(patches)
        prefix = [self.cond_emb(cond_list[i]).unsqueeze(1) for i in reversed(range(self.num_conds))]
        if self.guiding_pixel:
            prefix.insert(0, self.pix_proj(cond_list[-1]).unsqueeze(1))
        x = torch.cat(prefix + [x], dim=1)
        k = len(prefix)
        masked = torch.cat([mask.new_zeros(mask.shape[0], k), mask], dim=1).bool().unsqueeze(-1)
        x = torch.where(masked, self.mask_token.to(x.dtype), x)
        x = self.patch_emb_ln(x + self.pos_embed_learned)
        for block in self.blocks:
            x = block(x)
        middle = self.norm(x)[:, k:]
        N, L, D = middle.shape
        h = math.isqrt(L)
        grid = middle.reshape(N, h, h, D)
        top = F.pad(grid[:, :-1], (0, 0, 0, 0, 1, 0))
        bottom = F.pad(grid[:, 1:], (0, 0, 0, 0, 0, 1))
        left = F.pad(grid[:, :, :-1], (0, 0, 1, 0))
        right = F.pad(grid[:, :, 1:], (0, 0, 0, 1))
        return [middle] + [t.reshape(N, L, D) for t in (top, right, bottom, left)]

    def sample_orders(self, n: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
        """(n, L) random permutations: ``argsort(rand)``."""
        return torch.argsort(torch.rand(n, self.seq_len, device=device, generator=generator), dim=1)

    def training_mask(self, orders: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Per-sample ratio r ~ a normal (mean 1, std ``mask_ratio_std``; official 0.25, i.e.
        truncnorm(-4, 0, loc 1, scale 0.25)) truncated to [0, 1]; position j masked iff
        ``orders[j] < ceil(L r)`` (the official scatter). -> (n, L) float."""
        u = torch.rand(orders.shape[0], generator=generator, device=orders.device)
        num = torch.ceil(self.seq_len * truncnorm_mask_ratio(u.cpu(), 0.0, self.mask_ratio_std)).to(orders.device)
        return (orders < num[:, None]).float()

    def nll_mask(self, orders: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Eval (NLL) mask: one count ``randint(L) + 1`` for the batch, positions ``orders[:, :count]``."""
        num = int(torch.randint(self.seq_len, (1,), generator=generator, device=orders.device)) + 1
        return torch.zeros_like(orders, dtype=torch.float).scatter_(1, orders[:, :num], 1.0)

    def forward(self, imgs: torch.Tensor, cond_list: Sequence[torch.Tensor], generator: torch.Generator | None = None):
        """imgs (N, 3, H, W) -> the MASKED patches (M, 3, p, p) in (sample, patch) order, their five
        conditions [(M, D)] and the guiding-pixel loss (0 without guiding pixel)."""
        patches = patchify(imgs, self.patch_size)
        N, L, _ = patches.shape
        orders = self.sample_orders(N, imgs.device, generator)
        mask = self.training_mask(orders, generator) if self.training else self.nll_mask(orders, generator)
        cond_list = list(cond_list)
        if self.guiding_pixel:
            pixel = imgs.mean(-1).mean(-1)
            guiding_loss = self.guiding_pixel_loss(pixel, cond_list, generator)
            cond_list.append(pixel)
        else:
            guiding_loss = imgs.new_zeros(())
        keep = mask.reshape(-1).bool()
        conds = [c.reshape(N * L, -1)[keep] for c in self.predict(patches, mask, cond_list)]
        p = self.patch_size
        return patches.reshape(N * L, -1)[keep].reshape(-1, 3, p, p), conds, guiding_loss

    @torch.no_grad()
    def sample(self, cond_list: list, guided: bool, cfg: float, schedule: str, num_iter: int,
               next_sample: NextSample, generator: torch.Generator | None = None, *, temperature: float = 1.0,
               filter_threshold: float = 1e-4, known: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """MAR's cosine schedule over ``min(L, num_iter)`` steps; the patches chosen at a step are
        sampled together by the next level. cond (N or 2N, c) -> (N, 3, H, W).

        ``known`` = (images (N, 3, H, W), pixel mask (N, 1, H, W) bool, True = generate): editing
        (``FractalGen.edit_tokens``). Only the patches with a masked pixel are generated (known
        patches are visible), masked-first in the random order, the schedule over their count M
        (the same in every row); ``next_sample`` then also gets the selected patches' known
        pixels and masks (``(patches (k, 3, p, p), masks (k, 1, p, p))``)."""
        cond = cond_list[0]
        n = cond.shape[0] // 2 if guided else cond.shape[0]
        L, p, device = self.seq_len, self.patch_size, cond.device
        cond_list = list(cond_list)
        if self.guiding_pixel:
            pixel = self.guiding_pixel_loss.sample(cond_list, guided, cfg, temperature, filter_threshold, generator)
            cond_list.append(torch.cat([pixel, pixel]) if guided else pixel)
        mask = torch.ones(n, L, device=device)
        patches = cond.new_zeros(n, L, 3 * p * p)
        orders = self.sample_orders(n, device, generator)
        if known is not None:
            patches = patchify(known[0], p).to(patches.dtype)
            pixel_mask = patchify(known[1].float().expand(-1, 3, -1, -1), p)  # (n, L, 3 p p)
            mask = (pixel_mask > 0).any(-1).float()
            orders = orders.gather(1, (1 - mask).gather(1, orders).argsort(dim=1, stable=True))
        M = int(mask[0].sum())  # patches to generate (L when sampling)
        num_iter = min(L, num_iter)
        for step in range(num_iter if M else 0):
            both = (lambda t: torch.cat([t, t])) if guided else (lambda t: t)
            conds = self.predict(both(patches), both(mask), cond_list)
            mask_len = math.floor(M * math.cos(math.pi / 2. * (step + 1) / num_iter))
            mask_len = max(1, min(int(mask[0].sum()) - 1, mask_len))
            mask_next = torch.zeros_like(mask).scatter_(1, orders[:, :mask_len], 1.0)
            to_pred = mask.bool() if step >= num_iter - 1 else mask.bool() ^ mask_next.bool()
            mask = mask_next
            if not to_pred.any():  # more steps than patches to generate (editing a small region)
                continue
            sel = both(to_pred).nonzero(as_tuple=True)
            w = guidance_weight(cfg, schedule, (M - mask_len) / M) if guided else 1.0
            if known is None:
                sampled = next_sample([c[sel] for c in conds], w)
            else:
                at = to_pred.nonzero(as_tuple=True)
                sampled = next_sample([c[sel] for c in conds], w, (patches[at].reshape(-1, 3, p, p),
                                                                   pixel_mask[at].reshape(-1, 3, p, p)[:, :1] > 0))
            patches[to_pred.nonzero(as_tuple=True)] = sampled.reshape(sampled.shape[0], -1).to(patches.dtype)
        return unpatchify(patches, p)


# ============================================================================ the recursion
def _build_level(l: int, img_size_list, embed_dim_list, num_blocks_list, num_heads_list, generator_type_list,
                 attn_dropout, proj_dropout, guiding_pixel, num_conds, mask_ratio_std) -> nn.Module:
    kw = dict(seq_len=(img_size_list[l] // img_size_list[l + 1]) ** 2, patch_size=img_size_list[l + 1],
              cond_embed_dim=embed_dim_list[l - 1] if l > 0 else embed_dim_list[0], embed_dim=embed_dim_list[l],
              num_blocks=num_blocks_list[l], num_heads=num_heads_list[l])
    if generator_type_list[l] == "ar":
        return ARLevel(**kw)
    return MARLevel(**kw, attn_dropout=attn_dropout, proj_dropout=proj_dropout, num_conds=num_conds,
                    guiding_pixel=guiding_pixel and l > 0, mask_ratio_std=mask_ratio_std)


class FractalLevel(nn.Module):
    """Level l > 0: ``generator`` and ``next_fractal`` (another level or the PixelLoss)."""

    def __init__(self, generator: nn.Module, next_fractal: nn.Module) -> None:
        super().__init__()
        self.generator, self.next_fractal = generator, next_fractal


def _fractal_loss(level: nn.Module, imgs: torch.Tensor, cond_list: list, generator: torch.Generator | None):
    """(PixelLoss, summed guiding-pixel losses) of ``level`` (anything with generator / next_fractal)."""
    patches, conds, guiding = level.generator(imgs, cond_list, generator)
    nxt = level.next_fractal
    if isinstance(nxt, PixelLoss):
        return nxt(patches, conds, generator), guiding
    pixel, deeper = _fractal_loss(nxt, patches, conds, generator)
    return pixel, guiding + deeper


def _fractal_sample(level: nn.Module, depth: int, cond_list: list, guided: bool, cfg: float, schedule: str,
                    knobs: dict, generator: torch.Generator | None) -> torch.Tensor:
    """Depth-first: level ``depth`` samples its patches, each step calling the next level to completion."""
    nxt = level.next_fractal
    if isinstance(nxt, PixelLoss):
        def next_sample(conds, w):
            return nxt.sample(conds, guided, w, knobs["temperature"], knobs["filter_threshold"], generator)
    else:
        def next_sample(conds, w):
            return _fractal_sample(nxt, depth + 1, conds, guided, w, "constant", knobs, generator)
    gen = level.generator
    extra = dict(temperature=knobs["temperature"], filter_threshold=knobs["filter_threshold"]) \
        if isinstance(gen, MARLevel) else {}
    return gen.sample(cond_list, guided, cfg, schedule, knobs["num_iter_list"][depth], next_sample, generator, **extra)


def _fractal_edit(level: nn.Module, depth: int, cond_list: list, guided: bool, cfg: float, schedule: str,
                  knobs: dict, generator: torch.Generator | None, images: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
    """``_fractal_sample`` for items with known pixels: images (N, 3, H, W) normalised, mask (N, 1, H, W)
    bool (True = generate). Fully masked items are sampled together exactly as ``_fractal_sample``
    does; fully known ones are returned as they are; the others, one at a time, by the level's
    MAR with the known patches visible, each selected patch going down with its known pixels."""
    n = images.shape[0]
    flat = mask.flatten(1)
    full, partial = flat.all(1), flat.any(1) & ~flat.all(1)
    out = images.clone()

    def rows(idx: torch.Tensor) -> list[torch.Tensor]:
        return [torch.cat([c[idx], c[n:][idx]]) if guided else c[idx] for c in cond_list]

    if bool(full.any()):
        idx = full.nonzero()[:, 0]
        out[idx] = _fractal_sample(level, depth, rows(idx), guided, cfg, schedule, knobs, generator).to(out.dtype)
    nxt = level.next_fractal
    for i in partial.nonzero()[:, 0].tolist():
        def next_sample(conds, w, sub_known):
            if isinstance(nxt, PixelLoss):  # single pixels: a selected one is masked, nothing is known
                return nxt.sample(conds, guided, w, knobs["temperature"], knobs["filter_threshold"], generator)
            return _fractal_edit(nxt, depth + 1, conds, guided, w, "constant", knobs, generator, *sub_known)
        gen = level.generator
        if not isinstance(gen, MARLevel):
            raise GenmodelsError("FractalGen editing needs MAR levels (FractalMAR): an AR level generates its patches "
                                 "in raster order and cannot use known patches after a masked one")
        idx = torch.tensor([i], device=images.device)
        out[i:i + 1] = gen.sample(rows(idx), guided, cfg, schedule, knobs["num_iter_list"][depth], next_sample,
                                  generator, temperature=knobs["temperature"],
                                  filter_threshold=knobs["filter_threshold"],
                                  known=(images[i:i + 1], mask[i:i + 1])).to(out.dtype)
    return out


class FractalGen(Generator):
    """Class-conditional FractalGen over images of side ``img_size_list[0]`` (see module doc).

    Args (the official ``FractalGen`` constructor's):
        img_size_list: image side per level, e.g. (64, 4, 1): level l models (img_l / img_{l+1})^2
            patches of side img_{l+1}; the last entry must be 1 (pixels, the PixelLoss).
        embed_dim_list, num_blocks_list, num_heads_list: width / depth / heads per level; the last
            entry is the PixelLoss's.
        generator_type_list: "ar" or "mar" per level (the last entry names the PixelLoss; "ar").
        num_classes: C (label C = null class -> ``fake_latent``). label_drop_prob: 0.1.
        attn_dropout, proj_dropout: the MAR levels' dropout (AR levels: fixed 0.1 residual / FFN).
        guiding_pixel: MAR levels > 0 model the patch mean first (the 256-px models).
        num_conds: conditions a MAR level reads (5; FractalAR uses 1).
        r_weight: PixelLoss red-channel weight in training (official training script: 5).
        num_iter_list: default sampling steps per level (official README: 64,16 / 64,16,16).
        nll_passes: passes averaged by ``nll`` (official ``nll_forward_number``); default 1 when all
            levels are AR (exact), else 10.
        mask_ratio_std: std of the MAR levels' truncated-normal training mask ratio on [0, 1] (mean 1;
            official 0.25). Larger spreads the ratio towards uniform on [0, 1] (every visible count
            trained about equally, as the sampler and the NLL estimate use them): for levels of few
            patches on short budgets (the digits configs use 1.0). Not an official argument.
    """

    def __init__(self, img_size_list: Sequence[int] = (64, 4, 1), embed_dim_list: Sequence[int] = (1024, 512, 128),
                 num_blocks_list: Sequence[int] = (32, 8, 3), num_heads_list: Sequence[int] = (16, 8, 4),
                 generator_type_list: Sequence[str] = ("ar", "ar", "ar"), num_classes: int = 1000,
                 label_drop_prob: float = 0.1, attn_dropout: float = 0.1, proj_dropout: float = 0.1,
                 guiding_pixel: bool = False, num_conds: int = 5, r_weight: float = 5.0,
                 num_iter_list: Sequence[int] | None = None, nll_passes: int | None = None,
                 mask_ratio_std: float = 0.25) -> None:
        super().__init__()
        sizes = [int(s) for s in img_size_list]
        n = len(sizes)
        for name, lst in (("embed_dim_list", embed_dim_list), ("num_blocks_list", num_blocks_list),
                          ("num_heads_list", num_heads_list), ("generator_type_list", generator_type_list)):
            if len(lst) != n:
                raise GenmodelsError(f"FractalGen: {name} has {len(lst)} entries, img_size_list has {n}")
        if n < 2 or sizes[-1] != 1 or any(a % b for a, b in zip(sizes, sizes[1:])):
            raise GenmodelsError(f"FractalGen: img_size_list must decrease by integer factors to 1, got {sizes}")
        bad = [t for t in generator_type_list[:-1] if t not in GENERATOR_TYPES]
        if bad:
            raise GenmodelsError(f"FractalGen: generator_type_list entries must be in {GENERATOR_TYPES}, got {bad[0]!r}")
        if not mask_ratio_std > 0:
            raise GenmodelsError(f"FractalGen: mask_ratio_std must be > 0, got {mask_ratio_std}")
        self.img_size_list = sizes
        self.generator_type_list = list(generator_type_list)
        self.num_classes, self.label_drop_prob = int(num_classes), label_drop_prob
        self.num_conds = num_conds
        self.num_iter_list = list(num_iter_list) if num_iter_list is not None else \
            [(a // b) ** 2 for a, b in zip(sizes[:-1], sizes[1:])]
        self.nll_passes = nll_passes or (1 if all(t == "ar" for t in generator_type_list[:-1]) else 10)
        S = sizes[0]
        self.spec = TokenSpec("pixels", ((S, S),), vocab_size=256, channels=3, image_size=S)

        self.class_emb = nn.Embedding(self.num_classes, embed_dim_list[0])
        self.fake_latent = nn.Parameter(torch.zeros(1, embed_dim_list[0]))
        nn.init.normal_(self.class_emb.weight, std=0.02)
        nn.init.normal_(self.fake_latent, std=0.02)
        args = (sizes, embed_dim_list, num_blocks_list, num_heads_list, generator_type_list, attn_dropout,
                proj_dropout, guiding_pixel, num_conds, mask_ratio_std)
        last = n - 2
        nxt: nn.Module = PixelLoss(embed_dim_list[last], embed_dim_list[last + 1], num_blocks_list[last + 1],
                                   num_heads_list[last + 1], r_weight)
        for l in range(last, 0, -1):
            nxt = FractalLevel(_build_level(l, *args), nxt)
        self.generator = _build_level(0, *args)
        self.next_fractal = nxt

    def reset_constants(self) -> "FractalGen":
        """Recompute every non-persistent buffer (RoPE tables, pixel mean / std), e.g. after
        ``to_empty``: the converters build the official sizes on the meta device (no random
        init of hundreds of millions of weights) and then load the file."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_constants"):
                m.reset_constants()
        return self

    # ------------------------------------------------------------------ official sizes
    @classmethod
    def fractalar_in64(cls, **kw) -> "FractalGen":
        return cls((64, 4, 1), (1024, 512, 128), (32, 8, 3), (16, 8, 4), ("ar", "ar", "ar"),
                   **{"num_conds": 1, "num_iter_list": (64, 16), **kw})

    @classmethod
    def fractalmar_in64(cls, **kw) -> "FractalGen":
        return cls((64, 4, 1), (1024, 512, 128), (32, 8, 3), (16, 8, 4), ("mar", "mar", "ar"),
                   **{"num_iter_list": (64, 16), **kw})

    @classmethod
    def fractalmar_base_in256(cls, **kw) -> "FractalGen":
        return cls((256, 16, 4, 1), (768, 384, 192, 64), (24, 6, 3, 1), (12, 6, 3, 4), ("mar", "mar", "mar", "ar"),
                   **{"guiding_pixel": True, "num_iter_list": (64, 16, 16), **kw})

    @classmethod
    def fractalmar_large_in256(cls, **kw) -> "FractalGen":
        return cls((256, 16, 4, 1), (1024, 512, 256, 64), (32, 8, 4, 1), (16, 8, 4, 4), ("mar", "mar", "mar", "ar"),
                   **{"guiding_pixel": True, "num_iter_list": (64, 16, 16), **kw})

    @classmethod
    def fractalmar_huge_in256(cls, **kw) -> "FractalGen":
        return cls((256, 16, 4, 1), (1280, 640, 320, 64), (40, 10, 5, 1), (16, 8, 4, 4), ("mar", "mar", "mar", "ar"),
                   **{"guiding_pixel": True, "num_iter_list": (64, 16, 16), **kw})

    # ------------------------------------------------------------------ conditioning
    def class_embedding(self, labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) labels -> (B, D0); the null class (and ``drop``-ped rows) -> ``fake_latent``."""
        null = labels >= self.num_classes
        if drop is not None:
            null = null | drop
        emb = self.class_emb(labels.clamp(max=self.num_classes - 1))
        return torch.where(null[:, None], self.fake_latent.to(emb.dtype), emb)

    def _conditions(self, labels: torch.Tensor, generator: torch.Generator | None) -> list[torch.Tensor]:
        if self.training:
            drop = torch.rand(labels.shape[0], generator=generator, device=labels.device) < self.label_drop_prob
            emb = self.class_embedding(labels, drop)
        else:  # the official eval forward (NLL) is unconditional
            emb = self.fake_latent.expand(labels.shape[0], -1)
        return [emb] * 5

    # ------------------------------------------------------------------ training / likelihood
    def forward_loss(self, tokens: torch.Tensor, labels: torch.Tensor,
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """tokens: normalised images (B, 3, S, S); labels (B,). -> {loss = PixelLoss + guiding-pixel
        losses (nats), pixel_loss, guiding_loss}. In eval mode: the official NLL pass."""
        self.check_inputs(tokens, labels)
        pixel, guiding = _fractal_loss(self, tokens, self._conditions(labels, generator), generator)
        return {"loss": pixel + guiding, "pixel_loss": pixel.detach(), "guiding_loss": guiding.detach()}

    @torch.no_grad()
    def nll(self, tokens: torch.Tensor, labels: torch.Tensor, num_passes: int | None = None,
            generator: torch.Generator | None = None) -> torch.Tensor:
        """Unconditional negative log-likelihood of the batch in bits per dimension (scalar): the eval
        loss / ln 2 averaged over ``num_passes`` (default ``nll_passes``) forward passes, as the
        official ``compute_nll``. Exact for FractalAR (teacher forcing, one pass); for MAR levels the
        official stochastic estimate (random orders and masked counts). Runs in eval mode."""
        was = self.training
        self.eval()
        try:
            k = num_passes or self.nll_passes
            total = sum(self.forward_loss(tokens, labels, generator)["loss"] for _ in range(k))
        finally:
            self.train(was)
        return total / k / math.log(2)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, labels: torch.Tensor, *, cfg: float = 1.0, temperature: float = 1.0,
               num_steps: int | Sequence[int] | None = None, num_iter_list: Sequence[int] | None = None,
               guidance_schedule: str = "linear", filter_threshold: float = 1e-4,
               generator: torch.Generator | None = None,
               known: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Depth-first sampling -> normalised images (B, 3, S, S).

        Args:
            labels: (B,) in [0, C] (C = null class).
            cfg: guidance weight w (1 = none, no unconditional pass), at level 0 following
                ``guidance_schedule`` ("linear" as official, or any of ``sampling.GUIDANCE_SCHEDULES``);
                deeper levels use level 0's current w.
            temperature: divides the PixelLoss logits (official T: pass ``1 / T``,
                ``sampling.from_fractal_temperature``).
            num_iter_list / num_steps: steps per level (MAR levels; AR levels always take L steps);
                an int sets level 0 only.
            filter_threshold: the CFG filter (official 1e-4).
            generator: every draw comes from it.
            known: (images (B, 3, S, S) normalised, pixel mask (B, 1, S, S) bool, True = generate):
                editing (``edit_tokens``), ``_fractal_edit``.
        """
        self.check_inputs(None, labels)
        if guidance_schedule not in GUIDANCE_SCHEDULES:
            raise GenmodelsError(f"guidance_schedule must be one of {GUIDANCE_SCHEDULES}, got {guidance_schedule!r}")
        if not temperature > 0:
            raise GenmodelsError(f"temperature must be > 0, got {temperature}")
        steps = list(num_iter_list if num_iter_list is not None else self.num_iter_list)
        if isinstance(num_steps, int):
            steps[0] = num_steps
        elif num_steps is not None:
            steps = list(num_steps)
        if len(steps) < len(self.img_size_list) - 1:
            raise GenmodelsError(f"num_iter_list needs {len(self.img_size_list) - 1} entries, got {steps}")
        guided = cfg != 1.0
        emb = self.class_embedding(labels)
        if guided:
            emb = torch.cat([emb, self.fake_latent.expand(labels.shape[0], -1).to(emb.dtype)])
        knobs = dict(temperature=temperature, filter_threshold=filter_threshold, num_iter_list=steps)
        if known is not None:
            return _fractal_edit(self, 0, [emb] * 5, guided, cfg, guidance_schedule, knobs, generator, *known)
        return _fractal_sample(self, 0, [emb] * 5, guided, cfg, guidance_schedule, knobs, generator)

    @torch.no_grad()
    def edit_tokens(self, tokens: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, **knobs) -> torch.Tensor:
        """Zero-shot editing with FractalMAR (the paper's in-/out-painting): tokens = normalised
        images (B, 3, S, S), mask (B, S*S) bool per pixel (True = regenerate), labels (B,); ``knobs``
        as ``sample``. At every level the patches with a masked pixel are generated by its MAR with
        the known patches visible, each going down with its known pixels; so every masked pixel is
        drawn and every known one kept. An all-True mask gives ``sample``'s images for the same seed.
        AR levels (FractalAR) are refused: a raster order cannot use known patches after a masked one."""
        if any(t != "mar" for t in self.generator_type_list[:-1]):
            raise GenmodelsError(f"FractalGen editing needs MAR levels (FractalMAR); this one has "
                                 f"generator_type_list={self.generator_type_list}: an AR level generates in raster "
                                 "order and cannot use known patches after a masked one")
        self.check_inputs(tokens, labels)
        B, S = tokens.shape[0], self.img_size_list[0]
        return self.sample(labels, known=(tokens, mask.to(tokens.device).bool().view(B, 1, S, S)), **knobs)
