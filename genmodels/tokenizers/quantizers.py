"""Vector quantization: the one implementation every VQ tokenizer uses.

* ``nearest_code``: the code lookup, squared L2 in the ``|z|^2 + |e|^2 - 2 z.e`` (addmm) form,
  or cosine similarity (l2-normalised lookup, VAR's ``using_znorm``).
* ``perplexity`` and ``restart_dead_codes_``: codebook usage statistics and the dead-code
  restart (a code unused for ``threshold`` consecutive steps is re-initialised from an
  encoder vector of the current batch).
* ``VectorQuantizer``: a single-codebook VQ over token vectors (van den Oord et al. 2017),
  with the optional l2-normalised low-dimensional codes of ViT-VQGAN / TiTok (Yu et al.
  2024, "token_size 12"), used by TiTok (1D tokens) and the MaskGIT-VQGAN (2D tokens).

The multi-scale residual quantizer of VAR (``multiscale_vq.MultiScaleVectorQuantizer``) is
built from the same ``nearest_code`` / ``perplexity`` / ``restart_dead_codes_``; a plain 2D
VQ-VAE is that quantizer with a single scale.
"""
from __future__ import annotations

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn


def nearest_code(z_NC: torch.Tensor, codebook_VC: torch.Tensor, cosine: bool = False) -> torch.Tensor:
    """Index of the nearest code for each row. z (N, C), codebook (V, C) -> (N,) int64.

    ``cosine=False``: argmin_v |z|^2 + |e_v|^2 - 2 z.e_v (one addmm); ``cosine=True``:
    argmax_v of the cosine similarity. Gradients never flow through the lookup.
    """
    e = codebook_VC.detach()
    z_NC = z_NC.detach()
    if cosine:
        return torch.argmax(F.normalize(z_NC, dim=-1) @ F.normalize(e.T, dim=0), dim=1)
    d = torch.sum(z_NC.square(), dim=1, keepdim=True) + torch.sum(e.square(), dim=1)
    d.addmm_(z_NC, e.T, alpha=-2, beta=1)
    return torch.argmin(d, dim=1)


