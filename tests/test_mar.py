"""MAR generator (genmodels.generators.mar): parity with LTH14/mar on perturbed weights
(fixtures from scripts/record_fixtures/mar.py), official sizes, the paper's variants."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from genmodels.errors import GenmodelsError
from genmodels.generators.mar import MAR, truncnorm_mask_ratio
from helpers import F32_DEEP_RTOL, assert_close_f32, mar_fixture_weights

FIX = Path(__file__).parent / "fixtures" / "mar"
# the official MAR(img_size=16, vae_stride=2, patch_size=2, vae_embed_dim=4, ...) of the recording
SMALL = dict(token_shape=(4, 4), token_channels=16, num_classes=10, encoder_embed_dim=32, encoder_depth=2,
             encoder_num_heads=4, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4, buffer_size=4,
             diffloss_d=2, diffloss_w=32, num_sampling_steps="5", diffusion_batch_mul=2)
TINY = dict(token_shape=(4, 4), token_channels=4, num_classes=3, encoder_embed_dim=32, encoder_depth=1,
            encoder_num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, buffer_size=2,
            diffloss_d=1, diffloss_w=32, num_sampling_steps="4", attn_dropout=0.0, proj_dropout=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(scope="module")
def rec():
    return load_file(str(FIX / "mar.safetensors"))


@pytest.fixture(scope="module")
def model(rec):
    m = MAR(**SMALL).eval()
    checksum = mar_fixture_weights().perturb_(m, seed=2)
    assert_close_f32(checksum, rec["checksum"].item(), rtol=1e-6, what="weight checksum (weights differ from the recording)")
    return m


def test_encoder_decoder_match_official(model, rec):
    mask = rec["mask"].bool()
    with torch.no_grad():
        x = model.forward_mae_encoder(rec["tokens"], mask, model.class_embedding(rec["labels"]))
        z = model.forward_mae_decoder(x, mask)
    assert x.shape == (2, 4 + 16 - 11, 32) and z.shape == (2, 16, 32)
    assert_close_f32(x, rec["encoder_out"], what="encoder output")
    assert_close_f32(z, rec["decoder_z"], what="decoder z")
    # the null class (label == num_classes) is fake_latent; everything masked
    with torch.no_grad():
        null = torch.full((2,), 10)
        mask_all = rec["mask_all"].bool()
        z2 = model.forward_mae_decoder(model.forward_mae_encoder(rec["tokens"], mask_all,
                                                                 model.class_embedding(null)), mask_all)
    assert_close_f32(z2, rec["decoder_z_uncond_all_masked"], what="decoder z, null class, all masked")


class Replay:
    """Feeds the official sampler's recorded noise to ours: per token batch the official code
    draws the initial noise, then one (2n or n, C) noise per diffusion step (the last unused);
    ours draws the initial noise and n-row noises for all but the last step."""

    def __init__(self, draws: torch.Tensor, rows: torch.Tensor, C: int, diffusion_steps: int) -> None:
        chunks, off = [], 0
        for r in rows.tolist():
            chunks.append(draws[off:off + r * C].view(r, C))
            off += r * C
        self.queue = []
        per = 1 + diffusion_steps
        assert len(chunks) % per == 0
        for k in range(0, len(chunks), per):
            init, steps = chunks[k], chunks[k + 1:k + per]
            n = init.shape[0]
            self.queue += [init] + [s[:n] for s in steps[:-1]]

    def __call__(self, *size, **kw):
        shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else tuple(size)
        x = self.queue.pop(0)
        assert tuple(x.shape) == shape, (x.shape, shape)
        return x.clone()


@pytest.mark.parametrize("name,kw", [
    ("sample_cfg", dict(num_steps=4, cfg=3.0, temperature=0.95)),
    ("sample_nocfg", dict(num_steps=3, cfg=1.0, temperature=1.0)),
    ("sample_const", dict(num_steps=5, cfg=2.0, guidance_schedule="constant", temperature=0.9)),
])
def test_sampling_matches_official(model, rec, monkeypatch, name, kw):
    """The whole sample_tokens loop (orders, cosine mask schedule, CFG schedule, batched
    DiffLoss sampling) with the official random draws replayed."""
    replay = Replay(rec[f"{name}_draws"], rec[f"{name}_draw_rows"], 16, 5)
    monkeypatch.setattr(torch, "randn", replay)
    tokens = model.sample(rec["labels"], orders=rec[f"{name}_orders"], **kw)
    monkeypatch.undo()
    assert not replay.queue
    ref = rec[f"{name}_tokens"]
    assert tokens.shape == ref.shape == (2, 16, 16)
    # DDPM chains (values reach ~1e5, relative to the largest): the iterated-sampler tolerance
    assert_close_f32(tokens, ref, rtol=F32_DEEP_RTOL, what=name)


def test_paper_sizes_param_counts():
    """Official parameter counts (anchors/keys/mar_full_size_keys.txt), eval DiffLoss sizes."""
    with torch.device("meta"):
        base, large, huge = MAR.mar_base(), MAR.mar_large(), MAR.mar_huge()
        large_train = MAR.mar_large(diffloss_d=3, diffloss_w=1024)
    assert n_params(base) == 207_924_768
    assert n_params(large) == 478_326_304
    assert n_params(huge) == 942_403_104
    assert n_params(large_train) == 426_357_792
    assert len(base.state_dict()) == 364 and len(large.state_dict()) == 476 and len(huge.state_dict()) == 604
    sd = base.state_dict()
    assert tuple(sd["encoder_pos_embed_learned"].shape) == (1, 320, 768)
    assert tuple(sd["diffloss.net.res_blocks.5.adaLN_modulation.1.weight"].shape) == (3072, 1024)


def test_keys_equal_official_key_list():
    """Our mar_base state-dict keys and shapes equal the official list."""
    text = (Path(__file__).parents[1] / "tests" / "fixtures" / "mar" / "mar_base_keys.txt").read_text()
    want = {line.split()[0]: tuple(int(s) for s in line.split()[1].split(",")) for line in text.splitlines() if line}
    with torch.device("meta"):
        base = MAR.mar_base()
    assert {k: tuple(v.shape) for k, v in base.state_dict().items()} == want


def test_truncated_normal_mask_ratio():
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    r = truncnorm_mask_ratio(u, 0.7)
    assert r.min() >= 0.7 and r.max() <= 1.0
    # mean of N(1, 0.25) truncated to [0.7, 1]: 1 - 0.25 (phi(0) - phi(-1.2)) / (Phi(0) - Phi(-1.2))
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    Phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))
    expect = 1 - 0.25 * (phi(0) - phi(-1.2)) / (Phi(0) - Phi(-1.2))
    assert abs(r.mean().item() - expect) < 3e-3


def test_masking_one_ratio_per_batch_and_orders():
    m = MAR(**TINY)
    torch.manual_seed(0)
    orders = m.sample_orders(3)
    assert sorted(orders[0].tolist()) == list(range(16))
    mask = m.random_masking(3, orders)
    assert (mask.sum(1) == mask.sum(1)[0]).all() and mask.sum(1)[0] >= math.ceil(16 * 0.7)
    raster = MAR(**{**TINY, "order": "raster"}).sample_orders(2)
    assert raster[0].tolist() == list(range(15, -1, -1))  # the last raster tokens stay masked longest


def test_training_reduces_loss_and_sampling_is_seeded():
    torch.manual_seed(0)
    m = MAR(**TINY)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    tokens = torch.randn(8, 16, 4) * 0.5
    tokens[:, :, 0] += torch.arange(8).remainder(3)[:, None]
    labels = torch.arange(8).remainder(3)
    losses = []
    for _ in range(60):
        out = m.forward_loss(tokens, labels)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10])
    assert {"loss", "mse", "vb", "mask_ratio"} <= set(out)
    m.eval()
    a = m.sample(labels[:3], cfg=2.0, num_steps=4, generator=torch.Generator().manual_seed(0))
    b = m.sample(labels[:3], cfg=2.0, num_steps=4, generator=torch.Generator().manual_seed(0))
    c = m.sample(labels[:3], cfg=2.0, num_steps=4, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 16, 4) and torch.equal(a, b) and not torch.equal(a, c)
    # more steps than tokens and the null class work
    assert m.sample(torch.tensor([3, 0]), num_steps=20, generator=torch.Generator().manual_seed(0)).shape == (2, 16, 4)


def test_causal_variant_cached_decoding_equals_teacher_forcing():
    """AR + DiffLoss: z from the KV-cached incremental pass equals the teacher-forced z."""
    torch.manual_seed(0)
    m = MAR(**{**TINY, "order": "raster", "attention": "causal"}).eval()
    assert m.mask_token is None
    mar_fixture_weights().perturb_(m, seed=5)
    tokens, labels = torch.randn(2, 16, 4), torch.tensor([0, 2])
    with torch.no_grad():
        cls = m.class_embedding(labels)
        full = m.causal_z(tokens, cls)
        inc = torch.stack(list(m.causal_z_incremental(cls, lambda i: tokens[:, i])), dim=1)
    assert_close_f32(inc, full, what="incremental vs full causal z")
    # z_i must not depend on tokens >= i (causality)
    t2 = tokens.clone()
    t2[:, 5:] = 0
    with torch.no_grad():
        z2 = m.causal_z(t2, cls)
    assert_close_f32(z2[:, :6], full[:, :6], what="z before the change")
    assert not torch.allclose(z2[:, 6:], full[:, 6:])
    out = m.train().forward_loss(tokens, labels)
    assert out["mask_ratio"] == 1.0 and torch.isfinite(out["loss"])
    s = m.eval().sample(labels, cfg=1.5, generator=torch.Generator().manual_seed(0))
    assert s.shape == (2, 16, 4) and torch.isfinite(s).all()


def test_ce_head_variant_on_discrete_tokens():
    torch.manual_seed(0)
    m = MAR(**{**TINY, "token_channels": None, "vocab_size": 8})
    assert m.spec.kind == "discrete" and m.diffloss is None and "token_emb.weight" in m.state_dict()
    # class c -> every token equals c: learnable from the class alone
    labels = torch.arange(12).remainder(3)
    tokens = labels[:, None].expand(12, 16).clone()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(80):
        out = m.forward_loss(tokens, labels)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert out["loss"].item() < 0.5 and out["acc"] > 0.9
    m.eval()
    s = m.sample(torch.tensor([0, 1, 2]), cfg=2.0, temperature=0.5, num_steps=4,
                 generator=torch.Generator().manual_seed(0))
    assert s.dtype == torch.long and s.shape == (3, 16)
    assert (s == torch.tensor([0, 1, 2])[:, None]).float().mean() > 0.9


def test_bad_inputs_are_named():
    m = MAR(**TINY)
    with pytest.raises(ValueError, match="spec expects"):
        m.forward_loss(torch.randn(2, 16, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\]"):
        m.forward_loss(torch.randn(2, 16, 4), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="same number of masked"):
        mask = torch.zeros(2, 16, dtype=torch.bool)
        mask[0, :3] = True
        m.forward_loss(torch.randn(2, 16, 4), torch.tensor([0, 1]), mask=mask)
    with pytest.raises(ValueError, match="needs order='raster'"):
        MAR(**{**TINY, "attention": "causal"})


def test_diffloss_noise_schedule_knob():
    """cosine (official) vs DDPM linear: the first reverse step's eps-error amplification
    coef1(999) * sqrt(1/alpha_bar - 1) at 50 sampling steps is ~650 vs ~1."""
    amps = {}
    for schedule in ("cosine", "linear"):
        m = MAR(**{**TINY, "diffloss_noise_schedule": schedule, "num_sampling_steps": "50"})
        d = m.diffloss.gen_diffusion
        i = d.num_timesteps - 1
        amps[schedule] = d._at("posterior_mean_coef1", i) * d._at("sqrt_recipm1_alphas_cumprod", i)
    assert amps["cosine"] > 300 and amps["linear"] < 2
    with pytest.raises(ValueError, match="noise_schedule"):
        MAR(**{**TINY, "diffloss_noise_schedule": "sigmoid"})


def test_cuda_graph_buffers_give_the_same_tokens(model):
    """``cuda_graphs=True`` (on a CPU: the DiffLoss steps on static buffers, run eagerly) samples
    the default path's tokens call after call, one recorded step per row count, kept for the
    model; the approximate knobs are refused with it."""
    from genmodels.nn import graphs as graphs_mod

    labels = torch.tensor([1, 3])
    for seed, cfg in ((0, 3.0), (1, 3.0), (2, 1.0)):
        want = model.sample(labels, num_steps=4, cfg=cfg, generator=torch.Generator().manual_seed(seed))
        got = model.sample(labels, num_steps=4, cfg=cfg, generator=torch.Generator().manual_seed(seed),
                           cuda_graphs=True)
        assert torch.equal(got, want)
    (graphs,) = graphs_mod._STATES[model].values()
    rows = sorted(k[1] for k in graphs._steps)
    assert graphs.captured == 0 and len(rows) >= 4 and all(r % 2 == 0 for r in rows[-3:])
    with pytest.raises(GenmodelsError, match="approximate"):
        model.sample(labels, num_steps=4, cfg=3.0, cuda_graphs=True, cfg_cache_interval=2)
