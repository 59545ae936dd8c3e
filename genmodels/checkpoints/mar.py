"""Official LTH14/mar checkpoints -> genmodels modules.

``from_official("mar-kl", sd, embed_dim=16, ch_mult=(1, 1, 2, 2, 4))`` ->
``genmodels.tokenizers.kl_vae.KLVAE`` from ``kl16.ckpt`` (``{"model": state_dict}``, as the
official ``AutoencoderKL.init_from_ckpt`` reads it; LDM-style ``loss.*`` entries, if a file
has them, are dropped).

``from_official("mar", sd, model="mar_large", diffloss_d=8, diffloss_w=1280, ...)`` ->
``genmodels.generators.mar.MAR``. The keyword arguments are those of the official
``mar_base / mar_large / mar_huge(**kwargs)`` = ``MAR(img_size, vae_stride, patch_size,
vae_embed_dim, mask_ratio_min, label_drop_prob, class_num, attn_dropout, proj_dropout,
buffer_size, diffloss_d, diffloss_w, num_sampling_steps, diffusion_batch_mul,
grad_checkpointing)`` plus ``model`` (the constructor's name; the official training
script's ``--model``) or the explicit widths / depths / heads. Defaults are the official
constructor's -- including ``diffloss_d=3, diffloss_w=1024``, while the RELEASED files need
6/1024 (base), 8/1280 (large), 12/1536 (huge) (README); a file that does not fit is
refused naming the first mismatching key, both shapes and the size it was made for
(MAR#68). If the file pickles the training ``args`` (an ``argparse.Namespace``), its
values are the defaults instead.

Official training checkpoints hold ``model`` and ``model_ema`` (plus ``optimizer``,
``epoch``, ``scaler``, ``args``); evaluation uses the EMA weights, so ``use_ema=True``
(default) loads ``model_ema``. Parameter names are the official ones: the state dicts
load 1:1.
"""
from __future__ import annotations

import argparse
import re
from typing import Any, Mapping

import torch

from genmodels.checkpoints import register
from genmodels.checkpoints.common import CheckpointMismatchError, check_kwargs, load_strict
from genmodels.errors import GenmodelsError

MAR_SIZES = {  # official constructors: (width, encoder/decoder depth, heads)
    "mar_base": (768, 12, 12),
    "mar_large": (1024, 16, 16),
    "mar_huge": (1280, 20, 16),
}
RELEASED_DIFFLOSS = {"mar_base": (6, 1024), "mar_large": (8, 1280), "mar_huge": (12, 1536)}
_MAR_OFFICIAL_ARGS = {"img_size", "vae_stride", "patch_size", "vae_embed_dim", "mask_ratio_min", "label_drop_prob",
                      "class_num", "attn_dropout", "proj_dropout", "buffer_size", "diffloss_d", "diffloss_w",
                      "num_sampling_steps", "diffusion_batch_mul", "grad_checkpointing", "mlp_ratio",
                      "encoder_embed_dim", "encoder_depth", "encoder_num_heads", "decoder_embed_dim",
                      "decoder_depth", "decoder_num_heads", "norm_layer"}
_MAR_OFFICIAL_DEFAULTS = dict(img_size=256, vae_stride=16, patch_size=1, vae_embed_dim=16, mask_ratio_min=0.7,
                              label_drop_prob=0.1, class_num=1000, attn_dropout=0.1, proj_dropout=0.1,
                              buffer_size=64, diffloss_d=3, diffloss_w=1024, num_sampling_steps="100",
                              diffusion_batch_mul=4, grad_checkpointing=False, mlp_ratio=4.0)


