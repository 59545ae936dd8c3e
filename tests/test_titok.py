"""TiTok 1D tokenizer: contract, quantizer, two-stage / single-stage training, the CLI, and the
generators that take its 1D tokens (parity with the official code: test_titok_parity.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from genmodels.errors import GenmodelsError
from genmodels.tokenizers.maskgit_vqgan import MaskGITVQGAN
from genmodels.tokenizers.multiscale_vq import VQVAE
from genmodels.tokenizers.quantizers import VectorQuantizer
from genmodels.tokenizers.titok import TiTok

SMALL = dict(image_size=16, patch_size=4, encoder_size=[32, 1, 4], decoder_size=[32, 1, 4], num_latent_tokens=6)


def _teacher() -> VQVAE:
    """A tiny single-scale VQ-VAE on 16 px: 4x4 codes = TiTok's 4x4 patch grid."""
    torch.manual_seed(0)
    return VQVAE(vocab_size=16, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, decoder_blocks_per_level=1,
                 using_sa=False, using_mid_sa=False, v_patch_nums=(4,)).eval()


def _images(n: int = 4, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_contract_vq_and_vae(one_thread):
    vq = TiTok(**SMALL, codebook_size=32, token_size=5)
    ids = vq.encode(_images())
    assert ids.shape == (4, 6) and ids.dtype == torch.int64 and vq.spec.shapes == ((6,),)
    assert vq.spec.kind == "discrete" and vq.spec.vocab_size == 32 and vq.spec.seq_len == 6
    assert vq.decode(ids).shape == (4, 3, 16, 16) and vq.decode(ids).abs().max() <= 1
    vae = TiTok(**SMALL, quantize_mode="vae", token_size=3)
    z = vae.encode(_images())
    assert z.shape == (4, 6, 3) and vae.spec.kind == "continuous" and vae.spec.channels == 3
    assert vae.decode(z).shape == (4, 3, 16, 16)
    with pytest.raises(GenmodelsError, match="16, 16"):
        vq.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(GenmodelsError, match="token ids"):
        vq.decode(torch.full((1, 6), 32))


def test_num_latent_tokens_is_configurable():
    for n in (8, 16, 32):
        assert TiTok(**{**SMALL, "num_latent_tokens": n}, codebook_size=8, token_size=4).encode(_images(1)).shape == (1, n)


def test_l2_normalised_codes_and_straight_through():
    q = VectorQuantizer(64, 12, use_l2_norm=True)
    z = torch.randn(2, 5, 12, requires_grad=True)
    z_q, stats, loss, idx = q(z)
    assert torch.allclose(z_q.norm(dim=-1), torch.ones(2, 5), atol=1e-5)
    assert idx.shape == (2, 5) and 0 < stats["usage"] <= 1 and stats["perplexity"] >= 1
    ref = torch.nn.functional.normalize(q.embedding.weight, dim=-1)[idx]
    assert torch.allclose(z_q, ref, atol=1e-6)
    z_q.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # straight-through reaches the encoder
    assert torch.equal(q.nearest(z.reshape(-1, 12)), idx.reshape(-1))


def test_dead_codes_are_restarted():
    torch.manual_seed(0)
    q = VectorQuantizer(16, 4, dead_code_restart=2).train()
    z = torch.randn(32, 4) * 5 + 10  # far from the codebook: one code wins, the rest die
    before = q.embedding.weight.detach().clone()
    q(z)
    _, stats, _, _ = q(z)
    assert stats["dead_codes"] >= 14
    moved = (q.embedding.weight - before).abs().sum(1) > 0
    assert moved.sum() >= 14 and (q.embedding.weight[moved] - 10).abs().max() < 30


def test_legacy_layout_is_a_reshape():
    torch.manual_seed(0)
    legacy = TiTok(**SMALL, codebook_size=8, token_size=4, is_legacy=True)
    modern = TiTok(**SMALL, codebook_size=8, token_size=4, is_legacy=False)
    modern.load_state_dict(legacy.state_dict())
    x = (_images(2) + 1) / 2
    assert not torch.allclose(legacy.encode_latents(x), modern.encode_latents(x))
    # by hand: the (B, N, W) latents reinterpreted as (B, W, N) before the 1x1 conv
    enc = legacy.encoder
    h = torch.cat([enc.class_embedding.expand(2, -1, -1), enc.patch_embed(x).flatten(2).transpose(1, 2)], 1)
    h = torch.cat([h + enc.positional_embedding,
                   (legacy.latent_tokens + enc.latent_token_positional_embedding).expand(2, -1, -1)], 1)
    h = enc.ln_post(enc.transformer[0](enc.ln_pre(h))[:, -6:])
    w = enc.conv_out.weight[:, :, 0, 0]
    want = torch.einsum("cw,bwn->bnc", w, h.reshape(2, 32, 6)) + enc.conv_out.bias
    assert torch.allclose(legacy.encode_latents(x), want, atol=1e-5)


def test_stage1_learns_the_teachers_codes(one_thread):
    teacher = _teacher()
    model = TiTok(**SMALL, codebook_size=16, token_size=4, decoder_head="proxy", teacher=teacher)
    assert model.decoder.ffn[2].out_channels == 16  # K' = the teacher's codebook
    x = _images(8)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    first = None
    for _ in range(15):
        out = model.losses(x)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first if first is not None else out["proxy_ce"].item()
    assert out["proxy_ce"].item() < 0.5 * first and out["proxy_acc"] > 0.5
    assert "recon" not in out and model.eval().losses(x)["recon"].shape == x.shape
    assert all(not p.requires_grad for p in model.teacher.parameters())
    with pytest.raises(GenmodelsError, match="grid"):
        TiTok(**{**SMALL, "patch_size": 8}, codebook_size=16, token_size=4, decoder_head="proxy", teacher=teacher)


def test_stage2_freezes_encoder_and_quantizer(one_thread):
    model = TiTok(**SMALL, codebook_size=16, token_size=4, decoder_head="proxy", teacher=_teacher(), stage=2,
                  dead_code_restart=1).train()
    assert not model.encoder.training and not model.quantize.training
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("encoder.", "quantize.", "latent"))}
    dec0 = model.decoder.ln_post.weight.clone()
    tdec0 = model.teacher.decoder.conv_out.weight.clone()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        out = model.losses(_images())
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())
    assert not torch.equal(dec0, model.decoder.ln_post.weight)
    assert not torch.equal(tdec0, model.teacher.decoder.conv_out.weight)  # the pixel decoder is fine-tuned
    assert model.last_layer() is model.teacher.decoder.conv_out.weight
    assert out["vq_loss"] == 0


