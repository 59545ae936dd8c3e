"""VAR generator: parity with the official code (recorded fixtures), sampling, training.

Fixtures: tests/fixtures/var/ (see its README.md; recorded by scripts/record_fixtures/var.py
from the official FoundationVision/VAR code with every parameter perturbed).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from genmodels.checkpoints import from_official
from genmodels.generators.var import VAR
from genmodels import sampling
from genmodels.errors import GenmodelsError
from genmodels.sampling import filter_logits, from_var, sample_categorical
from genmodels.utils.config import instantiate
from helpers import F32_DEEP_RTOL, F32_RTOL, assert_close_f32

FIX = Path(__file__).parent / "fixtures" / "var"


pytestmark = pytest.mark.usefixtures("one_thread")
CONFIGS = Path(__file__).parents[1] / "configs" / "generators"
VAR_KEYS = ("num_classes", "depth", "embed_dim", "num_heads", "mlp_ratio", "drop_rate", "attn_drop_rate",
            "drop_path_rate", "norm_eps", "shared_aln", "cond_drop_rate", "attn_l2_norm", "patch_nums",
            "flash_if_available", "fused_if_available")


def _int8_sd(d: dict, prefix: str, grid: float = 64.0) -> dict:
    return {k[len(prefix):]: (v.float() / grid if v.dtype == torch.int8 else v) for k, v in d.items()
            if k.startswith(prefix)}


def load_vae():
    with safe_open(str(FIX / "vae.safetensors"), "pt") as f:
        cfg = json.loads(f.metadata()["vae_config"])
    sd = _int8_sd(load_file(str(FIX / "vae.safetensors")), "")
    return from_official("var-vqvae", sd, **cfg)


def load_case(name: str, vae=None):
    path = FIX / f"var_{name}.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items() if k != "grid"}
    d = load_file(str(path))
    cfg = {k: v for k, v in meta["var_config"].items() if k in VAR_KEYS}
    if vae is None:  # V / Cvae otherwise come from vae_local
        with safe_open(str(FIX / "vae.safetensors"), "pt") as f:
            vae_cfg = json.loads(f.metadata()["vae_config"])
        cfg.update(V=vae_cfg["vocab_size"], Cvae=vae_cfg["z_channels"])
    model = from_official("var", _int8_sd(d, "var."), vae_local=vae, **cfg)
    return model, d, meta


@pytest.fixture(scope="module")
def vae():
    return load_vae()


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", ["aln", "saln", "nol2"])
def test_logits_match_official(name):
    model, d, _ = load_case(name)
    with torch.no_grad():
        logits = model(d["labels"], d["x_BLCv_wo_first_l"])
        prog = model(d["labels"], d["x_BLCv_wo_first_l"], prog_si=1)
    assert logits.shape == d["logits"].shape
    assert_close_f32(logits, d["logits"], what="logits")
    assert prog.shape == d["logits_prog1"].shape == (4, 5, 64)
    assert_close_f32(prog, d["logits_prog1"], what="logits, prog_si=1")


def test_teacher_forcing_input_from_tokens(vae):
    _, d, _ = load_case("aln", vae)
    idx = list(d["tokens"].split([1, 4, 9, 16], dim=1))
    x = vae.quantize.idxBl_to_var_input(idx)
    assert_close_f32(x, d["x_BLCv_wo_first_l"], what="teacher-forcing input")


@pytest.mark.parametrize("name", ["aln", "saln", "nol2"])
def test_training_loss_and_gradients_match_official(name, vae):
    model, d, _ = load_case(name, vae)
    model.label_smoothing = 0.1
    model.train()
    out = model.forward_loss(d["tokens"], d["labels"])
    assert_close_f32(out["loss"].reshape(1), d["loss_ls0.1"].reshape(1), what="loss")
    out["loss"].backward()
    rename = {"qkv.weight": "mat_qkv.weight", "attn.scale_mul": "attn.scale_mul_1H11"}
    n = 0
    for our, p in model.named_parameters():
        off = our
        for a, b in rename.items():
            off = off.replace(a, b)
        want = d["gradnorm." + off]
        # gradients: relative to their own size (floor 0), summed over many float32 products
        assert_close_f32(p.grad.norm().reshape(1), want.reshape(1), rtol=1e-4, floor=0, what=f"|grad {our}|")
        if "grad." + off in d:
            assert_close_f32(p.grad, d["grad." + off], rtol=1e-4, floor=0, what=f"grad {our}")
        n += 1
    assert n == sum(1 for k in d if k.startswith("gradnorm."))


SAMPLING_RUNS = ["greedy_cfg0", "greedy_cfg1.5", "random_cfg2", "smooth_cfg1", "smooth_cfg1.5_k8_p0.9",
                 "smooth_cfg0_k16_p0.8", "random_cfg0.5_p0.7"]


@pytest.mark.parametrize("name", ["aln", "saln"])
@pytest.mark.parametrize("run", SAMPLING_RUNS)
def test_sampling_matches_official(name, run, vae):
    """The official sampler's kwargs go through ``sampling.from_var`` (official cfg c ->
    cfg = 1 + c with the linear schedule; official top_p 0 = off -> 1.0)."""
    model, d, meta = load_case(name, vae)
    official = dict(meta["sampling"][run])
    seed = official.pop("g_seed")
    kw = from_var(**official)
    assert kw["guidance_schedule"] == "linear" and kw["cfg"] == 1 + official["cfg"]
    tokens, f_hat = model.autoregressive_infer_cfg(d["labels"], generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(tokens, d[f"sample.{run}.tokens"])
    images = model.sample_images(d["labels"], generator=torch.Generator().manual_seed(seed), **kw)
    assert images.shape == d[f"sample.{run}.images01"].shape
    # tokens are exact, so the images differ by the conv decoder's float32 error (deep-net
    # tolerance); more_smooth decodes Gumbel-softmax mixtures softmax(logits (1 + r) / tau), tau =
    # max(0.27 (1 - 0.95 r), 0.005) at scale ratio r, which multiplies the logits' float32 error
    # by (1 + r) / tau: 148 at the last of 4 scales.
    rtol = F32_DEEP_RTOL
    if kw.get("more_smooth"):
        K = len(meta["var_config"]["patch_nums"])
        rtol = F32_RTOL * max((1 + si / (K - 1)) / max(0.27 * (1 - 0.95 * si / (K - 1)), 0.005) for si in range(K))
    assert_close_f32((images + 1) / 2, d[f"sample.{run}.images01"], rtol=rtol, what=f"{run} images")
    if not kw.get("more_smooth"):  # decoding the returned tokens gives the same image
        assert_close_f32(vae.decode(tokens), images, rtol=rtol, what=f"{run} decode(tokens)")


def test_official_draws_at_the_top_k_candidates(vae, monkeypatch):
    """The top-k + top-p run draws every scale through ``multinomial_one`` at the filter's
    candidate ids (the CPU fast path) and still gives the official tokens."""
    model, d, meta = load_case("aln", vae)
    official = dict(meta["sampling"]["random_cfg2"])
    seed = official.pop("g_seed")
    real, seen = sampling.multinomial_one, []

    def spy(probs, generator=None, candidates=None):
        seen.append(candidates is not None and 2 * candidates.shape[-1] <= probs.shape[-1])
        return real(probs, generator, candidates)
    monkeypatch.setattr(sampling, "multinomial_one", spy)
    tokens, _ = model.autoregressive_infer_cfg(d["labels"], generator=torch.Generator().manual_seed(seed),
                                               **from_var(**official))
    assert torch.equal(tokens, d["sample.random_cfg2.tokens"])
    assert len(seen) == len(meta["var_config"]["patch_nums"]) and all(seen)


def test_cuda_graph_buffers_give_the_same_tokens(vae):
    """``cuda_graphs=True`` (on a CPU: the same static caches / AdaLN buffers, run eagerly)
    samples the default path's tokens, call after call: buffers reused, caches rewound,
    conditioning copied in; a new batch size or moved weights get a new state."""
    from genmodels.nn import graphs as graphs_mod

    model, d, _ = load_case("aln", vae)
    kw = dict(cfg=2.5, top_k=8, top_p=0.9)
    for seed, labels in ((0, d["labels"]), (1, d["labels"].flip(0)), (2, d["labels"])):
        want = model.sample(labels, generator=torch.Generator().manual_seed(seed), **kw)
        got = model.sample(labels, generator=torch.Generator().manual_seed(seed), cuda_graphs=True, **kw)
        assert torch.equal(got, want)
    (key, (graphs, caches, _)), = graphs_mod._STATES[model].items()
    assert key[0] == 2 * len(d["labels"]) and graphs.captured == 0 and len(graphs._steps) == len(model.patch_nums)
    ptr = caches[0]._buf[0].data_ptr()
    model.sample(d["labels"], generator=torch.Generator().manual_seed(0), cuda_graphs=True, **kw)
    assert graphs_mod._STATES[model][key][1][0]._buf[0].data_ptr() == ptr  # the same buffers
    one = model.sample(d["labels"][:1], generator=torch.Generator().manual_seed(0), cfg=1.0, cuda_graphs=True)
    assert torch.equal(one, model.sample(d["labels"][:1], generator=torch.Generator().manual_seed(0), cfg=1.0))
    assert list(graphs_mod._STATES[model])[0][0] == 1  # one state at a time: batch 1, unguided
    state = next(iter(graphs_mod._STATES[model].values()))
    model.sample(d["labels"][:1], generator=torch.Generator().manual_seed(0), cfg=1.0, cuda_graphs=True)
    assert next(iter(graphs_mod._STATES[model].values())) is state  # same weights: kept
    w = model.blocks[0].attn.proj.weight
    w.data = w.data.clone()  # the weights moved (a reload / cast elsewhere): graphs would read the old address
    again = model.sample(d["labels"][:1], generator=torch.Generator().manual_seed(0), cfg=1.0, cuda_graphs=True)
    assert next(iter(graphs_mod._STATES[model].values())) is not state and torch.equal(again, one)
    with pytest.raises(GenmodelsError, match="use_cache"):
        model.sample(d["labels"], cuda_graphs=True, use_cache=False)


def test_step_graphs_refuse_another_shape():
    from genmodels.nn.graphs import StepGraphs

    graphs = StepGraphs("cpu")
    assert torch.equal(graphs(0, lambda x: x * 2, torch.ones(2, 3)), torch.full((2, 3), 2.0))
    assert torch.equal(graphs(0, lambda x: x * 2, torch.arange(6.0).view(2, 3)), torch.arange(6.0).view(2, 3) * 2)
    with pytest.raises(ValueError, match="recorded for"):
        graphs(0, lambda x: x * 2, torch.ones(3, 3))


def test_smooth_codes_see_the_filtered_logits(vae):
    """Regression (issue 11): with more_smooth and top-k / top-p on, the Gumbel-softmax codes
    come from the masked logits (official ``sample_with_top_k_top_p_`` masks in place), so a
    smooth run with top_k=1 decodes (almost) the greedy image from scale 2 on."""
    model, d, _ = load_case("aln", vae)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    smooth = model.sample_images(d["labels"], cfg=2.0, top_k=1, more_smooth=True, generator=g())
    greedy = model.sample_images(d["labels"], cfg=2.0, top_k=1, generator=g())
    assert (smooth - greedy).abs().max() <= 1e-5


def test_sampling_without_kv_cache_is_the_same(vae):
    model, d, _ = load_case("aln", vae)
    for cfg in (1.0, 2.5):
        a = model.sample(d["labels"], cfg=cfg, top_k=1, use_cache=True)
        b = model.sample(d["labels"], cfg=cfg, top_k=1, use_cache=False)
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- sampling knobs
def test_top_k_top_p_semantics():
    """VAR draws through sampling.filter_logits + sample_categorical (the official rule)."""
    logits = torch.tensor([[[0.0, 1.0, 2.0, 3.0]]]).log_softmax(-1)  # probs increasing
    g = torch.Generator().manual_seed(0)

    def draws(n, **kw):
        return torch.stack([sample_categorical(filter_logits(logits, **kw), g) for _ in range(n)]).flatten()

    assert set(draws(200, top_k=2).tolist()) == {2, 3}
    # probs .032 .087 .237 .644: cumulative from the smallest .032 .119 .356 1; top_p=0.75 removes
    # the entries with cumulative <= 0.25, i.e. tokens 0 and 1
    assert set(draws(200, top_p=0.75).tolist()) == {2, 3}
    assert set(draws(50, top_p=1e-6).tolist()) == {3}  # the most likely entry always stays


def test_sample_is_reproducible_and_checks_num_steps(vae):
    model, d, _ = load_case("aln", vae)
    a = model.sample(d["labels"], cfg=1.5, top_k=8, generator=torch.Generator().manual_seed(1))
    b = model.sample(d["labels"], cfg=1.5, top_k=8, generator=torch.Generator().manual_seed(1))
    c = model.sample(d["labels"], cfg=1.5, top_k=8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (4, 30) and a.dtype == torch.int64
    with pytest.raises(ValueError, match="num_steps"):
        model.sample(d["labels"], num_steps=8)
    # low temperature concentrates on the argmax (greedy)
    greedy = model.sample(d["labels"], cfg=1.5, top_k=1)
    cold = model.sample(d["labels"], cfg=1.5, temperature=1e-4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(greedy, cold)


def test_unbound_model_explains():
    model = VAR(vocab_size=16, Cvae=4, patch_nums=(1, 2), num_classes=3, depth=1, embed_dim=32, num_heads=2)
    with pytest.raises(RuntimeError, match="bind_tokenizer"):
        model.sample(torch.tensor([0]))
    with pytest.raises(TypeError, match="multi-scale quantizer"):
        model.bind_tokenizer(torch.nn.Linear(2, 2))


def test_bind_rejects_mismatched_tokenizer(vae):
    model = VAR(vocab_size=64, Cvae=8, patch_nums=(1, 2, 4), num_classes=3, depth=1, embed_dim=32, num_heads=2)
    with pytest.raises(ValueError, match="patch_nums"):
        model.bind_tokenizer(vae)
    model = VAR(vocab_size=32, Cvae=8, patch_nums=(1, 2, 3, 4), num_classes=3, depth=1, embed_dim=32, num_heads=2)
    with pytest.raises(ValueError, match="vocab_size"):
        model.bind_tokenizer(vae)


def test_tokenizer_not_in_state_dict(vae):
    model, _, _ = load_case("aln", vae)
    assert not any(k.startswith(("vae", "quantize", "tokenizer", "_tokenizer")) for k in model.state_dict())
    assert "lvl_1L" not in model.state_dict() and "attn_bias_for_masking" not in model.state_dict()


# ----------------------------------------------------------------------------- training behaviour
def test_label_dropout_only_in_training():
    torch.manual_seed(0)
    model = VAR(vocab_size=16, Cvae=4, patch_nums=(1, 2), num_classes=3, depth=1, embed_dim=32, num_heads=2,
                cond_drop_rate=0.5, init_adaln_gamma=1.0)
    labels, x = torch.zeros(64, dtype=torch.long), torch.randn(64, 4, 4)
    model.eval()
    with torch.no_grad():
        a, b = model(labels, x), model(labels, x)
    assert torch.equal(a, b)
    model.train()
    with torch.no_grad():
        c = model(labels, x)
    uncond = torch.tensor([3] * 64)
    with torch.no_grad():
        model.eval()
        u = model(uncond, x)
    dropped = ((c - u).abs().amax(dim=(1, 2)) < 1e-6)
    assert 10 < int(dropped.sum()) < 54  # about half the labels became the null class


def test_loss_goes_down(vae):
    torch.manual_seed(0)
    model = VAR(vocab_size=64, Cvae=8, patch_nums=(1, 2, 3, 4), num_classes=10, depth=2, embed_dim=64,
                num_heads=2, drop_path_rate=0.0, init_adaln_gamma=1e-3)
    model.bind_tokenizer(vae)
    tokens = torch.randint(0, 64, (8, 30), generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8) % 10
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = model.forward_loss(tokens, labels)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.5 * losses[0]
    assert {"loss_mean", "loss_tail", "acc_mean", "acc_tail"} <= set(out)


def test_progressive_training_schedule(vae):
    model = VAR(vocab_size=64, Cvae=8, patch_nums=(1, 2, 3, 4), num_classes=10, depth=1, embed_dim=32,
                num_heads=2, pg=0.5, pg0=1, pgwp=0.1)
    model.bind_tokenizer(vae)
    with pytest.raises(RuntimeError, match="set_train_progress"):
        model.forward_loss(torch.randint(0, 64, (2, 30)), torch.tensor([1, 2]))
    stages = []
    for step in range(0, 100, 5):
        model.set_train_progress(step, total_steps=100, warmup_steps=10)
        stages.append((model.prog_si, round(model.prog_wp, 3)))
    assert stages[0] == (1, 1.0)  # warm-up: first stage, no loss ramp
    assert stages[-1] == (-1, 1.0)  # after pg * total: all scales
    assert [s for s, _ in stages] == sorted([s for s, _ in stages], key=lambda s: 99 if s < 0 else s)
    # stage = 1 + round(2 * (step - 10) / 40) (Python's round: round(0.5) == 0, as the official):
    # stage 2 starts at step 21; its loss weight ramps over pgwp * 100 = 10 steps
    model.set_train_progress(24, total_steps=100, warmup_steps=10)
    assert model.prog_si == 2 and model.prog_wp == pytest.approx(0.4)
    model.train()
    tokens, labels = torch.randint(0, 64, (2, 30)), torch.tensor([1, 2])
    out = model.forward_loss(tokens, labels)
    assert torch.isfinite(out["loss"]) and "loss_tail" not in out  # only scales 0..2 were used


def test_no_weight_decay_names():
    model = VAR(vocab_size=16, Cvae=4, patch_nums=(1, 2), num_classes=3, depth=2, embed_dim=32, num_heads=2,
                shared_aln=True)
    names = model.no_weight_decay()
    nowd = {n for n, _ in model.named_parameters() if any(s in n for s in names)}
    assert {"pos_1LC", "pos_start", "lvl_embed.weight", "blocks.0.attn.scale_mul", "blocks.1.ada_gss"} <= nowd
    assert not any("qkv" in n or "fc1" in n or "head.weight" == n for n in nowd)


def test_official_init():
    torch.manual_seed(0)
    m = VAR(vocab_size=256, Cvae=8, patch_nums=(1, 2, 4), num_classes=10, depth=4, init_adaln=0.5,
            init_adaln_gamma=1e-3, init_head=0.02)
    C, std = 256, (1 / 256 / 3) ** 0.5
    w = m.blocks[0].ada_lin[1].weight
    assert w[:2 * C].std().item() == pytest.approx(std * 1e-3, rel=0.05)
    assert w[2 * C:].std().item() == pytest.approx(std * 0.5, rel=0.05)
    assert m.head.weight.std().item() == pytest.approx(std * 0.02, rel=0.05)
    assert m.blocks[0].attn.proj.weight.std().item() == pytest.approx(std / 8 ** 0.5, rel=0.05)
    assert m.blocks[0].attn.q_bias.abs().max() == 0 and m.head.bias.abs().max() == 0
    assert torch.allclose(m.blocks[0].attn.scale_mul, torch.tensor(4.0).log())
    assert m.pos_1LC.std().item() == pytest.approx(std, rel=0.05)
    assert [round(b.drop_path.drop_prob, 6) for b in m.blocks[1:]] == [round(0.1 * 4 / 24 * i / 3, 6) for i in (1, 2, 3)]


# ----------------------------------------------------------------------------- paper configs
PAPER = {"var_d16": 310_283_520, "var_d20": 600_917_136, "var_d24": 1_033_399_360, "var_d30": 2_010_020_356,
         "var_d36_512": 2_353_893_904}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_have_official_parameter_counts(name):
    cfg = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    gen_cfg = cfg["model"]["init_args"]["generator"]
    assert gen_cfg["class_path"] == "genmodels.generators.var.VAR"
    with torch.device("meta"):
        model = instantiate(gen_cfg)
    assert sum(p.numel() for p in model.parameters()) == PAPER[name]


def test_generator_module_binds_and_samples(vae):
    """The training loop's GeneratorModule binds the frozen tokenizer and decodes VAR's tokens."""
    from genmodels.training import GeneratorModule

    var = VAR(vocab_size=64, Cvae=8, patch_nums=(1, 2, 3, 4), num_classes=10, depth=1, embed_dim=32, num_heads=2)
    module = GeneratorModule(generator=var, tokenizer=vae, ema_decay=None, sample_kwargs={"cfg": 1.5, "top_k": 4})
    assert var.tokenizer is module.tokenizer
    assert not any(k.startswith("generator._tokenizer") for k in module.state_dict())
    images = torch.rand(3, 3, 8, 8) * 2 - 1
    tokens, labels = module.tokens_and_labels((images, torch.tensor([1, 2, 3])))
    out = module.generator.forward_loss(tokens, labels)
    out["loss"].backward()
    assert var.word_embed.weight.grad is not None and vae.quantize.embedding.weight.grad is None
    samples = module.sample_images(torch.tensor([0, 5]), generator=torch.Generator().manual_seed(0))
    assert samples.shape == (2, 3, 8, 8) and samples.min() >= -1 and samples.max() <= 1
