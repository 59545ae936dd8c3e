"""Ours against the official code, exact tier: VAR and MAR sampling and training steps on CPU.

One harness for issue 17's table. Each measure builds both sides from ONE random state dict
(the official model is built and initialised, its state dict is loaded into ours), runs a
warm-up of each, then ``--repeats`` interleaved pairs (the side that goes first alternates),
and records per run the process CPU time (``time.process_time``: user + system of all
threads, robust against other jobs on a shared machine) and the wall time. It reports the
median CPU time of each side, the median of the per-pair ratios official / ours (> 1: ours is
faster) and their spread (min..max), at every ``--threads`` setting, with the machine's load
average before and after, and which levers are on (``LEVERS``: all are in the default code
path, the exact tier).

Measures (issue 17's table; small configs so that a run takes minutes on 2 shared cores):

* ``var_sample``: VAR d8 (41M) at 256 px scales, B=4, official knobs cfg 1.5, top-k 900,
  top-p 0.96 (``sampling.from_var``), incl. the VQ-VAE decode (ch 32); the tokens of both
  sides are compared once (the official sampler's draws recorded by wrapping its
  ``sample_with_top_k_top_p_``).
* ``var_train``: VAR d8 training step, B=2: teacher-forcing input, forward, token-mean CE, backward.
* ``mar_sample*``: MAR 4+4 blocks x 512 + DiffLoss 3 x 512, 16 x 16 tokens, 16 AR steps x 50
  diffusion steps; B=1 with cfg 3 (linear) and without; ``--mar-big-batch`` B (default 64) with
  cfg 3 and without at a size that keeps the run short (4 x 4 tokens, buffer 16, 4 AR steps x 50
  diffusion steps: 2,048 DiffLoss rows per step with guidance).
* ``mar_train``: MAR training step, B=4 (same masks on both sides: the official masks are drawn
  from numpy's seeded RNG and handed to ours), forward + backward + AdamW step.

``--profile`` adds the top ops (torch.profiler, self CPU time) of our VAR and MAR samplers;
run once with ``PYTHONPATH`` pointing at the code before the speed-ups and ``--profile-only
--label before`` to record the "before" profile that ``speed.md`` shows beside "after".

The official MAR needs timm 0.9.x importable (``pip install --target DIR timm==0.9.16
--no-deps`` and add DIR to ``PYTHONPATH``); torchvision is stubbed as in
``scripts/record_fixtures/mar.py``. Usage::

    PYTHONPATH=$PWD:/tmp/timm python benchmarks/speed.py --official-var /tmp/official/VAR \\
        --official-mar /tmp/official/mar --threads 1 2 --repeats 5 --profile \\
        --out benchmarks/results/speed.json --md benchmarks/results/speed.md
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import types
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

PN_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)

#: the exact-tier levers in the default code path (same tokens, float32 within parity tolerance)
LEVERS = {
    "top_p_on_top_k": "top-p found among the top-k survivors, no sort of the vocabulary (sampling.filter_logits_)",
    "no_copy_draw": "sampling.sample_categorical copies the logits only when it filters them",
    "var_adaln_once": "VAR: block and head AdaLN vectors once per sample, not once per scale",
    "var_static_kv": "VAR: one preallocated KV buffer per block, filled scale by scale (KVCache(capacity))",
    "var_guided_head_input": "VAR: guidance applied to the (affine) head's input: head matmul on B rows, not 2B",
    "decoder_batch_chunks": "conv Decoder without autograd in batch chunks (<= 16 MB activations): heap reuse, "
                            "not an mmap + page faults per layer",
    "mar_last_block_rows": "MAR: last decoder block + norm only on the tokens whose z is used (sampling, training)",
    "diffloss_adaln_batched": "DiffLoss sampling: the adaLN outputs of all steps in one matmul (steps x rows)",
    "diffloss_embeddings_once": "DiffLoss sampling: condition embedding once, time embeddings of all steps at once",
    "cpu_dropout_pcg64": "dropout masks (nn.dropout) from numpy's PCG64 bits, not torch's CPU bernoulli_ "
                         "(MAR: dropout 0.1 on attention weights, projections, MLP)",
    "diffloss_train_embed_once": "DiffLoss training: z embedded once per token, not per diffusion_batch_mul copy; "
                                 "time embedding once per distinct t",
    "var_scale_causal_attention": "VAR training: block-causal attention by scale boundaries (nn.attention."
                                  "ScaleCausalMask): the last two scales mask-free, a third fewer scores",
    "fused_adamw_cpu": "training: AdamW fused on the CPU (training.common.adamw; the trainer's optimizer)",
    "mlp_fused_fc1_gelu": "CPU inference: an MLP's fc1 and its GELU in one oneDNN call (torch.ops.mkldnn."
                          "_linear_pointwise; nn.attention.Mlp): no second pass over the hidden activations",
    "decoder_channels_last": "conv Decoder without autograd on the CPU: channels-last activations (oneDNN's 3x3 "
                             "convolutions at 32-128 channels ~2x faster than on NCHW)",
    "diffloss_adaln_chunk_8mb": "DiffLoss sampling: the batched adaLN outputs in chunks of <= 8 MB (larger ones "
                                "are fresh mmaps: page faults on every call; 64 MB chunks cost ~0.9 s at batch 64)",
    "diffloss_adaln_weights_once": "DiffLoss sampling: the adaLN weights concatenated once per sample call (11.5 MB "
                                   "at 3 x 512), not once per chunk of steps (~3.5 ms each; ~0.5 s of MAR batch 1)",
    "l2_normalize_backward": "VAR training: q / k l2-normalisation with a hand-written backward (nn.attention."
                             "l2_normalize; the forward is F.normalize's ops): ~1 % of the step",
    "accuracy_by_amax": "VAR training metrics: token accuracy as target logit >= row max (amax + gather), not "
                        "argmax (~10x its cost on the CPU)",
    "diffloss_transposed_linears": "DiffLoss sampling at 8-128 rows on the CPU: the step's linears as addmm on "
                                   "(in, out)-contiguous weight copies made once per call (nn.linear): MKL 1.2-2x "
                                   "faster there than on F.linear's transposed weight (benchmarks/results/"
                                   "linear_layout.md), F.linear's floats up to float32 rounding (bitwise at the "
                                   "512-wide MLP's 16-128 rows); DiffLoss part of MAR batch 1 with guidance: "
                                   "3.29 -> 3.01 s",
    "var_attention_grad_buffers": "VAR training: the block-causal attention's query blocks as a split of q and "
                                  "its key / value prefixes as views with one gradient buffer (nn.attention."
                                  "prefixes), not slices whose backward zero-fills a full-size gradient each and "
                                  "adds them; its outputs written as (B, L, H, d) in the cat (no transpose copy); "
                                  "the l2 backward's eps case masked on row sums, not by a where over the gradient "
                                  "(paired A/B, 15 pairs: 1.063 -> 1.10 of the official step)",
    "multinomial_at_candidates": "CPU draw (sampling.multinomial_one): torch.multinomial's exponential race with "
                                 "the same 64-bit random numbers (random_, the same stream) and the double log1p "
                                 "only at the top-k ids, not at all 4,096: the same ids and generator state",
}


# ----------------------------------------------------------------------------- roofline
def _linear_pointwise_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    rows = 1
    for d in x_shape[:-1]:
        rows *= d
    return 2 * rows * w_shape[0] * w_shape[1]


def count_flops(fn) -> int:
    """Matmul / conv / attention FLOPs of one call (torch.utils.flop_counter; the fused oneDNN
    linear + activation counted as its matmul)."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        mapping[torch.ops.mkldnn._linear_pointwise] = _linear_pointwise_flops  # keyed by the overload packet
    with FlopCounterMode(display=False, custom_mapping=mapping) as fc:
        fn()
    return int(fc.get_total_flops())


