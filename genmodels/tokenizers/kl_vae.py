"""KL-VAE: the continuous tokenizer of MAR (LDM's ``AutoencoderKL``; ``LTH14/mar`` ``models/vae.py``).

An LDM conv encoder maps images to the moments of a diagonal Gaussian posterior
``q(z | x) = N(mean, exp(logvar))`` (``double_z``: 2 x ``embed_dim`` channels, then the 1x1
``quant_conv``); the decoder maps a latent back (``post_quant_conv`` then the conv
decoder). MAR's KL-16: ``embed_dim=16``, ``ch=128``, ``ch_mult=(1,1,2,2,4)`` (stride 16),
attention in the encoder's 16x16 level and in both mid blocks; 66,456,019 parameters.

Tokens (the genmodels contract): ``encode`` takes a posterior SAMPLE (MAR trains on
``posterior.sample() * 0.2325``; ``sample_posterior=False`` uses the mean), multiplies it
by ``scale_factor`` (0.2325 = 1 / std of KL-16 latents on ImageNet, MAR issue #2) and
patchifies it into (B, L, embed_dim * p^2) tokens, row-major, each token's features
channel-major (MAR's ``patchify``: ``nchpwq -> nhwcpq``). ``decode`` inverts it.

Training (``losses``) follows LDM's ``LPIPSWithDiscriminator`` without its learned
log-variance (fixed at 0, its initial value): reconstruction L1 (or L2) plus
``kl_weight`` x KL(q(z|x) || N(0, I)). LDM sums both over pixels / latent elements per
image; here the reconstruction is a per-element mean, so the KL (a sum over the latent
per image) is divided by the number of image elements: the objective is LDM's divided by
``3 H W``, and ``kl_weight=1e-6`` means what it means in LDM's configs. LPIPS and the
PatchGAN term are added by ``genmodels.training.TokenizerModule``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from genmodels.nn.conv import Decoder, Encoder, ldm_attn_levels
from genmodels.tokenizers.base import Tokenizer, TokenSpec


def patchify(z: torch.Tensor, p: int) -> torch.Tensor:
    """(..., C, h, w) -> (..., (h/p)(w/p), C p p): MAR's ``patchify`` (``nchpwq -> nhwcpq``:
    tokens row-major, each token's features channel-major)."""
    return rearrange(z, "... c (h p) (w q) -> ... (h w) (c p q)", p=p, q=p)


def unpatchify(tokens: torch.Tensor, p: int, h: int, w: int) -> torch.Tensor:
    """(..., h w, C p p) -> (..., C, h p, w p): MAR's ``unpatchify``."""
    return rearrange(tokens, "... (h w) (c p q) -> ... c (h p) (w q)", h=h, w=w, p=p, q=p)


