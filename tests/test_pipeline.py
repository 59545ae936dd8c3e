"""The sampling convention for every generator, the seeding rule and the pipeline (issue 11).

Tiny random models, no fixtures: for VAR, MAR (DiffLoss), MAR (CE head), causal AR, causal
AR + DiffLoss (MAR attention="causal") and MaskGIT:

* ``cfg=1`` (with any guidance schedule) is guidance off: the same tokens as the default and
  no unconditional pass;
* ``top_p=1`` is no filtering; ``top_k=1`` is argmax (where the generator has top-k);
* the predict path (``Pipeline.sample_classes``) and the test path (``sample_block`` calls,
  any subset of classes) give the same images for the same seed;
* a GeneratorModule checkpoint samples through ``genmodels.load`` after its tokenizer file is
  deleted.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import genmodels
from genmodels.errors import GenmodelsError
from genmodels.generators.causal_ar import CausalAR
from genmodels.generators.mar import MAR
from genmodels.generators.maskgit import MaskGIT
from genmodels.generators.var import VAR
from genmodels.pipeline import Pipeline, fetch_file, seed_for

from helpers import gen, tiny_kl, tiny_vq

pytestmark = pytest.mark.usefixtures("one_thread")
C = 3  # classes


vq, kl = tiny_vq, tiny_kl  # the tiny random tokenizers every pipeline test builds on (tests/helpers.py)


MAR_SMALL = dict(token_shape=(8, 8), num_classes=C, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
                 decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, buffer_size=2, diffloss_d=1,
                 diffloss_w=32, num_sampling_steps="5", num_iter=4, attn_dropout=0.0, proj_dropout=0.0)


def build(name: str) -> Pipeline:
    torch.manual_seed(1)
    if name == "var":
        tok = vq((1, 2, 4, 8))
        g = VAR(vocab_size=32, Cvae=8, patch_nums=(1, 2, 4, 8), num_classes=C, depth=1, embed_dim=32, num_heads=2,
                init_head=1.0, init_adaln_gamma=0.5)
    elif name == "mar":
        tok, g = kl(), MAR(token_channels=4, **MAR_SMALL)
    elif name == "mar_ce":
        tok, g = vq(), MAR(token_channels=None, vocab_size=32, **MAR_SMALL)
    elif name == "mar_causal":
        tok, g = kl(), MAR(token_channels=4, order="raster", attention="causal", **MAR_SMALL)
    elif name == "causal_ar":
        tok, g = vq(), CausalAR(vocab_size=32, token_shape=(8, 8), num_classes=C, hidden_size=32, depth=1,
                                num_heads=2)
    elif name == "maskgit":
        tok, g = vq(), MaskGIT(vocab_size=32, token_shape=(8, 8), num_classes=C, hidden_size=32, depth=1,
                               num_heads=2, intermediate_size=64, dropout=0.0, attn_dropout=0.0)
    else:
        raise KeyError(name)
    if name not in ("mar", "mar_causal"):  # zero / 0.02-initialised heads make every logit about equal: give them weight
        for p in g.parameters():
            if p.ndim >= 2 and p.abs().max() < 0.2:
                torch.nn.init.normal_(p, std=0.5)
    if name in ("mar", "mar_causal"):
        for p in g.diffloss.parameters():  # the DiffLoss MLP starts with zero adaLN / output layers
            if p.abs().max() == 0:
                torch.nn.init.normal_(p, std=0.05)
    return Pipeline(g.eval(), tok, {})


ALL = ["var", "mar", "mar_ce", "mar_causal", "causal_ar", "maskgit"]
FILTERING = ["var", "mar_ce", "causal_ar"]  # generators with top-k / top-p
LABELS = torch.tensor([0, 1, 2, 1])


@pytest.fixture(scope="module")
def pipes():
    return {}


def pipe_of(pipes, name):
    if name not in pipes:
        pipes[name] = build(name)
    return pipes[name]


def tokens(p: Pipeline, seed: int = 0, **kw) -> torch.Tensor:
    return p.generator.sample(LABELS, generator=gen(seed), **kw)


def batch_sizes(p: Pipeline, fn) -> set[int]:
    """Batch sizes the generator's first transformer block sees while running ``fn``."""
    g = p.generator
    block = (g.blocks if hasattr(g, "blocks") else g.encoder_blocks)[0]
    seen: set[int] = set()
    h = block.register_forward_hook(lambda m, i, o: seen.add(o.shape[0]))
    try:
        fn()
    finally:
        h.remove()
    return seen


