"""The approximate tier of issue 17 (opt-in sampling knobs, off by default): FastVAR-style
cached token pruning for VAR (``fastvar_prune``), LazyMAR-style condition cache
(``cfg_cache_interval``) and DiSA-style diffusion-step annealing (``diffusion_steps_end``)
for MAR. Off = the exact sampler; on = valid samples that differ, and cheaper."""
from __future__ import annotations

import pytest
import torch
from helpers import F32_DEEP_RTOL, assert_close_f32, tiny_var

from genmodels.generators.mar import MAR, lazy_sample
from genmodels.generators.var import fastvar_infer_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

PN = (1, 2, 3, 4, 6)


@pytest.fixture(scope="module")
def var():
    m, vae = tiny_var(PN)
    m.bind_tokenizer(vae)
    return m


def test_fastvar_without_pruning_is_the_exact_sampler(var):
    labels = torch.tensor([0, 3, 5])
    for cfg in (1.0, 2.5):
        kw = dict(cfg=cfg, top_k=20, top_p=0.9)
        exact, f_exact = var.autoregressive_infer_cfg(labels, generator=torch.Generator().manual_seed(1), **kw)
        zero, f_zero = fastvar_infer_cfg(var, labels, (0.0, 0.0), generator=torch.Generator().manual_seed(1), **kw)
        assert torch.equal(exact, zero)
        torch.testing.assert_close(f_exact, f_zero)


def test_fastvar_pruning_changes_samples_and_forwards_fewer_tokens(var):
    labels = torch.tensor([1, 2])
    seen = []
    hook = var.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    try:
        toks = var.sample(labels, cfg=2.0, fastvar_prune=(0.5, 0.75), generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    # scales 4 x 4 and 6 x 6 forward ceil(0.5 * 16) = 8 and ceil(0.25 * 36) = 9 tokens
    assert seen == [1, 4, 9, 8, 9]
    assert toks.shape == (2, sum(p * p for p in PN)) and toks.min() >= 0 and toks.max() < 64
    exact = var.sample(labels, cfg=2.0, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(toks, exact)
    imgs = var.sample_images(labels, cfg=2.0, fastvar_prune=(0.5,), generator=torch.Generator().manual_seed(0))
    assert imgs.shape[0] == 2 and torch.isfinite(imgs).all()
    with pytest.raises(ValueError, match="fastvar_prune"):
        var.sample(labels, fastvar_prune=(1.0,))


TINY = dict(token_shape=(4, 4), token_channels=4, num_classes=3, encoder_embed_dim=32, encoder_depth=1,
            encoder_num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, buffer_size=2,
            diffloss_d=1, diffloss_w=32, num_sampling_steps="6", attn_dropout=0.0, proj_dropout=0.0)


@pytest.fixture(scope="module")
def mar():
    torch.manual_seed(0)
    m = MAR(**TINY, diffloss_noise_schedule="linear").eval()
    with torch.no_grad():  # random weights everywhere (the zero-initialised DiffLoss output ignores z)
        for p in m.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.1)
    return m


def test_lazy_mar_with_knobs_off_is_the_exact_sampler(mar):
    labels = torch.tensor([0, 2])
    for cfg in (1.0, 3.0):
        exact = mar.sample(labels, cfg=cfg, num_steps=5, generator=torch.Generator().manual_seed(0))
        tokens = torch.zeros(2, 16, 4)
        cls = mar.class_embedding(labels)
        if cfg != 1.0:
            cls = torch.cat([cls, mar.fake_latent.expand(2, -1)])
        same = lazy_sample(mar, tokens, cls, cfg=cfg, schedule="linear", temperature=1.0, num_iter=5,
                           generator=torch.Generator().manual_seed(0), num_sampling_steps=None, orders=None)
        # the exact sampler runs the last decoder block on the predicted rows only: the same maths
        # summed in another order, so float32 sampler-chain tolerance (tests/helpers.py)
        assert_close_f32(same, exact, rtol=F32_DEEP_RTOL)
        # diffusion_steps_end equal to the model's steps is the same schedule
        also = mar.sample(labels, cfg=cfg, num_steps=5, diffusion_steps_end=6,
                          generator=torch.Generator().manual_seed(0))
        assert_close_f32(also, exact, rtol=F32_DEEP_RTOL)


def test_lazy_mar_knobs_skip_work_and_change_samples(mar):
    labels = torch.tensor([1, 2])
    rows = []
    hook = mar.encoder_blocks[0].register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[0]))
    try:
        lazy = mar.sample(labels, cfg=3.0, num_steps=6, cfg_cache_interval=3,
                          generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert rows == [4, 2, 2, 4, 2, 4]  # refresh at steps 0, 3 and the last; B rows otherwise
    exact = mar.sample(labels, cfg=3.0, num_steps=6, generator=torch.Generator().manual_seed(0))
    assert lazy.shape == exact.shape and torch.isfinite(lazy).all() and not torch.allclose(lazy, exact)
    disa = mar.sample(labels, cfg=3.0, num_steps=6, diffusion_steps_end=2, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(disa).all() and not torch.allclose(disa, exact)
    with pytest.raises(ValueError, match="cfg_cache_interval"):
        mar.sample(labels, cfg=3.0, cfg_cache_interval=0)
