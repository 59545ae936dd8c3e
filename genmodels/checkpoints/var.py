"""Official FoundationVision/VAR checkpoints -> genmodels modules.

``from_official("var-vqvae", sd, **VQVAE_kwargs)`` -> ``genmodels.tokenizers.multiscale_vq.VQVAE``
(e.g. ``vae_ch160v4096z32.pth`` with ``VQVAE(vocab_size=4096, z_channels=32, ch=160,
share_quant_resi=4, v_patch_nums=(1,2,3,4,5,6,8,10,13,16))`` -- the defaults here).

``from_official("var", sd, **kwargs)`` -> ``genmodels.generators.var.VAR`` (e.g.
``var_d16.pth`` .. ``var_d30.pth`` with ``depth=16`` .. ``30``). ``kwargs`` are those of
the official ``build_vae_var`` (``depth``, ``shared_aln``, ``attn_l2_norm``,
``patch_nums``, ``V``, ``Cvae``, ``num_classes``, ``init_*`` ...) and of the official
``VAR(vae_local, ...)`` constructor (``embed_dim``, ``num_heads``, ``mlp_ratio``,
``drop_rate``, ``attn_drop_rate``, ``drop_path_rate``, ``norm_eps``, ``cond_drop_rate``);
anything not given follows ``build_vae_var`` (width 64·depth, depth heads, drop path
0.1·depth/24, attn_l2_norm=True -- what the released files need). ``vae_local`` (our
VQVAE) sets ``V``/``Cvae`` and is bound to the model for sampling.

Name mapping (everything else is 1:1): ``blocks.i.attn.mat_qkv.weight`` ->
``blocks.i.attn.qkv.weight``, ``blocks.i.attn.scale_mul_1H11`` -> ``blocks.i.attn.scale_mul``.
The official buffers ``lvl_1L``, ``attn_bias_for_masking`` and ``blocks.i.attn.zero_k_bias``
are recomputed and ignored. Loading is strict otherwise; a file of another size is
refused naming the first mismatching key, both shapes and the model the file was made for.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from genmodels.checkpoints import register
from genmodels.checkpoints.common import CheckpointMismatchError, check_kwargs, load_strict
from genmodels.errors import GenmodelsError

VAR_RECOMPUTED = ("lvl_1L", "attn_bias_for_masking", "zero_k_bias")
_RENAMES = ((".attn.mat_qkv.weight", ".attn.qkv.weight"), (".attn.scale_mul_1H11", ".attn.scale_mul"))

# official build_vae_var keyword arguments that do not change VAR's weights
_IGNORED_BUILD_ARGS = {"device", "ch", "share_quant_resi", "flash_if_available", "fused_if_available"}
_VAR_ARGS = {"vae_local", "num_classes", "depth", "embed_dim", "num_heads", "mlp_ratio", "drop_rate",
             "attn_drop_rate", "drop_path_rate", "norm_eps", "shared_aln", "cond_drop_rate", "attn_l2_norm",
             "patch_nums", "V", "Cvae", "init_adaln", "init_adaln_gamma", "init_head", "init_std"}


def _unwrap(sd: Any, what: str) -> Mapping[str, torch.Tensor]:
    """Accept a flat state dict, or an official training checkpoint ``ar-ckpt-*.pth``
    ({'trainer': {'var_wo_ddp': ..., 'vae_local': ...}})."""
    if isinstance(sd, Mapping) and "trainer" in sd and isinstance(sd["trainer"], Mapping):
        key = "vae_local" if what == "vae" else "var_wo_ddp"
        if key not in sd["trainer"]:
            raise CheckpointMismatchError(f"official VAR training checkpoint has no trainer.{key}")
        sd = sd["trainer"][key]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointMismatchError(
            f"expected a state dict of tensors for an official VAR {what}, got {type(sd).__name__}"
            + (f" with keys {list(sd)[:5]}" if isinstance(sd, Mapping) else ""))
    return sd


def describe_var_state_dict(sd: Mapping[str, torch.Tensor]) -> str:
    """What a VAR state dict was made for, from its shapes (for mismatch errors)."""
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = max(blocks) + 1 if blocks else 0
    C = sd["class_emb.weight"].shape[1]
    parts = [f"depth={depth}", f"embed_dim={C}"]
    sm = sd.get("blocks.0.attn.scale_mul_1H11", sd.get("blocks.0.attn.scale_mul"))
    if sm is not None:
        parts.append(f"num_heads={sm.shape[1]}")
    else:
        parts.append("attn_l2_norm=False")
    parts += [f"num_classes={sd['class_emb.weight'].shape[0] - 1}", f"V={sd['head.weight'].shape[0]}",
              f"Cvae={sd['word_embed.weight'].shape[1]}", f"L={sd['pos_1LC'].shape[1]}",
              f"levels={sd['lvl_embed.weight'].shape[0]}", f"shared_aln={'shared_ada_lin.1.weight' in sd}"]
    return f"VAR-d{depth} ({', '.join(parts)})"


def _var_kwargs(kw: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    unknown = set(kw) - _VAR_ARGS - _IGNORED_BUILD_ARGS
    if unknown:
        raise GenmodelsError(f"from_official('var'): unknown argument(s) {sorted(unknown)}; accepted: "
                             f"{sorted(_VAR_ARGS | _IGNORED_BUILD_ARGS)}")
    vae = kw.pop("vae_local", None)
    for k in _IGNORED_BUILD_ARGS:
        kw.pop(k, None)
    V, Cvae = kw.pop("V", 4096), kw.pop("Cvae", 32)
    if vae is not None:
        quant = getattr(vae, "quantize", vae)
        V, Cvae = quant.embedding.weight.shape
    depth = kw.pop("depth", 16)
    args = dict(vocab_size=V, Cvae=Cvae, depth=depth, embed_dim=64 * depth, num_heads=depth,
                drop_path_rate=0.1 * depth / 24, attn_l2_norm=True, cond_drop_rate=0.1, norm_eps=1e-6)
    if "patch_nums" in kw:
        kw["patch_nums"] = tuple(kw["patch_nums"])
    args.update(kw)
    return args, vae


@register("var")
def var_from_official(state_dict: Any, **kwargs: Any):
    """Official VAR state dict -> ``genmodels.generators.var.VAR`` in eval mode (see module doc)."""
    from genmodels.generators.var import VAR

    sd = _unwrap(state_dict, "VAR")
    args, vae = _var_kwargs(dict(kwargs))
    model = VAR(**args)
    mapped = {}
    for k, v in sd.items():
        if any(k == b or k.endswith("." + b) for b in VAR_RECOMPUTED):
            continue
        for old, new in _RENAMES:
            if k.endswith(old):
                k = k[: -len(old)] + new
        mapped[k] = v
    load_strict(model, mapped, what="official VAR checkpoint", made_for=describe_var_state_dict)
    if vae is not None:
        model.bind_tokenizer(vae)
    return model.eval()


def var_to_official(model) -> dict[str, torch.Tensor]:
    """Our VAR's state dict with the official names and buffers (loads into the official
    ``VAR`` with ``strict=True``)."""
    sd = {}
    for k, v in model.state_dict().items():
        for old, new in _RENAMES:
            if k.endswith(new):
                k = k[: -len(new)] + old
        sd[k] = v
    sd["lvl_1L"] = model.lvl_1L
    sd["attn_bias_for_masking"] = model.attn_bias_for_masking
    for i, block in enumerate(model.blocks):
        sd[f"blocks.{i}.attn.zero_k_bias"] = torch.zeros_like(block.attn.q_bias)
    return sd


def describe_vqvae_state_dict(sd: Mapping[str, torch.Tensor]) -> str:
    V, Cvae = sd["quantize.embedding.weight"].shape
    ch = sd["encoder.conv_in.weight"].shape[0]
    n_phi = len({k.split(".")[3] for k in sd if k.startswith("quantize.quant_resi.qresi_ls.")})
    return f"VQVAE(vocab_size={V}, z_channels={Cvae}, ch={ch}, {n_phi} partially shared phi)"


@register("var-vqvae")
def vqvae_from_official(state_dict: Any, **kwargs: Any):
    """Official VQVAE state dict -> ``genmodels.tokenizers.multiscale_vq.VQVAE``.

    ``kwargs`` are the official ``VQVAE(...)`` arguments (``vocab_size``, ``z_channels``,
    ``ch``, ``dropout``, ``beta``, ``using_znorm``, ``quant_conv_ks``, ``quant_resi``,
    ``share_quant_resi``, ``default_qresi_counts``, ``v_patch_nums``, ``test_mode``);
    unspecified ones follow ``build_vae_var`` (the released ``vae_ch160v4096z32.pth``:
    ``ch=160``, where the bare class defaults to 128) and ``test_mode=True`` (frozen, eval). Our VQVAE's keyword-only extensions (``ch_mult``, ...) pass through.
    """
    from genmodels.tokenizers.multiscale_vq import VQVAE

    check_kwargs("var-vqvae", kwargs, VQVAE.__init__)
    sd = _unwrap(state_dict, "vae")
    args = dict(vocab_size=4096, z_channels=32, ch=160, share_quant_resi=4,
                v_patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), test_mode=True)
    args.update(kwargs)
    args["v_patch_nums"] = tuple(args["v_patch_nums"])
    if "quant_resi" not in kwargs:
        args["quant_resi"] = 0.5  # the official default (ours picks 0 for a single scale)
    vae = VQVAE(**args)
    try:
        vae.load_official_state_dict(dict(sd))
    except CheckpointMismatchError as e:
        try:
            hint = f"; the file looks made for {describe_vqvae_state_dict(sd)}"
        except Exception:  # the description is a courtesy
            hint = ""
        raise CheckpointMismatchError(str(e) + hint) from None
    return vae