def _unwrap(ckpt: Any, use_ema: bool, what: str) -> tuple[Mapping[str, torch.Tensor], dict[str, Any]]:
    """(state dict, training args) from a flat state dict or an official checkpoint dict."""
    args: dict[str, Any] = {}
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get("args"), argparse.Namespace):
        args = vars(ckpt["args"])
    if isinstance(ckpt, Mapping) and ("model" in ckpt or "model_ema" in ckpt):
        key = "model_ema" if use_ema and "model_ema" in ckpt else "model"
        if key not in ckpt:
            raise CheckpointMismatchError(f"official {what} checkpoint has no '{key}' entry (keys: {sorted(ckpt)})")
        ckpt = ckpt[key]
    if not isinstance(ckpt, Mapping) or not ckpt or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise CheckpointMismatchError(
            f"expected an official {what} checkpoint (a state dict, or a dict with 'model' / 'model_ema'), got "
            f"{type(ckpt).__name__}" + (f" with keys {list(ckpt)[:5]}" if isinstance(ckpt, Mapping) else ""))
    return ckpt, args


def describe_mar_state_dict(sd: Mapping[str, torch.Tensor]) -> str:
    """The architecture a MAR state dict was made for, from its shapes."""
    def count(prefix: str) -> int:
        idx = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
        return max(idx) + 1 if idx else 0

    D = sd["class_emb.weight"].shape[1]
    enc, dec = count("encoder_blocks."), count("decoder_blocks.")
    name = next((n for n, (w, d, _) in MAR_SIZES.items() if (w, d) == (D, enc) and d == dec), None)
    L = sd["diffusion_pos_embed_learned"].shape[1]
    parts = [f"width={D}", f"depth={enc}+{dec}", f"diffloss_d={count('diffloss.net.res_blocks.')}",
             f"diffloss_w={sd['diffloss.net.input_proj.weight'].shape[0]}", f"class_num={sd['class_emb.weight'].shape[0]}",
             f"seq_len={L}", f"buffer_size={sd['encoder_pos_embed_learned'].shape[1] - L}",
             f"token_dim={sd['z_proj.weight'].shape[1]}"]
    return f"{name or 'a MAR'} ({', '.join(parts)})"


def norm_eps_of(norm_layer: Any) -> float:
    """The official ``norm_layer`` (``mar_base`` .. ``mar_huge`` pass
    ``partial(nn.LayerNorm, eps=1e-6)``) -> our ``MAR(norm_eps=...)``. Honoured: None (the
    official default, eps 1e-6), ``nn.LayerNorm`` (eps 1e-5) or a ``functools.partial`` of it
    with only ``eps``; anything else (another norm, ``elementwise_affine=False``, ...) cannot be
    built by our MAR and is refused with a ``GenmodelsError``."""
    import functools

    from torch import nn

    from genmodels.errors import GenmodelsError

    if norm_layer is None:
        return 1e-6
    if norm_layer is nn.LayerNorm:
        return 1e-5
    if (isinstance(norm_layer, functools.partial) and norm_layer.func is nn.LayerNorm and not norm_layer.args
            and set(norm_layer.keywords) <= {"eps"}):
        return float(norm_layer.keywords.get("eps", 1e-5))
    raise GenmodelsError(f"from_official('mar'): norm_layer={norm_layer!r} is not supported; genmodels' MAR "
                         "builds nn.LayerNorm only: pass partial(nn.LayerNorm, eps=...) (official: eps=1e-6)")


