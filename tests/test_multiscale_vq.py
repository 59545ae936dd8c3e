"""Multi-scale residual VQ-VAE (VAR) and the single-scale 2D VQ-VAE: sizes, API, training
behaviour, and parity with the official FoundationVision/VAR code (fixtures recorded by
scripts/record_fixtures/var_vqvae.py, see tests/fixtures/var_vqvae/README.md)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from genmodels.checkpoints.common import CheckpointMismatchError, load_strict
from genmodels.tokenizers.multiscale_vq import (TRAINING_STATE_KEYS, VQVAE, MultiScaleVectorQuantizer, phi_index)
from helpers import F32_DEEP_RTOL, F32_RTOL, assert_close_f32

FIXTURES = Path(__file__).parent / "fixtures" / "var_vqvae"


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def small_vqvae(v_patch_nums=(1, 2, 3, 4), **kw) -> VQVAE:
    kw = {**dict(ch_mult=(1, 2), num_res_blocks=1), **kw}
    return VQVAE(32, 8, 32, v_patch_nums=v_patch_nums, **kw)


# ----------------------------------------------------------------------------- sizes and keys
def test_var_default_param_count_and_keys():
    with torch.device("meta"):
        vae = VQVAE(vocab_size=4096, z_channels=32, ch=160, share_quant_resi=4,
                    v_patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), test_mode=True)
    assert n_params(vae) == 108_948_355
    assert n_params(vae.encoder) == 44_107_872 and n_params(vae.decoder) == 64_653_923
    assert n_params(vae.quantize) == 168_064 and n_params(vae.quant_conv) == n_params(vae.post_quant_conv) == 9_248
    sd = vae.state_dict()
    official = [k for k in sd if k not in TRAINING_STATE_KEYS[1:]]
    assert len(official) == 324  # anchors/var.md section 5
    assert tuple(sd["quantize.embedding.weight"].shape) == (4096, 32)
    assert tuple(sd["quantize.quant_resi.qresi_ls.3.weight"].shape) == (32, 32, 3, 3)
    assert tuple(sd["decoder.conv_in.weight"].shape) == (640, 32, 3, 3)
    assert vae.spec.seq_len == 680 and vae.image_size == 256
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training


def test_phi_mapping():
    assert [phi_index(si, 10, 4) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    q = MultiScaleVectorQuantizer(16, 4, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), share_quant_resi=4)
    assert q.phi_indices() == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert q.phi(2) is q.quant_resi.qresi_ls[1] and q.phi(7) is q.quant_resi.qresi_ls[3]
    assert MultiScaleVectorQuantizer(16, 4, (1, 2, 3), share_quant_resi=1).phi_indices() == [0, 0, 0]
    assert MultiScaleVectorQuantizer(16, 4, (1, 2, 3), share_quant_resi=0).phi_indices() == [0, 1, 2]
    # phi(h) = 0.5 h + 0.5 conv(h); ratio 0 is the identity
    phi = q.phi(0)
    h = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(phi(h), 0.5 * h + 0.5 * F.conv2d(h, phi.weight, phi.bias, padding=1))
    q0 = MultiScaleVectorQuantizer(16, 4, (1, 2), quant_resi=0.0)
    assert isinstance(q0.phi(0), torch.nn.Identity) and n_params(q0) == 16 * 4


# ----------------------------------------------------------------------------- shapes and round trips
@pytest.mark.parametrize("pns", [(4,), (1, 2, 3, 4)])
def test_shapes_and_round_trip(pns):
    torch.manual_seed(0)
    vae = small_vqvae(pns).eval()
    assert vae.spec.shapes == tuple((p, p) for p in pns) and vae.spec.vocab_size == 32 and vae.image_size == 8
    if len(pns) == 1:  # plain 2D VQ-VAE: no phi by default
        assert vae.quantize.quant_resi_ratio == 0.0 and "quantize.quant_resi.qresi_ls.0.weight" not in vae.state_dict()
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    tokens = vae.encode(x)
    assert tokens.shape == (3, sum(p * p for p in pns)) and tokens.dtype == torch.int64
    assert 0 <= int(tokens.min()) and int(tokens.max()) < 32
    img = vae.decode(tokens)
    assert img.shape == (3, 3, 8, 8) and img.abs().max() <= 1
    scales = vae.encode_scales(x)
    assert [tuple(s.shape) for s in scales] == [(3, p, p) for p in pns]
    torch.testing.assert_close(vae.decode_scales(scales), img)
    # decode(encode(x)) is the quantized reconstruction of the training forward
    rec, stats, vq_loss = vae(x)
    assert_close_f32(vae.decode(tokens, clamp=False), rec, rtol=F32_DEEP_RTOL, what="decode(encode(x)) vs training forward")
    out = vae.losses(x)
    assert {"loss", "recon", "rec_loss", "vq_loss", "usage", "perplexity", "dead_codes"} <= set(out)
    assert all(f"usage_s{k}" in out and f"perplexity_s{k}" in out for k in range(len(pns)))
    assert vae.last_layer() is vae.decoder.conv_out.weight
    # teacher forcing input and the VAR sampling step
    q = vae.quantize
    idx = vae.img_to_idxBl(x)
    var_in = q.idxBl_to_var_input(idx)
    if len(pns) == 1:
        assert var_in is None
    else:
        assert var_in.shape == (3, sum(p * p for p in pns[1:]), 8)
        f_hat = torch.zeros(3, 8, pns[-1], pns[-1])
        nexts = []
        for si, pn in enumerate(pns):
            f_hat, nxt = q.get_next_autoregressive_input(si, len(pns), f_hat, q.idxBl_to_h([idx[si]])[0])
            nexts.append(nxt)
        torch.testing.assert_close(torch.cat([n.flatten(2).transpose(1, 2) for n in nexts[:-1]], 1), var_in)
        torch.testing.assert_close(f_hat, q.idxBl_to_fhat(idx))


def test_bad_inputs_raise():
    vae = small_vqvae()
    with pytest.raises(ValueError, match="8x8 images"):
        vae.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="spec expects"):
        vae.decode(torch.zeros(1, 29, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        vae.decode(torch.full((1, 30), 32, dtype=torch.long))
    with pytest.raises(ValueError, match="strictly increasing"):
        VQVAE(v_patch_nums=(4, 2))
    with pytest.raises(ValueError, match="rec_loss"):
        small_vqvae(rec_loss="l3")


# ----------------------------------------------------------------------------- training behaviour
def test_straight_through_gradients_reach_encoder():
    torch.manual_seed(0)
    vae = small_vqvae().train()
    out = vae.losses(torch.rand(2, 3, 8, 8) * 2 - 1)
    out["loss"].backward()
    for p in (vae.encoder.conv_in.weight, vae.quant_conv.weight, vae.quantize.embedding.weight,
              vae.quantize.quant_resi.qresi_ls[0].weight, vae.decoder.conv_out.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # the reconstruction alone (no VQ loss) still reaches the encoder: straight-through estimator
    vae.zero_grad()
    vae.losses(torch.rand(2, 3, 8, 8) * 2 - 1)["rec_loss"].backward()
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0
    # the codebook gets gradient only from the VQ loss
    assert vae.quantize.embedding.weight.grad is None or vae.quantize.embedding.weight.grad.abs().sum() == 0


def test_dead_code_restart_revives_codes_and_resumes_exactly():
    torch.manual_seed(0)
    q = MultiScaleVectorQuantizer(16, 4, (1, 2, 4), quant_resi=0.0, dead_code_restart=3)
    with torch.no_grad():
        q.embedding.weight.fill_(100.0)
        q.embedding.weight[0].zero_()  # only code 0 is ever nearest
    q.train()
    f = torch.randn(4, 4, 4, 4)
    _, stats, _ = q(f)
    assert stats["usage"] == 1 / 16 and stats["dead_codes"] == 0
    q(f)
    _, stats, _ = q(f)  # third step without hits: 15 codes restarted from the batch's residuals
    assert stats["dead_codes"] == 15 and q.embedding.weight.abs().max() < 100
    _, stats, _ = q(f)
    assert stats["usage"] > 0.3
    assert int(q.record_hit) == 4 * 3
    # buffers are in the state dict: a copy continues identically
    q2 = MultiScaleVectorQuantizer(16, 4, (1, 2, 4), quant_resi=0.0, dead_code_restart=3)
    q2.load_state_dict(q.state_dict())
    q2.train()
    assert {"code_age", "record_hit", "ema_vocab_hit_SV"} <= set(q.state_dict())
    for _ in range(5):
        g = torch.randn(4, 4, 4, 4) * 3
        torch.manual_seed(1)
        a = q(g)
        torch.manual_seed(1)
        b = q2(g)
        torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(q.embedding.weight, q2.embedding.weight)
    assert torch.equal(q.code_age, q2.code_age)


def digits_32px(n: int) -> torch.Tensor:
    from sklearn.datasets import load_digits
    x = torch.tensor(load_digits().images[:n], dtype=torch.float32)[:, None] / 16 * 2 - 1
    return F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)


def train_digits(v_patch_nums, steps: int, seed: int = 0):
    torch.manual_seed(seed)
    x = digits_32px(64)
    vae = VQVAE(128, 16, 32, v_patch_nums=v_patch_nums, ch_mult=(1, 2, 2), num_res_blocks=1, using_sa=False,
                using_mid_sa=False, rec_loss="l2", dead_code_restart=20)

    def evaluate():
        vae.eval()
        with torch.no_grad():
            err = F.mse_loss(vae.decode(vae.encode(x), clamp=False), x).item()
            usage = vae.losses(x)[f"usage_s{len(v_patch_nums) - 1}"].item()
        vae.train()
        return err, usage

    before, _ = evaluate()
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    for _ in range(steps):
        out = vae.losses(x[torch.randint(0, 64, (8,))])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    return before, *evaluate()


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # faster than 2 contended threads on the shared CI box
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("pns, steps", [((8,), 30), ((1, 2, 4, 8), 30)])
def test_short_training_on_digits_lowers_reconstruction_error(pns, steps, one_thread):
    before, after, usage = train_digits(pns, steps)
    assert after < 0.35 * before, (before, after)
    assert usage > 0.25, usage  # no codebook collapse (128 codes, 64 images x 64 positions)


@pytest.mark.slow
def test_longer_training_on_digits(one_thread):
    before, after, usage = train_digits((1, 2, 3, 4, 6, 8), 400)
    assert after < 0.05 * before and usage > 0.5, (before, after, usage)


# ----------------------------------------------------------------------------- parity with the official code
def _official_state(tensors: dict, prefix: str, grid: float) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: (v.float() / grid if v.dtype == torch.int8 else v)
            for k, v in tensors.items() if k.startswith(prefix)}


def _meta(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def _close(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float = F32_RTOL) -> None:
    assert_close_f32(a, b, rtol=rtol, what=what)


def _check_quantizer_outputs(q: MultiScaleVectorQuantizer, t: dict, p: str, f: torch.Tensor) -> None:
    SN = len(q.patch_nums)
    B, C, H, _ = f.shape
    idx = q.f_to_idxBl_or_fhat(f, to_fhat=False)
    fhats = q.f_to_idxBl_or_fhat(f, to_fhat=True)
    for si in range(SN):
        assert torch.equal(idx[si], t[f"{p}idx_s{si}"]), f"{p}idx_s{si}"
        _close(fhats[si], t[f"{p}fhat_s{si}"], f"{p}fhat_s{si}")
    with torch.no_grad():
        _close(q.idxBl_to_var_input(idx), t[p + "var_input"], p + "var_input")
        grow = q.embed_to_fhat(q.idxBl_to_h(idx), all_to_max_scale=False)
        for si in range(SN):
            _close(grow[si], t[f"{p}fhat_grow_s{si}"], f"{p}fhat_grow_s{si}")
        f_hat = f.new_zeros(B, C, H, H)
        for si in range(SN):
            f_hat, nxt = q.get_next_autoregressive_input(si, SN, f_hat, q.idxBl_to_h([idx[si]])[0])
            _close(nxt, t[f"{p}ar_next_s{si}"], f"{p}ar_next_s{si}")


@pytest.fixture(scope="module")
def official_vqvae():
    path = FIXTURES / "vqvae_small.safetensors"
    meta = _meta(path)
    cfg = json.loads(meta["config"])
    t = load_file(str(path))
    vae = VQVAE(cfg["vocab_size"], cfg["z_channels"], cfg["ch"], cfg["dropout"], cfg["beta"], cfg["using_znorm"],
                cfg["quant_conv_ks"], cfg["quant_resi"], cfg["share_quant_resi"], cfg["default_qresi_counts"],
                cfg["v_patch_nums"], ch_mult=cfg["ch_mult"], num_res_blocks=cfg["num_res_blocks"])
    sd = _official_state(t, "sd.", float(meta["grid"]))
    vae.load_official_state_dict(sd)
    return vae.eval(), t, sd


def test_official_state_dict_keys_match_exactly(official_vqvae):
    vae, _, sd = official_vqvae
    ours = set(vae.state_dict()) - {"quantize.record_hit", "quantize.code_age"}
    assert ours == set(sd)
    # plain strict loading (our own loader) refuses a file of another size with a clear error
    other = small_vqvae((1, 2, 3, 5, 8))
    with pytest.raises(CheckpointMismatchError, match="shape"):
        load_strict(other, sd, ignore=TRAINING_STATE_KEYS)


def test_parity_vqvae_encode_decode(official_vqvae):
    vae, t, _ = official_vqvae
    x = t["x"]
    with torch.no_grad():
        _close(vae.quant_conv(vae.encoder(x)), t["f"], "encoder features", F32_DEEP_RTOL)
        idx = vae.img_to_idxBl(x)
        for si in range(len(idx)):
            assert torch.equal(idx[si], t[f"idx_s{si}"]), f"indices at scale {si}"
        tokens = vae.encode(x)
        assert torch.equal(tokens, torch.cat([t[f"idx_s{si}"] for si in range(len(idx))], 1))
        _close(vae.decode(tokens), t["img_from_idx"], "decoded image (clamped)", F32_DEEP_RTOL)
        _close(vae.decode(tokens, clamp=False), t["dec_raw"], "decoded image (raw)", F32_DEEP_RTOL)
        _close(vae.idxBl_to_img(idx, same_shape=True, last_one=True), t["img_from_idx"], "idxBl_to_img",
               F32_DEEP_RTOL)
        recs = vae.img_to_reconstructed_img(x)
        for si, r in enumerate(recs):
            _close(r, t[f"recon_s{si}"], f"reconstruction after scale {si}", F32_DEEP_RTOL)
    _check_quantizer_outputs(vae.quantize, t, "q.", t["f"])
    # the training forward (straight-through reconstruction, VQ loss)
    vae.train()
    rec, _, vq_loss = vae(x)
    vae.eval()
    _close(rec.detach(), t["train_rec"], "training reconstruction", F32_DEEP_RTOL)
    _close(vq_loss.detach().reshape(1), t["train_vq_loss"], "vq loss")


VARIANTS = ["partial4", "partial3", "shared", "nonshared", "nonshared_counts3", "noresi", "znorm", "negresi_beta1"]


@pytest.mark.parametrize("name", VARIANTS)
def test_parity_quantizer_variants(name):
    path = FIXTURES / "quantizer_variants.safetensors"
    meta = _meta(path)
    cfg = json.loads(meta["configs"])[name]
    t = load_file(str(path))
    q = MultiScaleVectorQuantizer(cfg["vocab_size"], cfg["Cvae"], cfg["v_patch_nums"], using_znorm=cfg["using_znorm"],
                                  beta=cfg["beta"], quant_resi=cfg["quant_resi"],
                                  share_quant_resi=cfg["share_quant_resi"],
                                  default_qresi_counts=cfg["default_qresi_counts"])
    sd = _official_state(t, f"{name}.sd.", float(meta["grid"]))
    assert set(q.state_dict()) - {"record_hit", "code_age"} == set(sd)
    q.load_state_dict({**q.state_dict(), **sd})
    q.eval()
    _check_quantizer_outputs(q, t, f"{name}.", t[f"{name}.f"])
    # training forward: output, loss, gradients (beta placement, straight-through), usage EMA
    q.train()
    f = t[f"{name}.f"].clone().requires_grad_(True)
    f_hat, _, vq_loss = q(f)
    (vq_loss + (f_hat * t[f"{name}.train_w"]).mean()).backward()
    _close(f_hat.detach(), t[f"{name}.train_fhat"], "train f_hat")
    _close(vq_loss.detach().reshape(1), t[f"{name}.train_vq_loss"], "train vq_loss")
    _close(f.grad, t[f"{name}.grad_f"], "grad wrt f")
    for pname, p in q.named_parameters():
        _close(p.grad, t[f"{name}.grad.{pname}"], f"grad of {pname}")
    q(f.detach() * 0.5)
    _close(q.ema_vocab_hit_SV, t[f"{name}.ema_vocab_hit_SV"], "ema_vocab_hit_SV after two steps")


# ----------------------------------------------------------------------------- configs
CONFIGS = Path(__file__).parent.parent / "configs" / "tokenizers"


@pytest.mark.parametrize("name, params, shapes", [
    ("vq_digits", None, ((8, 8),)),
    ("msvq_digits", None, tuple((p, p) for p in (1, 2, 3, 4, 6, 8))),
    ("var_vqvae", 108_948_355, tuple((p, p) for p in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))),
    ("maskgit_vqgan_f16", 54_449_283, ((16, 16),)),
])
def test_tokenizer_configs_build(name, params, shapes):
    from omegaconf import OmegaConf

    from genmodels.utils.config import instantiate
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"))
    assert cfg["model"]["class_path"] == "genmodels.training.TokenizerModule"
    with torch.device("meta"):
        tok = instantiate(cfg["model"]["init_args"]["tokenizer"])
    assert isinstance(tok, VQVAE) and tok.spec.shapes == shapes
    if params is not None:
        assert n_params(tok) == params
    if len(shapes) == 1:
        assert tok.quantize.quant_resi_ratio == 0.0
