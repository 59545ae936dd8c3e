"""CausalAR: causality, likelihood, training, KV-cache decoding, CFG, top-k / top-p."""
from __future__ import annotations

import math

import pytest
import torch

from genmodels.generators.causal_ar import CausalAR
from genmodels.sampling import filter_logits
from genmodels.nn.attention import KVCache
from genmodels.tokenizers.base import TokenSpec
from genmodels.utils.config import instantiate
from helpers import assert_close_f32

K, C, N = 16, 3, 12


def tiny(**kw) -> CausalAR:
    return CausalAR(**{**dict(vocab_size=K, token_shape=(3, 4), num_classes=C, hidden_size=32, depth=2,
                              num_heads=4), **kw})


pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = tiny().eval()
    with torch.no_grad():  # larger weights: peaked, class-dependent logits
        for p in m.parameters():
            if p.ndim >= 2:
                p.mul_(4.0)
    return m


def test_shapes_spec_and_config():
    m = tiny()
    assert m.spec == TokenSpec("discrete", ((3, 4),), vocab_size=K)
    assert m.class_embed.num_embeddings == C + 1 and m.head.out_features == K and m.pos_embed.shape == (1, N, 32)
    assert m(torch.randint(0, K, (2, N)), torch.tensor([0, C])).shape == (2, N, K)
    assert instantiate(m.config).state_dict().keys() == m.state_dict().keys()
    with pytest.raises(ValueError, match="vocab_size"):
        m.forward_loss(torch.full((2, N), K), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="null class"):
        m.forward_loss(torch.zeros(2, N, dtype=torch.long), torch.tensor([0, C + 1]))
    with pytest.raises(ValueError, match="num_steps"):
        m.sample(torch.tensor([0]), num_steps=5)


def test_causality(model):
    """logits[:, i] depend on the class and tokens[:, :i] only."""
    tokens = torch.randint(0, K, (2, N), generator=gen(0))
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        a = model(tokens, labels)
        t2 = tokens.clone()
        t2[:, 5] = (t2[:, 5] + 1) % K
        b = model(t2, labels)
        c = model(tokens, torch.tensor([2, 2]))
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])
    assert not torch.allclose(a[:, 0], c[:, 0])  # the class conditions the first token


def test_nll_is_bits_per_token(model):
    tokens = torch.randint(0, K, (3, N), generator=gen(1))
    labels = torch.tensor([0, 1, C])
    bpt = model.nll(tokens, labels)
    with torch.no_grad():
        logp = model(tokens, labels).log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(bpt, -logp.sum(1) / N / math.log(2))
    out = model.forward_loss(tokens, labels)  # eval mode: no class dropout
    torch.testing.assert_close(out["bpt"], bpt.mean())
    torch.testing.assert_close(out["loss"], bpt.mean() * math.log(2))


def test_kv_cache_logits_match_teacher_forcing(model):
    tokens = torch.randint(0, K, (2, N), generator=gen(2))
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        full = model(tokens, labels)
        caches = [KVCache() for _ in model.blocks]
        steps = [model._transformer(model._inputs(labels, tokens[:, :0]), caches)]
        for i in range(1, N):
            steps.append(model._transformer(model._inputs(labels, tokens[:, i - 1:i], start=i), caches))
    assert_close_f32(torch.cat(steps, 1), full, what="KV-cache steps vs teacher forcing")


@pytest.mark.parametrize("kw", [dict(), dict(cfg=3.0), dict(top_k=4), dict(top_p=0.7, temperature=0.8),
                                dict(cfg=2.0, top_k=5, top_p=0.9, temperature=1.3)])
def test_cache_and_no_cache_give_identical_tokens(model, kw):
    labels = torch.tensor([0, 1, 2, C, 1])
    a = model.sample(labels, generator=gen(7), use_cache=True, **kw)
    b = model.sample(labels, generator=gen(7), use_cache=False, **kw)
    assert a.shape == (5, N) and a.dtype == torch.long and 0 <= a.min() and a.max() < K
    assert torch.equal(a, b)


