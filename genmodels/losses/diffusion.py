"""Diffusion Loss (MAR, Li et al. 2024, §3.2-3.3): a small denoising MLP per token.

Each token ``x`` (C,) is modelled by ``p(x | z)``, where ``z`` (D,) is the output of the
autoregressive transformer at that position. The loss is the DDPM loss of a tiny
network ``eps_theta(x_t | t, z)`` (eq. 2); sampling runs the reverse diffusion with the
noise scaled by a temperature ``tau`` (§3.3).

This file holds, matching ``LTH14/mar`` (``models/diffloss.py`` and its DiT/IDDPM
``diffusion/`` package, which MAR builds with ``create_diffusion(noise_schedule="cosine")``):

* ``GaussianDiffusion`` -- the cosine schedule (IDDPM, 1000 steps, ``beta <= 0.999``; DDPM's
  linear one with ``noise_schedule="linear"``, for short runs, see ``MAR``),
  epsilon prediction with a learned interpolated variance (``LEARNED_RANGE``), the
  training loss ``mse(eps) + vb`` (variational bound in bits with the mean detached,
  discretised-Gaussian NLL at ``t = 0``), respacing to fewer sampling steps
  (``space_timesteps``), and ancestral sampling ``mean + exp(logvar/2) * noise * tau``.
* ``SimpleMLPAdaLN`` -- the denoiser: ``input_proj``, ``time_embed``, ``cond_embed``,
  ``res_blocks`` (LayerNorm -> AdaLN modulate -> Linear/SiLU/Linear -> gated residual),
  ``final_layer``. Parameter names equal the official checkpoints' ``diffloss.net.*``.
* ``DiffLoss`` -- the loss module (``forward(target, z, mask)``) and the per-token sampler
  ``sample(z, temperature, cfg)``, batched over all tokens of a step and over the
  conditional / unconditional halves of classifier-free guidance.

Schedules are computed in float64 and every per-step coefficient is rounded to float32
before use, as the official ``_extract_into_tensor`` does, so outputs agree to float32
precision.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from genmodels.nn.adaln import modulate
from genmodels.nn.graphs import StepGraphs
from genmodels.nn.linear import linear_t, pays_off, transposed
from genmodels.sampling import guide

# ---------------------------------------------------------------------------- schedule


def cosine_betas(num_timesteps: int = 1000, max_beta: float = 0.999) -> np.ndarray:
    """IDDPM cosine schedule: ``alpha_bar(t) = cos^2(((t + 0.008) / 1.008) * pi / 2)``,
    ``beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta)`` (float64).
    Official: ``get_named_beta_schedule("cosine")`` / ``betas_for_alpha_bar``."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
                     for i in range(num_timesteps)], dtype=np.float64)


