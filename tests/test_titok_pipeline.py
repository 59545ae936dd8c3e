"""genmodels.from_official names of the TiTok releases (no network): the names, files and kinds,
and a pipeline built from official-format files (the recorded two-stage fixture + a UViT generator)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import genmodels
from genmodels import pipeline
from genmodels.errors import GenmodelsError
from genmodels.generators.maskgit import MaskGIT
from genmodels.generators.uvit import UViTBert
from genmodels.tokenizers.maskgit_vqgan import MaskGITVQGAN

FIX = Path(__file__).parent / "fixtures" / "titok"
HF = "https://huggingface.co/fun-research/TiTok/resolve/main/"


def test_titok_names_files_and_kinds(tmp_path):
    from genmodels.checkpoints import _CONVERTERS, _import_converters

    _import_converters()
    for v, gen_cls in (("l32", MaskGIT), ("b64", MaskGIT), ("s128", UViTBert)):
        spec = pipeline.OFFICIAL[f"titok-{v}"]
        assert spec["files"]["tokenizer"] == (f"tokenizer_titok_{v}.bin", HF + f"tokenizer_titok_{v}.bin", None)
        assert spec["files"]["generator"] == (f"generator_titok_{v}.bin", HF + f"generator_titok_{v}.bin", None)
        assert spec["tokenizer_kind"] in _CONVERTERS and spec["generator_kind"] in _CONVERTERS
        assert spec["sample_preset"] in gen_cls.SAMPLE_PRESETS
        with pytest.raises(GenmodelsError, match=f"generator_titok_{v}.bin"):
            genmodels.from_official(f"titok_{v}", tmp_path)
    (tmp_path / "generator_titok_l32.bin").write_bytes(b"")
    with pytest.raises(GenmodelsError, match="tokenizer_titok_l32.bin"):
        genmodels.from_official("TiTok-L32", tmp_path)


def _tiny_files(tmp_path: Path, vocab: int) -> tuple[dict, dict]:
    """Official-format files: the recorded legacy two-stage TiTok (64 codes x 6 tokens) and a random UViTBert."""
    with safe_open(str(FIX / "titok_legacy.safetensors"), "pt") as f:
        config = json.loads(f.metadata()["config"])
        t = {k: f.get_tensor(k) for k in f.keys()}
    torch.save({k[3:]: v for k, v in t.items() if k.startswith("sd.")}, tmp_path / "tokenizer_titok_tiny.bin")
    torch.manual_seed(0)
    uvit = UViTBert(vocab_size=vocab, token_shape=(6,), num_classes=3, hidden_size=32, depth=2, num_heads=4,
                    intermediate_size=64)
    torch.save(uvit.state_dict(), tmp_path / "generator_titok_tiny.bin")
    vq, tiny, pc = config["vq_model"], config["tiny"], config["pixel_conf"]
    size = [tiny["width"], tiny["layers"], tiny["heads"]]
    tok_kw = dict(image_size=32, patch_size=8, encoder_size=size, decoder_size=size, num_latent_tokens=6,
                  codebook_size=vq["codebook_size"], token_size=vq["token_size"], use_l2_norm=True, is_legacy=True,
                  decoder_head="proxy", stage=2,
                  teacher=MaskGITVQGAN(codebook_size=1024, z_channels=pc["z_channels"], ch=pc["hidden_channels"],
                                       ch_mult=pc["channel_mult"], num_res_blocks=pc["num_res_blocks"],
                                       image_size=32, with_encoder=False))
    spec = {"kind": "titok", "tokenizer_kind": "titok", "generator_kind": "uvit-titok", "sample_preset": "titok-s128",
            "tokenizer_kwargs": tok_kw, "generator_kwargs": {"num_heads": 4},
            "files": {"generator": ("generator_titok_tiny.bin", "https://example.invalid/g", None),
                      "tokenizer": ("tokenizer_titok_tiny.bin", "https://example.invalid/t", None)}}
    return spec, t


def test_titok_pipeline_from_official_format_files(tmp_path, monkeypatch, one_thread):
    spec, t = _tiny_files(tmp_path, vocab=64)
    monkeypatch.setitem(pipeline.OFFICIAL, "titok-tiny", spec)
    pipe = genmodels.from_official("titok-tiny", tmp_path)
    assert pipe.sample_kwargs == UViTBert.SAMPLE_PRESETS["titok-s128"]
    assert not pipe.tokenizer.training and not pipe.generator.training
    # the tokenizer is the official one: the recorded codes decode to the recorded pixels
    ref = t["out.decode_tokens"] * 2 - 1
    got = pipe.tokenizer.decode(t["out.codes"].squeeze(1), clamp=False)
    assert (got - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())
    # sampling = the generator's tokens (with the preset knobs) through the tokenizer
    labels = torch.tensor([0, 2])
    images = pipe.sample(labels, generator=torch.Generator().manual_seed(3), num_steps=4)
    toks = pipe.generator.sample(labels, generator=torch.Generator().manual_seed(3),
                                 **{**pipe.sample_kwargs, "num_steps": 4})
    assert images.shape == (2,) + tuple(ref.shape[1:])  # the fixture's small pixel decoder: 16 px
    assert torch.allclose(images, pipe.tokenizer.decode(toks), atol=1e-6)


def test_titok_pipeline_refuses_mismatched_files(tmp_path, monkeypatch, one_thread):
    spec, _ = _tiny_files(tmp_path, vocab=32)
    monkeypatch.setitem(pipeline.OFFICIAL, "titok-tiny", spec)
    with pytest.raises(GenmodelsError, match="different TiTok variants"):
        genmodels.from_official("titok-tiny", tmp_path)