def test_sampling_reproducible_seed_dependent_no_global_rng(model):
    labels = torch.tensor([0, 1, 2, 0])
    state = torch.get_rng_state()
    a = model.sample(labels, generator=gen(1))
    assert torch.equal(a, model.sample(labels, generator=gen(1)))
    assert not torch.equal(a, model.sample(labels, generator=gen(2)))
    assert torch.equal(torch.get_rng_state(), state)


def greedy(model: CausalAR, labels: torch.Tensor, cfg: float = 1.0) -> torch.Tensor:
    """Reference: argmax decoding with the full forward (no cache), guidance by hand."""
    tokens = torch.zeros(len(labels), N, dtype=torch.long)
    with torch.no_grad():
        for i in range(N):
            cond = model(tokens, labels)[:, i]
            uncond = model(tokens, torch.full_like(labels, C))[:, i]
            logits = cond if cfg == 1.0 else uncond + cfg * (cond - uncond)
            tokens[:, i] = logits.argmax(-1)
    return tokens


def test_top_k_1_is_greedy_and_cfg_formula(model):
    labels = torch.tensor([0, 1, 2, 2])
    plain = greedy(model, labels)
    assert torch.equal(model.sample(labels, top_k=1, generator=gen(0)), plain)
    assert torch.equal(model.sample(labels, top_k=1, generator=gen(1), use_cache=False), plain)
    guided = greedy(model, labels, cfg=4.0)
    assert torch.equal(model.sample(labels, top_k=1, cfg=4.0, generator=gen(0)), guided)
    assert not torch.equal(guided, plain)


def test_cfg_one_is_plain_conditional_and_cfg_changes_samples(model):
    labels = torch.tensor([0, 1, 2, 0])
    sizes = []
    h = model.tok_embed.register_forward_hook(lambda mod, inp, out: sizes.append(inp[0].shape[0]))
    try:
        plain = model.sample(labels, cfg=1.0, generator=gen(4))
        assert set(sizes) == {4}  # no doubled batch
        sizes.clear()
        guided = model.sample(labels, cfg=3.0, generator=gen(4))
        assert set(sizes) == {8}
    finally:
        h.remove()
    assert torch.equal(plain, model.sample(labels, generator=gen(4)))
    assert not torch.equal(plain, guided)


def test_filter_logits():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    keep = lambda out: torch.isfinite(out)[0].tolist()  # noqa: E731
    assert keep(filter_logits(logits, top_k=2)) == [True, True, False, False]
    assert keep(filter_logits(logits, top_p=0.7)) == [True, True, False, False]
    assert keep(filter_logits(logits, top_p=0.5)) == [True, False, False, False]
    assert keep(filter_logits(logits, top_p=0.81)) == [True, True, True, False]
    assert keep(filter_logits(logits, top_p=1e-6)) == [True, False, False, False]
    shuffled = logits[:, [2, 0, 3, 1]]
    assert keep(filter_logits(shuffled, top_p=0.7)) == [False, True, False, True]
    assert keep(filter_logits(logits, top_k=0, top_p=1.0)) == [True] * 4


def test_top_p_restricts_support(model):
    labels = torch.zeros(64, dtype=torch.long)
    with torch.no_grad():
        first = model(torch.zeros(1, N, dtype=torch.long), labels[:1])[0, 0].softmax(-1)
    top = first.argmax().item()
    out = model.sample(labels, top_p=first.max().item() * 0.99, generator=gen(0))
    assert (out[:, 0] == top).all()  # only the most likely first token is in the nucleus
    wide = model.sample(labels, generator=gen(0))
    assert wide[:, 0].unique().numel() > 1


def test_loss_falls_and_model_learns_class_patterns():
    torch.manual_seed(0)
    m = tiny(class_dropout=0.1)
    g = gen(0)
    patterns = torch.randint(0, K, (C, N), generator=g)
    labels = torch.randint(0, C, (64,), generator=g)
    tokens = patterns[labels]
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    m.eval()
    before = m.nll(tokens, labels).mean()
    m.train()
    for step in range(60):
        loss = m.forward_loss(tokens, labels, generator=gen(step))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    after = m.nll(tokens, labels).mean()
    assert after < 0.2 * before, (before, after)
    out = m.sample(torch.arange(C), top_k=1, generator=gen(0))
    assert torch.equal(out, patterns)
