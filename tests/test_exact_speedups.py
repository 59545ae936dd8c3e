"""The exact-tier speed-ups of issue 17: each new code path gives what the plain one gives.

* top-p on the top-k survivors (``sampling.filter_logits_``) keeps the very same set as the
  official full-vocabulary sort, bit for bit, including ties and -inf logits;
* a KV cache with a preallocated buffer gives the same attention outputs as concatenation;
* ``Block.forward_rows`` / MAR's decoder on the used rows only equal the full outputs at
  those rows; the DiffLoss sampler with the adaLN outputs of all steps precomputed equals
  the step-by-step network evaluation.
(The official-parity tests in test_var.py / test_mar.py / test_diffloss.py run the same paths
against recorded official outputs.)
"""
from __future__ import annotations

import pytest
import torch

from genmodels import sampling
from genmodels.nn.attention import Attention, Block, KVCache
from helpers import assert_close_f32

pytestmark = pytest.mark.usefixtures("one_thread")


def official_filter_(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """VAR's official ``sample_with_top_k_top_p_`` masking (top_p in our convention, 1 = off)."""
    V = logits.shape[-1]
    if 0 < top_k < V:
        logits.masked_fill_(logits < logits.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(-1, keepdim=True),
                            -torch.inf)
    if top_p < 1:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits.masked_fill_(remove.scatter(sorted_idx.ndim - 1, sorted_idx, remove), -torch.inf)
    return logits


def _cases():
    g = torch.Generator().manual_seed(0)
    yield torch.randn(3, 17, 512, generator=g) * 3, 64, 0.9           # plain
    yield torch.randn(2, 5, 4096, generator=g) * 4, 900, 0.96         # VAR's FID setting
    yield torch.randn(4, 300, generator=g), 1, 0.5                    # k = 1
    yield torch.randn(4, 300, generator=g) * 10, 299, 0.2             # k = V - 1
    yield torch.randint(-3, 4, (6, 200), generator=g).float(), 50, 0.7  # many ties (fallback)
    x = torch.randn(5, 256, generator=g)
    x[:, :250] = -torch.inf                                           # fewer finite logits than k
    yield x, 16, 0.9
    x = torch.randn(3, 128, generator=g)
    x[0, 5] = x[0, 7] = x[0].max() + 1                                # tied top entries
    yield x, 8, 0.3
    yield torch.randn(2, 3, 1000, generator=g) * 0.01, 100, 0.999     # nearly flat: top-p keeps almost all
    # bfloat16 logits (the bf16 tier): ties at the k-th value in most rows, different survivor counts
    yield (torch.randn(4, 16, 4096, generator=g) * 4).bfloat16().float(), 900, 0.96
    x = torch.randn(6, 500, generator=g)
    x[0, :40] = 2.5                                                   # 40 tied at the k-th (k = 20) in one row only
    yield x, 20, 0.8
    yield (torch.randn(3, 2000, generator=g) * 0.3).bfloat16().float(), 50, 0.5  # widened, then top-p splits ties


@pytest.mark.parametrize("case", range(11))
def test_top_p_on_top_k_is_the_official_full_sort(case):
    logits, k, p = list(_cases())[case]
    want = official_filter_(logits.clone(), k, p)
    got = sampling.filter_logits_(logits.clone(), k, p)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.equal(got, want)


def test_top_p_on_top_k_takes_the_short_path_and_the_same_draws():
    """Random logits (the sampler's case) go through the survivors-only path, and the draws of
    ``sample_categorical`` are the same as after the official masking."""
    g = torch.Generator().manual_seed(1)
    taken = []
    orig = sampling._top_p_of_top_k_

    def spy(*a, **k):
        taken.append(orig(*a, **k))
        return taken[-1]

    sampling._top_p_of_top_k_ = spy
    try:
        for _ in range(20):
            logits = torch.randn(4, 64, 4096, generator=g) * 3
            want = official_filter_(logits.clone(), 900, 0.96)
            got = sampling.filter_logits_(logits.clone(), 900, 0.96)
            assert torch.equal(got, want)
            a = sampling.sample_categorical(got, torch.Generator().manual_seed(3))
            b = sampling.sample_categorical(want, torch.Generator().manual_seed(3))
            assert torch.equal(a, b)
    finally:
        sampling._top_p_of_top_k_ = orig
    assert all(bool(t.all()) for t in taken) and len(taken) == 20


@pytest.mark.parametrize("case", range(11))
def test_candidates_cover_the_survivors_and_the_draw_is_torch_multinomial(case):
    """``filter_logits_with_candidates_`` filters as ``filter_logits_`` and its ids cover every
    survivor; ``multinomial_one`` at those ids draws what ``torch.multinomial`` draws (the
    official VAR / MAR-CE draw) and leaves the generator in the same state, seed after seed."""
    logits, k, p = list(_cases())[case]
    for top_p in (p, 1.0):  # top-k + top-p, top-k alone
        want = official_filter_(logits.clone(), k, top_p)
        got, cand = sampling.filter_logits_with_candidates_(logits.clone(), k, top_p)
        assert torch.equal(got, want)
        V = logits.shape[-1]
        probs = got.softmax(-1).reshape(-1, V)
        if cand is not None:
            finite = torch.isfinite(got).reshape(-1, V)
            assert torch.equal(finite.gather(1, cand).sum(-1), finite.sum(-1))
        elif top_p == 1.0 and case not in (4, 8, 9, 10):  # ties at the k-th value: survivors past the k ids
            raise AssertionError(f"case {case}: no candidates without ties")
        for seed in range(3):
            g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
            a = torch.multinomial(probs, 1, replacement=True, generator=g1).view(-1)
            assert torch.equal(sampling.multinomial_one(probs, g2, cand), a)
            assert torch.equal(g1.get_state(), g2.get_state())


def test_candidate_draw_in_chunks_is_torch_multinomial():
    """VAR's last-scale size: 4 x 256 rows of 4,096 (several 8 MB chunks of random bits), with
    the candidates from the filter, and the fallback when the first-use probe fails."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 256, 4096, generator=g) * 3
    got, cand = sampling.filter_logits_with_candidates_(logits, 900, 0.96)
    assert cand is not None and cand.shape == (1024, 900)
    probs = got.softmax(-1).view(-1, 4096)
    for probe in (True, False):
        sampling._EXACT_DRAW["cpu"] = probe
        try:
            g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
            a = torch.multinomial(probs, 1, replacement=True, generator=g1).view(-1)
            assert torch.equal(sampling.multinomial_one(probs, g2, cand), a)
            assert torch.equal(g1.get_state(), g2.get_state())
        finally:
            sampling._EXACT_DRAW.pop("cpu")
    assert sampling._exact_draw_ok()  # this torch: the probe finds the draw equal
    with pytest.raises(RuntimeError, match="probability tensor"):  # torch's own error for bad probabilities
        sampling.multinomial_one(probs.clone().fill_(float("nan")), g, cand)


def test_kv_cache_buffer_equals_concatenation():
    torch.manual_seed(0)
    attn = Attention(64, 4, qkv_bias="qv", qk_norm="l2").eval()
    grow, buf = KVCache(), KVCache(capacity=30)
    with torch.no_grad():
        for T in (1, 4, 9, 16):
            x = torch.randn(2, T, 64)
            assert torch.equal(attn(x, cache=grow), attn(x, cache=buf))
    assert len(buf) == len(grow) == 30
    with pytest.raises(ValueError, match="capacity"):
        buf.append(*(torch.zeros(2, 4, 1, 16),) * 2)


def test_block_forward_rows_equals_full_rows():
    torch.manual_seed(0)
    blk = Block(64, 4).eval()
    x = torch.randn(3, 20, 64)
    rows = torch.zeros(3, 20, dtype=torch.bool)
    for b, idx in enumerate(([1, 5, 19], [0, 2, 3], [7, 8, 9])):
        rows[b, idx] = True
    with torch.no_grad():
        full = blk(x)[rows].view(3, 3, 64)
        part = blk.forward_rows(x, rows)
    assert_close_f32(part, full, what="forward_rows")


def test_mar_decoder_rows_and_sampling():
    from genmodels.generators.mar import MAR

    torch.manual_seed(0)
    m = MAR(token_shape=(4, 4), token_channels=4, num_classes=3, encoder_embed_dim=32, encoder_depth=1,
            encoder_num_heads=2, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2, buffer_size=2,
            diffloss_d=1, diffloss_w=32, num_sampling_steps="4", attn_dropout=0.0, proj_dropout=0.0).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    tokens = torch.randn(2, 16, 4)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, :10] = mask[1, 6:] = True
    rows = mask.clone()
    rows[0, :4] = rows[1, 6:10] = False
    with torch.no_grad():
        enc = m.forward_mae_encoder(tokens, mask, m.class_embedding(torch.tensor([0, 3])))
        full = m.forward_mae_decoder(enc, mask)
        assert_close_f32(m.forward_mae_decoder(enc, mask, rows=rows), full[rows], what="decoder z[rows]")
        uneven = rows.clone()
        uneven[0, 5] = False  # different counts per sample: the full path, same values
        assert torch.equal(m.forward_mae_decoder(enc, mask, rows=uneven), full[uneven])
    # the training loss sees the same z (same masks, t and noise draws)
    m.train()
    m.label_drop_prob = 0.0
    torch.manual_seed(5)
    a = m.forward_loss(tokens, torch.tensor([0, 1]), mask=mask)["loss"]
    z = m.forward_mae_decoder(m.forward_mae_encoder(tokens, mask, m.class_embedding(torch.tensor([0, 1]))), mask)
    torch.manual_seed(5)
    b = m.token_loss(z[mask], tokens[mask])["loss"]
    assert_close_f32(a, b, what="training loss")


def _stepwise_sample(dl, z, temperature, cfg, noise, step_noises):
    """DiffLoss sampling with the network evaluated step by step (the plain algorithm)."""
    d = dl.gen_diffusion
    guided = cfg != 1.0
    n, C = noise.shape[0], dl.in_channels
    x = noise
    for k, i in enumerate(reversed(range(d.num_timesteps))):
        t = torch.full((z.shape[0],), int(d.timestep_map[i]))
        out = dl.net(torch.cat([x, x]) if guided else x, t, z)
        eps = sampling.guide(out[:n, :C], out[n:, :C], cfg) if guided else out[:, :C]
        mean, logvar, _ = d.p_mean_variance(eps, out[:n, C:], x, i)
        x = mean + torch.exp(0.5 * logvar) * step_noises[k] * temperature if i > 0 else mean
    return x


@pytest.mark.parametrize("cfg", [1.0, 2.5])
@pytest.mark.parametrize("chunk", [1 << 24, 1])
def test_diffloss_batched_modulations_equal_stepwise(cfg, chunk, monkeypatch):
    from genmodels.losses.diffusion import DiffLoss

    torch.manual_seed(0)
    dl = DiffLoss(target_channels=4, z_channels=8, depth=2, width=32, num_sampling_steps="10").eval()
    for p in dl.parameters():
        torch.nn.init.normal_(p, std=0.2)
    monkeypatch.setattr(DiffLoss, "MOD_CHUNK", chunk)  # all steps at once, or one step per matmul
    n = 6
    z = torch.randn(2 * n if cfg != 1 else n, 8)
    noise = torch.randn(n, 4)
    steps = [torch.randn(n, 4) for _ in range(10)]
    with torch.no_grad():
        got = dl.sample(z, 0.9, cfg, noise=noise, step_noises=steps)
        want = _stepwise_sample(dl, z, 0.9, cfg, noise, steps)
    assert_close_f32(got, want, what="DiffLoss sample")


def test_adamw_is_fused_on_cpu_unless_mixed_precision_and_steps_like_the_plain_one():
    from types import SimpleNamespace

    from genmodels.training.common import adamw

    torch.manual_seed(0)
    a, b = torch.nn.Linear(6, 5), torch.nn.Linear(6, 5)
    b.load_state_dict(a.state_dict())
    fused = adamw([{"params": list(a.parameters()), "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95))
    plain = torch.optim.AdamW([{"params": list(b.parameters()), "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95))
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    for _ in range(3):
        x = torch.randn(4, 6)
        for m, o in ((a, fused), (b, plain)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert_close_f32(p, q, what="fused AdamW parameters")
    mixed = adamw(a.parameters(), SimpleNamespace(precision="bf16-mixed"), lr=1e-3)
    assert not mixed.defaults["fused"]  # Lightning refuses clipping with self-unscaling optimizers there


@pytest.mark.parametrize("ends,tail", [((1, 5, 14, 30, 55, 91, 155, 255, 424, 680), 2), ((1, 5, 14, 30, 66, 130), 2),
                                       ((1, 5, 14), 5), ((4,), 2), ((1, 5, 14, 30), 0)])
def test_scale_causal_mask_equals_the_dense_block_causal_mask(ends, tail):
    """VAR's training attention by scale boundaries == SDPA with the dense (L, L) mask:
    outputs and the gradients of q, k, v (float32 tolerance)."""
    from genmodels.nn.attention import ScaleCausalMask

    m = ScaleCausalMask(ends, tail)
    L = ends[-1]
    lvl = torch.cat([torch.full((b - a,), i) for i, (a, b) in enumerate(zip((0,) + ends, ends))])
    assert torch.equal(m.dense(), lvl[:, None] >= lvl[None, :])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, L, 8, generator=g) for _ in range(3))
    grad = torch.randn(2, 3, L, 8, generator=g)
    outs = []
    for split in (True, False):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        o = (m.attend(qq, kk, vv, scale=0.3) if split else
             torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=m.dense(), scale=0.3))
        o.backward(grad)
        outs.append((o.detach(), qq.grad, kk.grad, vv.grad))
    for a, b, what in zip(outs[0], outs[1], ("out", "dq", "dk", "dv")):
        assert_close_f32(a, b, what=what)
    att = Attention(24, 3, qkv_bias="qv", qk_norm="l2").eval()
    x = torch.randn(2, L, 24, generator=g)
    assert_close_f32(att(x, m), att(x, m.dense()), what="Attention with a ScaleCausalMask")
    with pytest.raises(ValueError, match="no cache"):
        att(x, m, cache=KVCache())


def test_bf16_logits_with_ties_at_the_kth_value_take_the_short_path():
    """Tied k-th values (bfloat16 logits) widen the candidate set instead of sorting every row;
    only rows whose top-p threshold splits tied survivors (~3/4 here: their result is the
    sort's tie order) are sorted."""
    g = torch.Generator().manual_seed(2)
    taken = []
    orig = sampling._top_p_of_top_k_

    def spy(*a, **k):
        ok = orig(*a, **k)
        taken.append(float(ok.float().mean()))
        return ok

    sampling._top_p_of_top_k_ = spy
    try:
        for _ in range(5):
            logits = (torch.randn(4, 64, 4096, generator=g) * 3).bfloat16().float()
            vals = logits.topk(901, dim=-1)[0]
            assert bool((vals[..., 899] == vals[..., 900]).any())  # the case at hand
            assert torch.equal(sampling.filter_logits_(logits.clone(), 900, 0.96), official_filter_(logits.clone(), 900, 0.96))
    finally:
        sampling._top_p_of_top_k_ = orig
    assert min(taken) > 0.1, taken  # those rows decided without a sort (was: none)


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_mlp_fused_fc1_gelu_equals_the_two_step_path(approximate):
    from genmodels.nn import attention
    if not attention._ONEDNN_LINEAR_POINTWISE:
        pytest.skip("this torch build has no oneDNN linear_pointwise")
    torch.manual_seed(0)
    mlp = attention.Mlp(64, 256, drop=0.1, approximate=approximate).eval()
    x = torch.randn(3, 11, 64)
    with torch.no_grad():
        assert attention._fuse_linear_act(x, mlp.fc1, mlp.training)  # the fused path is the one taken
        fused = mlp(x)
        plain = mlp.fc2(mlp.act(mlp.fc1(x)))
        assert_close_f32(fused, plain, what=f"fused fc1 + GELU({approximate})")
        assert_close_f32(mlp(x[:, ::2]), plain[:, ::2], what="strided input")
        # training mode (dropout) and autocast take the plain path
        assert not attention._fuse_linear_act(x, mlp.fc1, True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not attention._fuse_linear_act(x, mlp.fc1, False)
    assert not attention._fuse_linear_act(x, mlp.fc1, False)  # autograd on: gradients need the plain ops


def test_inference_decode_in_channels_last_chunks_equals_the_autograd_path():
    from genmodels.nn.conv import Decoder
    torch.manual_seed(0)
    dec = Decoder(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, attn_levels=(2,)).eval()
    z = torch.randn(5, 4, 8, 8)
    ref = dec(z)  # autograd on: the plain NCHW path on the whole batch
    old = Decoder.INFERENCE_CHUNK_BYTES
    try:
        Decoder.INFERENCE_CHUNK_BYTES = 2 * 32 * 32 * 32 * 4  # two samples per chunk: 3 chunks
        with torch.no_grad():
            out = dec(z)
    finally:
        Decoder.INFERENCE_CHUNK_BYTES = old
    assert out.is_contiguous() and out.shape == ref.shape
    assert_close_f32(out, ref.detach(), rtol=1e-4, what="channels-last chunked decode")


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_generator_training_uses_fused_adamw_and_still_clips(tmp_path, precision):
    """The trainer's AdamW is fused on the CPU in float32 and in bf16-mixed (no loss scaler, so
    Lightning's refusal to clip with self-unscaling optimizers does not apply: the module clips
    with Lightning's base clipping); the clipped gradient norm is the clip value."""
    import lightning
    from torch.utils.data import DataLoader, TensorDataset

    from genmodels.generators.mar import MAR
    from genmodels.training import GeneratorModule
    from helpers import tiny_kl

    torch.manual_seed(0)
    gen = MAR(token_shape=(8, 8), token_channels=4, num_classes=10, encoder_embed_dim=32, encoder_depth=1,
              encoder_num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, buffer_size=2,
              diffloss_d=1, diffloss_w=32)
    module = GeneratorModule(gen, tokenizer=tiny_kl(), ema_decay=None, lr=1e-3)
    norms = []

    class Norms(lightning.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):  # after clipping and the step
            grads = [p.grad for p in pl_module.generator.parameters() if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
            assert trainer.optimizers[0].defaults["fused"]

    data = DataLoader(TensorDataset(torch.rand(8, 3, 16, 16) * 2 - 1, torch.arange(8) % 10), batch_size=4)
    trainer = lightning.Trainer(accelerator="cpu", precision=precision, gradient_clip_val=1e-3, max_steps=2,
                                logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, default_root_dir=tmp_path, callbacks=[Norms()])
    trainer.fit(module, data)
    assert len(norms) == 2 and all(abs(n - 1e-3) < 1e-5 for n in norms)


def test_l2_normalize_backward_is_autograd_of_f_normalize():
    """The hand-written backward of ``l2_normalize`` (VAR's q / k in training) equals autograd
    through ``F.normalize(x) * s`` (float64 gradcheck, and a zero row: the eps clamp); the
    forward is the same floats."""
    from genmodels.nn.attention import l2_normalize

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    s = torch.randn(1, 3, 1, 1, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: l2_normalize(a, b), (x, s))
    x = x.detach().clone()
    x[0, 1, 2] = 0.0  # a zero row: F.normalize's clamp at eps (finite differences cannot check it)
    x.requires_grad_(True)
    go = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=g)
    want = torch.autograd.grad((torch.nn.functional.normalize(x, dim=-1) * s).mul(go).sum(), (x, s))
    got = torch.autograd.grad(l2_normalize(x, s).mul(go).sum(), (x, s))
    for a, b in zip(got, want):
        assert_close_f32(a.float(), b.float(), rtol=1e-6)
    xf = x.detach().float().requires_grad_(True)
    assert torch.equal(l2_normalize(xf, s.detach().float()), torch.nn.functional.normalize(xf, dim=-1) * s.detach().float())


@pytest.mark.parametrize("lens,used", [((3, 7, 10), (0, 1, 2)), ((10, 3), (1,)), ((4, 10, 10), (0, 2)), ((10,), (0,))])
def test_prefix_views_have_the_gradients_of_slices(lens, used):
    """``prefixes`` (one gradient buffer for x[:, :, :n] over several n) == plain slices:
    the same gradient of x, also when some views get no gradient, and the same views."""
    from genmodels.nn.attention import prefixes

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 10, 4, generator=g)
    w = [torch.randn(2, 3, n, 4, generator=g) for n in lens]
    grads = []
    for fn in (prefixes, lambda t, ns: tuple(t[:, :, :n] for n in ns)):
        xx = x.clone().requires_grad_()
        views = fn(xx, lens)
        assert all(torch.equal(v, x[:, :, :n]) for v, n in zip(views, lens))
        sum((views[i] * w[i]).sum() for i in used).backward()
        grads.append(xx.grad)
    assert_close_f32(grads[0], grads[1], what="d x")


@pytest.mark.parametrize("shape,bias", [((32, 512), True), ((2, 9, 48), True), ((8, 64), False)])
def test_linear_on_transposed_weights_is_f_linear(shape, bias):
    """``nn.linear.linear_t`` on ``transposed`` copies == F.linear within the float32 tolerance
    (MKL may sum in another order for the other layout), for 2-D and 3-D inputs, with and
    without a bias."""
    import torch.nn.functional as F
    from genmodels.nn.linear import linear_t, transposed

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(shape[-1], 40, bias=bias)
    x = torch.randn(*shape, generator=g)
    (w_t, b), = transposed([lin])
    assert w_t.is_contiguous() and w_t.shape == (shape[-1], 40)
    with torch.no_grad():
        assert_close_f32(linear_t(x, w_t, b), F.linear(x, lin.weight, lin.bias), what="linear_t")


def test_transposed_linears_path_only_where_it_pays_and_gives_the_same_diffloss_samples(monkeypatch):
    """DiffLoss sampling takes the transposed-weight path at 8-128 float32 CPU rows without
    autograd, and samples the same tokens as the module path (cfg 3 and none)."""
    from genmodels.losses import diffusion as D
    from genmodels.nn.linear import pays_off

    w = torch.zeros(4, 4)
    with torch.no_grad():
        assert pays_off(8, w) and pays_off(128, w)
        assert not pays_off(4, w) and not pays_off(200, w) and not pays_off(32, w.bfloat16())
    assert not pays_off(32, w)  # autograd on
    torch.manual_seed(0)
    dl = D.DiffLoss(4, 16, depth=2, width=32, num_sampling_steps="10").eval()
    for p in dl.parameters():
        torch.nn.init.normal_(p, std=0.3)
    z = torch.randn(12, 16)
    taken = []
    real = D.linear_t
    monkeypatch.setattr(D, "linear_t", lambda *a: taken.append(1) or real(*a))
    for cfg in (3.0, 1.0):
        outs = []
        for path in (True, False):
            monkeypatch.setattr(D, "pays_off", lambda rows, weight: path)
            taken.clear()
            outs.append(dl.sample(z, 1.0, cfg, generator=torch.Generator().manual_seed(1)))
            assert bool(taken) == path
        assert_close_f32(outs[0], outs[1], what=f"DiffLoss samples, cfg {cfg}")
