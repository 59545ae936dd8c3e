"""Multi-scale residual VQ-VAE (VAR, Tian et al. 2024, Sec. 3.3 / Alg. 1-2) -- and the plain 2D VQ-VAE.

A 2D VQ-VAE is the special case of a single scale: ``v_patch_nums=(latent_size,)``
with no phi refinement (``quant_resi=0``), which is what ``quant_resi=None`` picks.

Quantization over scales ``patch_nums = (p_1, ..., p_K)`` with ONE shared codebook
(``FoundationVision/VAR`` ``models/quant.py`` ``VectorQuantizer2``): with the encoder
feature ``f`` (B, Cvae, p_K, p_K), ``f_rest = f`` and ``f_hat = 0``, for k = 1..K

    z_k   = area_resize(f_rest, p_k)                 (no resize at the last scale)
    r_k   = argmin_v |z_k - e_v|^2                   (or cosine argmax with using_znorm)
    h_k   = phi_k(bicubic_resize(e[r_k], p_K))       (no resize at the last scale)
    f_hat = f_hat + h_k ;  f_rest = f_rest - h_k

with ``phi_k(h) = (1 - r) h + r conv3x3(h)``, ``r = quant_resi`` (0.5 in VAR). The K
scales share ``share_quant_resi`` phi convs, scale k using the one whose tick is nearest
to ``k / (K-1)`` (computed with numpy exactly like the official code, ties included:
10 scales and 4 convs give ``[0,0,1,1,1,2,2,3,3,3]``).

Training loss (``forward``): ``mean_k [ beta * mse(sg(f_hat_k), f) + mse(f_hat_k, sg(f)) ]``
with the straight-through output ``f + sg(f_hat - f)``; beta = 0.25.

Parameter and buffer names equal the official checkpoint (``vae_ch160v4096z32.pth``):
``encoder.*``, ``decoder.*``, ``quant_conv``, ``post_quant_conv``,
``quantize.embedding.weight``, ``quantize.quant_resi.qresi_ls.{k}.*`` (``.qresi.*`` when one
phi is shared, ``.{k}.*`` when none is), ``quantize.ema_vocab_hit_SV``. Two more buffers,
``quantize.record_hit`` and ``quantize.code_age``, hold the training state (usage EMA
schedule, dead-code restart) so resuming is exact; ``VQVAE.load_official_state_dict``
loads an official file without them.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn

from genmodels.nn.conv import Decoder, Encoder
from genmodels.tokenizers.base import Tokenizer, TokenSpec
from genmodels.tokenizers.quantizers import nearest_code, perplexity, restart_dead_codes_

#: state-dict keys that are training state, absent from (or shaped differently in) official files
TRAINING_STATE_KEYS = ("quantize.ema_vocab_hit_SV", "quantize.record_hit", "quantize.code_age")


# ----------------------------------------------------------------------------- phi (quant_resi)
class Phi(nn.Conv2d):
    """phi(h) = (1 - r) h + r conv3x3(h), r = |quant_resi| (official ``Phi``). (B, C, H, W) -> same."""

    def __init__(self, channels: int, quant_resi: float) -> None:
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mul(1 - self.resi_ratio) + super().forward(h).mul(self.resi_ratio)


def phi_ticks(num_phis: int) -> np.ndarray:
    """Where each of the ``num_phis`` convs sits on [0, 1] (official ``PhiPartiallyShared.ticks``)."""
    K = num_phis
    return np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K) if K == 4 else np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)


def phi_index(si: int, num_scales: int, num_phis: int) -> int:
    """Index of the phi used at scale ``si`` of ``num_scales``: argmin_k |tick_k - si/(K-1)|.

    Uses numpy float arithmetic like the official code, so exact ties resolve the same way.
    A single scale uses position 0.
    """
    if num_phis == 1:
        return 0
    at = si / (num_scales - 1) if num_scales > 1 else 0.0
    return int(np.argmin(np.abs(phi_ticks(num_phis) - at)).item())


def _make_phi(channels: int, quant_resi: float) -> nn.Module:
    return Phi(channels, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()


class PhiShared(nn.Module):
    """One phi for every scale (``share_quant_resi=1``); key ``quant_resi.qresi``."""

    def __init__(self, qresi: nn.Module) -> None:
        super().__init__()
        self.qresi = qresi
        self.num_phis = 1

    def get(self, k: int) -> nn.Module:
        return self.qresi


class PhiPartiallyShared(nn.Module):
    """``share_quant_resi`` (>= 2) phis spread over the scales; keys ``quant_resi.qresi_ls.{k}``."""

    def __init__(self, qresi_ls: nn.ModuleList) -> None:
        super().__init__()
        self.qresi_ls = qresi_ls
        self.num_phis = len(qresi_ls)

    def get(self, k: int) -> nn.Module:
        return self.qresi_ls[k]


class PhiNonShared(nn.ModuleList):
    """One phi per scale (``share_quant_resi=0``; count ``default_qresi_counts or K``); keys ``quant_resi.{k}``."""

    @property
    def num_phis(self) -> int:
        return len(self)

    def get(self, k: int) -> nn.Module:
        return self[k]


def _check_patch_nums(patch_nums: Sequence[int], name: str = "patch_nums") -> tuple[int, ...]:
    pns = tuple(int(p) for p in patch_nums)
    if not pns or any(p <= 0 for p in pns) or list(pns) != sorted(set(pns)):
        raise ValueError(f"{name} must be a non-empty strictly increasing list of positive ints, got {list(patch_nums)}")
    return pns


# ----------------------------------------------------------------------------- quantizer
class MultiScaleVectorQuantizer(nn.Module):
    """VAR's ``VectorQuantizer2``: residual quantization over ``patch_nums`` with one codebook.

    Args:
        vocab_size: V codes. Cvae: code dimension (= the VAE's z_channels).
        patch_nums: side of each scale's square token map, coarse to fine; the last equals the
            latent side. ``(16,)`` is a plain single-scale VQ.
        using_znorm: nearest code by cosine similarity (l2-normalised lookup) instead of squared L2.
        beta: commitment weight.
        quant_resi: phi ratio r (0 = no phi, identity). share_quant_resi: 0 = one phi per scale,
            1 = one shared phi, n >= 2 = n phis partially shared. default_qresi_counts: phi count
            for share_quant_resi=0 (0 = K).
        dead_code_restart: in training, a code not picked at any scale (over all ranks) for this
            many consecutive steps is re-initialised from a residual vector z_k of the current
            batch (scale chosen uniformly, then a vector uniformly within it); 0 = never.

    Buffers: ``ema_vocab_hit_SV`` (K, V) EMA of per-scale code hits (official schedule),
    ``record_hit`` (count of EMA updates), ``code_age`` (V,) steps since each code was last used.
    """

    def __init__(self, vocab_size: int, Cvae: int, patch_nums: Sequence[int], using_znorm: bool = False,
                 beta: float = 0.25, quant_resi: float = 0.5, share_quant_resi: int = 4,
                 default_qresi_counts: int = 0, dead_code_restart: int = 0) -> None:
        super().__init__()
        self.vocab_size, self.Cvae = int(vocab_size), int(Cvae)
        self.patch_nums = _check_patch_nums(patch_nums)
        self.using_znorm, self.beta = bool(using_znorm), float(beta)
        self.quant_resi_ratio = float(quant_resi)
        self.dead_code_restart = int(dead_code_restart)
        K = len(self.patch_nums)
        if share_quant_resi < 0:
            raise ValueError(f"share_quant_resi must be >= 0, got {share_quant_resi}")
        if share_quant_resi == 0:
            self.quant_resi = PhiNonShared([_make_phi(Cvae, quant_resi) for _ in range(default_qresi_counts or K)])
        elif share_quant_resi == 1:
            self.quant_resi = PhiShared(_make_phi(Cvae, quant_resi))
        else:
            self.quant_resi = PhiPartiallyShared(nn.ModuleList([_make_phi(Cvae, quant_resi)
                                                                for _ in range(share_quant_resi)]))
        self.embedding = nn.Embedding(self.vocab_size, self.Cvae)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(K, self.vocab_size))
        self.register_buffer("record_hit", torch.zeros((), dtype=torch.long))
        self.register_buffer("code_age", torch.zeros(self.vocab_size, dtype=torch.long))

    @property
    def v_patch_nums(self) -> tuple[int, ...]:
        """Official name of ``patch_nums``."""
        return self.patch_nums

    def extra_repr(self) -> str:
        return (f"{self.patch_nums}, V={self.vocab_size}, Cvae={self.Cvae}, znorm={self.using_znorm}, "
                f"beta={self.beta}, quant_resi={self.quant_resi_ratio}, phis={self.phi_indices()}")

    def eini(self, eini: float) -> None:
        """Official codebook init: >0 truncated normal(std=eini), <0 uniform(+-|eini|/V), 0 keep."""
        if eini > 0:
            nn.init.trunc_normal_(self.embedding.weight.data, std=eini)
        elif eini < 0:
            self.embedding.weight.data.uniform_(-abs(eini) / self.vocab_size, abs(eini) / self.vocab_size)

    # ------------------------------------------------------------------ building blocks
    def phi(self, si: int, num_scales: int | None = None) -> nn.Module:
        """The phi module applied at scale ``si`` (of ``num_scales``, default K)."""
        SN = len(self.patch_nums) if num_scales is None else num_scales
        return self.quant_resi.get(phi_index(si, SN, self.quant_resi.num_phis))

    def phi_indices(self, num_scales: int | None = None) -> list[int]:
        SN = len(self.patch_nums) if num_scales is None else num_scales
        return [phi_index(si, SN, self.quant_resi.num_phis) for si in range(SN)]

    def nearest(self, z_NC: torch.Tensor) -> torch.Tensor:
        """(N, Cvae) -> (N,) long: argmin |z|^2 + |e|^2 - 2 z.e (addmm form), or cosine argmax
        (``quantizers.nearest_code``, shared by every VQ)."""
        return nearest_code(z_NC, self.embedding.weight, cosine=self.using_znorm)

    def idx_to_h(self, idx_Bl: torch.Tensor, si: int, pn: tuple[int, int], HW: tuple[int, int],
                 num_scales: int | None = None) -> torch.Tensor:
        """Codes of scale ``si`` (B, ph*pw) -> phi(bicubic_up(e[idx])) at (B, Cvae, H, W); no
        upsampling at the last scale."""
        SN = len(self.patch_nums) if num_scales is None else num_scales
        B = idx_Bl.shape[0]
        h = self.embedding(idx_Bl).transpose(1, 2).reshape(B, self.Cvae, pn[0], pn[1])
        if si != SN - 1:
            h = F.interpolate(h, size=HW, mode="bicubic")
        return self.phi(si, SN)(h)

    # ------------------------------------------------------------------ training forward
    def forward(self, f_BChw: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Quantize encoder features for VAE training.

        f_BChw: (B, Cvae, pK, pK). Returns ``(f_hat, stats, vq_loss)``: the straight-through
        quantized features (B, Cvae, pK, pK) (the official ``(f_hat, usages, loss)``
        order), a dict of 0-dim tensors ``usage_s{k}`` (fraction of the codebook hit at scale k
        in this batch, over all ranks), ``perplexity_s{k}``, ``usage`` / ``perplexity`` (all
        scales together), ``dead_codes`` (codes restarted this step), and the VQ loss.
        Runs in float32 with autocast off. In training mode it also updates the usage buffers
        and restarts dead codes.
        """
        dtype = f_BChw.dtype
        f = f_BChw.float()
        B, C, H, W = f.shape
        self._check_latent(f)
        SN = len(self.patch_nums)
        f_no_grad = f.detach()
        f_rest = f_no_grad.clone()
        f_hat = torch.zeros_like(f_rest)
        stats: dict[str, torch.Tensor] = {}
        sync = self.training and tdist.is_available() and tdist.is_initialized()
        with torch.autocast(device_type=f.device.type, enabled=False):
            vq_loss = f.new_zeros(())
            hits, rests = [], []
            for si, pn in enumerate(self.patch_nums):
                z = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != SN - 1 else f_rest
                z_NC = z.permute(0, 2, 3, 1).reshape(-1, C)
                idx_N = self.nearest(z_NC)
                hit_V = idx_N.bincount(minlength=self.vocab_size).float()
                if sync:
                    tdist.all_reduce(hit_V)
                h = self.idx_to_h(idx_N.view(B, pn * pn), si, (pn, pn), (H, W))
                f_hat = f_hat + h
                f_rest = f_rest - h.detach()
                vq_loss = vq_loss + F.mse_loss(f_hat.detach(), f).mul(self.beta) + F.mse_loss(f_hat, f_no_grad)
                if self.training:
                    self._update_ema(si, hit_V)
                hits.append(hit_V)
                rests.append(z_NC)
                stats[f"usage_s{si}"] = (hit_V > 0).float().mean()
                stats[f"perplexity_s{si}"] = _perplexity(hit_V)
            vq_loss = vq_loss / SN
            f_hat = (f_hat.detach() - f_no_grad) + f  # straight-through
        total = torch.stack(hits).sum(0)
        stats["usage"] = (total > 0).float().mean()
        stats["perplexity"] = _perplexity(total)
        stats["dead_codes"] = f.new_zeros(())
        if self.training and self.dead_code_restart > 0:
            stats["dead_codes"] = self._restart_dead_codes(total, rests, sync)
        return f_hat.to(dtype), stats, vq_loss

    @torch.no_grad()
    def _update_ema(self, si: int, hit_V: torch.Tensor) -> None:
        """Official schedule: copy on the first update, then EMA 0.9 below 100 updates, 0.99 after.
        (The official counter advances once per scale, which this reproduces.)"""
        n = int(self.record_hit)
        if n == 0:
            self.ema_vocab_hit_SV[si].copy_(hit_V)
        elif n < 100:
            self.ema_vocab_hit_SV[si].mul_(0.9).add_(hit_V.mul(0.1))
        else:
            self.ema_vocab_hit_SV[si].mul_(0.99).add_(hit_V.mul(0.01))
        self.record_hit += 1

    @torch.no_grad()
    def _restart_dead_codes(self, hit_V: torch.Tensor, rests: list[torch.Tensor], sync: bool) -> torch.Tensor:
        # choose a scale uniformly, then a residual vector uniformly within it (quantizers.restart_dead_codes_)
        return restart_dead_codes_(self.embedding.weight.data, self.code_age, hit_V, rests,
                                   self.dead_code_restart, sync)

    def _check_latent(self, f: torch.Tensor, patch_hws: Sequence[tuple[int, int]] | None = None) -> None:
        last = (patch_hws or [(self.patch_nums[-1],) * 2])[-1]
        if f.ndim != 4 or f.shape[1] != self.Cvae or tuple(f.shape[2:]) != tuple(last):
            raise ValueError(f"quantizer expects features (B, Cvae={self.Cvae}, {last[0]}, {last[1]}) (the last "
                             f"patch_num is the latent size), got {tuple(f.shape)}; check the image size against "
                             f"v_patch_nums[-1] x the encoder's downsampling")

    # ------------------------------------------------------------------ tokens <-> features (official API)
    @torch.no_grad()
    def f_to_idxBl_or_fhat(self, f_BChw: torch.Tensor, to_fhat: bool,
                           v_patch_nums: Sequence[int | tuple[int, int]] | None = None) -> list[torch.Tensor]:
        """Encode features: per scale either the codes (B, ph*pw) long, or the cumulative
        f_hat (B, Cvae, H, W) after that scale (official ``f_to_idxBl_or_fhat``)."""
        B, C, H, W = f_BChw.shape
        patch_hws = [(p, p) if isinstance(p, int) else (int(p[0]), int(p[1])) for p in (v_patch_nums or self.patch_nums)]
        self._check_latent(f_BChw, patch_hws)
        f_rest = f_BChw.detach().float().clone()
        f_hat = torch.zeros_like(f_rest)
        out: list[torch.Tensor] = []
        SN = len(patch_hws)
        for si, (ph, pw) in enumerate(patch_hws):
            z = F.interpolate(f_rest, size=(ph, pw), mode="area") if si != SN - 1 else f_rest
            idx_N = self.nearest(z.permute(0, 2, 3, 1).reshape(-1, C))
            h = self.idx_to_h(idx_N.view(B, ph * pw), si, (ph, pw), (H, W), SN)
            f_hat.add_(h)
            f_rest.sub_(h)
            out.append(f_hat.clone() if to_fhat else idx_N.reshape(B, ph * pw))
        return out

    def idxBl_to_h(self, ms_idx_Bl: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-scale codes (B, pn*pn) -> code embeddings (B, Cvae, pn, pn)."""
        out = []
        for idx in ms_idx_Bl:
            B, l = idx.shape
            pn = round(l ** 0.5)
            out.append(self.embedding(idx).transpose(1, 2).reshape(B, self.Cvae, pn, pn))
        return out

    def embed_to_fhat(self, ms_h_BChw: Sequence[torch.Tensor], all_to_max_scale: bool = True,
                      last_one: bool = False) -> list[torch.Tensor] | torch.Tensor:
        """Per-scale code embeddings (B, Cvae, pn, pn) -> f_hat (B, Cvae, pK, pK) after each scale
        (or only the last with ``last_one``): f_hat = sum_k phi_k(bicubic_up(h_k)).
        ``all_to_max_scale=False`` is the official experimental path (grow f_hat scale by scale)."""
        B = ms_h_BChw[0].shape[0]
        H = W = self.patch_nums[-1]
        SN = len(self.patch_nums)
        outs: list[torch.Tensor] = []
        if all_to_max_scale:
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, H, W, dtype=torch.float32)
            for si in range(SN):
                h = ms_h_BChw[si]
                if si < SN - 1:
                    h = F.interpolate(h, size=(H, W), mode="bicubic")
                f_hat = f_hat + self.phi(si)(h)
                outs.append(f_hat)
        else:
            pn0 = self.patch_nums[0]
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, pn0, pn0, dtype=torch.float32)
            for si, pn in enumerate(self.patch_nums):
                f_hat = F.interpolate(f_hat, size=(pn, pn), mode="bicubic")
                f_hat = f_hat + self.phi(si)(ms_h_BChw[si])
                outs.append(f_hat)
        return outs[-1] if last_one else outs

    def idxBl_to_fhat(self, ms_idx_Bl: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-scale codes -> final f_hat (B, Cvae, pK, pK)."""
        return self.embed_to_fhat(self.idxBl_to_h(ms_idx_Bl), all_to_max_scale=True, last_one=True)

    def idxBl_to_var_input(self, gt_ms_idx_Bl: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """Teacher-forcing inputs for VAR: for k = 1..K-1, f_hat_k = sum_{j<=k} phi_j(up(e[r_j])) area-resized
        to scale k+1, flattened. (B, pn*pn) long per scale -> (B, L - p_1^2, Cvae) float32
        (None for a single scale). The first scale's input is the start token, not built here."""
        B = gt_ms_idx_Bl[0].shape[0]
        C, H = self.Cvae, self.patch_nums[-1]
        SN = len(self.patch_nums)
        f_hat = gt_ms_idx_Bl[0].new_zeros(B, C, H, H, dtype=torch.float32)
        next_scales = []
        for si in range(SN - 1):
            pn = self.patch_nums[si]
            h = self.embedding(gt_ms_idx_Bl[si]).transpose(1, 2).reshape(B, C, pn, pn)
            f_hat = f_hat + self.phi(si)(F.interpolate(h, size=(H, H), mode="bicubic"))
            pn_next = self.patch_nums[si + 1]
            next_scales.append(F.interpolate(f_hat, size=(pn_next, pn_next), mode="area").view(B, C, -1).transpose(1, 2))
        return torch.cat(next_scales, dim=1) if next_scales else None

    def get_next_autoregressive_input(self, si: int, SN: int, f_hat: torch.Tensor,
                                      h_BChw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """VAR sampling step: add scale ``si``'s embeddings h (B, Cvae, pn, pn) to ``f_hat``
        (B, Cvae, pK, pK) **in place** and return ``(f_hat, next_input)``, next_input being
        f_hat area-resized to the next scale (B, Cvae, p_{si+1}, p_{si+1}), or f_hat itself at the
        last scale."""
        HW = self.patch_nums[-1]
        if si != SN - 1:
            f_hat.add_(self.phi(si, SN)(F.interpolate(h_BChw, size=(HW, HW), mode="bicubic")))
            pn = self.patch_nums[si + 1]
            return f_hat, F.interpolate(f_hat, size=(pn, pn), mode="area")
        f_hat.add_(self.phi(si, SN)(h_BChw))
        return f_hat, f_hat


VectorQuantizer2 = MultiScaleVectorQuantizer  # the official class name


_perplexity = perplexity  # shared with every VQ (quantizers.py)


# ----------------------------------------------------------------------------- the tokenizer
class VQVAE(Tokenizer):
    """Encoder -> quant_conv -> multi-scale quantizer -> post_quant_conv -> decoder.

    The positional arguments mirror the official ``VQVAE(vocab_size, z_channels, ch, dropout,
    beta, using_znorm, quant_conv_ks, quant_resi, share_quant_resi, default_qresi_counts,
    v_patch_nums, test_mode)``; VAR's tokenizer is ``VQVAE(4096, 32, 160, share_quant_resi=4,
    v_patch_nums=(1,2,3,4,5,6,8,10,13,16))`` (108,948,355 parameters). The keyword-only
    arguments expose what the official code hard-codes.

    Args:
        vocab_size, z_channels (= Cvae), ch, dropout: codebook size, latent channels, base width.
        beta, using_znorm, quant_resi, share_quant_resi, default_qresi_counts: see
            ``MultiScaleVectorQuantizer``. ``quant_resi=None``: 0.5 with several scales, 0 (no
            phi) for a single scale.
        quant_conv_ks: kernel of quant_conv / post_quant_conv (3 in VAR; 0 = none).
        v_patch_nums: token-map sides, coarse to fine; ``(n,)`` = plain 2D VQ-VAE.
        test_mode: as official: eval mode and frozen parameters (default False: trainable).
        ch_mult, num_res_blocks, using_sa, using_mid_sa: conv net (official: (1,1,2,2,4), 2,
            True, True). using_sa puts attention after each res block of the lowest level.
        downsample_with_conv: pad + strided 3x3 conv (True, LDM/VAR) or 2x2 average pooling (MaskGIT-VQGAN).
        upsample_with_conv: nearest x2 followed by a 3x3 conv (True) or plain nearest.
        decoder_blocks_per_level: default num_res_blocks + 1.
        encoder_out_ks: kernel of the encoder's conv_out (3; MaskGIT-VQGAN 1).
        in_channels: image channels.
        rec_loss: ``"l1"`` (VQGAN) or ``"l2"`` for ``losses``; vq_weight: weight of the VQ loss.
        dead_code_restart: see ``MultiScaleVectorQuantizer`` (training only; 0 = off).
        eini: codebook init (official ``eini``: >0 trunc-normal std, <0 uniform +-|eini|/V,
            0 = torch's N(0, 1)).

    Tokens: ``encode`` gives (B, L) int64, scales concatenated coarse to fine, each raster
    order; ``decode`` returns images clamped to [-1, 1] like VAR's ``idxBl_to_img`` /
    ``fhat_to_img`` (pass ``clamp=False`` for the raw decoder output). ``losses`` returns the
    unclamped reconstruction (for LPIPS / GAN gradients).
    """

    BF16_PARTS = ("post_quant_conv", "decoder")  # genmodels.precision: cast for the bf16 tier's sampling

    def __init__(self, vocab_size: int = 4096, z_channels: int = 32, ch: int = 128, dropout: float = 0.0,
                 beta: float = 0.25, using_znorm: bool = False, quant_conv_ks: int = 3,
                 quant_resi: float | None = None, share_quant_resi: int = 4, default_qresi_counts: int = 0,
                 v_patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), test_mode: bool = False, *,
                 ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2, using_sa: bool = True,
                 using_mid_sa: bool = True, downsample_with_conv: bool = True, upsample_with_conv: bool = True,
                 decoder_blocks_per_level: int | None = None, encoder_out_ks: int = 3, in_channels: int = 3, rec_loss: str = "l1",
                 vq_weight: float = 1.0, dead_code_restart: int = 0, eini: float = 0.0) -> None:
        super().__init__()
        v_patch_nums = _check_patch_nums(v_patch_nums, "v_patch_nums")
        if rec_loss not in ("l1", "l2"):
            raise ValueError(f"rec_loss must be 'l1' or 'l2', got {rec_loss!r}")
        if quant_resi is None:
            quant_resi = 0.5 if len(v_patch_nums) > 1 else 0.0
        self.V, self.Cvae = int(vocab_size), int(z_channels)
        self.vocab_size = self.V
        self.rec_loss, self.vq_weight, self.test_mode = rec_loss, float(vq_weight), test_mode
        attn_levels = (len(ch_mult) - 1,) if using_sa else ()
        dd = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, z_channels=z_channels,
                  dropout=dropout, attn_levels=attn_levels, mid_attn=using_mid_sa, attn_type="qkv")
        self.encoder = Encoder(in_channels=in_channels, double_z=False, resamp_with_conv=downsample_with_conv,
                               conv_out_ks=encoder_out_ks, **dd)
        self.decoder = Decoder(out_channels=in_channels, blocks_per_level=decoder_blocks_per_level,
                               resamp_with_conv=upsample_with_conv, **dd)
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.quantize = MultiScaleVectorQuantizer(
            vocab_size, z_channels, v_patch_nums, using_znorm=using_znorm, beta=beta, quant_resi=quant_resi,
            share_quant_resi=share_quant_resi, default_qresi_counts=default_qresi_counts,
            dead_code_restart=dead_code_restart)
        self.quantize.eini(eini)
        if quant_conv_ks > 0:
            self.quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, stride=1, padding=quant_conv_ks // 2)
            self.post_quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, stride=1,
                                             padding=quant_conv_ks // 2)
        else:
            self.quant_conv, self.post_quant_conv = nn.Identity(), nn.Identity()
        self.image_size = v_patch_nums[-1] * self.downsample
        self.spec = TokenSpec("discrete", tuple((p, p) for p in v_patch_nums), vocab_size=self.V,
                              image_size=self.image_size)
        if test_mode:
            self.eval()
            self.requires_grad_(False)

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.quantize.patch_nums

    v_patch_nums = patch_nums

    # ------------------------------------------------------------------ checks
    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != self.encoder.conv_in.in_channels:
            raise ValueError(f"images must be (B, {self.encoder.conv_in.in_channels}, H, W), got {tuple(images.shape)}")
        if tuple(images.shape[2:]) != (self.image_size, self.image_size):
            raise ValueError(f"VQVAE expects {self.image_size}x{self.image_size} images (v_patch_nums[-1]="
                             f"{self.patch_nums[-1]} x downsample {self.downsample}), got {tuple(images.shape[2:])}")

    # ------------------------------------------------------------------ training
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """images (B, 3, H, W) -> (reconstruction (unclamped), quantizer stats, vq_loss), as the official forward."""
        self._check_images(images)
        f_hat, stats, vq_loss = self.quantize(self.quant_conv(self.encoder(images)))
        return self.decoder(self.post_quant_conv(f_hat)), stats, vq_loss

    def losses(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``loss = rec_loss + vq_weight * vq_loss``; also ``recon`` (unclamped), ``rec_loss``,
        ``vq_loss``, ``usage_s{k}`` / ``perplexity_s{k}`` per scale, ``usage``, ``perplexity``,
        ``dead_codes``."""
        rec, stats, vq_loss = self(images)
        rec_loss = (rec - images).abs().mean() if self.rec_loss == "l1" else F.mse_loss(rec, images)
        return dict(loss=rec_loss + self.vq_weight * vq_loss, recon=rec, rec_loss=rec_loss, vq_loss=vq_loss, **stats)

    def last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight

    # ------------------------------------------------------------------ tokens (genmodels contract)
    @torch.no_grad()
    def encode_scales(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images -> per-scale index maps (B, pn, pn) int64, coarse to fine."""
        return [idx.view(idx.shape[0], pn, pn) for idx, pn in zip(self.img_to_idxBl(images), self.patch_nums)]

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> tokens (B, L) int64, L = sum pn^2."""
        return torch.cat(self.img_to_idxBl(images), dim=1)

    def decode_scales(self, ms_idx: Sequence[torch.Tensor], clamp: bool = True) -> torch.Tensor:
        """Per-scale index maps (B, pn, pn) or (B, pn*pn) -> images (B, 3, H, W)."""
        ms_idx_Bl = [i.reshape(i.shape[0], -1).long() for i in ms_idx]
        for i, pn in zip(ms_idx_Bl, self.patch_nums):
            if i.shape[1] != pn * pn:
                raise ValueError(f"scale with {i.shape[1]} tokens where v_patch_nums expects {pn}x{pn}")
        return self.fhat_to_img(self.quantize.idxBl_to_fhat(ms_idx_Bl), clamp=clamp)

    def decode(self, tokens: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """tokens (B, L) -> images (B, 3, H, W), clamped to [-1, 1] unless ``clamp=False``."""
        self.spec.check(tokens)
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.V:
            raise ValueError(f"token ids must lie in [0, {self.V}), got [{int(tokens.min())}, {int(tokens.max())}]")
        return self.decode_scales(self.spec.split(tokens.long()), clamp=clamp)

    # ------------------------------------------------------------------ official helper names
    def fhat_to_img(self, f_hat: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """f_hat (B, Cvae, pK, pK) -> images; clamped to [-1, 1] like the official helper."""
        dt = self.decoder.conv_in.weight.dtype  # bfloat16 in the bf16 tier's sampling copy (genmodels.precision)
        img = self.decoder(self.post_quant_conv(f_hat.to(dt))).float()
        return img.clamp(-1, 1) if clamp else img

    @torch.no_grad()
    def img_to_idxBl(self, inp_img_no_grad: torch.Tensor,
                     v_patch_nums: Sequence[int | tuple[int, int]] | None = None) -> list[torch.Tensor]:
        """images -> per-scale codes (B, pn*pn) int64 (official ``img_to_idxBl``)."""
        if v_patch_nums is None:
            self._check_images(inp_img_no_grad)
        f = self.quant_conv(self.encoder(inp_img_no_grad))
        return self.quantize.f_to_idxBl_or_fhat(f, to_fhat=False, v_patch_nums=v_patch_nums)

    def idxBl_to_img(self, ms_idx_Bl: Sequence[torch.Tensor], same_shape: bool = True,
                     last_one: bool = False) -> list[torch.Tensor] | torch.Tensor:
        """Per-scale codes -> the image after every scale (or only the last), clamped (official)."""
        fhats = self.quantize.embed_to_fhat(self.quantize.idxBl_to_h(ms_idx_Bl), all_to_max_scale=same_shape,
                                            last_one=last_one)
        return self.fhat_to_img(fhats) if last_one else [self.fhat_to_img(f) for f in fhats]

    @torch.no_grad()
    def img_to_reconstructed_img(self, x: torch.Tensor, v_patch_nums=None,
                                 last_one: bool = False) -> list[torch.Tensor] | torch.Tensor:
        """images -> reconstructions after every scale (or only the last), clamped (official)."""
        f = self.quant_conv(self.encoder(x))
        fhats = self.quantize.f_to_idxBl_or_fhat(f, to_fhat=True, v_patch_nums=v_patch_nums)
        return self.fhat_to_img(fhats[-1]) if last_one else [self.fhat_to_img(f) for f in fhats]

    # ------------------------------------------------------------------ official checkpoints
    def load_official_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load an official ``FoundationVision/VAR`` VQVAE state dict (e.g. ``vae_ch160v4096z32.pth``)
        strictly, apart from the training-state buffers: ``ema_vocab_hit_SV`` is taken when its
        shape fits (the official ``load_state_dict`` also drops a mismatched one), ``record_hit``
        and ``code_age`` (ours only) are reset."""
        from genmodels.checkpoints.common import load_strict

        load_strict(self, state_dict, what="official VAR VQVAE state dict", ignore=TRAINING_STATE_KEYS)
        ema = state_dict.get("quantize.ema_vocab_hit_SV")
        with torch.no_grad():
            if ema is not None and ema.shape == self.quantize.ema_vocab_hit_SV.shape:
                self.quantize.ema_vocab_hit_SV.copy_(ema)
            self.quantize.record_hit.zero_()
            self.quantize.code_age.zero_()