# ----------------------------------------------------------------------------- the convention
@pytest.mark.parametrize("name", ALL)
def test_cfg_1_is_guidance_off(pipes, name):
    p = pipe_of(pipes, name)
    off = tokens(p)
    for schedule in ("constant", "linear", "power-cosine"):
        sizes = batch_sizes(p, lambda: torch.equal(tokens(p, cfg=1.0, guidance_schedule=schedule), off) or
                            pytest.fail(f"cfg=1 with {schedule} differs from guidance off"))
        assert sizes == {len(LABELS)}, f"cfg=1 ran an unconditional pass ({schedule}): {sizes}"
    guided = tokens(p, cfg=10.0, guidance_schedule="constant")
    assert not torch.equal(guided, off)  # the check can fail: guidance changes the samples
    assert len(LABELS) * 2 in batch_sizes(p, lambda: tokens(p, cfg=3.0, guidance_schedule="constant"))


@pytest.mark.parametrize("name", FILTERING)
def test_top_p_1_is_no_filtering(pipes, name):
    p = pipe_of(pipes, name)
    plain = tokens(p, cfg=2.0, seed=3)
    assert torch.equal(tokens(p, cfg=2.0, seed=3, top_p=1.0, top_k=0), plain)
    assert not torch.equal(tokens(p, cfg=2.0, seed=3, top_p=0.05), plain)  # filtering does change them
    with pytest.raises(ValueError, match="top_p"):
        tokens(p, top_p=0.0)  # VAR's official "0 = off" is not ours: mapped by sampling.from_var_top_p


@pytest.mark.parametrize("name", FILTERING)
def test_top_k_1_is_argmax(pipes, name):
    p = pipe_of(pipes, name)
    g = p.generator
    kw = {"orders": g.sample_orders(len(LABELS), generator=gen(9))} if name == "mar_ce" else {}  # MAR: fix the order
    greedy = tokens(p, seed=0, top_k=1, **kw)
    assert torch.equal(greedy, tokens(p, seed=5, top_k=1, **kw))  # no randomness left
    assert not torch.equal(tokens(p, seed=0, **kw), tokens(p, seed=5, **kw))
    with torch.no_grad():
        if name == "causal_ar":  # every token is the argmax given its prefix (teacher forcing)
            assert torch.equal(g(greedy, LABELS).argmax(-1), greedy)
        elif name == "var":
            x = g.quantizer.idxBl_to_var_input(list(greedy.split(g.spec.scale_lens, dim=1)))
            assert torch.equal(g(LABELS, x).argmax(-1), greedy)
        else:  # MAR CE head: temperature 0 is argmax, same orders from the same seed
            assert torch.equal(greedy, tokens(p, seed=0, temperature=0.0, **kw))


def test_mar_diffloss_refuses_logit_filters(pipes):
    with pytest.raises(GenmodelsError, match="top_k / top_p"):
        tokens(pipe_of(pipes, "mar"), top_k=5)


# ----------------------------------------------------------------------------- the seeding rule
def test_seed_for_is_a_pure_63_bit_mix():
    s = {seed_for(a, c, b) for a in (0, 1) for c in range(50) for b in range(4)}
    assert len(s) == 400 and all(0 <= x < 2 ** 63 for x in s)
    assert seed_for(7, 3, 2) == seed_for(7, 3, 2) != seed_for(7, 2, 3)
    assert seed_for(-1, 0, 0) == seed_for(2 ** 64 - 1, 0, 0)


