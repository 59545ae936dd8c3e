"""The bf16 tier of issue 17 (``genmodels.precision``): a sampling copy whose trunk and decoder
hold bfloat16 weights while embeddings, head, logits and draws stay float32."""
from __future__ import annotations

import pytest
import torch
from helpers import tiny_var

from genmodels import sampling
from genmodels.errors import GenmodelsError
from genmodels.evaluation.evaluator import Evaluator
from genmodels.generators.var import VAR
from genmodels.pipeline import Pipeline
from genmodels.precision import bf16_for_sampling

pytestmark = pytest.mark.usefixtures("one_thread")

PN = (1, 2, 3, 4)
BF16_EPS = 2.0 ** -8  # bfloat16 keeps 8 significant bits


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(*tiny_var(PN))


def test_copy_casts_the_trunk_and_decoder_only_and_leaves_the_original(pipe):
    before = {k: v.clone() for k, v in pipe.generator.state_dict().items()}
    fast = pipe.bf16()
    var, vae = fast.generator, fast.tokenizer
    assert var.tokenizer is vae  # the copy is bound to the copied tokenizer
    assert var.trunk_dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in var.blocks.parameters())
    for name in ("head", "head_nm", "class_emb", "word_embed", "shared_ada_lin"):
        assert all(p.dtype == torch.float32 for p in getattr(var, name).parameters()), name
    assert vae.decoder.conv_in.weight.dtype == torch.bfloat16 and vae.quantize.embedding.weight.dtype == torch.float32
    assert pipe.generator.trunk_dtype == torch.float32 and pipe.tokenizer.decoder.conv_in.weight.dtype == torch.float32
    for k, v in pipe.generator.state_dict().items():
        assert torch.equal(v, before[k]), k


def _teacher_forced_logits(var: VAR, labels: torch.Tensor, tokens: torch.Tensor, monkeypatch) -> list[torch.Tensor]:
    """The filtered logits the sampler draws from at every scale, with every scale's codes forced
    to ``tokens`` (editing with an empty mask), so two samplers walk the same path."""
    seen: list[torch.Tensor] = []
    real = sampling.sample_categorical

    def spy(logits, generator=None, **kw):
        seen.append(logits.clone())
        return real(logits, generator, **kw)
    monkeypatch.setattr(sampling, "sample_categorical", spy)
    var.autoregressive_infer_cfg(labels, cfg=2.5, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(0),
                                 known=(tokens, torch.zeros_like(tokens, dtype=torch.bool)))
    monkeypatch.undo()
    return seen


def test_bf16_logits_follow_float32_within_bf16_rounding(pipe, monkeypatch):
    labels = torch.tensor([0, 3, 4])
    tokens = pipe.generator.sample(labels, cfg=2.5, generator=torch.Generator().manual_seed(1))
    ref = _teacher_forced_logits(pipe.generator, labels, tokens, monkeypatch)
    got = _teacher_forced_logits(pipe.bf16().generator, labels, tokens, monkeypatch)
    assert len(ref) == len(got) == len(PN)
    for a, b in zip(ref, got):
        assert b.dtype == torch.float32  # the head and the filters run in float32
        keep = torch.isfinite(a) & torch.isfinite(b)  # top-k / top-p masks may differ at their boundary
        assert keep.float().mean() > 0.2
        scale = a[keep].abs().max()
        # two bf16 blocks: a few roundings of 2^-8 relative to the logits' magnitude
        assert (a[keep] - b[keep]).abs().max() <= 8 * BF16_EPS * scale  # measured: 1.1-1.8
        assert (a[keep] - b[keep]).abs().max() > 0  # it did run in bfloat16