class DiagonalGaussian:
    """Posterior from moments (B, 2C, h, w) = [mean | logvar]; logvar clamped to [-30, 20]
    (LDM ``DiagonalGaussianDistribution``)."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over C, h, w: (B,)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


class KLVAE(Tokenizer):
    """LDM / MAR KL autoencoder as a continuous tokenizer.

    Args:
        embed_dim: latent channels (16 for KL-16).
        ch, ch_mult, num_res_blocks, dropout: conv net width, per-level multipliers (stride
            ``2 ** (len(ch_mult) - 1)``), ResnetBlocks per encoder level (decoder: +1).
        resolution: image size H = W.
        attn_resolutions: feature-map sizes with attention in the ENCODER levels (LDM; (16,)
            at 256 px); ``decoder_attn_resolutions``: the same for the decoder (() in MAR).
        use_variational: as the official flag; False gives a fixed logvar of 1 (official).
        patch_size: latent patch per token (1 in MAR; tokens have embed_dim * p^2 channels).
        scale_factor: latents are multiplied by it in ``encode`` (0.2325 for KL-16). ``None``
            (for a new tokenizer): ``1 / std`` of the posterior samples, tracked during training
            as an exponential moving average (momentum ``0.99``) in the buffer ``latent_std``
            (saved with the checkpoint), so a trained tokenizer gives unit-variance tokens.
        sample_posterior: ``encode`` returns a posterior sample (True, MAR) or the mean.
        kl_weight: weight of the KL term (LDM's 1e-6, see the module note on normalisation).
        rec_loss: ``"l1"`` (LDM) or ``"l2"``.
    """

    BF16_PARTS = ("post_quant_conv", "decoder")  # genmodels.precision: cast for the bf16 tier's sampling

    def __init__(self, embed_dim: int = 16, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, resolution: int = 256, attn_resolutions: Sequence[int] = (16,),
                 decoder_attn_resolutions: Sequence[int] = (), dropout: float = 0.0, use_variational: bool = True,
                 patch_size: int = 1, scale_factor: float | None = 0.2325, sample_posterior: bool = True,
                 kl_weight: float = 1e-6, rec_loss: str = "l1", in_channels: int = 3) -> None:
        super().__init__()
        if rec_loss not in ("l1", "l2"):
            raise ValueError(f"KLVAE.rec_loss must be 'l1' or 'l2', got {rec_loss!r}")
        levels = len(ch_mult)
        self.downsample = 2 ** (levels - 1)
        if resolution % (self.downsample * patch_size):
            raise ValueError(f"KLVAE: resolution {resolution} is not divisible by the stride {self.downsample} "
                             f"x patch_size {patch_size}")
        self.embed_dim, self.patch_size, self.resolution = int(embed_dim), int(patch_size), int(resolution)
        self.scale_factor = None if scale_factor is None else float(scale_factor)
        self.sample_posterior = sample_posterior
        if self.scale_factor is None:  # 0 = not measured yet
            self.register_buffer("latent_std", torch.zeros(()))
        self.kl_weight, self.rec_loss, self.use_variational = kl_weight, rec_loss, use_variational
        common = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, z_channels=embed_dim,
                      dropout=dropout, mid_attn=True, attn_type="separate")
        self.encoder = Encoder(in_channels=in_channels, double_z=True,
                               attn_levels=ldm_attn_levels(resolution, attn_resolutions, levels), **common)
        self.decoder = Decoder(out_channels=in_channels,
                               attn_levels=ldm_attn_levels(resolution, decoder_attn_resolutions, levels), **common)
        self.quant_conv = nn.Conv2d(2 * embed_dim, (2 if use_variational else 1) * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, 1)
        side = resolution // self.downsample // patch_size
        self.latent_size = resolution // self.downsample
        self.spec = TokenSpec("continuous", ((side, side),), channels=embed_dim * patch_size ** 2,
                              image_size=resolution)

    @property
    def latent_scale(self) -> float:
        """The factor applied to latents in ``encode`` (``scale_factor``, or ``1 / latent_std``)."""
        if self.scale_factor is not None:
            return self.scale_factor
        std = float(self.latent_std)
        return 1.0 / std if std > 0 else 1.0

    # ------------------------------------------------------------------ latents
    def _check_images(self, images: torch.Tensor) -> None:
        c = self.encoder.conv_in.in_channels
        if images.ndim != 4 or images.shape[1] != c or tuple(images.shape[2:]) != (self.resolution,) * 2:
            raise ValueError(f"KLVAE expects images (B, {c}, {self.resolution}, {self.resolution}) in [-1, 1], "
                             f"got {tuple(images.shape)}")

    def encode_posterior(self, images: torch.Tensor) -> DiagonalGaussian:
        """images (B, 3, H, W) in [-1, 1] -> q(z | x) over (B, embed_dim, H/s, W/s) (official ``encode``)."""
        self._check_images(images)
        moments = self.quant_conv(self.encoder(images))
        if not self.use_variational:
            moments = torch.cat([moments, torch.ones_like(moments)], dim=1)
        return DiagonalGaussian(moments)

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent (B, embed_dim, h, w) -> images (unclamped) (official ``decode``)."""
        dt = self.decoder.conv_in.weight.dtype  # bfloat16 in the bf16 tier's sampling copy (genmodels.precision)
        return self.decoder(self.post_quant_conv(z.to(dt))).to(z.dtype)

    def patchify(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, (h/p)(w/p), C p p): MAR's ``patchify`` (features channel-major)."""
        return patchify(z, self.patch_size)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, C p p) -> (B, C, h, w): MAR's ``unpatchify``."""
        return unpatchify(tokens, self.patch_size, *self.spec.grid)

    # ------------------------------------------------------------------ tokens (genmodels contract)
    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> tokens (B, L, embed_dim p^2): a posterior sample
        (or the mean: ``sample=False`` / ``sample_posterior=False``) times ``scale_factor``."""
        post = self.encode_posterior(images)
        use_sample = self.sample_posterior if sample is None else sample
        z = post.sample(generator) if use_sample else post.mode()
        return self.patchify(z * self.latent_scale)

    def decode(self, tokens: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """tokens (B, L, C) -> images (B, 3, H, W), clamped to [-1, 1] unless ``clamp=False``
        (MAR: ``vae.decode(tokens / 0.2325)``)."""
        self.spec.check(tokens)
        images = self.decode_latent(self.unpatchify(tokens) / self.latent_scale)
        return images.clamp(-1, 1) if clamp else images

    # ------------------------------------------------------------------ training
    def losses(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``loss = rec_loss + kl_weight * kl / (3 H W)``; also ``recon`` (unclamped decode of a
        posterior sample), ``rec_loss`` (mean L1 / L2), ``kl`` (KL per image, batch mean),
        ``latent_std`` (std of the posterior samples of this batch: ``scale_factor`` ~ 1 / it)."""
        post = self.encode_posterior(images)
        z = post.sample()
        if self.scale_factor is None and self.training:
            with torch.no_grad():
                std = z.detach().float().std()
                self.latent_std.copy_(std if self.latent_std == 0 else 0.99 * self.latent_std + 0.01 * std)
        recon = self.decode_latent(z)
        rec_loss = (recon - images).abs().mean() if self.rec_loss == "l1" else F.mse_loss(recon, images)
        kl = post.kl().mean()
        loss = rec_loss + self.kl_weight * kl / images[0].numel()
        return {"loss": loss, "recon": recon, "rec_loss": rec_loss, "kl": kl,
                "latent_std": z.detach().float().std()}

    def last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight

    @classmethod
    def kl16(cls, **overrides) -> "KLVAE":
        """MAR's KL-16 (``AutoencoderKL(embed_dim=16, ch_mult=(1,1,2,2,4))``, 66.46M parameters)."""
        return cls(**{**dict(embed_dim=16, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, resolution=256,
                             attn_resolutions=(16,), decoder_attn_resolutions=(), scale_factor=0.2325), **overrides})


AutoencoderKL = KLVAE  # the official class name