def test_single_stage_vq_and_vae_train(one_thread):
    for kw in (dict(codebook_size=16, token_size=4), dict(quantize_mode="vae", token_size=4, kl_weight=1e-3)):
        torch.manual_seed(0)
        model = TiTok(**SMALL, **kw)
        x = _images(8)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(25):
            out = model.losses(x)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            losses.append(out["rec_loss"].item())
        assert losses[-1] < 0.5 * losses[0], (kw, losses[0], losses[-1])
        assert ("perplexity" in out) == ("codebook_size" in kw) and ("kl" in out) == ("codebook_size" not in kw)


def test_maskgit_vqgan_as_tokenizer_and_teacher(one_thread):
    torch.manual_seed(0)
    vqgan = MaskGITVQGAN(codebook_size=32, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, image_size=16)
    ids = vqgan.encode(_images())
    assert ids.shape == (4, 16) and vqgan.spec.shapes == ((4, 4),)
    assert vqgan.decode(ids).shape == (4, 3, 16, 16)
    out = vqgan.losses(_images())
    assert {"loss", "recon", "rec_loss", "usage", "perplexity"} <= set(out)
    model = TiTok(**SMALL, codebook_size=16, token_size=4, decoder_head="proxy", teacher=vqgan)
    assert model.losses(_images())["proxy_ce"] > 0
    with pytest.raises(GenmodelsError, match="with_encoder=False"):
        MaskGITVQGAN(ch=32, ch_mult=(1, 2), z_channels=8, image_size=16, with_encoder=False).encode(_images())


