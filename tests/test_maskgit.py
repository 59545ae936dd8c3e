"""MaskGIT: token layout, schedules, parity with the official TiTok ImageBert, training, decoding."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import genmodels.generators.maskgit as mg
from genmodels.checkpoints import CheckpointMismatchError, from_official
from genmodels.generators.maskgit import MaskGIT, mask_ratio
from genmodels.tokenizers.base import TokenSpec
from genmodels.sampling import from_titok_guidance
from genmodels.utils.config import instantiate
from helpers import assert_close_f32

FIXTURE = Path(__file__).parent / "fixtures" / "maskgit" / "imagebert_tiny.pt"
K, C = 16, 3


def tiny(**kw) -> MaskGIT:
    args = dict(vocab_size=K, token_shape=(4, 4), num_classes=C, hidden_size=32, depth=2, num_heads=4,
                intermediate_size=64)
    return MaskGIT(**{**args, **kw})


pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------- layout, sizes
def test_token_id_layout_and_shapes():
    m = tiny().eval()
    assert m.spec == TokenSpec("discrete", ((4, 4),), vocab_size=K)
    assert m.word_embeddings.num_embeddings == K + C + 2 and m.mask_token_id == K
    assert m.position_embeddings.num_embeddings == 16 + 1 and m.lm_head.out_features == K
    seen = []
    m.word_embeddings.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].clone()))
    tokens = torch.randint(0, K + 1, (3, 16))
    labels = torch.tensor([0, 2, C])  # C = null class
    logits = m(tokens, labels)
    assert logits.shape == (3, 16, K)
    ids = seen[0]
    assert ids.shape == (3, 17)
    assert ids[:, 0].tolist() == [K + 1, K + 3, K + C + 1]  # class tokens K+1..K+C, null K+C+1
    assert torch.equal(ids[:, 1:], tokens)


def test_seq_len_and_config_roundtrip():
    m = MaskGIT(vocab_size=K, seq_len=8, num_classes=C, hidden_size=32, depth=1, num_heads=4, intermediate_size=64)
    assert m.spec.shapes == ((8,),)
    m2 = instantiate(m.config)
    assert {k: v.shape for k, v in m2.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="seq_len"):
        MaskGIT(vocab_size=K, token_shape=(4, 4), seq_len=8)
    with pytest.raises(ValueError, match="mask_schedule"):
        tiny(mask_schedule="cos")


def test_bad_inputs_are_named():
    m = tiny()
    with pytest.raises(ValueError, match="vocab_size"):
        m.forward_loss(torch.full((2, 16), K), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="null class"):
        m.forward_loss(torch.zeros(2, 16, dtype=torch.long), torch.tensor([0, C + 1]))
    with pytest.raises(ValueError, match="shape"):
        m.forward_loss(torch.zeros(2, 15, dtype=torch.long), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="vocab_size"):
        m.check_spec(TokenSpec("discrete", ((4, 4),), vocab_size=32))


def test_paper_imagenet256_parameter_count():
    """Transformer of the paper's ImageNet-256 config: 172,652,800 params here (the JAX model with
    its MLM transform head and tied output: 172,457,193); + the 54.5M VQGAN = the paper's 227M."""
    with torch.device("meta"):
        m = MaskGIT.imagenet256()
        l32, b64 = MaskGIT.titok(32), MaskGIT.titok(64)
    assert n_params(m) == 172_652_800
    assert m.spec == TokenSpec("discrete", ((16, 16),), vocab_size=1024)
    assert len(m.blocks) == 24 and m.blocks[0].mlp.fc1.out_features == 3072 and m.blocks[0].attn.num_heads == 16
    # TiTok's generators measured from the official ImageBert: 177.20M (L-32), 177.23M (B-64)
    assert n_params(l32) == 177_202_432 and n_params(b64) == 177_227_008
    jax_count = n_params(m) - 768 * 2 - (1024 * 768 + 1024) + (768 * 768 + 768 + 2 * 768 + 2025) - 768
    assert jax_count == 172_457_193  # minus token-type table and lm_head, plus Dense+LN+bias, one vocab row fewer