@pytest.mark.parametrize("name", ALL)
def test_predict_path_equals_test_path(pipes, name):
    """sample_classes (grids, predict, `genmodels sample`) vs sample_block calls (the judge's
    callable, any subset / order of classes): sample i of class c is the same image."""
    p = pipe_of(pipes, name)
    knobs = dict(cfg=2.0)
    images, labels = p.sample_classes([0, 2], 3, seed=11, block_size=2, **knobs)
    assert images.dtype == torch.uint8 and images.shape == (6, 3, 16, 16)
    assert labels.tolist() == [0, 0, 0, 2, 2, 2]
    fn = p.block_sampler(seed=11, block_size=2, **knobs)
    class2 = torch.cat([fn(2, 1), fn(2, 0)])  # other order, other class first
    assert torch.equal(images[3:5], class2[2:4]) and torch.equal(images[5], class2[0])
    only0, _ = p.sample_classes([0], 1, seed=11, block_size=2, **knobs)
    assert torch.equal(only0[0], images[0])
    other_seed, _ = p.sample_classes([0], 1, seed=12, block_size=2, **knobs)
    assert not torch.equal(other_seed[0], images[0])


def test_sample_outputs(pipes):
    p = pipe_of(pipes, "causal_ar")
    x = p.sample([0, 1], generator=gen(0))
    u = p.sample([0, 1], generator=gen(0), output="uint8")
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1 and x.shape == (2, 3, 16, 16)
    assert torch.equal(u, ((x + 1) * 127.5).round().to(torch.uint8))
    with pytest.raises(GenmodelsError, match="output"):
        p.sample([0], output="png")


# ----------------------------------------------------------------------------- checkpoints
def _tokenizer_file(tmp_path, tok) -> str:
    path = tmp_path / "tok.ckpt"
    torch.save({"genmodels": {"tokenizer": tok.config},
                "state_dict": {f"tokenizer.{k}": v for k, v in tok.state_dict().items()}}, path)
    return str(path)


@pytest.mark.parametrize("name,ema", [("maskgit", True), ("mar", False)])
def test_load_after_the_tokenizer_file_is_gone(tmp_path, name, ema):
    """A few training steps through GeneratorModule + Trainer, then genmodels.load with the
    tokenizer file deleted: the same images as the trained module, the tokenizer stored once."""
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader, TensorDataset

    from genmodels.training import GeneratorModule
    from genmodels.utils.config import instantiate

    src = build(name)
    tok_file = _tokenizer_file(tmp_path, src.tokenizer)
    module = GeneratorModule(generator=instantiate(src.generator.config), tokenizer_ckpt=tok_file, lr=1e-3,
                             ema_decay=0.5 if ema else None, sample_kwargs={"cfg": 2.0}, grid_per_class=1,
                             sample_block_size=2)
    data = TensorDataset(torch.rand(8, 3, 16, 16) * 2 - 1, torch.arange(8) % C)
    trainer = Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path), limit_val_batches=0)
    trainer.fit(module, DataLoader(data, batch_size=4))  # ModelCheckpoint saves at the epoch's end
    ckpt = next(tmp_path.glob("checkpoints/*.ckpt"))
    raw = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert not any(k.startswith("tokenizer.") for k in raw["state_dict"])
    assert not any(k.startswith("tokenizer.") for k in raw.get("current_model_state", {}))
    assert ema == ("current_model_state" in raw)
    assert raw["genmodels"]["tokenizer_state_dict"] and raw["genmodels"]["sample_kwargs"] == {"cfg": 2.0}

    (tmp_path / "tok.ckpt").unlink()
    pipe = genmodels.load(ckpt, ema=ema)
    assert pipe.sample_kwargs == {"cfg": 2.0}
    module.eval()
    want = module.block_sampler()(1, 0)  # module weights: the EMA ones after fit (on_train_end) with EMA
    assert torch.equal(pipe.sample_block(1, 0, seed=0, block_size=2), want)
    if ema:  # ema=False gives the raw weights, which differ from the EMA ones
        raw = genmodels.load(ckpt, ema=False).generator.state_dict()
        assert any(not torch.equal(v, raw[k]) for k, v in pipe.generator.state_dict().items())
    # `genmodels sample` over the same pipeline: the same images as sample_classes
    from genmodels.cli import main

    main(["sample", "--ckpt", str(ckpt), "--classes", "2,0", "--num", "3", "--block-size", "2", "--device", "cpu",
          "--out", str(tmp_path / "s.npz")] + ([] if ema else ["--no-ema"]))
    arr = np.load(tmp_path / "s.npz")
    images, labels = pipe.sample_classes([2, 0], 3, seed=0, block_size=2)
    np.testing.assert_array_equal(arr["arr_0"], images.permute(0, 2, 3, 1).numpy())
    assert arr["arr_1"].tolist() == labels.tolist() == [2, 2, 2, 0, 0, 0]
    main(["sample", "--ckpt", str(ckpt), "--classes", "1", "--num", "2", "--out", str(tmp_path / "g.png"),
          "--set", "cfg=1.0", "--device", "cpu"])
    assert (tmp_path / "g.png").is_file()
    with pytest.raises(SystemExit):
        main(["sample", "--ckpt", str(ckpt), "--classes", "7", "--out", str(tmp_path / "x.png"), "--device", "cpu"])


