"""Diffusion Loss (genmodels.losses.diffusion): parity with the official LTH14/mar code
(fixtures recorded by scripts/record_fixtures/mar.py), schedule facts, behaviour."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from genmodels.losses.diffusion import DiffLoss, create_diffusion, space_timesteps
from helpers import F32_DEEP_RTOL, assert_close_f32, assert_close_f64, mar_fixture_weights

FIX = Path(__file__).parent / "fixtures" / "mar"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def rec():
    return load_file(str(FIX / "diffloss.safetensors"))


@pytest.fixture(scope="module")
def dl(rec):
    m = DiffLoss(target_channels=4, z_channels=8, depth=2, width=32, num_sampling_steps="10").eval()
    checksum = mar_fixture_weights().perturb_(m, seed=1)
    assert_close_f32(checksum, rec["checksum"].item(), rtol=1e-6, what="weight checksum (weights differ from the recording)")
    return m


def test_net_output_matches_official(dl, rec):
    with torch.no_grad():
        out = dl.net(rec["x"], rec["t"], rec["z"])
    assert out.shape == (12, 8)
    assert_close_f32(out, rec["net_out"], what="net output")


def test_training_loss_terms_match_official(dl, rec):
    """mse + vb for fixed t (including t=0, the decoder-NLL branch) and noise."""
    with torch.no_grad():
        terms = dl.loss_terms(rec["target"], rec["z"], t=rec["t"], noise=rec["noise"])
        x_t = dl.train_diffusion.q_sample(rec["target"], rec["t"], rec["noise"])
    assert_close_f32(x_t, rec["train_x_t"], what="x_t")
    # per-sample terms of very different size (vb reaches ~457 at t = 0): each relative to itself
    for k in ("mse", "vb", "loss"):
        assert_close_f32(terms[k], rec[f"train_{k}"], what=k, elementwise=True)
    # t == 0 rows take the discretised-Gaussian NLL branch, which differs from a KL
    assert (rec["t"] == 0).sum() == 2
    mask = torch.tensor([1.0] * 6 + [0.0] * 6)
    with torch.no_grad():
        loss = dl(rec["target"], rec["z"], mask=mask, t=rec["t"], noise=rec["noise"])
    assert_close_f32(loss, (rec["train_loss"] * mask).sum() / 6, what="masked mean loss")


def test_repeated_rows_embed_z_once_with_the_same_terms_and_gradients(dl):
    """loss_terms(target, z, repeat=r) == loss_terms on the r-fold copies (MAR's
    diffusion_batch_mul): same t / noise per copy, same terms, same gradient w.r.t. z."""
    g = torch.Generator().manual_seed(0)
    target, z = torch.randn(5, 4, generator=g), torch.randn(5, 8, generator=g)
    t = torch.randint(0, 1000, (15,), generator=g)
    t[3] = t[9]  # a repeated timestep (embedded once)
    noise = torch.randn(15, 4, generator=g)
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    a = dl.loss_terms(target, z1, t=t, noise=noise, repeat=3)
    b = dl.loss_terms(target.repeat(3, 1), z2.repeat(3, 1), t=t, noise=noise)
    for k in ("mse", "vb", "loss"):
        assert_close_f32(a[k], b[k], what=k, elementwise=True)
    a["loss"].sum().backward()
    b["loss"].sum().backward()
    assert_close_f32(z1.grad, z2.grad, what="dL/dz")
    torch.manual_seed(4)
    c = dl.loss_terms(target, z, repeat=3)["loss"]
    torch.manual_seed(4)
    d = dl.loss_terms(target.repeat(3, 1), z.repeat(3, 1))["loss"]  # the same draws of t and noise
    assert_close_f32(c, d, what="drawn t / noise", elementwise=True)


def test_sampling_schedule_matches_official(rec):
    d = create_diffusion("100")
    assert d.timestep_map.tolist() == rec["gen100_timestep_map"].tolist()
    assert_close_f64(torch.from_numpy(d.betas), rec["gen100_betas"], what="betas (float64 maths)")
    assert space_timesteps(1000, "100")[:4] == [0, 10, 20, 30] and len(space_timesteps(1000, "100")) == 100
    full = create_diffusion("")
    assert full.num_timesteps == 1000 and full.timestep_map.tolist() == list(range(1000))
    # cosine schedule: beta clipped at 0.999 at the end, tiny at the start
    assert full.betas[-1] == pytest.approx(0.999) and full.betas[0] < 1e-4


def test_sampler_matches_official_without_guidance(dl, rec):
    z = rec["z"][:6]
    out = dl.sample(z, temperature=0.9, noise=rec["sample_noise0"].clone(), step_noises=list(rec["sample_step_noises"]))
    assert out.shape == (6, 4)
    # DDPM chain (random weights grow it to ~1e5, relative to the largest): iterated-sampler tolerance
    assert_close_f32(out, rec["sample_out"], rtol=F32_DEEP_RTOL, what="sample")


def test_sampler_matches_official_with_guidance(dl, rec):
    z = torch.cat([rec["z"][:6], rec["z"][6:12]])
    out = dl.sample(z, temperature=0.8, cfg=3.0, noise=rec["sample_noise0"].clone(),
                    step_noises=list(rec["cfg_step_noises"]))
    assert out.shape == (6, 4)
    assert_close_f32(out, rec["cfg_out"], rtol=F32_DEEP_RTOL, what="sample with cfg")


def test_sampler_is_reproducible_and_temperature_scales_noise(dl):
    z = torch.randn(5, 8)
    a = dl.sample(z, generator=torch.Generator().manual_seed(0))
    b = dl.sample(z, generator=torch.Generator().manual_seed(0))
    c = dl.sample(z, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # temperature 0: deterministic given the initial noise
    x0 = torch.randn(5, 4)
    d1 = dl.sample(z, temperature=0.0, noise=x0.clone(), generator=torch.Generator().manual_seed(0))
    d2 = dl.sample(z, temperature=0.0, noise=x0.clone(), generator=torch.Generator().manual_seed(5))
    assert torch.equal(d1, d2)
    assert dl.sample(z, num_sampling_steps=3, generator=torch.Generator().manual_seed(0)).shape == (5, 4)


def test_official_init_and_keys():
    m = DiffLoss(target_channels=16, z_channels=768, depth=6, width=1024)
    keys = set(m.state_dict())
    assert "net.time_embed.mlp.0.weight" in keys and "net.res_blocks.5.adaLN_modulation.1.weight" in keys
    assert "net.final_layer.linear.weight" in keys and not any("norm_final" in k for k in keys)
    assert m.net.final_layer.linear.weight.abs().sum() == 0  # zero-initialised output
    w = 1024  # per block: in_ln 2w, mlp 2(w^2 + w), adaLN 3w^2 + 3w
    assert sum(p.numel() for p in m.parameters()) == 6 * (5 * w * w + 7 * w) \
        + (256 * w + w + w * w + w) + (768 * w + w) + (16 * w + w) + (2 * w * w + 2 * w) + (32 * w + 32)


def test_diffloss_learns_a_conditional_distribution():
    """Two conditions, two separated 2-D targets: training lowers the loss and the denoiser's
    x0-prediction from a noisy token lands near the target of ITS condition.

    (Full ancestral sampling is not asserted here: with the cosine schedule the first step at
    t = 999 multiplies eps errors by ~1e4, so a toy trained for seconds diverges -- the
    official code does the same; sampling is covered by the parity tests.)"""
    torch.manual_seed(0)
    dl = DiffLoss(target_channels=2, z_channels=2, depth=2, width=64)
    opt = torch.optim.AdamW(dl.parameters(), lr=3e-3)
    centres = torch.tensor([[0.8, 0.8], [-0.8, -0.4]])
    z_of = torch.eye(2)
    losses = []
    for step in range(250):
        k = torch.randint(0, 2, (256,))
        target = centres[k] + 0.05 * torch.randn(256, 2)
        loss = dl(target, z_of[k])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-30:]) / 30 < 0.3 * sum(losses[:30]) / 30
    d = dl.train_diffusion
    with torch.no_grad():  # from an almost pure-noise token (t = 800), the condition decides
        t = torch.full((400,), 800)
        x_t = d.q_sample(centres.repeat(200, 1), t, torch.randn(400, 2))
        for c in (0, 1):
            out = dl.net(x_t, t, z_of[c].expand(400, 2))
            _, _, x0_pred = d.p_mean_variance(out[:, :2], out[:, 2:], x_t, t)
            m = x0_pred.median(0).values
            assert (m - centres[c]).norm() < 0.5 * (m - centres[1 - c]).norm(), (c, m)


def test_bad_shapes_are_named():
    dl = DiffLoss(target_channels=4, z_channels=8, depth=1, width=16)
    with pytest.raises(ValueError, match=r"targets must be \(N, 4\)"):
        dl(torch.randn(3, 5), torch.randn(3, 8))
    with pytest.raises(ValueError, match="conditions z"):
        dl(torch.randn(3, 4), torch.randn(2, 8))
    with pytest.raises(ValueError, match="cannot divide"):
        space_timesteps(10, "20")