# ----------------------------------------------------------------------------- the CLI, end to end
def _trainer(root: Path, steps: int) -> dict:
    return {"seed_everything": 0, "trainer": {
        "accelerator": "cpu", "devices": 1, "default_root_dir": str(root), "enable_progress_bar": False,
        "enable_model_summary": False, "log_every_n_steps": 1, "max_steps": steps, "limit_val_batches": 1,
        "check_val_every_n_epoch": 1, "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                                 "init_args": {"save_dir": str(root)}}}}


def _fit(root: Path, tokenizer: dict, steps: int = 3) -> Path:
    from genmodels.cli import main
    cfg = {"data": {"class_path": "genmodels.data.DigitsDataModule",
                    "init_args": {"image_size": 16, "batch_size": 16}},
           "model": {"class_path": "genmodels.training.TokenizerModule",
                     "init_args": {"lr": 2e-3, "tokenizer": tokenizer}}, **_trainer(root, steps)}
    root.mkdir(parents=True, exist_ok=True)
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    main(["fit", "-c", str(root / "cfg.yaml")])
    return sorted(root.glob("lightning_logs/version_0/checkpoints/*.ckpt"))[-1]


@pytest.mark.slow
def test_two_stage_through_the_cli(tmp_path, one_thread):
    from genmodels.tokenizers import load_tokenizer
    teacher_ckpt = _fit(tmp_path / "vq", _teacher().config)
    titok = {"class_path": "genmodels.tokenizers.titok.TiTok",
             "init_args": {**SMALL, "codebook_size": 16, "token_size": 4, "decoder_head": "proxy",
                           "teacher_ckpt": str(teacher_ckpt)}}
    stage1 = _fit(tmp_path / "s1", titok)
    stage2 = _fit(tmp_path / "s2", {**titok, "init_args": {**titok["init_args"], "stage": 2, "init_from": str(stage1)}})
    teacher_ckpt.unlink()
    stage1.unlink()  # the stage-2 checkpoint carries its teacher: neither file is needed any more
    tok = load_tokenizer(stage2)
    assert isinstance(tok, TiTok) and tok.stage == 2 and isinstance(tok.teacher, VQVAE)
    assert tok.config["init_args"]["teacher_ckpt"] is None and tok.config["init_args"]["init_from"] is None
    assert tok.decode(tok.encode(_images())).shape == (4, 3, 16, 16)
    grids = list((tmp_path / "s2").glob("lightning_logs/version_0/samples/recon_*.png"))
    assert grids


# ----------------------------------------------------------------------------- generators on 1D tokens
def test_generators_take_titok_tokens(one_thread):
    from genmodels.generators.causal_ar import CausalAR
    from genmodels.generators.mar import MAR
    from genmodels.generators.maskgit import MaskGIT
    from genmodels.generators.uvit import UViTBert

    vq = TiTok(**SMALL, codebook_size=16, token_size=4)
    vae = TiTok(**SMALL, quantize_mode="vae", token_size=4)
    ids, z = vq.encode(_images()), vae.encode(_images())
    labels = torch.tensor([0, 1, 2, 1])
    g = torch.Generator().manual_seed(0)
    gens = [
        (MaskGIT(vocab_size=16, token_shape=(6,), num_classes=3, hidden_size=32, depth=1, num_heads=2), vq, ids),
        (UViTBert(vocab_size=16, seq_len=6, num_classes=3, hidden_size=32, depth=2, num_heads=2), vq, ids),
        (CausalAR(vocab_size=16, seq_len=6, num_classes=3, hidden_size=32, depth=1, num_heads=2), vq, ids),
        (MAR(token_shape=(6,), token_channels=None, vocab_size=16, num_classes=3, encoder_embed_dim=32,
             encoder_depth=1, encoder_num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
             buffer_size=2, num_iter=3), vq, ids),
        (MAR(token_shape=(6,), token_channels=4, num_classes=3, encoder_embed_dim=32, encoder_depth=1,
             encoder_num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, buffer_size=2,
             diffloss_d=1, diffloss_w=32, num_sampling_steps="5", num_iter=3), vae, z),
        (MAR(token_shape=(6,), token_channels=4, num_classes=3, encoder_embed_dim=32, encoder_depth=1,
             encoder_num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, buffer_size=2,
             diffloss_d=1, diffloss_w=32, num_sampling_steps="5", order="raster", attention="causal"), vae, z),
    ]
    for gen, tok, tokens in gens:
        gen.check_spec(tok.spec)
        loss = gen.forward_loss(tokens, labels)["loss"]
        assert torch.isfinite(loss), type(gen).__name__
        steps = None if isinstance(gen, CausalAR) or getattr(gen, "attention", "") == "causal" else 3
        out = gen.eval().sample(labels, num_steps=steps, generator=g)
        assert out.shape == tokens.shape, type(gen).__name__
        assert tok.decode(out).shape == (4, 3, 16, 16)


def test_a_2d_grid_generator_refuses_1d_tokens():
    from genmodels.generators.var import VAR
    var = VAR(vocab_size=16, Cvae=4, patch_nums=(1, 2), num_classes=3, depth=1, embed_dim=32, num_heads=2)
    with pytest.raises(GenmodelsError, match="1D tokens"):
        var.check_spec(TiTok(**SMALL, codebook_size=16, token_size=4).spec)
