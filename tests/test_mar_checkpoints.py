"""Official MAR / KL-16 checkpoints through genmodels.checkpoints.from_official ("mar", "mar-kl"):
EMA weights, pickled args, explained mismatches (mar_large into mar_base, DiffLoss depth --
MAR#68), files that are not checkpoints."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from genmodels.checkpoints import CheckpointMismatchError, from_official
from genmodels.generators.mar import MAR
from genmodels.tokenizers.kl_vae import KLVAE
from genmodels.errors import GenmodelsError
from helpers import F32_DEEP_RTOL, assert_close_f32, mar_fixture_weights

FIX = Path(__file__).parent / "fixtures" / "mar"
OFFICIAL_SMALL = dict(img_size=16, vae_stride=2, patch_size=2, vae_embed_dim=4, encoder_embed_dim=32,
                      encoder_depth=2, encoder_num_heads=4, decoder_embed_dim=32, decoder_depth=2,
                      decoder_num_heads=4, class_num=10, buffer_size=4, diffloss_d=2, diffloss_w=32,
                      num_sampling_steps="5", diffusion_batch_mul=2)


def _official_small_state(seed: int) -> dict[str, torch.Tensor]:
    m = MAR(token_shape=(4, 4), token_channels=16, num_classes=10, encoder_embed_dim=32, encoder_depth=2,
            encoder_num_heads=4, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4, buffer_size=4,
            diffloss_d=2, diffloss_w=32)
    return mar_fixture_weights().perturbed_state_dict({k: tuple(v.shape) for k, v in m.state_dict().items()}, seed)


def test_training_checkpoint_with_args_loads_ema_and_matches_official(tmp_path):
    """{'model', 'model_ema', 'optimizer', 'epoch', 'args'} as misc.save_model writes it: the EMA
    weights are loaded, the pickled Namespace supplies the constructor args, outputs equal the
    official recording."""
    rec = load_file(str(FIX / "mar.safetensors"))
    args = argparse.Namespace(model="mar_base", **OFFICIAL_SMALL, attn_dropout=0.1, proj_dropout=0.1,
                              mask_ratio_min=0.7, label_drop_prob=0.1, grad_checkpointing=False, lr=1e-4,
                              output_dir="./output")
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": _official_small_state(seed=9), "model_ema": _official_small_state(seed=2),
                "optimizer": {}, "epoch": 3, "args": args}, path)
    model = from_official("mar", str(path))
    assert isinstance(model, MAR) and not model.training
    mask = rec["mask"].bool()
    with torch.no_grad():
        z = model.forward_mae_decoder(model.forward_mae_encoder(rec["tokens"], mask,
                                                                model.class_embedding(rec["labels"])), mask)
    assert_close_f32(z, rec["decoder_z"], what="decoder z")
    raw = from_official("mar", str(path), use_ema=False)
    assert not torch.equal(raw.fake_latent, model.fake_latent)


def test_mar_large_file_into_mar_base_is_explained():
    with torch.device("meta"):
        large = MAR.mar_large().state_dict()
        with pytest.raises(CheckpointMismatchError) as e:
            from_official("mar", {"model": large, "model_ema": large}, model="mar_base", diffloss_d=6,
                          diffloss_w=1024)
    msg = str(e.value)
    assert "'fake_latent'" in msg and "(1, 1024) in the file" in msg and "(1, 768) in the model" in msg
    assert "mar_large (width=1024, depth=16+16, diffloss_d=8, diffloss_w=1280" in msg


def test_diffloss_depth_mismatch_is_explained():
    """MAR#68: the released mar_base (DiffLoss 6 x 1024) with the constructor default depth 3."""
    with torch.device("meta"):
        base = MAR.mar_base().state_dict()
        with pytest.raises(CheckpointMismatchError) as e:
            from_official("mar", base, model="mar_base")
        msg = str(e.value)
        assert "unexpected key(s), first 'diffloss.net.res_blocks.3." in msg
        assert "mar_base (width=768, depth=12+12, diffloss_d=6, diffloss_w=1024" in msg
        assert "needs diffloss_d=6, diffloss_w=1024" in msg
        ok = from_official("mar", base, model="mar_base", diffloss_d=6, diffloss_w=1024)
    assert sum(p.numel() for p in ok.parameters()) == 207_924_768


