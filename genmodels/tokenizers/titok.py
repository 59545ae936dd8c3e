"""TiTok: an image is worth 32 tokens (Yu et al., NeurIPS 2024, arXiv:2406.07550) -- the 1D tokenizer.

A ViT encoder reads ``[cls, patch tokens (g x g), latent tokens (N)]`` and keeps only the N
latent tokens; each becomes one token of a 1D sequence (paper Sec. 3.2, Fig. 3):

    z   = conv_out(ln_post(ViT_enc([cls; P + pos; L + pos_L])[-N:]))          (B, N, C)
    VQ:  z_q = e[argmin_v |norm(z) - norm(e_v)|]  (l2-normalised codes, C = 12, K = 4096)
    VAE: z_q ~ N(mu, sigma^2) per token           (C = 16; mu, log sigma^2 = chunk(z, 2))

A ViT decoder reads ``[cls, mask tokens (g x g), decoder_embed(z_q) + pos]`` and keeps the
g x g mask tokens, which become either

* the **proxy-code head** (two-stage training, Sec. 3.3): 1x1 conv W -> 2W, tanh, 1x1 conv
  -> K' logits over the codebook of a frozen 2D VQ teacher (the MaskGIT-VQGAN's 1024 codes
  in the paper; any single-scale VQ tokenizer of ours here). Stage 1 trains with
  cross-entropy against the teacher's codes of the image; stage 2 freezes encoder and
  quantizer and decodes pixels through the teacher's decoder fed with the softmax mixture
  of its code vectors (``einsum('nchw,cd->ndhw')``), fine-tuning decoder and teacher decoder;
* the **pixel head** (single-stage, the Oct-2024 release): 1x1 conv W -> 16*16*3, unpatchify,
  3x3 conv.

Architecture, parameter names and numerics follow bytedance/1d-tokenizer
(``modeling/titok.py``, ``modeling/modules/blocks.py``, ``modeling/quantizer/quantizer.py``):
official state dicts load by key (``genmodels/checkpoints/titok.py`` renames only the
``pixel_quantize`` / ``pixel_decoder`` of two-stage files to ``teacher.*``). The official
network lives in [0, 1]; this module takes and returns images in [-1, 1] (the genmodels
contract) and converts at the boundary.

``is_legacy``: the released two-stage checkpoints (L-32, B-64, S-128) *reshape* the (B, N, W)
latents to (B, W, N, 1) before ``conv_out`` instead of permuting them (1d-tokenizer #16, #98):
a fixed but meaningless shuffle of features across tokens, reproduced bit for bit when
set; new models use the correct permute.

Tokens: VQ -> (B, N) int64 ids; VAE -> (B, N, C) float (the posterior mean). ``spec`` is a
1D ``TokenSpec`` with shape ``(N,)``.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from einops.layers.torch import Rearrange
from torch import nn

from genmodels.errors import GenmodelsError
from genmodels.nn.vit import ResidualAttentionBlock, vit_size
from genmodels.tokenizers.base import Tokenizer, TokenSpec
from genmodels.tokenizers.quantizers import VectorQuantizer

QUANTIZE_MODES = ("vq", "vae")
DECODER_HEADS = ("pixels", "proxy")


# ----------------------------------------------------------------------------- ViT encoder / decoder
class TiTokEncoder(nn.Module):
    """Images (B, 3, H, W) in [0, 1] and latent tokens (N, W) -> latents (B, N, out_channels).

    Keys: ``patch_embed``, ``class_embedding`` (1, W), ``positional_embedding`` (g^2+1, W),
    ``latent_token_positional_embedding`` (N, W), ``ln_pre``, ``transformer.{i}.*``,
    ``ln_post``, ``conv_out`` (out, W, 1, 1).
    """

    def __init__(self, image_size: int, patch_size: int, size: str | Sequence[int], num_latent_tokens: int,
                 out_channels: int, is_legacy: bool = False) -> None:
        super().__init__()
        self.width, self.num_layers, self.num_heads = vit_size(size, "encoder_size")
        W = self.width
        self.grid_size = image_size // patch_size
        self.num_latent_tokens, self.out_channels, self.is_legacy = num_latent_tokens, out_channels, is_legacy
        self.patch_embed = nn.Conv2d(3, W, kernel_size=patch_size, stride=patch_size, bias=True)
        scale = W ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(1, W))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size ** 2 + 1, W))
        self.latent_token_positional_embedding = nn.Parameter(scale * torch.randn(num_latent_tokens, W))
        self.ln_pre = nn.LayerNorm(W)
        self.transformer = nn.ModuleList([ResidualAttentionBlock(W, self.num_heads) for _ in range(self.num_layers)])
        self.ln_post = nn.LayerNorm(W)
        self.conv_out = nn.Conv2d(W, out_channels, kernel_size=1, bias=True)

    def forward(self, pixel_values: torch.Tensor, latent_tokens: torch.Tensor) -> torch.Tensor:
        B, N, W = pixel_values.shape[0], self.num_latent_tokens, self.width
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)                 # (B, g^2, W)
        x = torch.cat([self.class_embedding.expand(B, -1, -1), x], dim=1) + self.positional_embedding
        lat = (latent_tokens + self.latent_token_positional_embedding).expand(B, -1, -1)
        x = self.ln_pre(torch.cat([x, lat], dim=1))
        for block in self.transformer:
            x = block(x)
        lat = self.ln_post(x[:, 1 + self.grid_size ** 2:])                            # (B, N, W)
        if self.is_legacy:  # the released two-stage models: a reshape, not a permute
            lat = lat.reshape(B, W, N, 1)
        else:
            lat = lat.transpose(1, 2).reshape(B, W, N, 1)
        return self.conv_out(lat).reshape(B, self.out_channels, N).transpose(1, 2)   # (B, N, out)


class TiTokDecoder(nn.Module):
    """Tokens (B, N, C) -> proxy-code logits (B, K', g, g) or pixels (B, 3, H, W) in [0, 1] (unclamped).

    Keys: ``decoder_embed`` (W, C), ``class_embedding``, ``positional_embedding`` (g^2+1, W),
    ``mask_token`` (1, 1, W), ``latent_token_positional_embedding`` (N, W), ``ln_pre``,
    ``transformer.{i}.*``, ``ln_post``, ``ffn.{0,2}`` (proxy head) or ``ffn.0`` + ``conv_out``
    (pixel head).
    """

    def __init__(self, image_size: int, patch_size: int, size: str | Sequence[int], num_latent_tokens: int,
                 token_size: int, head: str = "pixels", proxy_codebook_size: int = 1024) -> None:
        super().__init__()
        if head not in DECODER_HEADS:
            raise GenmodelsError(f"decoder_head must be one of {DECODER_HEADS}, got {head!r}")
        self.width, self.num_layers, self.num_heads = vit_size(size, "decoder_size")
        W = self.width
        self.grid_size, self.patch_size = image_size // patch_size, patch_size
        self.num_latent_tokens, self.head = num_latent_tokens, head
        self.decoder_embed = nn.Linear(token_size, W, bias=True)
        scale = W ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(1, W))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size ** 2 + 1, W))
        self.mask_token = nn.Parameter(scale * torch.randn(1, 1, W))
        self.latent_token_positional_embedding = nn.Parameter(scale * torch.randn(num_latent_tokens, W))
        self.ln_pre = nn.LayerNorm(W)
        self.transformer = nn.ModuleList([ResidualAttentionBlock(W, self.num_heads) for _ in range(self.num_layers)])
        self.ln_post = nn.LayerNorm(W)
        if head == "proxy":
            self.ffn = nn.Sequential(nn.Conv2d(W, 2 * W, 1), nn.Tanh(), nn.Conv2d(2 * W, proxy_codebook_size, 1))
            self.conv_out = nn.Identity()
        else:
            self.ffn = nn.Sequential(nn.Conv2d(W, patch_size * patch_size * 3, 1),
                                     Rearrange("b (p1 p2 c) h w -> b c (h p1) (w p2)", p1=patch_size, p2=patch_size))
            self.conv_out = nn.Conv2d(3, 3, 3, padding=1, bias=True)

    def forward(self, z_q: torch.Tensor) -> torch.Tensor:
        B, N, _ = z_q.shape
        g = self.grid_size
        x = self.decoder_embed(z_q) + self.latent_token_positional_embedding[:N]
        masks = torch.cat([self.class_embedding.expand(B, -1, -1), self.mask_token.expand(B, g * g, -1)], dim=1)
        x = self.ln_pre(torch.cat([masks + self.positional_embedding, x], dim=1))
        for block in self.transformer:
            x = block(x)
        x = self.ln_post(x[:, 1:1 + g * g])                                           # (B, g^2, W)
        x = x.transpose(1, 2).reshape(B, self.width, g, g)
        return self.conv_out(self.ffn(x))


# ----------------------------------------------------------------------------- the 2D VQ teacher
def _teacher_grid(teacher: Tokenizer) -> tuple[int, int]:
    spec = getattr(teacher, "spec", None)
    if spec is None or spec.kind != "discrete" or len(spec.shapes) != 1 or len(spec.shapes[0]) != 2:
        raise GenmodelsError(f"teacher: TiTok's proxy codes need a single-scale 2D VQ tokenizer, got "
                             f"{type(teacher).__name__} with spec {spec}")
    return spec.shapes[0]  # type: ignore[return-value]


def teacher_codebook(teacher: Tokenizer) -> torch.Tensor:
    """The teacher's code vectors (K', C')."""
    return teacher.quantize.embedding.weight


def teacher_codes(teacher: Tokenizer, images: torch.Tensor) -> torch.Tensor:
    """Proxy codes of images in [-1, 1]: (B, h, w) int64."""
    h, w = _teacher_grid(teacher)
    with torch.no_grad():
        return teacher.encode(images).view(images.shape[0], h, w)


def teacher_decode(teacher: Tokenizer, features: torch.Tensor) -> torch.Tensor:
    """Code vectors (B, C', h, w) -> images in [-1, 1] (unclamped) through the teacher's decoder."""
    if hasattr(teacher, "decode_features"):  # MaskGIT-VQGAN
        return teacher.decode_features(features)
    from genmodels.tokenizers.multiscale_vq import VQVAE
    if isinstance(teacher, VQVAE):  # single scale: f_hat = phi(e[codes])
        return teacher.fhat_to_img(teacher.quantize.phi(0, 1)(features), clamp=False)
    raise GenmodelsError(f"teacher: {type(teacher).__name__} cannot decode code vectors (use a VQVAE with one "
                         "scale or the MaskGIT-VQGAN)")


def load_teacher(path: str | Path) -> Tokenizer:
    """A frozen teacher from a genmodels tokenizer checkpoint, or from the official
    ``maskgit-vqgan-imagenet-f16-256.bin``."""
    from genmodels.checkpoints.common import read_checkpoint
    from genmodels.tokenizers import load_tokenizer

    path = Path(path)
    if not path.is_file():
        raise GenmodelsError(f"teacher_ckpt: file not found: {path}")
    ckpt = read_checkpoint(path)
    if isinstance(ckpt, dict) and "genmodels" in ckpt:
        return load_tokenizer(path, field="teacher_ckpt")
    from genmodels.checkpoints import from_official
    return from_official("maskgit-vqgan", ckpt).requires_grad_(False)


# ----------------------------------------------------------------------------- the tokenizer
class TiTok(Tokenizer):
    """TiTok 1D tokenizer (VQ or VAE; proxy-code or pixel decoder head).

    Args:
        image_size, patch_size: input side and ViT patch (256 / 16 in the paper -> 16x16 grid).
        encoder_size, decoder_size: ``"small"`` (512/8/8), ``"base"`` (768/12/12), ``"large"``
            (1024/24/16) or ``[width, depth, heads]``.
        num_latent_tokens: N, the 1D sequence length (32 / 64 / 128 in the paper).
        quantize_mode: ``"vq"`` (codebook) or ``"vae"`` (diagonal Gaussian per token).
        codebook_size, token_size, use_l2_norm, commitment_cost: the VQ (4096 / 12 / True / 0.25
            in the two-stage models; 8192 / 64 / False single-stage). VAE: token_size = C of
            each continuous token (16), the encoder emits 2C channels.
        is_legacy: the reshape-before-``conv_out`` encoder layout of the two-stage releases.
        decoder_head: ``"pixels"`` or ``"proxy"`` (logits over the teacher's codebook).
        proxy_codebook_size: K' of the proxy head (default: the teacher's codebook size; 1024
            for the MaskGIT-VQGAN).
        stage: with the proxy head, 1 = cross-entropy against the teacher's codes, 2 = encoder,
            quantizer and latent tokens frozen, pixels through the teacher's decoder
            (official ``finetune_decoder``).
        teacher: the frozen 2D VQ tokenizer (``VQVAE`` with one scale, ``MaskGITVQGAN``), or
        teacher_ckpt: a genmodels tokenizer checkpoint to load it from (the teacher's weights
            are then stored in this module's state dict, so the checkpoint file is not needed
            to reload a trained TiTok).
        init_from: a genmodels TiTok checkpoint whose weights initialise this one (stage 2
            from stage 1); its teacher is taken too.
        quantizer_weight: weight of the VQ loss; kl_weight: weight of the per-token KL (VAE,
            1e-6 in the official single-stage recipe); proxy_label_smoothing: of the stage-1 CE.
        dead_code_restart: restart codes unused for this many training steps (0 = off).
    """

    def __init__(self, image_size: int = 256, patch_size: int = 16, encoder_size: str | Sequence[int] = "large",
                 decoder_size: str | Sequence[int] = "large", num_latent_tokens: int = 32, quantize_mode: str = "vq",
                 codebook_size: int = 4096, token_size: int = 12, use_l2_norm: bool = True,
                 commitment_cost: float = 0.25, is_legacy: bool = False, decoder_head: str = "pixels",
                 proxy_codebook_size: int | None = None, stage: int = 1, teacher: Tokenizer | None = None,
                 teacher_ckpt: str | None = None, init_from: str | None = None, quantizer_weight: float = 1.0,
                 kl_weight: float = 1e-6, proxy_label_smoothing: float = 0.0, dead_code_restart: int = 0) -> None:
        super().__init__()
        if quantize_mode not in QUANTIZE_MODES:
            raise GenmodelsError(f"quantize_mode must be one of {QUANTIZE_MODES}, got {quantize_mode!r}")
        if decoder_head not in DECODER_HEADS:
            raise GenmodelsError(f"decoder_head must be one of {DECODER_HEADS}, got {decoder_head!r}")
        if image_size % patch_size:
            raise GenmodelsError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
        if stage not in (1, 2):
            raise GenmodelsError(f"stage must be 1 or 2, got {stage}")
        source = None
        if init_from is not None:
            from genmodels.tokenizers import load_tokenizer
            source = load_tokenizer(init_from, field="init_from")
            if not isinstance(source, TiTok):
                raise GenmodelsError(f"init_from: {init_from} holds a {type(source).__name__}, not a TiTok")
            teacher = teacher or source.teacher
        if teacher_ckpt is not None and teacher is None:
            teacher = load_teacher(teacher_ckpt)
        if decoder_head == "proxy":
            if teacher is not None:
                grid = _teacher_grid(teacher)
                if stage == 1 and grid != (image_size // patch_size,) * 2:
                    raise GenmodelsError(f"teacher: its token grid {grid[0]}x{grid[1]} must equal TiTok's patch grid "
                                         f"{image_size // patch_size}x{image_size // patch_size} (image_size / "
                                         f"patch_size): the proxy head predicts one teacher code per patch")
                k = teacher_codebook(teacher).shape[0]
                if proxy_codebook_size is not None and proxy_codebook_size != k:
                    raise GenmodelsError(f"proxy_codebook_size={proxy_codebook_size} but the teacher has {k} codes")
                proxy_codebook_size = k
            elif proxy_codebook_size is None:
                raise GenmodelsError("decoder_head='proxy' needs a teacher (teacher / teacher_ckpt) or "
                                     "proxy_codebook_size")
        self.image_size, self.patch_size, self.num_latent_tokens = image_size, patch_size, num_latent_tokens
        self.quantize_mode, self.decoder_head, self.stage = quantize_mode, decoder_head, stage
        self.token_size, self.is_legacy = token_size, is_legacy
        self.quantizer_weight, self.kl_weight = quantizer_weight, kl_weight
        self.proxy_label_smoothing = proxy_label_smoothing
        enc_out = 2 * token_size if quantize_mode == "vae" else token_size
        self.encoder = TiTokEncoder(image_size, patch_size, encoder_size, num_latent_tokens, enc_out, is_legacy)
        self.decoder = TiTokDecoder(image_size, patch_size, decoder_size, num_latent_tokens, token_size,
                                    decoder_head, proxy_codebook_size or 0)
        width = self.encoder.width
        self.latent_tokens = nn.Parameter(width ** -0.5 * torch.randn(num_latent_tokens, width))
        self.apply(self._init_weights)
        self.quantize = (VectorQuantizer(codebook_size, token_size, commitment_cost, use_l2_norm, dead_code_restart)
                         if quantize_mode == "vq" else None)
        self.teacher = teacher
        if quantize_mode == "vq":
            self.spec = TokenSpec("discrete", ((num_latent_tokens,),), vocab_size=codebook_size, image_size=image_size)
        else:
            self.spec = TokenSpec("continuous", ((num_latent_tokens,),), channels=token_size, image_size=image_size)
        if source is not None:
            self.load_state_dict(source.state_dict())
        self._freeze()

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """1d-tokenizer ``TiTok._init_weights``: trunc-normal(0.02) Linear / Conv, LN 1 / 0."""
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def _freeze(self) -> None:
        if self.teacher is not None:
            self.teacher.requires_grad_(False).eval()
        if self.decoder_head == "proxy" and self.stage == 2:
            for m in (self.encoder, self.quantize):
                if m is not None:
                    m.requires_grad_(False)
            self.latent_tokens.requires_grad_(False)
            if self.teacher is not None:  # the teacher's decoder is fine-tuned, its codebook stays
                for name in ("decoder", "post_quant_conv"):
                    if hasattr(self.teacher, name):
                        getattr(self.teacher, name).requires_grad_(True)

    def train(self, mode: bool = True) -> "TiTok":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        if self.decoder_head == "proxy" and self.stage == 2:  # frozen parts stay in eval (no code restarts)
            self.encoder.eval()
            if self.quantize is not None:
                self.quantize.eval()
        return self

    # config: the teacher's weights live in the state dict, so the recorded config names the
    # teacher's architecture instead of the files it was loaded from
    @property
    def config(self) -> dict:
        return self.__dict__["_config"]

    @config.setter
    def config(self, value: dict) -> None:
        value = copy.deepcopy(value)
        args = value.get("init_args", {})
        if args.get("teacher_ckpt") is not None or args.get("init_from") is not None:
            args["teacher"] = self.teacher.config if self.teacher is not None else None
            args["teacher_ckpt"] = args["init_from"] = None
        self.__dict__["_config"] = value

    # ------------------------------------------------------------------ network pieces (official convention)
    def encode_latents(self, images01: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (B, 3, H, W) -> encoder latents (B, N, C) (VAE: (B, N, 2C))."""
        self._check_images(images01)
        return self.encoder(images01, self.latent_tokens)

    def decode_raw(self, z_q: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, C) -> the decoder head's output: proxy logits (B, K', g, g) or pixels in [0, 1]."""
        return self.decoder(z_q)

    def proxy_to_images(self, logits: torch.Tensor, soft: bool = True) -> torch.Tensor:
        """Proxy logits (B, K', h, w) -> images in [-1, 1] (unclamped) through the teacher: the softmax
        mixture of its code vectors (stage 2) or, ``soft=False``, its argmax codes."""
        if self.teacher is None:
            raise GenmodelsError("this TiTok has a proxy-code head but no teacher to decode pixels with "
                                 "(give teacher or teacher_ckpt)")
        codebook = teacher_codebook(self.teacher)
        if soft:
            f = torch.einsum("nchw,cd->ndhw", logits.softmax(1), codebook)
        else:
            f = F.embedding(logits.argmax(1), codebook).permute(0, 3, 1, 2)
        return teacher_decode(self.teacher, f)

    def _to_images(self, raw: torch.Tensor) -> torch.Tensor:
        if self.decoder_head == "proxy":
            return self.proxy_to_images(raw, soft=self.stage == 2)
        return raw * 2 - 1

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (self.image_size,) * 2:
            raise GenmodelsError(f"TiTok expects images (B, 3, {self.image_size}, {self.image_size}), "
                                 f"got {tuple(images.shape)}")

    def _posterior(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE: (B, N, 2C) -> mean, logvar (clamped to [-30, 20]), float32."""
        mean, logvar = z.float().chunk(2, dim=-1)
        return mean, logvar.clamp(-30.0, 20.0)

    # ------------------------------------------------------------------ tokens (genmodels contract)
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> VQ: ids (B, N) int64; VAE: posterior means (B, N, C)."""
        z = self.encode_latents((images + 1) / 2)
        if self.quantize is None:
            return self._posterior(z)[0]
        return self.quantize.nearest(z.float().reshape(-1, self.token_size)).view(z.shape[0], -1)

    def tokens_to_latents(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens as ``encode`` gives them -> the decoder's input (B, N, C)."""
        self.spec.check(tokens)
        if self.quantize is None:
            return tokens.float()
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.spec.vocab_size:
            raise GenmodelsError(f"token ids must lie in [0, {self.spec.vocab_size}), got "
                                 f"[{int(tokens.min())}, {int(tokens.max())}]")
        return self.quantize.get_codebook_entry(tokens.long())

    def decode(self, tokens: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """tokens -> images (B, 3, H, W) in [-1, 1] (clamped unless ``clamp=False``)."""
        img = self._to_images(self.decode_raw(self.tokens_to_latents(tokens)))
        return img.clamp(-1, 1) if clamp else img

    def last_layer(self) -> torch.Tensor | None:
        if self.decoder_head == "pixels":
            return self.decoder.conv_out.weight
        if self.stage == 2 and self.teacher is not None:
            return self.teacher.decoder.conv_out.weight
        return None

    # ------------------------------------------------------------------ training
    def losses(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training losses for images in [-1, 1].

        single-stage (pixel head): ``rec_loss`` = mse(recon, x); loss = rec_loss +
            quantizer_weight * VQ loss (VQ) or + kl_weight * KL (VAE; KL summed over a
            sample's tokens and channels, averaged over the batch, as 1d-tokenizer);
        proxy head, stage 1: ``proxy_ce`` = CE(logits, teacher codes); loss = proxy_ce +
            quantizer_weight * VQ loss; in eval mode ``recon`` = teacher decode of the argmax
            codes (no pixel loss in stage 1, so no perceptual / GAN terms either);
        proxy head, stage 2: encoder and quantizer frozen, recon = teacher decoder of the
            softmax mixture; loss = mse(recon, x).
        Also ``usage``, ``perplexity``, ``dead_codes`` (VQ), ``kl`` (VAE), ``proxy_acc``.
        """
        out: dict[str, torch.Tensor] = {}
        frozen = self.decoder_head == "proxy" and self.stage == 2
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            z = self.encode_latents((images + 1) / 2)
            if self.quantize is not None:
                z_q, stats, vq_loss, _ = self.quantize(z)
                out.update(stats)
                out["vq_loss"] = vq_loss * (0.0 if frozen else 1.0)
                extra = self.quantizer_weight * out["vq_loss"]
            else:
                mean, logvar = self._posterior(z)
                z_q = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
                kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2)).mean()
                out["kl"] = kl
                extra = self.kl_weight * kl
        raw = self.decode_raw(z_q)
        if self.decoder_head == "proxy" and self.stage == 1:
            codes = teacher_codes(self._need_teacher(), images)
            ce = F.cross_entropy(raw.float(), codes, label_smoothing=self.proxy_label_smoothing)
            with torch.no_grad():
                out["proxy_acc"] = (raw.argmax(1) == codes).float().mean()
                if not self.training:  # grids and evaluation only: stage 1 has no pixel loss
                    out["recon"] = self.proxy_to_images(raw.detach(), soft=False)
            out.update(proxy_ce=ce, rec_loss=ce, loss=ce + extra)
            return out
        recon = self._to_images(raw)
        rec_loss = F.mse_loss(recon.float(), images.float())
        out.update(recon=recon, rec_loss=rec_loss, loss=rec_loss + extra)
        return out

    def _need_teacher(self) -> Tokenizer:
        if self.teacher is None:
            raise GenmodelsError("stage-1 TiTok training needs a teacher (teacher / teacher_ckpt)")
        return self.teacher

    # ------------------------------------------------------------------ official configurations
    @classmethod
    def from_official_config(cls, name: str, **overrides: Any) -> "TiTok":
        """The released configurations (``configs/infer/TiTok/*.yaml``) by name; two-stage ones come
        with a decoder-only MaskGIT-VQGAN teacher (the ``pixel_*`` modules)."""
        if name not in OFFICIAL_CONFIGS:
            raise GenmodelsError(f"unknown TiTok configuration {name!r}; known: {sorted(OFFICIAL_CONFIGS)}")
        kw = dict(OFFICIAL_CONFIGS[name])
        if kw.get("decoder_head") == "proxy" and "teacher" not in overrides:
            from genmodels.tokenizers.maskgit_vqgan import MaskGITVQGAN
            kw["teacher"] = MaskGITVQGAN(with_encoder=False)
        kw.update(overrides)
        return cls(**kw)


_TWO_STAGE = dict(codebook_size=4096, token_size=12, use_l2_norm=True, commitment_cost=0.25, is_legacy=True,
                  decoder_head="proxy", stage=2)
_VQ8K = dict(codebook_size=8192, token_size=64, use_l2_norm=False, commitment_cost=0.25, is_legacy=False)
_VAE16 = dict(quantize_mode="vae", token_size=16, is_legacy=False)

#: configs/infer/TiTok/*.yaml of bytedance/1d-tokenizer
OFFICIAL_CONFIGS: dict[str, dict] = {
    "titok_l32": dict(encoder_size="large", decoder_size="large", num_latent_tokens=32, **_TWO_STAGE),
    "titok_b64": dict(encoder_size="base", decoder_size="base", num_latent_tokens=64, **_TWO_STAGE),
    "titok_s128": dict(encoder_size="small", decoder_size="small", num_latent_tokens=128, **_TWO_STAGE),
    "titok_bl64_vq8k": dict(encoder_size="base", decoder_size="large", num_latent_tokens=64, **_VQ8K),
    "titok_bl128_vq8k": dict(encoder_size="base", decoder_size="large", num_latent_tokens=128, **_VQ8K),
    "titok_sl256_vq8k": dict(encoder_size="small", decoder_size="large", num_latent_tokens=256, **_VQ8K),
    "titok_ll32_vae_c16": dict(encoder_size="large", decoder_size="large", num_latent_tokens=32, **_VAE16),
    "titok_bl64_vae_c16": dict(encoder_size="base", decoder_size="large", num_latent_tokens=64, **_VAE16),
    "titok_bl128_vae_c16": dict(encoder_size="base", decoder_size="large", num_latent_tokens=128, **_VAE16),
}