def test_bf16_copy_cast_back_to_float32_is_the_exact_sampler(pipe):
    fast = pipe.bf16()
    for name in ("generator.blocks", "tokenizer.decoder", "tokenizer.post_quant_conv"):
        obj, attr = name.split(".")
        mine, orig = getattr(getattr(fast, obj), attr), getattr(getattr(pipe, obj), attr)
        mine.float().load_state_dict(orig.state_dict())  # the float32 weights back (bf16 -> fp32 loses bits)
    kw = dict(cfg=2.5, top_k=20, top_p=0.9)
    a = pipe.sample([1, 2], generator=torch.Generator().manual_seed(3), **kw)
    b = fast.sample([1, 2], generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a, b)  # the seams (casts to trunk_dtype) are no-ops in float32


def test_bf16_samples_are_images(pipe):
    for prune in (None, (0.5,)):
        imgs = pipe.bf16().sample([0, 1, 2], generator=torch.Generator().manual_seed(0), output="uint8", cfg=2.0,
                                  fastvar_prune=prune)
        ref = pipe.sample([0, 1, 2], generator=torch.Generator().manual_seed(0), output="uint8", cfg=2.0)
        assert imgs.dtype == torch.uint8 and imgs.shape == ref.shape
        assert imgs.float().std() > 0


def test_precision_knobs_are_checked(pipe):
    with pytest.raises(GenmodelsError, match="evaluator.precision"):
        Evaluator(precision="fp16")
    with pytest.raises(GenmodelsError, match="not both"):
        Evaluator(precision="bf16", autocast="bf16")
    with pytest.raises(GenmodelsError, match="no bf16 sampling path"):
        bf16_for_sampling(torch.nn.Linear(2, 2))


def test_mar_bf16_tier_follows_float32():
    from genmodels.generators.mar import MAR
    torch.manual_seed(0)
    mar = MAR(token_shape=(4, 4), token_channels=4, num_classes=3, encoder_embed_dim=32, encoder_depth=1,
              encoder_num_heads=2, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2, buffer_size=2,
              diffloss_d=2, diffloss_w=32, num_sampling_steps="8", attn_dropout=0.0, proj_dropout=0.0).eval()
    with torch.no_grad():  # random weights everywhere (the zero-initialised DiffLoss output would ignore z)
        for p in mar.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.1)
    fast = bf16_for_sampling(mar)
    assert all(p.dtype == torch.bfloat16 for m in (fast.encoder_blocks, fast.decoder_blocks, fast.diffloss.net)
               for p in m.parameters())
    assert fast.class_emb.weight.dtype == fast.z_proj.weight.dtype == torch.float32
    assert mar.diffloss.net.input_proj.weight.dtype == torch.float32  # the original is untouched
    labels = torch.tensor([0, 1, 2, 3])
    for cfg in (1.0, 3.0):
        kw = dict(cfg=cfg, num_steps=3)
        a = mar.sample(labels, generator=torch.Generator().manual_seed(0), **kw)
        b = fast.sample(labels, generator=torch.Generator().manual_seed(0), **kw)
        assert b.dtype == torch.float32 and b.shape == a.shape
        rel = float((a - b).abs().max() / a.abs().max())
        assert 0 < rel < 16 * BF16_EPS  # measured 1.3 (cfg 1) and 2.7 (cfg 3) bf16 epsilons


def test_generator_module_block_sampler_takes_the_bf16_tier(pipe):
    from genmodels.training import GeneratorModule

    module = GeneratorModule(generator=pipe.generator, tokenizer=pipe.tokenizer, ema_decay=None,
                             sample_kwargs={"cfg": 2.0}, sample_block_size=3)
    fast = module.block_sampler(seed=0, precision="bf16")
    plain = module.block_sampler(seed=0)
    a, b = plain(1, 0), fast(1, 0)
    assert a.dtype == b.dtype == torch.uint8 and a.shape == b.shape == (3, 3, 64, 64)
    assert not torch.equal(a, b)  # bf16 rounding moves some pixels
    assert (a.float() - b.float()).abs().mean() < 8  # but the same images, mostly
    assert module.generator.trunk_dtype == torch.float32  # the module's own weights stay float32