# ---------------------------------------------------------------- schedules and masking
def test_mask_schedule_values():
    assert mask_ratio(0.0, "arccos") == pytest.approx(1.0) and mask_ratio(1.0, "arccos") == pytest.approx(0.0)
    assert mask_ratio(0.5, "arccos") == pytest.approx(2 / 3)
    assert mask_ratio(0.5, "cosine") == pytest.approx(math.cos(math.pi / 4))
    assert mask_ratio(0.25, "linear") == pytest.approx(0.75)
    r = torch.linspace(0, 1, 11, dtype=torch.float64)
    for s in ("arccos", "cosine", "linear"):
        vals = mask_ratio(r, s)
        assert torch.allclose(vals, torch.tensor([mask_ratio(float(x), s) for x in r], dtype=torch.float64))
        assert (vals[1:] <= vals[:-1]).all()
    with pytest.raises(ValueError):
        mask_ratio(0.5, "exp")


def test_training_masks_follow_schedule():
    m = tiny()
    tokens = torch.randint(0, K, (4000, 16))
    masked, mask = m.mask_tokens(tokens, gen(0))
    assert torch.equal(masked[mask], torch.full((int(mask.sum()),), K))
    assert torch.equal(masked[~mask], tokens[~mask])
    assert mask.sum(1).min() >= 1
    # E[arccos(t)/(pi/2)] for t ~ U[0,1) = 2/pi
    assert mask.float().mean().item() == pytest.approx(2 / math.pi, abs=0.02)
    m.mask_schedule = "linear"
    assert m.mask_tokens(tokens, gen(0))[1].float().mean().item() == pytest.approx(0.5, abs=0.02)
    again = m.mask_tokens(tokens, gen(0))[1]
    assert torch.equal(again, m.mask_tokens(tokens, gen(0))[1])


# ---------------------------------------------------------------- official parity (recorded fixture)
@pytest.fixture(scope="module")
def official():
    rec = torch.load(FIXTURE, weights_only=True)
    model = from_official("maskgit-titok", rec["state_dict"], num_heads=4, dropout=0.0, attn_dropout=0.0)
    return rec, model.eval()


def test_converter_loads_official_state_dict(official):
    rec, m = official
    assert (m.vocab_size, m.num_classes, m.seq_len, len(m.blocks)) == (16, 3, 8, 2)
    sd = rec["state_dict"]
    qkv = torch.cat([sd[f"model.encoder.layer.1.attention.self.{n}.weight"] for n in ("query", "key", "value")])
    assert torch.equal(m.blocks[1].attn.qkv.weight, qkv)
    assert torch.equal(m.blocks[1].norm2.bias, sd["model.encoder.layer.1.output.LayerNorm.bias"])


def test_forward_matches_official(official):
    rec, m = official
    f = rec["forward"]
    with torch.no_grad():
        cond = m(f["ids"], f["condition"])
        uncond = m(f["ids"], torch.full_like(f["condition"], m.num_classes))
    assert_close_f32(cond, f["logits_cond"], what="logits cond")
    assert_close_f32(uncond, f["logits_uncond"], what="logits uncond")


def test_training_step_matches_official(official):
    """Same RNG stream: masking, class dropout and MLMLoss (label smoothing, unmasked weight 0.1)."""
    rec, m = official
    t = rec["train"]
    m.train()
    try:
        out = m.forward_loss(t["tokens"], t["labels"], generator=gen(t["seed"]))
        masked, mask = m.mask_tokens(t["tokens"], gen(t["seed"]))
    finally:
        m.eval()
    assert torch.equal(mask, t["masks"]) and torch.equal(masked, t["masked"])
    assert_close_f32(out["loss"], t["loss"], what="loss")


@pytest.mark.parametrize("i", range(4))
def test_decoding_matches_official_generate(official, i, monkeypatch):
    """Replay the official Gumbel draws: linear / power-cosine / no / constant guidance, softmax annealing."""
    rec, m = official
    g = rec["generate"][i]
    kw = g["kwargs"]
    draws = iter(g["uniforms"][:-2])  # the official also draws (unused) noise at the last step

    def replay(shape, generator=None, device=None):
        u = next(draws)
        assert tuple(u.shape) == tuple(shape)
        return -torch.log((-torch.log(u.clamp(min=1e-20))).clamp(min=1e-20))

    monkeypatch.setattr(mg, "gumbel_noise", replay)
    knobs = from_titok_guidance(kw["guidance_scale"], kw["guidance_decay"])  # official g -> our w
    ids = m.sample(g["condition"], **knobs,
                   guidance_pow=kw.get("guidance_scale_pow", 3.0), randomize_temperature=kw["randomize_temperature"],
                   softmax_temperature_annealing=kw["softmax_temperature_annealing"],
                   num_steps=kw["num_sample_steps"], generator=gen(0))
    assert torch.equal(ids, g["ids"])
    assert next(draws, None) is None