def sgemm_peak(repeats: int = 10) -> float:
    """FLOP/s (per CPU-second) of a float32 (2048 x 512) @ (512 x 2048) matmul at the current
    thread count: the matmul speed both sides' linear layers can reach on this machine."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2048, 512, generator=g), torch.randn(512, 2048, generator=g)
    a @ b
    t = time.process_time()
    for _ in range(repeats):
        a @ b
    return 2 * 2048 * 512 * 2048 * repeats / (time.process_time() - t)


def roofline(r: dict, official, ours) -> dict:
    """Adds FLOPs of both sides, the sgemm peak and ``ceiling``: the official CPU time over the
    time our FLOPs take at that peak, i.e. the largest ratio an implementation of our FLOPs could
    reach in float32 if every FLOP ran at matmul peak and nothing else cost time."""
    fo, fu, peak = count_flops(official), count_flops(ours), sgemm_peak()
    r.update(official_gflop=fo / 1e9, ours_gflop=fu / 1e9, peak_gflops=peak / 1e9,
             official_achieved_gflops=fo / r["official_cpu_s"] / 1e9, ours_achieved_gflops=fu / r["ours_cpu_s"] / 1e9,
             ceiling=r["official_cpu_s"] / (fu / peak))
    return r


# ----------------------------------------------------------------------------- timing
def run_timed(fn) -> tuple[float, float]:
    c, w = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c, time.perf_counter() - w


def interleaved(official, ours, repeats: int) -> dict:
    """Warm-up each, then ``repeats`` pairs alternating which side goes first."""
    official()
    ours()
    rows = {"official": [], "ours": []}
    load0 = os.getloadavg()
    for i in range(repeats):
        order = (("official", official), ("ours", ours)) if i % 2 == 0 else (("ours", ours), ("official", official))
        for name, fn in order:
            rows[name].append(run_timed(fn))
    cpu_o = [c for c, _ in rows["official"]]
    cpu_u = [c for c, _ in rows["ours"]]
    ratios = [a / b for a, b in zip(cpu_o, cpu_u)]
    wall_ratios = [a[1] / b[1] for a, b in zip(rows["official"], rows["ours"])]
    return {"official_cpu_s": statistics.median(cpu_o), "ours_cpu_s": statistics.median(cpu_u),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "wall_ratio": statistics.median(wall_ratios),
            "official_wall_s": statistics.median(w for _, w in rows["official"]),
            "ours_wall_s": statistics.median(w for _, w in rows["ours"]),
            "runs": rows, "load_before": load0, "load_after": os.getloadavg()}


def top_ops(fn, n: int = 12) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ev = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ev) or 1
    return [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
             "share": e.self_cpu_time_total / total} for e in ev[:n]]


# ----------------------------------------------------------------------------- VAR
def import_official_var(root: Path):
    sys.path.insert(0, str(root))
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        stub = types.ModuleType("huggingface_hub")
        stub.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {})
        sys.modules["huggingface_hub"] = stub
    import models  # the official package
    import models.var as official_var_module
    sys.path.remove(str(root))
    for name in [m for m in sys.modules if m == "models" or m.startswith("models.")]:
        sys.modules["var_official_" + name] = sys.modules.pop(name)  # free the name for MAR's "models"
    return models, official_var_module


def build_var(root: Path, depth: int = 8):
    from genmodels.checkpoints import from_official

    off, off_var_mod = import_official_var(root)
    width = 64 * depth
    vae_kw = dict(vocab_size=4096, z_channels=32, ch=32, share_quant_resi=4, v_patch_nums=PN_256, test_mode=True)
    torch.manual_seed(0)
    ovae = off.VQVAE(**vae_kw)
    ovar = off.VAR(ovae, num_classes=10, depth=depth, embed_dim=width, num_heads=width // 64, drop_path_rate=0.0,
                   attn_l2_norm=True, patch_nums=PN_256, cond_drop_rate=0.1, flash_if_available=False,
                   fused_if_available=False)
    ovar.init_weights(init_adaln_gamma=0.5, init_std=-1)
    ovar.rng = torch.Generator()
    vae = from_official("var-vqvae", ovae.state_dict(), **vae_kw)
    var = from_official("var", ovar.state_dict(), vae_local=vae, num_classes=10, depth=depth, embed_dim=width,
                        num_heads=width // 64, drop_path_rate=0.0, patch_nums=PN_256)
    return ovar, ovae, off_var_mod, var, vae


def var_measures(args, root: Path) -> tuple[dict, dict]:
    from genmodels.sampling import from_var

    ovar, ovae, off_var_mod, var, vae = build_var(root)
    B = 4
    labels = torch.arange(B) % 10
    skw = dict(cfg=1.5, top_k=900, top_p=0.96)
    ours_kw = from_var(**skw)
    ovar.eval(), var.eval()

    @torch.no_grad()
    def ours_sample():
        _, f_hat = var.autoregressive_infer_cfg(labels, generator=torch.Generator().manual_seed(0), **ours_kw)
        return vae.fhat_to_img(f_hat)

    @torch.no_grad()
    def official_sample():
        return ovar.autoregressive_infer_cfg(B, labels, g_seed=0, **skw)

    # same tokens? record the official draws once (untimed)
    drawn = []
    orig = off_var_mod.sample_with_top_k_top_p_

    def recording(*a, **k):
        out = orig(*a, **k)
        drawn.append(out[:, :, 0].clone())
        return out

    off_var_mod.sample_with_top_k_top_p_ = recording
    img_off = official_sample()
    off_var_mod.sample_with_top_k_top_p_ = orig
    with torch.no_grad():
        toks, f_hat = var.autoregressive_infer_cfg(labels, generator=torch.Generator().manual_seed(0), **ours_kw)
        img_ours = (vae.fhat_to_img(f_hat) + 1) / 2
    check = {"var_same_tokens": bool(torch.equal(torch.cat(drawn, 1), toks)),
             "var_image_max_abs_diff": float((img_ours - img_off).abs().max())}

    tokens = torch.randint(0, 4096, (2, sum(p * p for p in PN_256)), generator=torch.Generator().manual_seed(0))
    tl = torch.arange(2) % 10
    L = tokens.shape[1]

    def official_step():
        idx = list(tokens.split([p * p for p in PN_256], dim=1))
        with torch.no_grad():
            x = ovae.quantize.idxBl_to_var_input(idx)
        logits = ovar(tl, x)
        loss = F.cross_entropy(logits.view(-1, 4096), tokens.view(-1), reduction="none").view(2, -1)
        loss.mul(1 / L).sum(-1).mean().backward()
        ovar.zero_grad(set_to_none=True)

    def ours_step():
        var.forward_loss(tokens, tl)["loss"].backward()
        var.zero_grad(set_to_none=True)

    compiled = torch.compile(var.forward_loss) if args.compile else None

    def ours_step_compiled():  # GeneratorModule(compile=True): the opt-in lever
        compiled(tokens, tl)["loss"].backward()
        var.zero_grad(set_to_none=True)

    out = {}
    for t in args.threads:
        torch.set_num_threads(t)
        if "var_sample" in args.only:
            ovar.eval(), var.eval()
            out[f"var_sample@{t}"] = roofline(interleaved(official_sample, ours_sample, args.repeats),
                                              official_sample, ours_sample)
            report(f"var_sample@{t}", out[f"var_sample@{t}"])
        if "var_train" in args.only:
            ovar.train(), var.train()
            out[f"var_train@{t}"] = interleaved(official_step, ours_step, args.repeats)
            report(f"var_train@{t}", out[f"var_train@{t}"])
            if compiled is not None:
                out[f"var_train_compiled@{t}"] = interleaved(official_step, ours_step_compiled, args.repeats)
                report(f"var_train_compiled@{t}", out[f"var_train_compiled@{t}"])
    ovar.eval(), var.eval()
    return out, check


# ----------------------------------------------------------------------------- MAR
def import_official_mar(root: Path):
    spec = importlib.util.spec_from_file_location("record_mar", ROOT / "scripts" / "record_fixtures" / "mar.py")
    rec = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rec)
    _, mar, _ = rec.import_official(root)
    return mar


def build_mar(mar_mod, side: int, buffer_size: int = 64):
    from genmodels.checkpoints.mar import mar_kwargs
    from genmodels.generators.mar import MAR

    kw = dict(img_size=side * 16, vae_stride=16, patch_size=1, vae_embed_dim=16, encoder_embed_dim=512,
              encoder_depth=4, encoder_num_heads=8, decoder_embed_dim=512, decoder_depth=4, decoder_num_heads=8,
              class_num=10, buffer_size=buffer_size, diffloss_d=3, diffloss_w=512, num_sampling_steps="50",
              diffusion_batch_mul=4)
    torch.manual_seed(0)
    theirs = mar_mod.MAR(norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), **kw)
    ours = MAR(**mar_kwargs(**kw))
    missing = ours.load_state_dict(theirs.state_dict())
    assert not missing.missing_keys and not missing.unexpected_keys
    return theirs, ours, kw


def mar_measures(args, root: Path) -> dict:
    # what GeneratorModule.configure_optimizers builds (imports Lightning: before torchvision's stub)
    from genmodels.training.common import adamw

    mar_mod = import_official_mar(root)
    out = {}
    theirs, ours, kw = build_mar(mar_mod, 16)
    theirs.eval(), ours.eval()
    runs = [("mar_sample_cfg3_b1", 3.0, 1), ("mar_sample_nocfg_b1", 1.0, 1)]

    def sampler(model_t, model_o, cfg, bsz, num_iter=16):
        lab = torch.arange(bsz) % 10

        def official():
            with torch.no_grad():
                model_t.sample_tokens(bsz=bsz, num_iter=num_iter, cfg=cfg, labels=lab, temperature=1.0)

        def our():
            model_o.sample(lab, num_steps=num_iter, cfg=cfg, temperature=1.0,
                           generator=torch.Generator().manual_seed(0))
        return official, our

    # training step, B=4, the same masks on both sides
    B = 4
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(B, 16, 16, 16, generator=g)
    tokens = theirs.patchify(latents)
    labels = torch.randint(0, 10, (B,), generator=g)
    masks = []
    for i in range(args.repeats + 1):
        np.random.seed(i)
        orders = theirs.sample_orders(B)
        masks.append(theirs.random_masking(tokens, orders).bool())
    opt_t = torch.optim.AdamW(theirs.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.02)
    opt_o = adamw(ours.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.02)
    counter = {"t": 0, "o": 0}

    def official_step():
        np.random.seed(counter["t"] % len(masks))
        counter["t"] += 1
        loss = theirs(latents, labels)
        opt_t.zero_grad(set_to_none=True)
        loss.backward()
        opt_t.step()

    def ours_step():
        mask = masks[counter["o"] % len(masks)]
        counter["o"] += 1
        loss = ours.forward_loss(tokens, labels, mask=mask)["loss"]
        opt_o.zero_grad(set_to_none=True)
        loss.backward()
        opt_o.step()

    sd = {k: v.clone() for k, v in theirs.state_dict().items()}
    for t in args.threads:
        torch.set_num_threads(t)
        for name, cfg, bsz in runs:
            if name.startswith("mar_sample") and "mar_sample" in args.only:
                out[f"{name}@{t}"] = roofline(interleaved(*sampler(theirs, ours, cfg, bsz), args.repeats),
                                              *sampler(theirs, ours, cfg, bsz))
                report(f"{name}@{t}", out[f"{name}@{t}"])
        if "mar_train" in args.only:
            theirs.train(), ours.train()
            counter.update(t=0, o=0)
            out[f"mar_train@{t}"] = interleaved(official_step, ours_step, args.repeats)
            report(f"mar_train@{t}", out[f"mar_train@{t}"])
            theirs.eval(), ours.eval()
            theirs.load_state_dict(sd), ours.load_state_dict(sd)  # back to the shared weights
    if "mar_sample_big" in args.only:
        side, bsz, buf, it = args.mar_big_batch_side, args.mar_big_batch, args.mar_big_buffer, args.mar_big_iters
        theirs_b, ours_b, _ = build_mar(mar_mod, side, buf)
        theirs_b.eval(), ours_b.eval()
        for t in args.big_threads:
            torch.set_num_threads(t)
            for cfg in args.big_cfgs:
                name = f"mar_sample_{'cfg3' if cfg != 1 else 'nocfg'}_b{bsz}_{side}x{side}_buf{buf}_{it}iters@{t}"
                out[name] = roofline(interleaved(*sampler(theirs_b, ours_b, cfg, bsz, it), args.big_repeats),
                                     *sampler(theirs_b, ours_b, cfg, bsz, it))
                report(name, out[name])
    return out


# ----------------------------------------------------------------------------- profiles
def profiles(args) -> dict:
    """Top ops of OUR VAR and MAR samplers (whatever ``genmodels`` is on the path), 1 thread."""
    from genmodels.checkpoints.mar import mar_kwargs
    from genmodels.generators.mar import MAR
    from genmodels.generators.var import VAR
    from genmodels.sampling import from_var
    from genmodels.tokenizers.multiscale_vq import VQVAE

    torch.set_num_threads(1)
    torch.manual_seed(0)
    vae = VQVAE(vocab_size=4096, z_channels=32, ch=32, share_quant_resi=4, v_patch_nums=PN_256).eval()
    var = VAR(vocab_size=4096, Cvae=32, patch_nums=PN_256, num_classes=10, depth=8, embed_dim=512, num_heads=8,
              init_adaln_gamma=0.5).eval()
    var.bind_tokenizer(vae)
    labels = torch.arange(4) % 10
    kw = from_var(cfg=1.5, top_k=900, top_p=0.96)

    @torch.no_grad()
    def var_fn():
        _, f_hat = var.autoregressive_infer_cfg(labels, generator=torch.Generator().manual_seed(0), **kw)
        vae.fhat_to_img(f_hat)

    mar = MAR(**mar_kwargs(img_size=256, vae_stride=16, patch_size=1, vae_embed_dim=16, encoder_embed_dim=512,
                           encoder_depth=4, encoder_num_heads=8, decoder_embed_dim=512, decoder_depth=4,
                           decoder_num_heads=8, class_num=10, buffer_size=64, diffloss_d=3, diffloss_w=512,
                           num_sampling_steps="50")).eval()

    def mar_fn():
        mar.sample(torch.tensor([1]), num_steps=16, cfg=3.0, generator=torch.Generator().manual_seed(0))

    var_fn(), mar_fn()  # warm-up
    res = {}
    for name, fn in (("var_sample", var_fn), ("mar_sample_cfg3_b1", mar_fn)):
        cpu, _ = run_timed(fn)
        res[name] = {"cpu_s": cpu, "top_ops": top_ops(fn)}
        print(f"[profile] {name}: {cpu:.2f} s CPU; top ops: " +
              ", ".join(f"{o['op']} {100 * o['share']:.0f}%" for o in res[name]["top_ops"][:6]))
    return res


# ----------------------------------------------------------------------------- report
SAVE = None  # set by main: stores a result as soon as it is measured (a long run keeps what it has)


def report(name: str, r: dict) -> None:
    if SAVE is not None:
        SAVE(name, r)
    print(f"[{name}] official {r['official_cpu_s']:.3f} s / ours {r['ours_cpu_s']:.3f} s CPU: x{r['ratio']:.2f} "
          f"({r['ratio_min']:.2f}..{r['ratio_max']:.2f}); wall x{r['wall_ratio']:.2f}; "
          f"load {r['load_before'][0]:.1f} -> {r['load_after'][0]:.1f}", flush=True)


TARGETS = {"var_sample": 1.25, "var_train": 1.10, "mar_sample": 1.40, "mar_train": 1.25}


def write_md(path: Path, data: dict) -> None:
    meta = data["meta"]
    lines = ["# Speed: ours against the official code (exact tier, CPU)", "",
             f"Written by `benchmarks/speed.py` ({meta['time']}); command: `{meta['command']}`.", "",
             f"Machine: {meta['machine']}, {meta['cpus']} CPUs, torch {meta['torch']}; load average "
             f"{meta['load_start']} at the start, {meta['load_end']} at the end (other jobs share the "
             "machine: times are process CPU time, runs interleaved).", "",
             "Tier: **exact** (default code path; same tokens for the same seed, float32 within the parity "
             "tests' tolerance). Ratio = official CPU time / ours, median of "
             f"{meta['repeats']} interleaved pairs (min..max over the pairs); > 1: ours is faster.", "",
             "| measure | threads | official s | ours s | ratio (min..max) | wall ratio | target | "
             "GFLOP official / ours | matmul peak GFLOP/s | ceiling |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in data["results"].items():
        name, t = key.split("@")
        target = next((v for k, v in TARGETS.items() if name.startswith(k)), None)
        lines.append(f"| {name} | {t} | {r['official_cpu_s']:.3f} | {r['ours_cpu_s']:.3f} | "
                     f"**{r['ratio']:.2f}** ({r['ratio_min']:.2f}..{r['ratio_max']:.2f}) | {r['wall_ratio']:.2f} | "
                     f"{'>= ' + format(target, '.2f') if target else ''} | "
                     + (f"{r['official_gflop']:.0f} / {r['ours_gflop']:.0f} | {r['peak_gflops']:.0f} | "
                        f"{r['ceiling']:.2f} |" if "ceiling" in r else "| | |"))
    lines += ["", "Ceiling (sampling rows): the official CPU time over the time our FLOPs (matmuls, convolutions, "
              "attention; `torch.utils.flop_counter`) would take at the float32 matmul peak timed in the same "
              "run (a 2048 x 512 x 2048 sgemm), i.e. the largest ratio any float32 implementation of our FLOPs "
              "could reach if nothing but matmuls cost time. A target above it needs fewer FLOPs or lower "
              "precision (the bf16 tier), not a faster exact kernel.", "", "Checks: " + ", ".join(f"{k} = {v}" for k, v in data.get("checks", {}).items()), "",
              "Levers on (all in the default path; rows named `*_compiled` add the opt-in "
              "`GeneratorModule(compile=True)`: `torch.compile` of the training loss):", ""]
    note = data.get("meta", {}).get("note")
    lines += [f"* `{k}`: {v}" for k, v in LEVERS.items()]
    if note:
        lines += ["", note]
    for label in ("before", "after"):
        prof = data.get(f"profile_{label}")
        if not prof:
            continue
        lines += ["", f"## Top ops of our samplers, {label} (torch.profiler, self CPU, 1 thread)", ""]
        for name, p in prof.items():
            lines += [f"**{name}** ({p['cpu_s']:.2f} s CPU)", "", "| op | calls | self ms | share |", "|---|---|---|---|"]
            lines += [f"| `{o['op']}` | {o['calls']} | {o['self_cpu_ms']:.0f} | {100 * o['share']:.1f}% |"
                      for o in p["top_ops"]]
            lines.append("")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official-var", type=Path)
    ap.add_argument("--official-mar", type=Path)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--big-repeats", type=int, default=5)
    ap.add_argument("--big-threads", type=int, nargs="+", default=[1])
    ap.add_argument("--big-cfgs", type=float, nargs="+", default=[3.0, 1.0])
    ap.add_argument("--mar-big-batch", type=int, default=64)
    ap.add_argument("--mar-big-batch-side", type=int, default=4)
    ap.add_argument("--mar-big-buffer", type=int, default=16)
    ap.add_argument("--mar-big-iters", type=int, default=4)
    ap.add_argument("--only", nargs="+", default=["var_sample", "var_train", "mar_sample", "mar_train",
                                                  "mar_sample_big"])
    ap.add_argument("--compile", action="store_true",
                    help="also time our VAR training step under torch.compile (GeneratorModule(compile=True))")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-only", action="store_true")
    ap.add_argument("--label", default="after", help="profile label (before / after)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "speed.json")
    ap.add_argument("--md", type=Path, default=None)
    ap.add_argument("--merge", type=Path, nargs="+", default=None,
                    help="combine the results of runs made in parallel processes into --out (and --md)")
    args = ap.parse_args()
    data = json.loads(args.out.read_text()) if args.out.exists() else {}
    if args.merge:
        parts = [json.loads(p.read_text()) for p in args.merge]
        data["meta"] = dict(parts[0]["meta"], command=" ; ".join(p["meta"]["command"] for p in parts),
                            load_start=[p["meta"]["load_start"] for p in parts],
                            load_end=[p["meta"].get("load_end") for p in parts])
        data["results"] = {k: v for p in parts for k, v in p.get("results", {}).items()}
        data["checks"] = {k: v for p in parts for k, v in p.get("checks", {}).items()}
    elif args.profile_only:
        data[f"profile_{args.label}"] = profiles(args)
    else:
        data.update(results={}, checks={})
        data["meta"] = {"time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                        "command": "python benchmarks/speed.py " + " ".join(sys.argv[1:]),
                        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                        "torch": torch.__version__, "repeats": args.repeats, "threads": args.threads,
                        "load_start": [round(x, 2) for x in os.getloadavg()], "levers": list(LEVERS)}
        global SAVE

        def save(name, r):
            data["results"][name] = r
            data["meta"]["load_end"] = [round(x, 2) for x in os.getloadavg()]
            args.out.write_text(json.dumps(data, indent=1))
            if args.md:
                write_md(args.md, data)
        SAVE = save
        if args.official_var and {"var_sample", "var_train"} & set(args.only):
            res, check = var_measures(args, args.official_var)
            data["results"].update(res)
            data["checks"].update(check)
        if args.official_mar and any(o.startswith("mar") for o in args.only):
            data["results"].update(mar_measures(args, args.official_mar))
        if args.profile:
            data[f"profile_{args.label}"] = profiles(args)
        data["meta"]["load_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1))
    if args.md and "meta" in data:
        write_md(args.md, data)
    print("wrote", args.out, args.md or "")


if __name__ == "__main__":
    main()