def test_not_a_checkpoint_and_wrong_contents(tmp_path):
    junk = tmp_path / "mar_base.pth"
    junk.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(ValueError, match="is not a PyTorch checkpoint"):
        from_official("mar", str(junk))
    with pytest.raises(CheckpointMismatchError, match="has no 'model'"):
        from_official("mar", {"model_ema": None, "epoch": 1}, use_ema=False)
    with pytest.raises(CheckpointMismatchError, match="expected an official MAR checkpoint"):
        from_official("mar", {"epoch": 1})
    with pytest.raises(GenmodelsError, match="unknown argument"):
        from_official("mar", _official_small_state(0), depth=3)


def test_kl16_checkpoint_and_parity(tmp_path):
    rec = load_file(str(FIX / "kl_vae.safetensors"))
    small = dict(embed_dim=4, ch_mult=(1, 2, 2), ch=32, num_res_blocks=1, resolution=16, attn_resolutions=(4,))
    shapes = {k: tuple(v.shape) for k, v in KLVAE(**small).state_dict().items()}
    sd = mar_fixture_weights().perturbed_state_dict(shapes, seed=3)
    path = tmp_path / "kl16.ckpt"
    torch.save({"model": {**sd, "loss.logvar": torch.zeros(())}}, path)  # LDM files carry loss.*
    vae = from_official("mar-kl", str(path), **small)
    assert not any(p.requires_grad for p in vae.parameters())
    with torch.no_grad():
        post = vae.encode_posterior(rec["images"])
    assert_close_f32(post.mean, rec["mean"], rtol=F32_DEEP_RTOL, what="posterior mean (conv encoder)")
    with torch.device("meta"):
        full = KLVAE.kl16().state_dict()
        vae16 = from_official("mar-kl", {"model": full})
        assert vae16.spec.channels == 16 and vae16.scale_factor == 0.2325
        with pytest.raises(CheckpointMismatchError, match=r"AutoencoderKL\(embed_dim=16, ch=128, 5 levels\)"):
            from_official("mar-kl", {"model": full}, embed_dim=8)


def test_norm_layer_is_honoured_or_refused():
    """The official constructors pass norm_layer=partial(nn.LayerNorm, eps=1e-6) (issue 11: it
    was accepted and ignored): a LayerNorm's eps is honoured, anything else is refused."""
    from functools import partial

    from torch import nn

    from genmodels.checkpoints.mar import mar_kwargs
    from genmodels.errors import GenmodelsError

    assert mar_kwargs(norm_layer=partial(nn.LayerNorm, eps=1e-6))["norm_eps"] == 1e-6
    assert mar_kwargs()["norm_eps"] == 1e-6
    kw = mar_kwargs(model="mar_base", norm_layer=nn.LayerNorm, encoder_depth=1, decoder_depth=1, diffloss_d=1,
                    diffloss_w=16, img_size=64)
    assert kw["norm_eps"] == 1e-5  # nn.LayerNorm's own default
    m = MAR(**kw)
    assert m.encoder_blocks[0].norm1.eps == m.decoder_norm.eps == m.encoder_norm.eps == 1e-5
    assert m.z_proj_ln.eps == 1e-6  # hard-coded in the official too
    for bad in (nn.BatchNorm1d, partial(nn.LayerNorm, eps=1e-6, elementwise_affine=False), nn.RMSNorm):
        with pytest.raises(GenmodelsError, match="norm_layer"):
            mar_kwargs(norm_layer=bad)