def test_converter_random_hf_layout_and_errors():
    """A state dict in the HF BERT layout built by name (+ the legacy position_ids buffer)."""
    D, L, I, N = 32, 3, 48, 6
    sd = {"model.embeddings.word_embeddings.weight": torch.randn(K + 5 + 2, D),
          "model.embeddings.position_embeddings.weight": torch.randn(N + 1, D),
          "model.embeddings.token_type_embeddings.weight": torch.randn(2, D),
          "model.embeddings.LayerNorm.weight": torch.randn(D), "model.embeddings.LayerNorm.bias": torch.randn(D),
          "model.embeddings.position_ids": torch.arange(N + 1)[None],
          "model.lm_head.weight": torch.randn(K, D), "model.lm_head.bias": torch.randn(K)}
    for i in range(L):
        p = f"model.encoder.layer.{i}."
        for n in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            sd[p + n + ".weight"], sd[p + n + ".bias"] = torch.randn(D, D), torch.randn(D)
        for n in ("attention.output.LayerNorm", "output.LayerNorm"):
            sd[p + n + ".weight"], sd[p + n + ".bias"] = torch.randn(D), torch.randn(D)
        sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"] = torch.randn(I, D), torch.randn(I)
        sd[p + "output.dense.weight"], sd[p + "output.dense.bias"] = torch.randn(D, I), torch.randn(D)
    m = from_official("maskgit-titok", sd, num_heads=2)
    assert (m.vocab_size, m.num_classes, m.seq_len, len(m.blocks), m.blocks[0].mlp.fc1.out_features) == (K, 5, N, L, I)
    assert torch.equal(m.blocks[2].attn.qkv.bias[D:2 * D], sd["model.encoder.layer.2.attention.self.key.bias"])
    assert torch.equal(m.blocks[0].mlp.fc2.weight, sd["model.encoder.layer.0.output.dense.weight"])
    assert torch.equal(m.embed_norm.bias, sd["model.embeddings.LayerNorm.bias"])
    bad = dict(sd)
    del bad["model.encoder.layer.1.attention.self.value.weight"]
    with pytest.raises(CheckpointMismatchError, match="value"):
        from_official("maskgit-titok", bad, num_heads=2)
    with pytest.raises(CheckpointMismatchError, match="lm_head"):
        from_official("maskgit-titok", {"model.foo": torch.zeros(1)})