def perplexity(hit_V: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the code-usage histogram ``hit_V`` (V,): V when uniform, 1 when collapsed."""
    p = hit_V / hit_V.sum().clamp_min(1)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


@torch.no_grad()
def restart_dead_codes_(codebook_VC: torch.Tensor, code_age: torch.Tensor, hit_V: torch.Tensor,
                        pools: list[torch.Tensor], threshold: int, sync: bool) -> torch.Tensor:
    """Age the codes (0 where used this step, +1 otherwise) and re-initialise, in place, the
    codes unused for ``threshold`` steps from vectors of ``pools`` (a pool chosen uniformly,
    then a vector uniformly within it). Under DDP (``sync``) every rank sees the same
    all-reduced hits, so the same dead codes; rank 0's new vectors are broadcast.
    Returns the number of restarted codes (0-dim float)."""
    code_age.copy_(torch.where(hit_V > 0, torch.zeros_like(code_age), code_age + 1))
    dead = (code_age >= threshold).nonzero().squeeze(1)
    if dead.numel() == 0:
        return hit_V.new_zeros(())
    weights = torch.cat([torch.full((r.shape[0],), 1.0 / r.shape[0], device=r.device) for r in pools])
    pool = torch.cat(pools).to(codebook_VC.dtype)
    pick = torch.multinomial(weights, dead.numel(), replacement=True)
    codebook_VC[dead] = pool[pick]
    if sync:
        tdist.broadcast(codebook_VC, src=0)
    code_age[dead] = 0
    return hit_V.new_tensor(float(dead.numel()))


class VectorQuantizer(nn.Module):
    """Single-codebook vector quantizer over the last dimension.

    Args:
        codebook_size: V codes. token_size: C, the code dimension.
        commitment_cost: beta of the commitment term.
        use_l2_norm: l2-normalise the inputs and the codes before the lookup; the quantized
            vector is then the normalised code (TiTok's ``use_l2_norm``, 1d-tokenizer
            ``modeling/quantizer/quantizer.py``).
        dead_code_restart: in training, restart codes unused for this many steps (0 = off).

    ``forward(z)`` with z (..., C) returns ``(z_q, stats, loss, indices)``:

        z_n    = normalise(z) if use_l2_norm else z
        i      = argmin_v |z_n - e_v|^2         (e_v normalised too with use_l2_norm)
        loss   = beta * mse(sg(e_i), z_n) + mse(e_i, sg(z_n))      (commitment + codebook)
        z_q    = z_n + sg(e_i - z_n)            (straight-through)

    z_q has z's shape, indices z's shape without the last dim; stats holds ``usage`` (fraction
    of codes hit in the batch, all ranks), ``perplexity``, ``commitment_loss``,
    ``codebook_loss`` and ``dead_codes``. Runs in float32 with autocast off.

    Buffer ``code_age`` (V,) is training state for the restart, not in official files.
    """

    def __init__(self, codebook_size: int, token_size: int, commitment_cost: float = 0.25,
                 use_l2_norm: bool = False, dead_code_restart: int = 0) -> None:
        super().__init__()
        self.codebook_size, self.token_size = int(codebook_size), int(token_size)
        self.commitment_cost, self.use_l2_norm = float(commitment_cost), bool(use_l2_norm)
        self.dead_code_restart = int(dead_code_restart)
        self.embedding = nn.Embedding(self.codebook_size, self.token_size)
        self.embedding.weight.data.uniform_(-1.0 / self.codebook_size, 1.0 / self.codebook_size)
        self.register_buffer("code_age", torch.zeros(self.codebook_size, dtype=torch.long))

    def extra_repr(self) -> str:
        return f"V={self.codebook_size}, C={self.token_size}, l2_norm={self.use_l2_norm}, beta={self.commitment_cost}"

    def codebook(self) -> torch.Tensor:
        """The code vectors as used (normalised with ``use_l2_norm``), (V, C)."""
        e = self.embedding.weight
        return F.normalize(e, dim=-1) if self.use_l2_norm else e

    def get_codebook_entry(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (...) int64 -> code vectors (..., C) (normalised with ``use_l2_norm``)."""
        z = self.embedding(indices)
        return F.normalize(z, dim=-1) if self.use_l2_norm else z

    def nearest(self, z_NC: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (N,) code indices (inputs normalised first with ``use_l2_norm``)."""
        if self.use_l2_norm:
            z_NC = F.normalize(z_NC, dim=-1)
        return nearest_code(z_NC, self.codebook())

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        dtype = z.dtype
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            if z.shape[-1] != self.token_size:
                raise ValueError(f"quantizer expects vectors of size token_size={self.token_size} in the last "
                                 f"dimension, got shape {tuple(z.shape)}")
            z_NC = z.reshape(-1, self.token_size)
            idx = self.nearest(z_NC)
            z_q = self.get_codebook_entry(idx)
            z_n = F.normalize(z_NC, dim=-1) if self.use_l2_norm else z_NC
            commitment = self.commitment_cost * F.mse_loss(z_q.detach(), z_n)
            codebook = F.mse_loss(z_q, z_n.detach())
            z_q = z_n + (z_q - z_n).detach()
        hit_V = idx.bincount(minlength=self.codebook_size).float()
        sync = self.training and tdist.is_available() and tdist.is_initialized()
        if sync:
            tdist.all_reduce(hit_V)
        stats = {"usage": (hit_V > 0).float().mean(), "perplexity": perplexity(hit_V),
                 "commitment_loss": commitment.detach(), "codebook_loss": codebook.detach(),
                 "dead_codes": z.new_zeros(())}
        if self.training and self.dead_code_restart > 0:
            stats["dead_codes"] = restart_dead_codes_(self.embedding.weight.data, self.code_age, hit_V,
                                                      [z_NC.detach()], self.dead_code_restart, sync)
        return z_q.view(z.shape).to(dtype), stats, commitment + codebook, idx.view(z.shape[:-1])
