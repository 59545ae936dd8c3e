"""KL-VAE tokenizer (genmodels.tokenizers.kl_vae): official KL-16 size and keys, parity with
LTH14/mar's AutoencoderKL on perturbed weights, token layout, training behaviour."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from genmodels.tokenizers.kl_vae import KLVAE
from helpers import F32_DEEP_RTOL, assert_close_f32, mar_fixture_weights

FIX = Path(__file__).parent / "fixtures" / "mar"
SMALL = dict(embed_dim=4, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=16, attn_resolutions=(4,),
             decoder_attn_resolutions=())


pytestmark = pytest.mark.usefixtures("one_thread")


def test_kl16_size_and_keys():
    with torch.device("meta"):
        vae = KLVAE.kl16()
    assert sum(p.numel() for p in vae.parameters()) == 66_456_019
    want = {}
    for line in (FIX / "kl16_keys.txt").read_text().splitlines():
        k, shape = line.split()
        want[k] = tuple(int(s) for s in shape.split(","))
    assert {k: tuple(v.shape) for k, v in vae.state_dict().items()} == want
    assert vae.spec.grid == (16, 16) and vae.spec.channels == 16 and vae.spec.seq_len == 256


def test_posterior_and_decode_match_official():
    rec = load_file(str(FIX / "kl_vae.safetensors"))
    vae = KLVAE(**SMALL).eval()
    checksum = mar_fixture_weights().perturb_(vae, seed=3)
    assert_close_f32(checksum, rec["checksum"].item(), rtol=1e-6, what="weight checksum (weights differ from the recording)")
    with torch.no_grad():
        post = vae.encode_posterior(rec["images"])
        dec = vae.decode_latent(rec["z"])
    # conv encoder / decoder: the deep-net tolerance (tests/helpers.py)
    assert_close_f32(post.mean, rec["mean"], rtol=F32_DEEP_RTOL, what="posterior mean")
    assert_close_f32(post.logvar, rec["logvar"], rtol=F32_DEEP_RTOL, what="posterior logvar")
    assert_close_f32(post.kl(), rec["kl"], rtol=F32_DEEP_RTOL, what="KL")
    assert_close_f32(dec, rec["decoded"], rtol=F32_DEEP_RTOL, what="decoded")


def test_tokens_follow_mar_patchify():
    """patch_size 2: our patchify / unpatchify equal the official MAR ones."""
    rec = load_file(str(FIX / "mar.safetensors"))
    vae = KLVAE(embed_dim=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16, attn_resolutions=(),
                patch_size=2)
    assert vae.spec.grid == (4, 4) and vae.spec.channels == 16
    latents = rec["latents"]  # (2, 4, 8, 8)
    assert torch.equal(vae.patchify(latents), rec["tokens"])
    assert torch.equal(vae.unpatchify(rec["tokens"]), rec["unpatchify"])


def test_encode_decode_contract():
    torch.manual_seed(0)
    vae = KLVAE(**{**SMALL, "scale_factor": 0.5}).eval()
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    tokens = vae.encode(images, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (3, 16, 4)
    mean_tokens = vae.encode(images, sample=False)
    with torch.no_grad():
        post = vae.encode_posterior(images)
    assert torch.allclose(mean_tokens, vae.patchify(post.mean) * 0.5)
    assert not torch.allclose(tokens, mean_tokens)  # a sample, as MAR trains on
    again = vae.encode(images, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tokens, again)
    with torch.no_grad():
        out = vae.decode(mean_tokens)
        raw = vae.decode_latent(post.mean)
    assert out.shape == images.shape and out.abs().max() <= 1
    assert_close_f32(out, raw.clamp(-1, 1), what="decode(tokens) vs decode_latent")  # decode divides by scale_factor


def test_training_lowers_reconstruction_loss():
    torch.manual_seed(0)
    vae = KLVAE(embed_dim=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16, attn_resolutions=(),
                scale_factor=None)
    assert vae.latent_scale == 1.0 and "latent_std" in vae.state_dict()
    images = torch.zeros(8, 3, 16, 16) - 1
    for i in range(8):  # simple shapes
        images[i, :, 2 + i: 8 + i, 3:12] = 1
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    first = None
    for step in range(40):
        out = vae.losses(images)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first if first is not None else out["rec_loss"].item()
    assert {"loss", "recon", "rec_loss", "kl", "latent_std"} <= set(out)
    assert out["rec_loss"].item() < 0.6 * first
    assert out["loss"].item() == pytest.approx(out["rec_loss"].item() + 1e-6 * out["kl"].item() / (3 * 16 * 16),
                                               rel=1e-5)
    assert vae.last_layer() is vae.decoder.conv_out.weight
    # scale_factor=None: 1 / (running std of the posterior samples) -> tokens of about unit std
    assert vae.latent_std > 0 and vae.latent_scale == pytest.approx(1 / vae.latent_std.item())
    tokens = vae.eval().encode(images)
    assert 0.5 < tokens.std().item() < 2.0  # the average lags the growing std over 40 steps
    assert "latent_std" not in KLVAE.kl16.__func__(KLVAE, ch=32, ch_mult=(1, 2), resolution=16).state_dict()


def test_bad_inputs_are_named():
    vae = KLVAE(**SMALL)
    with pytest.raises(ValueError, match=r"expects images \(B, 3, 16, 16\)"):
        vae.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="spec expects"):
        vae.decode(torch.zeros(1, 16, 5))
    with pytest.raises(ValueError, match="not divisible"):
        KLVAE(**{**SMALL, "resolution": 18})