# ---------------------------------------------------------------- training
def class_patterns(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Synthetic data: each class has one fixed random 4x4 token pattern -> (patterns, tokens, labels)."""
    g = gen(seed)
    patterns = torch.randint(0, K, (C, 16), generator=g)
    labels = torch.randint(0, C, (n,), generator=g)
    return patterns, patterns[labels], labels


def test_loss_falls_on_structured_tokens():
    torch.manual_seed(0)
    m = tiny(dropout=0.0, attn_dropout=0.0, class_dropout=0.1)
    patterns, tokens, labels = class_patterns(64)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)

    def eval_loss():
        m.eval()
        with torch.no_grad():
            return m.forward_loss(tokens, labels, generator=gen(123))
    before = eval_loss()
    m.train()
    for step in range(60):
        loss = m.forward_loss(tokens, labels, generator=gen(step))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after["loss"] < 0.5 * before["loss"], (before, after)
    assert after["acc"] > 0.9
    # the trained model decodes each class's pattern
    m.eval()
    out = m.sample(torch.arange(C), num_steps=4, choice_temperature=0.5, generator=gen(0))
    assert (out == patterns).float().mean() > 0.9


# ---------------------------------------------------------------- decoding
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = tiny().eval()
    with torch.no_grad():  # larger weights: peaked logits, so that CFG / seeds visibly matter
        for p in m.parameters():
            if p.ndim == 2:
                p.mul_(4.0)
    return m


@pytest.mark.parametrize("schedule", ["arccos", "cosine", "linear"])
@pytest.mark.parametrize("steps", [1, 3, 8, 20])
def test_decoding_unmasks_all_and_follows_schedule(model, schedule, steps):
    labels = torch.tensor([0, 1, 2, C])
    out, hist = model.sample(labels, num_steps=steps, mask_schedule=schedule, generator=gen(1), return_history=True)
    assert out.shape == (4, 16) and out.dtype == torch.long
    assert out.min() >= 0 and out.max() < K and len(hist) == steps
    assert torch.equal(hist[-1], out)
    prev = 16
    for s, ids in enumerate(hist[:-1]):
        want = max(1, min(math.floor(16 * mask_ratio((s + 1) / steps, schedule)), prev - 1))
        assert (ids == K).sum(1).tolist() == [want] * 4, (s, want)
        if s:  # tokens once unmasked stay fixed
            kept = hist[s - 1] != K
            assert torch.equal(ids[kept], hist[s - 1][kept])
        prev = want


def test_sampling_reproducible_and_seed_dependent(model):
    labels = torch.tensor([0, 1, 2, 0])
    state = torch.get_rng_state()
    for decoding in ("titok", "maskgit"):
        a = model.sample(labels, generator=gen(5), decoding=decoding)
        b = model.sample(labels, generator=gen(5), decoding=decoding)
        c = model.sample(labels, generator=gen(6), decoding=decoding)
        assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is never used
    assert not torch.equal(model.sample(labels, generator=gen(5), decoding="titok"),
                           model.sample(labels, generator=gen(5), decoding="maskgit"))


def test_cfg(model):
    labels = torch.tensor([0, 1, 2, 1])
    batch_sizes = []
    h = model.word_embeddings.register_forward_hook(lambda mod, inp, out: batch_sizes.append(inp[0].shape[0]))
    try:
        plain = [model.sample(labels, cfg=1.0, guidance_schedule=s, generator=gen(3), num_steps=4)
                 for s in ("constant", "linear", "power-cosine")]
        assert set(batch_sizes) == {4}  # cfg = 1: no unconditional pass
        batch_sizes.clear()
        guided = model.sample(labels, cfg=4.0, guidance_schedule="constant", generator=gen(3), num_steps=4)
        assert set(batch_sizes) == {8}
        batch_sizes.clear()
        model.sample(labels, cfg=4.0, guidance_schedule="linear", generator=gen(3), num_steps=4)
        assert batch_sizes == [4, 8, 8, 8]  # linear: step 0 unguided (MUSE / TiTok)
    finally:
        h.remove()
    assert torch.equal(plain[0], plain[1]) and torch.equal(plain[0], plain[2])
    assert not torch.equal(plain[0], guided)


def test_guidance_formulas(model):
    ids = torch.full((2, 16), K)
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        cond = model(ids, labels)
        uncond = model(ids, torch.full_like(labels, C))
        for sched, step, w_eff in [("constant", 0, 3.0), ("linear", 2, 1 + 0.5 * 2.0),
                                   ("power-cosine", 2, 1 + 2.0 * (1 - math.cos(math.pi * 0.5 ** 3)) / 2)]:
            got = model._guided_logits(ids, labels, 3.0, sched, step, 4, 3.0)
            assert_close_f32(got, uncond + w_eff * (cond - uncond), what=sched)


def test_temperature_knobs(model):
    labels = torch.tensor([0, 1, 2, 0])
    base = model.sample(labels, generator=gen(2))
    assert not torch.equal(base, model.sample(labels, generator=gen(2), temperature=3.0))
    assert torch.equal(model.sample(labels, generator=gen(2), choice_temperature=2.0),
                       model.sample(labels, generator=gen(2), randomize_temperature=2.0))
    # choice temperature 0: deterministic (argmax ids, raw-logit confidence)
    assert torch.equal(model.sample(labels, generator=gen(2), choice_temperature=0.0),
                       model.sample(labels, generator=gen(9), choice_temperature=0.0))
    preset = MaskGIT.SAMPLE_PRESETS["titok-l32"]
    assert model.sample(labels, generator=gen(2), **preset).shape == (4, 16)
    with pytest.raises(ValueError, match="guidance_schedule"):
        model.sample(labels, guidance_schedule="cosine")
    with pytest.raises(ValueError, match="decoding"):
        model.sample(labels, decoding="jax")
