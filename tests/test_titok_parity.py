"""TiTok, MaskGIT-VQGAN and UViTBert against fixtures recorded from bytedance/1d-tokenizer
(scripts/record_fixtures/titok.py; tests/fixtures/titok/README.md), and the official parameter counts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from genmodels import sampling
from genmodels.checkpoints import CheckpointMismatchError, from_official
from genmodels.checkpoints.titok import convert_titok_state_dict
from genmodels.generators.uvit import UViTBert
from genmodels.tokenizers.maskgit_vqgan import MaskGITVQGAN
from genmodels.tokenizers.titok import OFFICIAL_CONFIGS, TiTok

FIX = Path(__file__).parent / "fixtures" / "titok"


def _load(name: str) -> tuple[dict, dict, dict]:
    with safe_open(str(FIX / f"{name}.safetensors"), "pt") as f:
        config = json.loads(f.metadata()["config"])
        t = {k: f.get_tensor(k) for k in f.keys()}
    sd = {k[3:]: v for k, v in t.items() if k.startswith("sd.")}
    return config, sd, t


def _close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    tol = rtol * max(1.0, ref.abs().max().item())
    diff = (ours.float() - ref.float()).abs().max().item()
    assert diff <= tol, f"max |diff| {diff:.3g} > {tol:.3g}"


def _pixel_teacher(conf: dict) -> MaskGITVQGAN:
    return MaskGITVQGAN(codebook_size=1024, z_channels=conf["z_channels"], ch=conf["hidden_channels"],
                        ch_mult=conf["channel_mult"], num_res_blocks=conf["num_res_blocks"], image_size=32,
                        with_encoder=False)


def _titok(config: dict) -> TiTok:
    vq, tiny = config["vq_model"], config["tiny"]
    size = [tiny["width"], tiny["layers"], tiny["heads"]]
    kw = dict(image_size=config["image_size"], patch_size=vq["vit_enc_patch_size"], encoder_size=size,
              decoder_size=size, num_latent_tokens=vq["num_latent_tokens"], quantize_mode=vq["quantize_mode"],
              token_size=vq["token_size"], is_legacy=vq["is_legacy"])
    if vq["quantize_mode"] == "vq":
        kw.update(codebook_size=vq["codebook_size"], use_l2_norm=vq["use_l2_norm"],
                  commitment_cost=vq["commitment_cost"])
    if vq["finetune_decoder"]:
        kw.update(decoder_head="proxy", stage=2, teacher=_pixel_teacher(config["pixel_conf"]))
    return TiTok(**kw)


@pytest.mark.parametrize("case", ["titok_legacy", "titok_vq"])
def test_titok_vq_parity(case):
    config, sd, t = _load(case)
    model = from_official("titok", sd, **{k: v for k, v in _titok(config).config["init_args"].items()
                                          if k != "teacher"},
                          teacher=_titok(config).teacher)
    x01 = t["in.images01"]
    with torch.no_grad():
        z = model.encode_latents(x01)                                                  # (B, N, C)
        _close(z, t["out.latents"].squeeze(2).transpose(1, 2))
        ids = model.encode(x01 * 2 - 1)
        assert torch.equal(ids, t["out.codes"].squeeze(1)), "codes differ"
        z_q, _, loss, idx = model.quantize(z)
        _close(z_q, t["out.z_quantized"].squeeze(2).transpose(1, 2))
        _close(loss.reshape(1), t["out.quantizer_loss"])
        raw = model.decode_raw(z_q)
        _close(raw, t["out.decoder"])                                                  # proxy logits / pixels
        _close(model.decode(ids, clamp=False), t["out.decode_tokens"] * 2 - 1)


def test_titok_legacy_layout_matters():
    """The legacy reshape is what the two-stage weights need: the permute layout gives other latents."""
    config, sd, t = _load("titok_legacy")
    config["vq_model"]["is_legacy"] = False
    model = _titok(config)
    model.load_state_dict(convert_titok_state_dict(sd), strict=False)
    with torch.no_grad():
        z = model.encode_latents(t["in.images01"])
    assert (z - t["out.latents"].squeeze(2).transpose(1, 2)).abs().max() > 1e-2


def test_titok_vae_parity():
    config, sd, t = _load("titok_vae")
    model = _titok(config)
    model.load_state_dict(convert_titok_state_dict(sd), strict=False)
    with torch.no_grad():
        z = model.encode_latents(t["in.images01"])
        mean, logvar = model._posterior(z)
        _close(mean, t["out.mean"].squeeze(2).transpose(1, 2))
        _close(logvar, t["out.logvar"].squeeze(2).transpose(1, 2))
        kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum(-1)          # per token, as official kl()
        _close(kl, t["out.kl"].squeeze(1))
        tokens = model.encode(t["in.images01"] * 2 - 1)
        assert tokens.shape == (3, config["vq_model"]["num_latent_tokens"], config["vq_model"]["token_size"])
        _close(model.decode(tokens, clamp=False), t["out.decoder"] * 2 - 1)
    assert model.spec.kind == "continuous" and model.spec.shapes == ((7,),)


def test_vqgan_parity():
    config, sd, t = _load("vqgan")
    conf = config["conf"]
    model = from_official("maskgit-vqgan", sd, codebook_size=config["codebook_size"], z_channels=conf["z_channels"],
                          ch=conf["hidden_channels"], ch_mult=conf["channel_mult"],
                          num_res_blocks=conf["num_res_blocks"], image_size=32)
    x = t["in.images01"] * 2 - 1
    with torch.no_grad():
        _close(model.encoder(t["in.images01"]), t["out.features"])
        ids = model.encode(x)
        assert torch.equal(ids, t["out.codes"]), "codes differ"
        _close(model.decode(ids, clamp=False), t["out.decoded"] * 2 - 1)
        _close(model.decode(ids), (t["out.decoded"].clamp(0, 1)) * 2 - 1)


def test_uvit_parity_logits_and_greedy_decoding():
    config, sd, t = _load("uvit")
    model = from_official("uvit-titok", sd, num_heads=config["uvit"]["num_attention_heads"]).eval()
    ids, cond = t["in.ids"], t["in.condition"]
    with torch.no_grad():
        _close(model(ids, cond), t["out.logits_cond"])
        _close(model(ids, torch.full_like(cond, model.num_classes)), t["out.logits_uncond"])
    for i, kw in enumerate(config["generate"]):
        knobs = sampling.from_titok_guidance(kw["guidance_scale"], kw["guidance_decay"])
        out = model.sample(torch.tensor([0, 2, 1]), **knobs, guidance_pow=kw.get("guidance_scale_pow", 3.0),
                           choice_temperature=0.0, num_steps=kw["num_sample_steps"],
                           softmax_temperature_annealing=kw["softmax_temperature_annealing"],
                           generator=torch.Generator().manual_seed(0))
        assert torch.equal(out, t[f"out.generate{i}"]), f"greedy decoding {kw}"


# ----------------------------------------------------------------------------- official sizes
def _count(m: torch.nn.Module) -> float:
    return sum(p.numel() for p in m.parameters()) / 1e6


def test_official_parameter_counts():
    with torch.device("meta"):
        assert round(_count(TiTok.from_official_config("titok_l32")), 1) == 641.1
        assert round(_count(TiTok.from_official_config("titok_b64")), 1) == 204.8
        assert round(_count(TiTok.from_official_config("titok_s128")), 1) == 83.7
        assert round(_count(UViTBert.titok_s128()), 1) == 295.0
        assert round(_count(MaskGITVQGAN()), 1) == 54.5


def test_official_configs_cover_the_releases():
    assert set(OFFICIAL_CONFIGS) == {"titok_l32", "titok_b64", "titok_s128", "titok_bl64_vq8k", "titok_bl128_vq8k",
                                     "titok_sl256_vq8k", "titok_ll32_vae_c16", "titok_bl64_vae_c16",
                                     "titok_bl128_vae_c16"}


def test_wrong_variant_is_refused():
    config, sd, _ = _load("titok_vq")
    wrong = dict(config)
    wrong["vq_model"] = dict(config["vq_model"], num_latent_tokens=9)
    with pytest.raises(CheckpointMismatchError, match="latent_tokens"):
        from_official("titok", sd, **{k: v for k, v in _titok(wrong).config["init_args"].items()})
    _, vae_sd, _ = _load("titok_vae")
    with pytest.raises(CheckpointMismatchError, match="VAE"):  # a VAE file into a VQ model names what it is
        from_official("titok", vae_sd, **{k: v for k, v in _titok(config).config["init_args"].items()})
    _, uvit_sd, _ = _load("uvit")
    with pytest.raises(CheckpointMismatchError):
        from_official("maskgit-titok", uvit_sd)
    with pytest.raises(CheckpointMismatchError):
        from_official("maskgit-vqgan", sd)
    with pytest.raises(CheckpointMismatchError):
        from_official("titok_l32", _load("vqgan")[1])