def test_load_refuses_other_files(tmp_path):
    bad = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(GenmodelsError, match="not a genmodels generator checkpoint"):
        genmodels.load(bad)


# ----------------------------------------------------------------------------- official download
class _Response(io.BytesIO):
    headers = {"Content-Length": "11"}


def test_fetch_file_caches_and_checks_the_hash(tmp_path):
    import hashlib

    calls = []

    def opener(url):
        calls.append(url)
        return _Response(b"hello world")

    dest = tmp_path / "cache" / "w.pth"
    fetch_file("https://example.invalid/w.pth", dest, progress=False, opener=opener)
    assert dest.read_bytes() == b"hello world" and len(calls) == 1
    digest = hashlib.sha256(b"hello world").hexdigest()
    assert dest.with_name("w.pth.sha256").read_text().split()[0] == digest
    fetch_file("https://example.invalid/w.pth", dest, progress=False, opener=opener)
    assert len(calls) == 1  # cached
    dest.write_bytes(b"tampered")
    with pytest.raises(GenmodelsError, match="sha256"):
        fetch_file("https://example.invalid/w.pth", dest, progress=False, opener=opener)
    other = tmp_path / "cache" / "v.pth"
    with pytest.raises(GenmodelsError, match="does not match"):
        fetch_file("https://example.invalid/v.pth", other, sha256="0" * 64, progress=False, opener=opener)
    assert not other.exists() and not other.with_name("v.pth.part").exists()
    # a file:// URL through the default opener
    src = tmp_path / "src.bin"
    src.write_bytes(b"abc")
    out = fetch_file(src.as_uri(), tmp_path / "cache" / "abc.bin", sha256=hashlib.sha256(b"abc").hexdigest(),
                     progress=False)
    assert out.read_bytes() == b"abc"


def test_from_official_names_missing_files(tmp_path):
    with pytest.raises(GenmodelsError, match="var_d16.pth"):
        genmodels.from_official("var-d16", tmp_path)
    with pytest.raises(GenmodelsError, match="known"):
        genmodels.from_official("var-d99", tmp_path)