def linear_betas(num_timesteps: int = 1000) -> np.ndarray:
    """DDPM linear schedule (1e-4 .. 0.02 at 1000 steps), for completeness."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str | int | list[int]) -> list[int]:
    """The original timesteps kept when respacing to fewer steps (IDDPM ``space_timesteps``).

    ``section_counts``: e.g. ``"100"`` (100 evenly strided steps, MAR's sampler),
    ``"10,15,20"`` (per equal-sized section) or ``"ddim50"`` (DDIM's integer stride).
    Returns the sorted kept indices.
    """
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            want = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {want} DDIM steps from {num_timesteps} with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} diffusion steps into {count} sampling steps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):  # accumulate the float stride exactly as the official loop does
            steps.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(steps))


def _normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise (nats)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    """log-probability of ``x`` (assumed on a 1/255 grid in [-1, 1]) under a Gaussian
    discretised into bins of width 2/255 (IDDPM ``discretized_gaussian_log_likelihood``)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class GaussianDiffusion:
    """A (possibly respaced) Gaussian diffusion with epsilon prediction and learned-range variance.

    Args:
        betas: float64 noise schedule of the base process (``cosine_betas(1000)``).
        use_timesteps: original timesteps to keep (``space_timesteps``); ``None`` keeps all.
            Respacing recomputes ``beta`` from ``alpha_bar`` of the kept steps; the network
            always sees the ORIGINAL timestep index (``timestep_map``).

    Not an ``nn.Module``: it has no parameters and must not add keys to checkpoints. The
    float32 tables live on CPU and are moved to the data's device on demand (cached).
    """

    def __init__(self, betas: np.ndarray, use_timesteps: list[int] | None = None) -> None:
        betas = np.asarray(betas, dtype=np.float64)
        if use_timesteps is not None:
            keep = set(int(t) for t in use_timesteps)
            alphas_cumprod = np.cumprod(1.0 - betas)
            last, new_betas, timestep_map = 1.0, [], []
            for i, ac in enumerate(alphas_cumprod):
                if i in keep:
                    new_betas.append(1 - ac / last)
                    last = ac
                    timestep_map.append(i)
            betas = np.array(new_betas, dtype=np.float64)
        else:
            timestep_map = list(range(len(betas)))
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.num_timesteps = len(betas)
        self.timestep_map = torch.tensor(timestep_map, dtype=torch.int64, device="cpu")  # also under a meta default device
        ac = np.cumprod(1.0 - betas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        tables64 = {
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
            # log of the posterior variance, clipped at t=0 where it is 0 (official)
            "posterior_log_variance_clipped": np.log(np.append(post_var[1], post_var[1:])) if len(post_var) > 1
            else np.zeros(0),
            "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac),
            "log_betas": np.log(betas),
        }
        self.betas = betas
        # float32 copies: the official code casts each gathered float64 value to float32
        self._tables = {k: torch.from_numpy(v).float() for k, v in tables64.items()}
        self._floats = {k: v.tolist() for k, v in self._tables.items()}  # python floats of the float32 values
        self._device_tables: dict = {}

    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, str(device))
        if key not in self._device_tables:
            self._device_tables[key] = self._tables[name].to(device)
        return self._device_tables[key]

    def _at(self, name: str, t: torch.Tensor | int, ndim: int = 2) -> torch.Tensor | float:
        """Coefficient ``name`` at step index ``t``: a python float for an int ``t`` (all rows
        share it, the sampler's case), else a (N, 1, ...) float32 tensor."""
        if isinstance(t, int):
            return self._floats[name][t]
        return self._table(name, t.device)[t].view(-1, *([1] * (ndim - 1)))

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise``."""
        return (self._at("sqrt_alphas_cumprod", t, x_start.ndim) * x_start
                + self._at("sqrt_one_minus_alphas_cumprod", t, x_start.ndim) * noise)

    def q_posterior_mean(self, x_start: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        return self._at("posterior_mean_coef1", t, x_t.ndim) * x_start + self._at("posterior_mean_coef2", t, x_t.ndim) * x_t

    # ------------------------------------------------------------------ reverse process
    def p_mean_variance(self, eps: torch.Tensor, var_values: torch.Tensor, x_t: torch.Tensor, t
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """From the network's eps and variance channels: (mean, log_variance, pred_xstart) of
        ``p(x_{t-1} | x_t)``. The log-variance interpolates between the clipped posterior
        log-variance (``v = -1``) and ``log beta_t`` (``v = +1``) (IDDPM eq. 15)."""
        min_log = self._at("posterior_log_variance_clipped", t, x_t.ndim)
        max_log = self._at("log_betas", t, x_t.ndim)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = self._at("sqrt_recip_alphas_cumprod", t, x_t.ndim) * x_t - \
            self._at("sqrt_recipm1_alphas_cumprod", t, x_t.ndim) * eps
        return self.q_posterior_mean(pred_xstart, x_t, t), log_variance, pred_xstart

    # ------------------------------------------------------------------ training loss
    def training_losses(self, net_out: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-row loss terms (N,) for network output ``net_out`` (N, 2C) = [eps | variance values]
        at ``x_t`` (official ``training_losses`` with ``LossType.MSE`` + ``LEARNED_RANGE``):
        ``mse`` = mean((noise - eps)^2); ``vb`` = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits
        with ``eps`` detached (only the variance learns from it), or at ``t = 0`` the
        discretised-Gaussian decoder NLL in bits; ``loss = mse + vb``."""
        C = x_start.shape[1]
        if net_out.shape[1] != 2 * C:
            raise ValueError(f"the network must output 2*C = {2 * C} channels (eps and variance), got {net_out.shape[1]}")
        eps, var_values = net_out[:, :C], net_out[:, C:]
        true_mean = self.q_posterior_mean(x_start, x_t, t)
        true_logvar = self._at("posterior_log_variance_clipped", t, x_t.ndim)
        mean, logvar, _ = self.p_mean_variance(eps.detach(), var_values, x_t, t)
        kl = _normal_kl(true_mean, true_logvar, mean, logvar).mean(dim=1) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x_start, mean, 0.5 * logvar).mean(dim=1) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        mse = ((noise - eps) ** 2).mean(dim=1)
        return {"loss": mse + vb, "mse": mse, "vb": vb}


@lru_cache(maxsize=16)
def create_diffusion(timestep_respacing: str = "", noise_schedule: str = "cosine",
                     diffusion_steps: int = 1000) -> GaussianDiffusion:
    """MAR's ``create_diffusion``: ``""`` keeps all ``diffusion_steps`` (training),
    ``"100"`` respaces to 100 sampling steps. Cached (the schedule is immutable)."""
    betas = {"cosine": cosine_betas, "linear": linear_betas}.get(noise_schedule)
    if betas is None:
        raise ValueError(f"noise_schedule must be 'cosine' or 'linear', got {noise_schedule!r}")
    spacing = str(timestep_respacing) if timestep_respacing not in (None, "") else str(diffusion_steps)
    return GaussianDiffusion(betas(diffusion_steps), space_timesteps(diffusion_steps, spacing))


# ---------------------------------------------------------------------------- network


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (N,) -> (N, dim), ``[cos | sin]`` with frequencies
    ``max_period^(-i/half)`` (GLIDE / DiT ``timestep_embedding``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t (N,) -> (N, width): sinusoidal(256) -> Linear -> SiLU -> Linear (``time_embed.mlp.{0,2}``)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))  # bfloat16 in the bf16 tier's copy


