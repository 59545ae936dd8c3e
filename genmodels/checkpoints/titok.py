"""Official TiTok (bytedance/1d-tokenizer) checkpoints -> genmodels modules.

Kinds: ``maskgit-titok`` (ImageBert generators, below), ``uvit-titok`` (``generator_titok_s128.bin``
-> ``UViTBert``, keys 1:1), ``maskgit-vqgan`` (``maskgit-vqgan-imagenet-f16-256.bin`` ->
``MaskGITVQGAN``, keys 1:1), ``titok`` and one kind per released tokenizer (``titok_l32``,
``titok_b64``, ``titok_s128``, ``titok_bl64_vq8k``, ``titok_bl128_vq8k``, ``titok_sl256_vq8k``,
``titok_ll32_vae_c16``, ``titok_bl64_vae_c16``, ``titok_bl128_vae_c16``) -> ``TiTok``: keys 1:1
except the two-stage files' ``pixel_quantize.*`` / ``pixel_decoder.*``, which become
``teacher.quantize.*`` / ``teacher.decoder.*``. Our training-state buffers (``code_age``) are
not in official files and stay zero.

``maskgit-titok``: the MaskGIT generators ``generator_titok_l32.bin`` / ``generator_titok_b64.bin``
(``modeling/maskgit.py::ImageBert``, a Hugging Face ``BertModel`` + ``lm_head``) ->
``genmodels.generators.maskgit.MaskGIT``. The key mapping is 1:1 except that BERT's separate
query / key / value projections are concatenated into the fused ``attn.qkv``:

================================================================  ===========================
official (``model.`` prefix)                                      ours
================================================================  ===========================
embeddings.word_embeddings / position_embeddings /                word_embeddings / position_embeddings /
token_type_embeddings                                             token_type_embeddings
embeddings.LayerNorm                                              embed_norm
encoder.layer.{i}.attention.self.{query,key,value}                blocks.{i}.attn.qkv (cat on dim 0)
encoder.layer.{i}.attention.output.dense / .LayerNorm             blocks.{i}.attn.proj / blocks.{i}.norm1
encoder.layer.{i}.intermediate.dense                              blocks.{i}.mlp.fc1
encoder.layer.{i}.output.dense / .LayerNorm                       blocks.{i}.mlp.fc2 / blocks.{i}.norm2
lm_head                                                           lm_head
================================================================  ===========================

``model.embeddings.position_ids`` (a buffer saved by older ``transformers``) is ignored.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from genmodels.checkpoints import register
from genmodels.checkpoints.common import CheckpointMismatchError, check_kwargs, load_strict

_RENAMES = [
    (r"^embeddings\.LayerNorm\.", "embed_norm."),
    (r"^embeddings\.", ""),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"blocks.\1.norm2."),
]
_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)$")


def convert_imagebert_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official ``ImageBert`` state dict (HF BERT layout) to ``MaskGIT``'s keys."""
    sd = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state_dict.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        m = _QKV.match(k)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = v
            continue
        new = k
        for pat, rep in _RENAMES:
            new, n = re.subn(pat, rep, new)
            if n:
                break
        out[new] = v
    for (layer, kind), parts in qkv.items():
        missing = {"query", "key", "value"} - set(parts)
        if missing:
            raise CheckpointMismatchError(
                f"TiTok generator checkpoint: layer {layer} has no attention.self.{sorted(missing)[0]}.{kind}")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def _sizes(sd: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Architecture read off the (converted) state dict's shapes."""
    try:
        vocab_size, hidden = sd["lm_head.weight"].shape
        total_vocab = sd["word_embeddings.weight"].shape[0]
        n_pos = sd["position_embeddings.weight"].shape[0]
        intermediate = sd["blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise CheckpointMismatchError(
            f"not a TiTok MaskGIT (ImageBert) generator checkpoint: no key {e.args[0]!r} after conversion "
            f"(expected model.lm_head.weight, model.embeddings.*, model.encoder.layer.*)") from None
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    return dict(vocab_size=int(vocab_size), hidden_size=int(hidden), num_classes=int(total_vocab - vocab_size - 2),
                seq_len=int(n_pos - 1), intermediate_size=int(intermediate), depth=depth)


@register("maskgit-titok")
def load_maskgit_titok(state_dict: Mapping[str, Any], num_heads: int = 16, token_shape: tuple[int, ...] | None = None,
                       dropout: float = 0.1, attn_dropout: float = 0.1, **overrides: Any):
    """Build a ``MaskGIT`` for an official TiTok generator state dict and load it strictly.

    Sizes (codebook, classes, tokens, width, depth, MLP) are read from the tensors; the
    head count is not in the file (``num_attention_heads``: 16 for every released
    generator). ``token_shape`` defaults to ``(seq_len,)`` (TiTok's 1D tokens). Other
    ``MaskGIT`` arguments (e.g. ``mask_schedule``) may be given in ``overrides``.
    """
    from genmodels.generators.maskgit import MaskGIT

    check_kwargs("maskgit-titok", overrides, MaskGIT.__init__)
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    sd = convert_imagebert_state_dict(state_dict)
    s = _sizes(sd)
    model = MaskGIT(vocab_size=s["vocab_size"], token_shape=token_shape or (s["seq_len"],), seq_len=s["seq_len"],
                    num_classes=s["num_classes"], hidden_size=s["hidden_size"], depth=s["depth"], num_heads=num_heads,
                    intermediate_size=s["intermediate_size"], dropout=dropout, attn_dropout=attn_dropout,
                    **{"mask_schedule": "arccos", "class_dropout": 0.1, "unmasked_weight": 0.1, **overrides})
    desc = (f"K={s['vocab_size']} codes, {s['num_classes']} classes, {s['seq_len']} tokens, "
            f"{s['depth']} layers x {s['hidden_size']}")
    load_strict(model, sd, what="TiTok generator checkpoint", made_for=lambda _: desc)
    return model


# ----------------------------------------------------------------------------- UViTBert (TiTok-S-128)
def _uvit_sizes(sd: Mapping[str, torch.Tensor]) -> dict[str, int]:
    try:
        vocab_size, hidden = sd["lm_head.weight"].shape
        total_vocab = sd["embeddings.weight"].shape[0]
        n_pos = sd["pos_embed"].shape[1]
        intermediate = sd["mid_block.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise CheckpointMismatchError(
            f"not a TiTok UViTBert generator checkpoint: no key {e.args[0]!r} (expected embeddings.weight, "
            f"pos_embed, in_blocks.*, mid_block.*, out_blocks.*, lm_head.*)") from None
    depth = 2 * len({k.split(".")[1] for k in sd if k.startswith("in_blocks.")})
    return dict(vocab_size=int(vocab_size), hidden_size=int(hidden), num_classes=int(total_vocab - vocab_size - 2),
                seq_len=int(n_pos - 1), intermediate_size=int(intermediate), depth=depth)


@register("uvit-titok")
def load_uvit_titok(state_dict: Mapping[str, Any], num_heads: int = 16, token_shape: tuple[int, ...] | None = None,
                    **overrides: Any):
    """Build a ``UViTBert`` for an official ``generator_titok_s128.bin`` and load it strictly (keys are 1:1).
    Sizes are read from the tensors; the head count (16) is not in the file."""
    from genmodels.generators.uvit import UViTBert

    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    s = _uvit_sizes(state_dict)
    model = UViTBert(vocab_size=s["vocab_size"], token_shape=token_shape or (s["seq_len"],), seq_len=s["seq_len"],
                     num_classes=s["num_classes"], hidden_size=s["hidden_size"], depth=s["depth"],
                     num_heads=num_heads, intermediate_size=s["intermediate_size"], **overrides)
    desc = (f"K={s['vocab_size']} codes, {s['num_classes']} classes, {s['seq_len']} tokens, "
            f"{s['depth']} layers x {s['hidden_size']}")
    load_strict(model, state_dict, what="TiTok UViT generator checkpoint", made_for=lambda _: desc)
    return model


# ----------------------------------------------------------------------------- MaskGIT-VQGAN
@register("maskgit-vqgan")
def load_maskgit_vqgan(state_dict: Mapping[str, Any], **overrides: Any):
    """``maskgit-vqgan-imagenet-f16-256.bin`` (1d-tokenizer / open-muse layout, keys 1:1) -> ``MaskGITVQGAN``."""
    from genmodels.tokenizers.maskgit_vqgan import MaskGITVQGAN

    if not any(k.startswith("encoder.down.") for k in state_dict) or "quantize.embedding.weight" not in state_dict:
        raise CheckpointMismatchError("not a MaskGIT-VQGAN checkpoint: expected encoder.down.*, decoder.up.* and "
                                      "quantize.embedding.weight (maskgit-vqgan-imagenet-f16-256.bin)")
    model = MaskGITVQGAN(**overrides)
    load_strict(model, state_dict, what="MaskGIT-VQGAN checkpoint", ignore=("code_age",))
    return model.eval()


# ----------------------------------------------------------------------------- TiTok tokenizers
#: official pixel-decoder names of the two-stage files -> our ``teacher`` (a decoder-only MaskGIT-VQGAN)
_TITOK_RENAMES = (("pixel_quantize.", "teacher.quantize."), ("pixel_decoder.", "teacher.decoder."))


def convert_titok_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official ``TiTok`` state dict -> ours: only ``pixel_quantize`` / ``pixel_decoder`` are renamed."""
    out = {}
    for k, v in state_dict.items():
        for old, new in _TITOK_RENAMES:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


def describe_titok(sd: Mapping[str, torch.Tensor]) -> str:
    """The configuration a (converted) TiTok state dict was made for, read off its shapes."""
    from genmodels.nn.vit import VIT_SIZES

    def size(prefix: str) -> str:
        w = sd[f"{prefix}.ln_pre.weight"].shape[0]
        depth = len({k.split(".")[2] for k in sd if k.startswith(f"{prefix}.transformer.")})
        return next((n for n, (W, D, _) in VIT_SIZES.items() if (W, D) == (w, depth)), f"{w}x{depth}")

    n = sd["latent_tokens"].shape[0]
    mode = f"VQ {tuple(sd['quantize.embedding.weight'].shape)}" if "quantize.embedding.weight" in sd else \
        f"VAE c{sd['encoder.conv_out.weight'].shape[0] // 2}"
    head = "proxy head (two-stage)" if "decoder.ffn.2.weight" in sd else "pixel head"
    return f"encoder {size('encoder')}, decoder {size('decoder')}, {n} tokens, {mode}, {head}"


def _titok_kind(name: str):
    def load(state_dict: Mapping[str, Any], **overrides: Any):
        return load_titok(state_dict, name=name, **overrides)
    load.__doc__ = f"Official ``tokenizer_{name}.bin`` -> ``TiTok`` (``configs/infer/TiTok/{name}.yaml``)."
    return load


@register("titok")
def load_titok(state_dict: Mapping[str, Any], name: str | None = None, **overrides: Any):
    """Build a ``TiTok`` for an official tokenizer state dict and load it strictly.

    ``name``: one of ``genmodels.tokenizers.titok.OFFICIAL_CONFIGS`` (``titok_l32``, ``titok_b64``,
    ``titok_s128``, ``titok_bl64_vq8k``, ..., ``titok_bl128_vae_c16``; each is also a kind of its own);
    ``overrides``: ``TiTok`` arguments (all of them when ``name`` is None). A file made for
    another variant raises ``CheckpointMismatchError`` naming the variant it was made for.
    """
    from genmodels.tokenizers.titok import TiTok

    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    sd = convert_titok_state_dict(state_dict)
    if "latent_tokens" not in sd or "encoder.ln_pre.weight" not in sd:
        raise CheckpointMismatchError("not a TiTok tokenizer checkpoint: no latent_tokens / encoder.ln_pre.weight")
    model = TiTok.from_official_config(name, **overrides) if name is not None else TiTok(**overrides)
    load_strict(model, sd, what=f"TiTok tokenizer checkpoint{f' ({name})' if name else ''}",
                made_for=describe_titok, ignore=("code_age",))
    return model.eval()


for _name in ("titok_l32", "titok_b64", "titok_s128", "titok_bl64_vq8k", "titok_bl128_vq8k", "titok_sl256_vq8k",
              "titok_ll32_vae_c16", "titok_bl64_vae_c16", "titok_bl128_vae_c16"):
    register(_name)(_titok_kind(_name))