def test_write_adm_npz_is_the_one_writer(tmp_path):
    from genmodels.utils.images import write_adm_npz

    x = torch.rand(2, 3, 4, 5) * 2 - 1
    a = np.load(write_adm_npz(tmp_path / "a.npz", x, torch.tensor([3, 4])))
    b = np.load(write_adm_npz(tmp_path / "b.npz", ((x + 1) * 127.5).round().to(torch.uint8)))
    assert a["arr_0"].shape == (2, 4, 5, 3) and a["arr_0"].dtype == np.uint8 and a["arr_1"].tolist() == [3, 4]
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    assert "arr_1" not in b


def test_generator_module_predict_follows_the_seeding_rule(pipes, tmp_path):
    """`genmodels predict`'s path (GeneratorModule.predict_step over the data module's
    (labels, indices) batches, any batch size) gives, for each class, exactly the first n
    samples of sample_classes -- the images of the grid and of the test path."""
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader, TensorDataset

    from genmodels.data.base import balanced_labels
    from genmodels.training import GeneratorModule

    p = pipe_of(pipes, "causal_ar")
    module = GeneratorModule(generator=p.generator, tokenizer=p.tokenizer, ema_decay=None, seed=4,
                             sample_kwargs={"cfg": 2.0}, sample_block_size=2)
    n = 7  # classes 0, 1, 2 get 3, 2, 2 samples
    data = TensorDataset(balanced_labels(n, C), torch.arange(n))
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(tmp_path), callbacks=[])
    out = trainer.predict(module, DataLoader(data, batch_size=3))
    images = torch.cat([o["images"] for o in out])
    labels, j = torch.cat([o["labels"] for o in out]), torch.cat([o["class_index"] for o in out])
    assert sorted(labels.tolist()) == sorted(balanced_labels(n, C).tolist())
    for c, count in ((0, 3), (1, 2), (2, 2)):
        want, _ = p.sample_classes([c], count, seed=4, block_size=2, cfg=2.0)
        got = images[labels == c][j[labels == c].argsort()]
        assert torch.equal(((got + 1) * 127.5).round().to(torch.uint8), want)
    npz = list(tmp_path.glob("**/predictions/samples_7x16x16x3.npz"))
    assert len(npz) == 1 and np.load(npz[0])["arr_1"].tolist() == labels.tolist()


# ----------------------------------------------------------------------------- sampling.py itself
def test_guidance_forms_and_schedules():
    from genmodels import sampling

    cond, uncond = torch.randn(5, 7), torch.randn(5, 7)
    ref = uncond + 2.5 * (cond - uncond)
    for form in ("uncond", "cond", "var"):
        assert torch.allclose(sampling.guide(cond, uncond, 2.5, form=form), ref, atol=1e-6)
        assert sampling.guide(cond, uncond, 1.0, form=form) is cond  # w = 1: no arithmetic at all
    assert sampling.guidance_weight(3.0, "linear", 0.0) == 1.0 and sampling.guidance_weight(3.0, "linear", 1.0) == 3.0
    assert sampling.guidance_weight(3.0, "power-cosine", 0.0) == 1.0
    assert abs(sampling.guidance_weight(3.0, "power-cosine", 1.0) - 3.0) < 1e-12
    assert sampling.from_var(cfg=1.5, top_k=900, top_p=0.96) == {"cfg": 2.5, "guidance_schedule": "linear",
                                                                  "top_k": 900, "top_p": 0.96}
    assert sampling.from_var(cfg=0.0, top_p=0.0)["top_p"] == 1.0
    assert sampling.from_titok_guidance(4.5, "linear") == {"cfg": 5.5, "guidance_schedule": "linear"}
    assert sampling.from_titok_guidance(3.0, "power-cosine") == {"cfg": 3.0, "guidance_schedule": "power-cosine"}
    with pytest.raises(GenmodelsError, match="guidance_schedule"):
        sampling.check_schedule("cosine")
    # VAR-style in-place filtering: the caller's tensor is masked (what the smoothed codes see)
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    out = sampling.filter_logits_(logits, top_k=2)
    assert out is logits and torch.isinf(logits[0, :2]).all() and torch.isfinite(logits[0, 2:]).all()


