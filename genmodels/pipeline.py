"""The pipeline: a generator, its tokenizer and default sampling knobs -> images.

``genmodels.load(ckpt)`` (a ``genmodels fit`` checkpoint) and ``genmodels.from_official(name,
path)`` (the released VAR / MAR weights) both return a ``Pipeline``::

    pipe = genmodels.load("outputs/digits_var/checkpoints/last.ckpt")
    images = pipe.sample(torch.tensor([1, 7]), generator=torch.Generator().manual_seed(0))  # (2, 3, H, W) in [-1, 1]

Knobs follow the ``genmodels.sampling`` convention (``cfg`` = w, ``cfg=1`` no guidance,
``top_k=0`` / ``top_p=1.0`` off, ``guidance_schedule``); a ``.sample`` call's knobs override
the pipeline's defaults (``sample_kwargs``).

**The seeding rule** (one for validation grids, ``genmodels predict`` and ``genmodels test``):
the samples of class c are made in blocks of ``block_size`` S (default 25). Block b of class c
holds the per-class sample indices [b S, (b + 1) S); it is ONE batch of S labels all equal to
c, drawn with a fresh ``torch.Generator`` seeded with ``seed_for(seed, c, b)``
(``sample_block``). Sample i of class c is therefore the same image whatever other classes,
counts or ranks are asked for (on the same device type and knobs).

**Zero-shot editing** (``Pipeline.edit``, as in the VAR and MaskGIT papers): in-painting,
out-painting and class-conditional editing with a model trained only for class-conditional
generation. The pixel mask (1 = regenerate) becomes a token mask (``token_mask``: a token is
regenerated when any pixel of its footprint is masked, each scale of a multi-scale tokenizer with
its own footprint), and the generator's ``edit_tokens`` regenerates the masked tokens given the
others, the way its paper does (see each generator's ``edit_tokens``).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from genmodels.errors import GenmodelsError
from genmodels.utils.images import quantize_uint8

DEFAULT_BLOCK_SIZE = 25
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One step of SplitMix64 (Steele, Lea, Flood 2014): a bijective 64-bit mixer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def seed_for(seed: int, class_id: int, block: int) -> int:
    """The seed of block ``block`` of class ``class_id`` under the run seed ``seed``: a pure
    function of the three ints, ``splitmix64(splitmix64(splitmix64(seed) ^ class_id) ^ block)``
    (each int taken modulo 2^64) shifted to 63 bits, so it is a valid ``manual_seed`` and
    neighbouring (seed, class, block) triples get unrelated streams."""
    h = _splitmix64(int(seed) & _MASK64)
    h = _splitmix64(h ^ (int(class_id) & _MASK64))
    h = _splitmix64(h ^ (int(block) & _MASK64))
    return h >> 1


class Pipeline:
    """Generator + tokenizer + default sampling knobs.

    Args:
        generator: a ``genmodels.generators.base.Generator`` (bound to the tokenizer when it
            needs it, as VAR).
        tokenizer: the tokenizer whose tokens the generator models (``decode``: tokens ->
            images in [-1, 1]).
        sample_kwargs: default knobs of ``sample`` (e.g. ``{"cfg": 2.0, "num_steps": 8}``).
        name: where it came from (a checkpoint path or an official name), for messages.
    """

    def __init__(self, generator: nn.Module, tokenizer: nn.Module, sample_kwargs: dict[str, Any] | None = None,
                 name: str | None = None) -> None:
        self.generator, self.tokenizer = generator, tokenizer
        self.sample_kwargs = dict(sample_kwargs or {})
        self.name = name
        if hasattr(generator, "bind_tokenizer"):
            generator.bind_tokenizer(tokenizer)

    def __repr__(self) -> str:
        return (f"Pipeline({type(self.generator).__name__} + {type(self.tokenizer).__name__}, "
                f"sample_kwargs={self.sample_kwargs}, name={self.name!r})")

    # ------------------------------------------------------------------ device
    @property
    def device(self) -> torch.device:
        p = next(self.generator.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def to(self, device: torch.device | str) -> "Pipeline":
        """Move generator and tokenizer to ``device``; returns self."""
        self.generator.to(device)
        self.tokenizer.to(device)
        return self

    def eval(self) -> "Pipeline":
        self.generator.eval()
        self.tokenizer.eval()
        return self

    def bf16(self) -> "Pipeline":
        """The bf16 tier: a new pipeline on copies of the generator and tokenizer whose trunk and
        decoder hold bfloat16 weights, logits and sampling in float32 (``genmodels.precision``);
        this pipeline is untouched. Refused for models without a bf16 path."""
        from genmodels.precision import bf16_for_sampling
        gen, tok = bf16_for_sampling(self.generator, self.tokenizer)
        return Pipeline(gen, tok, self.sample_kwargs, name=f"{self.name} (bf16)")

    @property
    def num_classes(self) -> int:
        return int(getattr(self.generator, "num_classes", 0) or 0)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, labels: torch.Tensor | Sequence[int], *, generator: torch.Generator | None = None,
               output: str = "float", **knobs: Any) -> torch.Tensor:
        """Images for class ``labels`` (B,) (``num_classes`` = unconditional).

        ``knobs`` override the pipeline's ``sample_kwargs``; all randomness comes from
        ``generator`` (a torch.Generator on the pipeline's device). ``output``: ``float``
        (B, 3, H, W) in [-1, 1], or ``uint8`` (B, 3, H, W) in [0, 255] (the rounding of a PNG).
        """
        if output not in ("float", "uint8"):
            raise GenmodelsError(f"output must be 'float' or 'uint8', got {output!r}")
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.device).reshape(-1)
        kwargs = {**self.sample_kwargs, **knobs}
        if hasattr(self.generator, "sample_images"):  # decodes what the sampler built (VAR's f_hat)
            images = self.generator.sample_images(labels, generator=generator, **kwargs)
        else:
            tokens = self.generator.sample(labels, generator=generator, **kwargs)
            images = self.tokenizer.decode(tokens)
        images = images.float().clamp(-1, 1)
        return quantize_uint8(images) if output == "uint8" else images

    @torch.no_grad()
    def sample_block(self, class_id: int, block: int, *, seed: int, block_size: int = DEFAULT_BLOCK_SIZE,
                     **knobs: Any) -> torch.Tensor:
        """Block ``block`` of class ``class_id`` (the module's seeding rule): the per-class
        samples [block * S, (block + 1) * S) as uint8 (S, 3, H, W) on the pipeline's device,
        one batch of S labels ``class_id`` drawn from ``torch.Generator().manual_seed(
        seed_for(seed, class_id, block))``."""
        if block_size < 1 or block < 0:
            raise GenmodelsError(f"sample_block: block_size must be >= 1 and block >= 0, got {block_size}, {block}")
        gen = torch.Generator(device=self.device).manual_seed(seed_for(seed, class_id, block))
        labels = torch.full((block_size,), int(class_id), dtype=torch.long, device=self.device)
        return self.sample(labels, generator=gen, output="uint8", **knobs)

    def block_sampler(self, *, seed: int, block_size: int = DEFAULT_BLOCK_SIZE,
                      **knobs: Any) -> Callable[[int, int], torch.Tensor]:
        """``sample_block`` with everything but (class_id, block) fixed: the callable the
        evaluator takes (``fn(class_id, block) -> uint8 (S, 3, H, W)``)."""
        def fn(class_id: int, block: int) -> torch.Tensor:
            return self.sample_block(class_id, block, seed=seed, block_size=block_size, **knobs)
        fn.block_size = block_size  # type: ignore[attr-defined]
        return fn

    @torch.no_grad()
    def sample_classes(self, classes: Iterable[int], n_per_class: int, *, seed: int,
                       block_size: int = DEFAULT_BLOCK_SIZE, **knobs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n_per_class`` samples of every class in ``classes`` by the seeding rule:
        returns (uint8 images (len(classes) * n, 3, H, W), labels (len(classes) * n,)), class by
        class, each in per-class sample order (blocks 0 .. ceil(n / S) - 1, the tail of the
        last block dropped)."""
        classes = [int(c) for c in classes]
        images, labels = [], []
        for c in classes:
            got = 0
            for b in range((n_per_class + block_size - 1) // block_size):
                block = self.sample_block(c, b, seed=seed, block_size=block_size, **knobs)
                take = min(block_size, n_per_class - got)
                images.append(block[:take])
                got += take
            labels.append(torch.full((n_per_class,), c, dtype=torch.long))
        if not images:
            raise GenmodelsError("sample_classes: no classes or n_per_class = 0")
        return torch.cat(images), torch.cat(labels)

    # ------------------------------------------------------------------ zero-shot editing
    def _edit_inputs(self, images: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | Sequence[int] | int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Checked (float images (B, 3, H, W) in [-1, 1], bool mask (B, 1, H, W), labels (B,))."""
        images = torch.as_tensor(images)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != 3:
            raise GenmodelsError(f"edit: images must be (B, 3, H, W), got {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            images = images.float() / 127.5 - 1
        elif not images.dtype.is_floating_point:
            raise GenmodelsError(f"edit: images must be uint8 in [0, 255] or float in [-1, 1], got {images.dtype}")
        elif images.numel() and (images.min() < -1.001 or images.max() > 1.001):
            raise GenmodelsError(f"edit: float images must lie in [-1, 1], got [{float(images.min()):.3g}, "
                                 f"{float(images.max()):.3g}]")
        B, H, W = images.shape[0], images.shape[2], images.shape[3]
        size = getattr(self.tokenizer, "image_size", None) or self.tokenizer.spec.image_size
        if size is not None and (H, W) != (size, size):
            raise GenmodelsError(f"edit: the images are {H}x{W} but the tokenizer {type(self.tokenizer).__name__} "
                                 f"takes {size}x{size}")
        mask = torch.as_tensor(mask)
        while mask.ndim < 4:
            mask = mask[None] if mask.ndim != 3 else mask[:, None]
        if tuple(mask.shape[2:]) != (H, W):
            raise GenmodelsError(f"edit: the mask is {mask.shape[2]}x{mask.shape[3]} but the images are {H}x{W}; "
                                 f"give a mask (B, 1, {H}, {W}) with 1 = regenerate")
        if mask.shape[1] != 1 or mask.shape[0] not in (1, B):
            raise GenmodelsError(f"edit: mask must be (B, 1, H, W) or (1, 1, H, W) for {B} images, got "
                                 f"{tuple(mask.shape)}")
        mask = (mask.float() > 0.5).expand(B, 1, H, W)
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if labels.numel() == 1:
            labels = labels.expand(B)
        if labels.shape[0] != B:
            raise GenmodelsError(f"edit: {labels.shape[0]} labels for {B} images")
        n = self.num_classes
        if labels.numel() and (labels.min() < 0 or labels.max() > n):
            raise GenmodelsError(f"edit: labels must lie in [0, {n}) (the model's classes; {n} = unconditional), got "
                                 f"[{int(labels.min())}, {int(labels.max())}]")
        dev = self.device
        return images.to(dev), mask.to(dev), labels.to(dev)

    @torch.no_grad()
    def edit_tokens(self, images: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | Sequence[int] | int, *,
                    generator: torch.Generator | None = None, footprint: str = "any", **knobs: Any
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``edit`` in token space: returns (the images' tokens, the token mask (B, L) bool, the
        edited tokens). The tokens come from ``tokenizer.encode`` (a KL-VAE's posterior mean)."""
        edit = getattr(self.generator, "edit_tokens", None)
        if edit is None:
            raise GenmodelsError(f"{type(self.generator).__name__} has no zero-shot editing in genmodels (edit_tokens: "
                                 "MaskGIT, MAR, VAR and the causal AR have it)")
        images, mask, labels = self._edit_inputs(images, mask, labels)
        spec = self.tokenizer.spec
        tmask = token_mask(mask, spec.shapes, type(self.tokenizer).__name__, footprint)
        if hasattr(self.tokenizer, "sample_posterior"):  # KL-VAE: the posterior mean, deterministic
            tokens = self.tokenizer.encode(images, sample=False)
        else:
            tokens = self.tokenizer.encode(images)
        edited = edit(tokens, tmask, labels, generator=generator, **{**self.sample_kwargs, **knobs})
        return tokens, tmask, edited

    @torch.no_grad()
    def edit(self, images: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | Sequence[int] | int, *,
             generator: torch.Generator | None = None, output: str = "float", footprint: str = "any",
             **knobs: Any) -> torch.Tensor:
        """Zero-shot editing: regenerate the masked part of ``images`` as class ``labels``.

        images (B, 3, H, W) float in [-1, 1] or uint8; mask (B, 1, H, W) (or (1, 1, H, W) for all),
        1 = regenerate; labels (B,) or one int: the class to generate in the masked region (the
        image's own for in-/out-painting, another for class-conditional editing). The masked
        tokens (``token_mask``) are regenerated by the generator's ``edit_tokens`` given the
        others, every random draw from ``generator``; ``knobs`` override ``sample_kwargs`` (the
        ``genmodels.sampling`` convention). Tokens outside the mask are the image's own, so an
        all-zero mask returns the tokenizer's reconstruction and an all-one mask ``sample``'s
        images for the same seed. ``output``: ``float`` [-1, 1] or ``uint8``; ``footprint``: ``any``
        or ``all`` masked pixels make a token regenerated (``token_mask``)."""
        if output not in ("float", "uint8"):
            raise GenmodelsError(f"output must be 'float' or 'uint8', got {output!r}")
        _, _, edited = self.edit_tokens(images, mask, labels, generator=generator, footprint=footprint, **knobs)
        out = self.tokenizer.decode(edited).float().clamp(-1, 1)
        return quantize_uint8(out) if output == "uint8" else out


# ---------------------------------------------------------------------- genmodels checkpoints

FOOTPRINTS = ("any", "all")


def token_mask(mask: torch.Tensor, shapes: Sequence[Sequence[int]], tokenizer: str = "the tokenizer",
               footprint: str = "any") -> torch.Tensor:
    """Pixel mask (B, 1, H, W) (nonzero = regenerate) -> token mask (B, L) bool in the tokens'
    order (scales concatenated coarse to fine, each in raster order; ``shapes`` = the
    ``TokenSpec.shapes``). Token (i, j) of an h x w grid covers the pixel rows
    floor(i H / h) .. ceil((i + 1) H / h) - 1 and likewise the columns (adaptive pooling), and
    is regenerated when any of them is masked (``footprint="any"``, the default), or, with
    ``footprint="all"``, only when all of them are (a multi-scale tokenizer then keeps the
    coarse tokens that straddle the mask's border). A 1D token sequence (TiTok) has no
    footprint: a ``GenmodelsError`` naming ``tokenizer``."""
    if footprint not in FOOTPRINTS:
        raise GenmodelsError(f"footprint must be one of {FOOTPRINTS}, got {footprint!r}")
    if any(len(s) != 2 for s in shapes):
        raise GenmodelsError(f"{tokenizer} gives 1D tokens (shapes={tuple(tuple(s) for s in shapes)}): no token has "
                             "a spatial footprint, so a pixel mask cannot choose the tokens to regenerate; editing "
                             "needs a tokenizer with a 2D token grid")
    m = mask.float() > 0
    if footprint == "all":  # all masked <=> no pixel unmasked
        return torch.cat([F.adaptive_max_pool2d((~m).float(), tuple(s)).flatten(1) == 0 for s in shapes], dim=1)
    return torch.cat([F.adaptive_max_pool2d(m.float(), tuple(s)).flatten(1) > 0 for s in shapes], dim=1)


# ---------------------------------------------------------------------- genmodels checkpoints
def load(ckpt_path: str | Path, ema: bool = True, device: torch.device | str | None = None) -> Pipeline:
    """A ``Pipeline`` from a ``genmodels fit`` checkpoint of a ``GeneratorModule``.

    Needs only that file: it records the generator's and the tokenizer's configs, the
    tokenizer's weights (once, under ``genmodels.tokenizer_state_dict``; older files keep
    them in ``state_dict``) and the module's ``sample_kwargs`` (the pipeline's defaults).
    ``ema``: the EMA weights when the run had EMA on (Lightning stores them as the
    ``state_dict``); ``ema=False`` takes the raw weights (``current_model_state``).
    """
    from genmodels.checkpoints.common import load_strict, read_checkpoint
    from genmodels.utils.config import instantiate

    path = Path(ckpt_path)
    ckpt = read_checkpoint(path)
    meta = ckpt.get("genmodels") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or "generator" not in meta or "tokenizer" not in meta:
        raise GenmodelsError(f"{path} is not a genmodels generator checkpoint (no 'genmodels.generator' entry; "
                             "it must come from `genmodels fit` with a GeneratorModule)")
    sd = ckpt["state_dict"]
    if not ema and "current_model_state" in ckpt:
        sd = ckpt["current_model_state"]
    generator, tokenizer = instantiate(meta["generator"]), instantiate(meta["tokenizer"])
    gen_sd = {k[len("generator."):]: v for k, v in sd.items() if k.startswith("generator.")}
    load_strict(generator, gen_sd, what=f"generator of {path}")
    tok_sd = meta.get("tokenizer_state_dict")
    if tok_sd is None:
        tok_sd = {k[len("tokenizer."):]: v for k, v in sd.items() if k.startswith("tokenizer.")}
    load_strict(tokenizer, tok_sd, what=f"tokenizer of {path}")
    sample_kwargs = meta.get("sample_kwargs")
    if sample_kwargs is None:  # a checkpoint from before the sampling convention (issue 11)
        sample_kwargs = dict((ckpt.get("hyper_parameters") or {}).get("sample_kwargs") or {})
        if meta["generator"].get("class_path", "").endswith(".VAR") and "guidance_schedule" not in sample_kwargs:
            from genmodels.sampling import from_var

            old = dict(sample_kwargs)
            sample_kwargs = from_var(**sample_kwargs)  # its cfg was VAR's c (default 1.5), top_p 0 = off
            warnings.warn(f"{path}: VAR sample_kwargs {old} predate genmodels' sampling convention; read as VAR's "
                          f"official knobs -> {sample_kwargs}", stacklevel=2)
    pipe = Pipeline(generator.requires_grad_(False).eval(), tokenizer.requires_grad_(False).eval(),
                    sample_kwargs, name=str(path))
    return pipe.to(device) if device is not None else pipe


# ---------------------------------------------------------------------- official checkpoints
_VAR_URL = "https://huggingface.co/FoundationVision/var/resolve/main/"
_MAR_URL = "https://www.dropbox.com/scl/fi/"
#: name -> kind, the converters' keyword arguments (``generator_kwargs``, ``tokenizer_kwargs``) and
#: the files: (file name in the folder, official URL, sha256 or None when the authors publish none)
OFFICIAL: dict[str, dict[str, Any]] = {
    **{f"var-d{d}": {"kind": "var", "generator_kwargs": {"depth": d}, "tokenizer_kwargs": {},
                     "files": {"generator": (f"var_d{d}.pth", _VAR_URL + f"var_d{d}.pth", None),
                               "tokenizer": ("vae_ch160v4096z32.pth", _VAR_URL + "vae_ch160v4096z32.pth", None)}}
       for d in (16, 20, 24, 30)},
    **{f"mar-{size}": {"kind": "mar", "generator_kwargs": {"model": f"mar_{size}"}, "tokenizer_kwargs": {},
                       "files": {"generator": (f"mar/mar_{size}/checkpoint-last.pth", _MAR_URL + url, None),
                                 "tokenizer": ("vae/kl16.ckpt", _MAR_URL + "hhmuvaiacrarfg28qxhwz/kl16.ckpt"
                                               "?rlkey=l44xipsezc8atcffdp4q7mwmh&dl=1", None)}}
       for size, url in (("base", "f6dpuyjb7fudzxcyhvrhk/checkpoint-last.pth?rlkey=a6i4bo71vhfo4anp33n9ukujb&dl=1"),
                         ("large", "pxacc5b2mrt3ifw4cah6k/checkpoint-last.pth?rlkey=m48ovo6g7ivcbosrbdaz0ehqt&dl=1"),
                         ("huge", "1qmfx6fpy3k7j9vcjjs3s/checkpoint-last.pth?rlkey=4lae281yzxb406atp32vzc83o&dl=1"))},
    # FractalGen (LTH14/fractalgen): pixel space, so one file (``{"model": ...}``, no EMA) and the
    # Pixels tokenizer. Folder / file as the official util/download.py writes them
    # (``pretrained_models/<model>/checkpoint-last.pth``); URLs are the README's Dropbox links with
    # ``dl=1`` (a direct download; the README's ``dl=0`` works only with wget's user agent).
    # ``sample_kwargs``: the README's FID settings in our convention (temperature 1 / T).
    **{name: {"kind": "fractal", "generator_kwargs": {"model": name.replace("-", "_")},
              "tokenizer_kwargs": {"image_size": size},
              "sample_kwargs": {"cfg": cfg, "guidance_schedule": "linear", "temperature": 1.0 / temp,
                                "num_iter_list": iters, "filter_threshold": 1e-4},
              "files": {"generator": (f"fractalgen/{name.replace('-', '_')}/checkpoint-last.pth",
                                      _MAR_URL + url + "&dl=1", None)}}
       for name, size, cfg, temp, iters, url in (
           ("fractalar-in64", 64, 11.0, 1.03, [64, 16],
            "n25tbij7aqkwo1ypqhz72/checkpoint-last.pth?rlkey=2czevgex3ocg2ae8zde3xpb3f&st=mj0subup"),
           ("fractalmar-in64", 64, 6.5, 1.02, [64, 16],
            "lh7fmv48pusujd6m4kcdn/checkpoint-last.pth?rlkey=huihey61ok32h28o3tbbq6ek9&st=fxtoawba"),
           # README: best cfg 29 (Base) / 21 (Large); it gives no temperature for Base: 1.1 as Large / Huge
           ("fractalmar-base-in256", 256, 29.0, 1.1, [64, 16, 16],
            "zrdm7853ih4tcv98wmzhe/checkpoint-last.pth?rlkey=htq9yuzovet7d6ioa64s1xxd0&st=4c4d93vs"),
           ("fractalmar-large-in256", 256, 21.0, 1.1, [64, 16, 16],
            "y1k05xx7ry8521ckxkqgt/checkpoint-last.pth?rlkey=wolq4krdq7z7eyjnaw5ndhq6k&st=vjeu5uzo"),
           ("fractalmar-huge-in256", 256, 19.0, 1.1, [64, 16, 16],
            "t2rru8xr6wm23yvxskpww/checkpoint-last.pth?rlkey=dn9ss9zw4zsnckf6bat9hss6h&st=y7w921zo"))},
}

# TiTok (bytedance/1d-tokenizer README_TiTok.md "Model Zoo"): the three two-stage tokenizers and their
# MaskGIT generators, the files of the Hugging Face repo fun-research/TiTok (no published checksums).
# The single-stage VQ / VAE tokenizers come without generators: genmodels.checkpoints.from_official
# ("titok_bl64_vq8k", ...) loads them alone.
_TITOK_URL = "https://huggingface.co/fun-research/TiTok/resolve/main/"
OFFICIAL.update({
    f"titok-{v}": {"kind": "titok", "tokenizer_kind": f"titok_{v}", "generator_kind": gen,
                   "sample_preset": f"titok-{v}", "generator_kwargs": {}, "tokenizer_kwargs": {},
                   "files": {"generator": (f"generator_titok_{v}.bin", _TITOK_URL + f"generator_titok_{v}.bin", None),
                             "tokenizer": (f"tokenizer_titok_{v}.bin", _TITOK_URL + f"tokenizer_titok_{v}.bin", None)}}
    for v, gen in (("l32", "maskgit-titok"), ("b64", "maskgit-titok"), ("s128", "uvit-titok"))})


def _titok_pipeline(key: str, spec: dict[str, Any], files: dict[str, Path]) -> "Pipeline":
    """TiTok tokenizer + its MaskGIT (``ImageBert``; ``UViTBert`` for S-128) with the official
    sampling settings (``sample_imagenet_titok.py``: ``MaskGIT.SAMPLE_PRESETS`` /
    ``UViTBert.SAMPLE_PRESETS``, TiTok's guidance_scale mapped to our ``cfg``)."""
    from genmodels.checkpoints import from_official as convert

    tok = convert(spec["tokenizer_kind"], files["tokenizer"], **spec.get("tokenizer_kwargs", {}))
    gen = convert(spec["generator_kind"], files["generator"], **spec.get("generator_kwargs", {}))
    if gen.spec.vocab_size != tok.spec.vocab_size or tuple(gen.spec.shapes[0]) != tuple(tok.spec.shapes[0]):
        raise GenmodelsError(f"from_official({key!r}): the generator models {gen.spec.vocab_size} codes x "
                             f"{tuple(gen.spec.shapes[0])} tokens but the tokenizer gives {tok.spec.vocab_size} x "
                             f"{tuple(tok.spec.shapes[0])}: files of different TiTok variants")
    return Pipeline(gen, tok, dict(type(gen).SAMPLE_PRESETS.get(spec.get("sample_preset"), {})), name=key)


def default_cache_dir() -> Path:
    """``$GENMODELS_CACHE/official`` (default ``~/.cache/genmodels/official``)."""
    return Path(os.environ.get("GENMODELS_CACHE", Path.home() / ".cache" / "genmodels")) / "official"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_file(url: str, dest: Path, sha256: str | None = None, *, progress: bool = True,
               opener: Callable[[str], Any] = urllib.request.urlopen) -> Path:
    """Download ``url`` to ``dest`` (the only network access in genmodels) with a progress bar,
    hashing while writing. With ``sha256`` the hash must match; without one (the authors publish
    none) the computed hash is written beside the file (``dest.sha256``), and every later call
    checks the cached file against it. A file already in the cache is not downloaded again.
    Raises ``GenmodelsError`` on a checksum mismatch (the partial / bad file is removed)."""
    dest = Path(dest)
    side = dest.with_name(dest.name + ".sha256")
    if dest.is_file():
        want = sha256 or (side.read_text().split()[0] if side.is_file() else None)
        if want is not None and _sha256(dest) != want:
            raise GenmodelsError(f"{dest}: cached file has sha256 {_sha256(dest)}, expected {want}; delete it to "
                                 "download again")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    h = hashlib.sha256()
    with opener(url) as r, open(tmp, "wb") as f:
        total = int(getattr(r, "headers", {}).get("Content-Length", 0) or 0)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=total or None, unit="B", unit_scale=True, desc=dest.name)
        for chunk in iter(lambda: r.read(1 << 20), b""):
            f.write(chunk)
            h.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
    digest = h.hexdigest()
    if sha256 is not None and digest != sha256:
        tmp.unlink(missing_ok=True)
        raise GenmodelsError(f"{url}: downloaded sha256 {digest} does not match the expected {sha256}")
    shutil.move(str(tmp), str(dest))
    side.write_text(f"{digest}  {dest.name}\n")
    return dest


def _official_name(name: str) -> str:
    key = name.lower().replace("_", "-")
    if key not in OFFICIAL:
        raise GenmodelsError(f"unknown official model {name!r}; known: {', '.join(sorted(OFFICIAL))}")
    return key


def official_files(name: str, path: str | Path | None = None, *, download: bool = False,
                   cache_dir: str | Path | None = None, progress: bool = True) -> dict[str, Path]:
    """The local files of official model ``name``: under the folder ``path`` (the names in
    ``OFFICIAL``; the file name alone directly in ``path`` works too), or, with
    ``download=True``, fetched into ``cache_dir`` (default ``default_cache_dir()``)."""
    spec = OFFICIAL[_official_name(name)]
    out = {}
    for role, (rel, url, sha) in spec["files"].items():
        if download:
            out[role] = fetch_file(url, Path(cache_dir or default_cache_dir()) / rel, sha, progress=progress)
            continue
        if path is None:
            raise GenmodelsError(f"from_official({name!r}): give the folder with the official files "
                                 f"(path=...) or download=True")
        root, rel = Path(path), Path(rel)
        candidates = (root / rel, root / rel.parent.name / rel.name, root / rel.name)
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            tried = ", ".join(dict.fromkeys(str(p) for p in candidates))
            raise GenmodelsError(f"from_official({name!r}): {role} file not found (looked for {tried}); download it "
                                 f"from {url} or pass download=True (genmodels sample --download)")
        out[role] = found
    return out


def from_official(name: str, path: str | Path | None = None, *, download: bool = False,
                  cache_dir: str | Path | None = None, device: torch.device | str | None = None,
                  progress: bool = True) -> Pipeline:
    """A ``Pipeline`` for the released weights: ``var-d16`` .. ``var-d30`` (+ the VQ-VAE
    ``vae_ch160v4096z32.pth``), ``mar-base`` / ``mar-large`` / ``mar-huge`` (+ ``kl16.ckpt``),
    ``fractalar-in64``, ``fractalmar-in64``, ``fractalmar-base-in256`` / ``-large-`` / ``-huge-``
    (pixels: one ``checkpoint-last.pth`` each), ``titok-l32`` / ``titok-b64`` / ``titok-s128``
    (``tokenizer_titok_*.bin`` + ``generator_titok_*.bin``).

    ``path``: a folder holding the official files (see ``official_files``); ``download=True``
    fetches them from the authors' locations into ``cache_dir`` instead (progress bar,
    sha256 recorded and checked). Built by the converters in ``genmodels.checkpoints``; the
    default knobs are the papers' FID settings in our convention: VAR's official ``cfg=1.5,
    top_k=900, top_p=0.96`` is ``sampling.from_var`` (cfg 2.5, linear); MAR's README
    settings (``MAR.SAMPLE_PRESETS``, knobs mean ours).
    """
    from genmodels.checkpoints import from_official as convert
    from genmodels.sampling import from_var

    key = _official_name(name)
    spec = OFFICIAL[key]
    files = official_files(key, path, download=download, cache_dir=cache_dir, progress=progress)
    gen_kw, tok_kw = dict(spec.get("generator_kwargs", {})), dict(spec.get("tokenizer_kwargs", {}))
    if spec["kind"] == "titok":
        pipe = _titok_pipeline(key, spec, files)
    elif spec["kind"] == "var":
        vae = convert("var-vqvae", files["tokenizer"], **tok_kw)
        var = convert("var", files["generator"], vae_local=vae, **gen_kw)
        pipe = Pipeline(var, vae, from_var(cfg=1.5, top_k=900, top_p=0.96), name=key)
    elif spec["kind"] == "fractal":  # pixel space: the Pixels tokenizer has no file
        from genmodels.tokenizers.pixels import Pixels

        fractal = convert(gen_kw.pop("model"), files["generator"], **gen_kw)
        pipe = Pipeline(fractal, Pixels(**tok_kw), spec["sample_kwargs"], name=key)
    else:
        from genmodels.checkpoints.mar import RELEASED_DIFFLOSS
        from genmodels.generators.mar import MAR

        model = gen_kw.get("model")
        if model in RELEASED_DIFFLOSS:
            gen_kw.setdefault("diffloss_d", RELEASED_DIFFLOSS[model][0])
            gen_kw.setdefault("diffloss_w", RELEASED_DIFFLOSS[model][1])
        kl = convert("mar-kl", files["tokenizer"], **tok_kw)
        mar = convert("mar", files["generator"], **gen_kw)
        pipe = Pipeline(mar, kl, MAR.SAMPLE_PRESETS.get(model, {}), name=key)
    pipe.generator.requires_grad_(False).eval()
    pipe.tokenizer.requires_grad_(False).eval()
    return pipe.to(device) if device is not None else pipe