class ResBlock(nn.Module):
    """``x + gate * MLP(modulate(LN(x), shift, scale))`` with (shift, scale, gate) = adaLN(y)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.forward_modulated(x, *self.adaLN_modulation(y).chunk(3, dim=-1))

    def forward_modulated(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                          gate: torch.Tensor, linears: list | None = None) -> torch.Tensor:
        """The block given its adaLN outputs (each (N, C)): they depend on y only, not on x.
        ``linears``: the MLP's two layers as ``nn.linear.transposed`` operands (faster at few rows)."""
        h = modulate(self.in_ln(x), shift, scale)
        if linears is None:
            return x + gate * self.mlp(h)
        return x + gate * linear_t(self.mlp[1](linear_t(h, *linears[0])), *linears[1])


class FinalLayer(nn.Module):
    """LN (no affine) -> modulate with adaLN(y) = (shift, scale) -> Linear(width -> out)."""

    def __init__(self, model_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(model_channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(model_channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 2 * model_channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.forward_modulated(x, *self.adaLN_modulation(y).chunk(2, dim=-1))

    def forward_modulated(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                          linear: tuple | None = None) -> torch.Tensor:
        h = modulate(self.norm_final(x), shift, scale)
        return self.linear(h) if linear is None else linear_t(h, *linear)


class SimpleMLPAdaLN(nn.Module):
    """The Diffusion Loss denoiser ``eps_theta(x_t | t, z)`` (MAR §3.2, Fig. 2).

    ``forward(x (N, in), t (N,) original timestep indices, c (N, z_channels)) -> (N, out)``;
    ``out = 2 * in``: eps, then the variance-interpolation values. The condition of every
    block is ``y = time_embed(t) + cond_embed(c)``.
    """

    def __init__(self, in_channels: int, model_channels: int, out_channels: int, z_channels: int,
                 num_res_blocks: int, grad_checkpointing: bool = False) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.grad_checkpointing = grad_checkpointing
        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList([ResBlock(model_channels) for _ in range(num_res_blocks)])
        self.final_layer = FinalLayer(model_channels, out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """xavier-uniform Linear layers, N(0, 0.02) time MLP, zero adaLN and output layers (official)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for block in self.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for p in (self.final_layer.adaLN_modulation[-1].weight, self.final_layer.adaLN_modulation[-1].bias,
                  self.final_layer.linear.weight, self.final_layer.linear.bias):
            nn.init.zeros_(p)

    def forward_embedded(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The trunk given the block condition ``y`` (N or 1, width)."""
        h = self.input_proj(x)
        for block in self.res_blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, y, use_reentrant=False)
            else:
                h = block(h, y)
        return self.final_layer(h, y)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, repeat: int = 1) -> torch.Tensor:
        """x (N, in), t (N,), c (N / repeat, z_channels) -> (N, out); row i takes the condition
        ``c[i % (N / repeat)]`` (MAR's ``diffusion_batch_mul`` copies). The condition embedding
        is computed once per distinct row of c and the time embedding once per distinct t
        (~1000 values): the same rows as embedding every row (per-row float32 results)."""
        tu, inv = torch.unique(t, return_inverse=True)
        cond = self.cond_embed(c)
        return self.forward_embedded(x, self.time_embed(tu)[inv] + (cond.repeat(repeat, 1) if repeat > 1 else cond))

    def modulations(self, y: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """All adaLN outputs at once: y (..., width) -> (..., width * (3 depth + 2)), the
        blocks' (shift, scale, gate) then the final layer's (shift, scale). The adaLN layers
        share their input SiLU(y), so this is one matmul over the concatenated weights
        (``modulation_weights``; pass them to reuse one concatenation across calls;
        ``split_modulations`` cuts the output up); rows may be any batch, e.g. every diffusion
        step of a sampling chain at once: adaLN depends on (t, z), never on x_t."""
        w, b = self.modulation_weights() if weights is None else weights
        return F.linear(F.silu(y), w, b)

    def modulation_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The adaLN layers' weights (width * (3 depth + 2), width) and biases, concatenated."""
        lins = [b.adaLN_modulation[-1] for b in self.res_blocks] + [self.final_layer.adaLN_modulation[-1]]
        return torch.cat([m.weight for m in lins]), torch.cat([m.bias for m in lins])

    def split_modulations(self, mods: torch.Tensor) -> tuple[list[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]]:
        """(..., width * (3 depth + 2)) -> per block (shift, scale, gate), final (shift, scale)."""
        W = self.final_layer.linear.in_features
        parts = mods.split(W, dim=-1)
        return [parts[3 * i:3 * i + 3] for i in range(len(self.res_blocks))], parts[-2:]

    def linears(self) -> list[nn.Linear]:
        """The layers a sampling step runs on x_t, in order: input_proj, each block's two MLP
        layers, the final linear (``nn.linear.transposed(net.linears())`` for ``forward_modulated``)."""
        return ([self.input_proj] + [m for b in self.res_blocks for m in (b.mlp[0], b.mlp[2])]
                + [self.final_layer.linear])

    def forward_modulated(self, x: torch.Tensor, mods: torch.Tensor, linears: list | None = None) -> torch.Tensor:
        """The trunk given ``modulations(y)`` (N or 1, ...) instead of y (inference).
        ``linears``: ``nn.linear.transposed(self.linears())``: faster at few rows (float32 rounding apart)."""
        blocks, final = self.split_modulations(mods)
        if linears is None:
            h = self.input_proj(x)
            for block, m in zip(self.res_blocks, blocks):
                h = block.forward_modulated(h, *m)
            return self.final_layer.forward_modulated(h, *final)
        h = linear_t(x, *linears[0])
        for i, (block, m) in enumerate(zip(self.res_blocks, blocks)):
            h = block.forward_modulated(h, *m, linears=linears[1 + 2 * i:3 + 2 * i])
        return self.final_layer.forward_modulated(h, *final, linear=linears[-1])


# ---------------------------------------------------------------------------- the loss


class DiffLoss(nn.Module):
    """Diffusion Loss: ``L(z, x) = E_{eps,t} ||eps - eps_theta(x_t | t, z)||^2`` (+ the IDDPM
    variance term), and sampling ``x ~ p(x | z)`` with temperature (MAR §3.2-3.3).

    Args:
        target_channels: token dimension C (16 for KL-16 with patch size 1).
        z_channels: dimension of the conditioning vectors z (the transformer width).
        depth, width: ``SimpleMLPAdaLN`` residual blocks and width (MAR: 3/1024 for
            training in the README, 6/1024, 8/1280, 12/1536 for the released B/L/H).
        num_sampling_steps: respacing of the 1000 training steps used by ``sample``
            (``"100"`` in the paper); ``sample(..., num_sampling_steps=...)`` overrides it.
        noise_schedule, diffusion_steps: ``"cosine"`` and 1000 in MAR.
    """

    #: floats of adaLN outputs ``sample`` precomputes at once (steps x rows x (3 depth + 2) width)
    MOD_CHUNK = 1 << 21  # 8 MB: larger outputs are fresh mmaps (page faults on every call); measured at batch 64

    def __init__(self, target_channels: int, z_channels: int, depth: int, width: int,
                 num_sampling_steps: str | int = "100", grad_checkpointing: bool = False,
                 noise_schedule: str = "cosine", diffusion_steps: int = 1000) -> None:
        super().__init__()
        self.in_channels = target_channels
        self.net = SimpleMLPAdaLN(target_channels, width, 2 * target_channels, z_channels, depth, grad_checkpointing)
        self.noise_schedule, self.diffusion_steps = noise_schedule, diffusion_steps
        self.num_sampling_steps = str(num_sampling_steps)
        self.train_diffusion = create_diffusion("", noise_schedule, diffusion_steps)
        self.gen_diffusion = create_diffusion(self.num_sampling_steps, noise_schedule, diffusion_steps)

    def loss_terms(self, target: torch.Tensor, z: torch.Tensor, t: torch.Tensor | None = None,
                   noise: torch.Tensor | None = None, repeat: int = 1) -> dict[str, torch.Tensor]:
        """Per-row terms (N,) for targets (N, C) and conditions (N, D); ``t`` ~ U{0..T-1} and
        ``noise`` ~ N(0, I) are drawn (global torch RNG) unless given. ``repeat`` r: the rows
        are r copies of each (target, z) (MAR's ``diffusion_batch_mul``; terms (r N,), copy k
        of row j at k N + j, as ``target.repeat(r, 1)``), each with its own t and noise; z's
        embedding is computed once per row, not per copy."""
        if target.ndim != 2 or target.shape[1] != self.in_channels:
            raise ValueError(f"DiffLoss targets must be (N, {self.in_channels}), got {tuple(target.shape)}")
        if z.shape[0] != target.shape[0]:
            raise ValueError(f"DiffLoss got {target.shape[0]} targets but {z.shape[0]} conditions z")
        if repeat > 1:
            target = target.repeat(repeat, 1)
        d = self.train_diffusion
        if t is None:
            t = torch.randint(0, d.num_timesteps, (target.shape[0],), device=target.device)
        if noise is None:
            noise = torch.randn_like(target)
        x_t = d.q_sample(target, t, noise)
        out = self.net(x_t, d.timestep_map.to(t.device)[t], z, repeat)
        return d.training_losses(out, target, x_t, t, noise)

    def forward(self, target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None,
                t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Scalar loss: the mean over rows, or ``sum(loss * mask) / sum(mask)`` with a mask (N,)."""
        loss = self.loss_terms(target, z, t, noise)["loss"]
        if mask is not None:
            return (loss * mask).sum() / mask.sum()
        return loss.mean()

    def _sampling_diffusion(self, num_sampling_steps: str | int | None) -> GaussianDiffusion:
        if num_sampling_steps is None or str(num_sampling_steps) == self.num_sampling_steps:
            return self.gen_diffusion
        return create_diffusion(str(num_sampling_steps), self.noise_schedule, self.diffusion_steps)

    @torch.no_grad()
    def sample(self, z: torch.Tensor, temperature: float | torch.Tensor = 1.0, cfg: float | torch.Tensor = 1.0, *,
               generator: torch.Generator | None = None, num_sampling_steps: str | int | None = None,
               noise: torch.Tensor | None = None, step_noises: list[torch.Tensor] | None = None,
               graphs: StepGraphs | None = None) -> torch.Tensor:
        """Sample one token per condition by ancestral DDPM sampling (official ``p_sample_loop``
        with ``clip_denoised=False``): ``x_{t-1} = mean + exp(logvar/2) * noise * temperature``.

        Without guidance (``cfg == 1``): ``z`` (N, D) -> tokens (N, C).
        With guidance: ``z`` (2N, D) is ``[conditional | unconditional]``; both halves start
        from the same noise, ``eps = eps_u + cfg (eps_c - eps_u)`` (``sampling.guide``; ``cfg`` is
        the genmodels guidance weight w, as MAR's) and the variance comes
        from the conditional half (official ``forward_with_cfg``); returns (N, C) -- the
        official code returns (2N, C) with two copies of the same first half.
        ``temperature`` scales the noise of every reverse step (MAR Sec. 3.3; the paper's knob
        means ours, ``sampling.from_mar_temperature``); 0 gives the deterministic mean path.

        ``noise`` (N, C) / ``step_noises`` (one (N, C) per step) replace the random draws
        (parity tests); otherwise everything is drawn from ``generator``. Cost per step: one
        network evaluation of all rows; the condition embedding is computed once, the time
        embedding once per step. ``graphs``: replay the network evaluation as one CUDA graph
        per row count (``nn.graphs.StepGraphs``; the update of x stays eager).
        """
        guided = not (isinstance(cfg, (int, float)) and cfg == 1.0)
        n = z.shape[0] // 2 if guided else z.shape[0]
        if guided and z.shape[0] % 2:
            raise ValueError(f"with cfg != 1, z must stack [conditional | unconditional] rows; got {z.shape[0]} rows")
        d = self._sampling_diffusion(num_sampling_steps)
        C = self.in_channels
        x = noise if noise is not None else torch.randn(n, C, device=z.device, generator=generator, dtype=z.dtype)
        if n == 0:
            return x
        net = self.net
        dt = net.input_proj.weight.dtype  # bfloat16 in the bf16 tier's copy: x_t and the update stay float32
        c_emb = net.cond_embed(z.to(dt))
        t_orig = d.timestep_map.tolist()
        steps = list(reversed(range(d.num_timesteps)))
        # the adaLN outputs depend on (t, z) only: computed for many steps at once (one matmul of
        # steps x rows, not 2-3 small ones per step), in chunks of at most ~MOD_CHUNK floats
        t_emb = net.time_embed(torch.tensor([t_orig[i] for i in steps], device=z.device))  # (S, W)
        per_step = c_emb.shape[0] * net.final_layer.linear.in_features * (3 * len(net.res_blocks) + 2)
        chunk = max(1, self.MOD_CHUNK // max(per_step, 1))
        mods, mod_weights = None, net.modulation_weights()  # concatenated once per call (11.5 MB at 3 x 512)
        rows = c_emb.shape[0]
        # few rows (batch 1's 2-100) on the CPU: the step's linears on transposed copies (nn.linear)
        lin_t = transposed(net.linears()) if graphs is None and pays_off(rows, net.input_proj.weight) else None
        for k, i in enumerate(steps):
            if k % chunk == 0:
                mods = net.modulations(c_emb + t_emb[k:k + chunk, None], mod_weights)  # (s, rows, ...)
            x_in = (torch.cat([x, x]) if guided else x).to(dt)
            if graphs is None:
                out = net.forward_modulated(x_in, mods[k % chunk], lin_t)
            else:
                out = graphs(("diffloss", x_in.shape[0], dt), net.forward_modulated, x_in, mods[k % chunk])
            out = out.to(x.dtype)
            if guided:
                eps_c, eps_u = out[:n, :C], out[n:, :C]
                eps = guide(eps_c, eps_u, cfg)  # eps_u + cfg (eps_c - eps_u)
                var_values = out[:n, C:]
            else:
                eps, var_values = out[:, :C], out[:, C:]
            mean, logvar, _ = d.p_mean_variance(eps, var_values, x, i)
            if i > 0:  # no noise at the last step
                step_noise = step_noises[k] if step_noises is not None else \
                    torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype)
                x = mean + torch.exp(0.5 * logvar) * step_noise * temperature
            else:
                x = mean
        return x
