"""``GeneratorModule(compile=True)``: the training loss through ``torch.compile`` (inductor) gives
the eager loss and gradients (issue 17's opt-in training lever). Slow: compiles with gcc."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from genmodels.generators.mar import MAR
from genmodels.training import GeneratorModule
from helpers import assert_close_f32, tiny_kl

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def module(compile: bool, dropout: float = 0.0) -> GeneratorModule:
    torch.manual_seed(0)
    gen = MAR(token_shape=(8, 8), token_channels=4, num_classes=10, encoder_embed_dim=32, encoder_depth=1,
              encoder_num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, buffer_size=2,
              diffloss_d=1, diffloss_w=32, attn_dropout=dropout, proj_dropout=dropout)
    m = GeneratorModule(gen, tokenizer=tiny_kl(), ema_decay=None, compile=compile)
    m._trainer = SimpleNamespace(strategy=None, global_step=0)
    m.log = m.log_dict = lambda *a, **k: None
    return m


def test_compiled_training_loss_and_gradients_equal_eager(monkeypatch):
    import torch._inductor.config as inductor_config

    # inductor draws torch's random ops (MAR's orders, DiffLoss's t and noise) from its own
    # Philox stream unless told to fall back: with the fallback the draws equal eager's
    monkeypatch.setattr(inductor_config, "fallback_random", True)
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    batch = (images, torch.tensor([0, 1, 2, 3]))
    losses, grads = [], []
    for compile in (False, True):
        m = module(compile)
        m.train()
        for step in range(2):  # the second step reuses the compiled graph
            torch.manual_seed(step)
            loss = m.training_step(batch, step)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in m.generator.parameters() if p.grad is not None]))
    assert m._compiled_loss is not None
    assert_close_f32(losses[1], losses[0], what="compiled loss")
    assert_close_f32(grads[1], grads[0], what="compiled gradients")
    # with dropout the compiled graph draws its masks with inductor's RNG (eager: nn.dropout's
    # numpy masks), so only check that it trains
    m = module(True, dropout=0.1)
    m.train()
    loss = m.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss)