def test_from_official_var_pipeline_matches_the_official_sampler(tmp_path, monkeypatch):
    """genmodels.from_official on official-format files (the recorded VAR fixture: official VQVAE
    + VAR state dicts, written as .pth) samples the official tokens through the knob mapping."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    from genmodels import pipeline
    from genmodels.sampling import from_var

    fix = __import__("pathlib").Path(__file__).parent / "fixtures" / "var"

    def f32(d, prefix):
        return {k[len(prefix):]: (v.float() / 64 if v.dtype == torch.int8 else v) for k, v in d.items()
                if k.startswith(prefix)}

    with safe_open(str(fix / "vae.safetensors"), "pt") as f:
        vae_cfg = json.loads(f.metadata()["vae_config"])
    with safe_open(str(fix / "var_aln.safetensors"), "pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items() if k != "grid"}
    d = load_file(str(fix / "var_aln.safetensors"))
    torch.save(f32(load_file(str(fix / "vae.safetensors")), ""), tmp_path / "vae.pth")
    torch.save(f32(d, "var."), tmp_path / "var_tiny.pth")
    keep = ("num_classes", "depth", "embed_dim", "num_heads", "shared_aln", "attn_l2_norm", "patch_nums")
    monkeypatch.setitem(pipeline.OFFICIAL, "var-tiny", {
        "kind": "var", "generator_kwargs": {k: v for k, v in meta["var_config"].items() if k in keep},
        "tokenizer_kwargs": vae_cfg, "files": {"generator": ("var_tiny.pth", "https://example.invalid/v", None),
                                               "tokenizer": ("vae.pth", "https://example.invalid/t", None)}})
    pipe = genmodels.from_official("var-tiny", tmp_path)
    assert pipe.sample_kwargs == {"cfg": 2.5, "guidance_schedule": "linear", "top_k": 900, "top_p": 0.96}
    run = dict(meta["sampling"]["smooth_cfg1.5_k8_p0.9"])
    seed = run.pop("g_seed")
    toks, _ = pipe.generator.autoregressive_infer_cfg(d["labels"], generator=gen(seed), **from_var(**run))
    assert torch.equal(toks, d["sample.smooth_cfg1.5_k8_p0.9.tokens"])
    images = pipe.sample(d["labels"], generator=gen(seed), **from_var(**run))
    assert ((images + 1) / 2 - d["sample.smooth_cfg1.5_k8_p0.9.images01"]).abs().max() <= 5e-5


def test_load_reads_a_pre_convention_var_checkpoint(tmp_path, pipes):
    """An older checkpoint (tokenizer weights inside state_dict, VAR knobs in VAR's own
    spelling) loads, and its knobs are mapped (with a warning), not silently reinterpreted."""
    p = pipe_of(pipes, "var")
    sd = {**{f"generator.{k}": v for k, v in p.generator.state_dict().items()},
          **{f"tokenizer.{k}": v for k, v in p.tokenizer.state_dict().items()}}
    torch.save({"genmodels": {"generator": p.generator.config, "tokenizer": p.tokenizer.config}, "state_dict": sd,
                "hyper_parameters": {"sample_kwargs": {"cfg": 2.0, "top_p": 0.96}}}, tmp_path / "old.ckpt")
    with pytest.warns(UserWarning, match="predate"):
        pipe = genmodels.load(tmp_path / "old.ckpt")
    assert pipe.sample_kwargs == {"cfg": 3.0, "guidance_schedule": "linear", "top_k": 0, "top_p": 0.96}
    want = p.sample([1], generator=gen(0), output="uint8", **pipe.sample_kwargs)
    assert torch.equal(pipe.sample([1], generator=gen(0), output="uint8"), want)