def mar_kwargs(**official: Any) -> dict[str, Any]:
    """Official MAR constructor kwargs (+ ``model``) -> ``genmodels.generators.mar.MAR`` kwargs."""
    model_name = official.pop("model", None)
    unknown = set(official) - _MAR_OFFICIAL_ARGS
    if unknown:
        raise GenmodelsError(f"from_official('mar'): unknown argument(s) {sorted(unknown)}; accepted: model, "
                              f"{', '.join(sorted(_MAR_OFFICIAL_ARGS))}")
    norm_eps = norm_eps_of(official.pop("norm_layer", None))
    kw = {**_MAR_OFFICIAL_DEFAULTS, **official}
    if model_name is not None:
        if model_name not in MAR_SIZES:
            raise ValueError(f"from_official('mar'): model must be one of {sorted(MAR_SIZES)}, got {model_name!r}")
        w, d, h = MAR_SIZES[model_name]
        for side in ("encoder", "decoder"):
            kw.setdefault(f"{side}_embed_dim", w)
            kw.setdefault(f"{side}_depth", d)
            kw.setdefault(f"{side}_num_heads", h)
    side = kw["img_size"] // kw["vae_stride"] // kw["patch_size"]
    out = dict(token_shape=(side, side), token_channels=kw["vae_embed_dim"] * kw["patch_size"] ** 2,
               num_classes=kw["class_num"], norm_eps=norm_eps)
    for k in ("mask_ratio_min", "label_drop_prob", "attn_dropout", "proj_dropout", "buffer_size", "diffloss_d",
              "diffloss_w", "num_sampling_steps", "diffusion_batch_mul", "grad_checkpointing", "mlp_ratio",
              "encoder_embed_dim", "encoder_depth", "encoder_num_heads", "decoder_embed_dim", "decoder_depth",
              "decoder_num_heads"):
        if k in kw:
            out[k] = kw[k]
    return out


@register("mar")
def mar_from_official(state_dict: Any, use_ema: bool = True, **official: Any):
    """Official MAR checkpoint -> ``genmodels.generators.mar.MAR`` in eval mode (see module doc)."""
    from genmodels.generators.mar import MAR

    sd, args = _unwrap(state_dict, use_ema, "MAR")
    if args:  # the training args pickled in the file are the defaults
        defaults = {k: v for k, v in args.items() if k in _MAR_OFFICIAL_ARGS or k == "model"}
        official = {**defaults, **official}
    model = MAR(**mar_kwargs(**official))
    hint = ""
    name = official.get("model")
    if name in RELEASED_DIFFLOSS and (official.get("diffloss_d"), official.get("diffloss_w")) != RELEASED_DIFFLOSS[name]:
        d, w = RELEASED_DIFFLOSS[name]
        hint = f" (the released {name} checkpoint needs diffloss_d={d}, diffloss_w={w})"
    try:
        load_strict(model, sd, what="official MAR checkpoint", made_for=describe_mar_state_dict)
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(str(e) + hint) from None
    return model.eval()


def describe_kl_state_dict(sd: Mapping[str, torch.Tensor]) -> str:
    levels = len({k.split(".")[2] for k in sd if k.startswith("encoder.down.")})
    return (f"AutoencoderKL(embed_dim={sd['post_quant_conv.weight'].shape[0]}, "
            f"ch={sd['encoder.conv_in.weight'].shape[0]}, {levels} levels)")


@register("mar-kl")
def kl_from_official(state_dict: Any, use_ema: bool = False, embed_dim: int = 16,
                     ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4), use_variational: bool = True,
                     ckpt_path: str | None = None, **ours: Any):
    """Official ``AutoencoderKL(embed_dim, ch_mult, use_variational)`` checkpoint (``kl16.ckpt``)
    -> ``genmodels.tokenizers.kl_vae.KLVAE`` (frozen, eval). The official Encoder/Decoder
    hard-code ch=128, num_res_blocks=2, resolution 256, encoder attention at 16x16; our
    KLVAE's other arguments (``scale_factor``, ``patch_size``, ...) may be passed too."""
    from genmodels.tokenizers.kl_vae import KLVAE

    check_kwargs("mar-kl", ours, KLVAE.__init__)
    sd, _ = _unwrap(state_dict, use_ema, "KL-VAE")
    sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}  # LDM training files carry the loss nets
    vae = KLVAE.kl16(embed_dim=embed_dim, ch_mult=tuple(ch_mult), use_variational=use_variational, **ours)
    load_strict(vae, sd, what="official KL-VAE checkpoint", made_for=describe_kl_state_dict)
    return vae.requires_grad_(False).eval()
