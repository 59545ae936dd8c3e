"""VAR sampling / training benchmarks (CPU or GPU).

Three measurements, each printed as a table and written to ``--out`` (JSON):

1. ``kv_cache``: VAR sampling time with and without the KV cache (same tokens).
2. ``resolution``: sampling time against the final token-grid side n for VAR
   (next-scale, one step per scale) and the causal raster AR (``CausalAR``, one step per
   token; with and without KV cache) on models of the same width / depth / vocabulary.
   The paper (Sec. 3.1 / App.) argues O(n^4) for VAR against O(n^6) for raster AR
   (attention recomputed at each of the n^2 steps); the fitted log-log slopes of time
   against n are reported. On a CPU, time is mostly arithmetic, not the number of
   sequential steps: VAR runs sum(pn^2) ~ 2.7 n^2 token positions (all scales) against n^2
   for a KV-cached raster AR, yet it was still 1.4-1.8x faster at n = 8..24 on an idle
   2-core CPU (results/var_speed_cpu.json); its 10-vs-n^2 step advantage grows where each
   step is latency-bound (GPU).
3. ``official`` (with ``--official-root``): our VAR against the official
   FoundationVision/VAR code on the same config and weights on this machine: sampling
   (``autoregressive_infer_cfg`` incl. decoding) and a training step (teacher forcing +
   forward + token-mean CE + backward); also checks that both sample the same tokens.

Usage::

    .venv/bin/python benchmarks/var_sampling.py --threads 1 --official-root /work/official/VAR \
        --out benchmarks/results/var_benchmarks_cpu.json
    .venv/bin/python benchmarks/var_sampling.py --quick   # small sizes, a smoke run
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from genmodels.generators.causal_ar import CausalAR
from genmodels.generators.var import VAR
from genmodels.tokenizers.multiscale_vq import MultiScaleVectorQuantizer, VQVAE

PN_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


CLOCK = time.perf_counter  # --clock process: CPU time of this process (robust on a shared machine)


def timeit(fn, repeats: int, warmup: int = 1) -> float:
    """Median time (s, ``CLOCK``) of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = CLOCK()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(CLOCK() - t)
    return statistics.median(times)


def schedule(n: int) -> tuple[int, ...]:
    """VAR's 256 px scale schedule stretched to a final side n (first scale always 1)."""
    pns = sorted({max(1, round(p * n / 16)) for p in PN_256} | {1})
    return tuple(pns)


def make_var(patch_nums, depth: int, width: int, heads: int, vocab: int, cvae: int, device) -> VAR:
    torch.manual_seed(0)
    var = VAR(vocab_size=vocab, Cvae=cvae, patch_nums=patch_nums, num_classes=10, depth=depth, embed_dim=width,
              num_heads=heads, init_adaln_gamma=0.5).to(device).eval()
    quant = MultiScaleVectorQuantizer(vocab, cvae, patch_nums).to(device).eval()
    var.bind_tokenizer(quant)
    return var


def interleaved(fn_a, fn_b, runs: int) -> tuple[float, float]:
    """Median times of ``fn_a`` and ``fn_b`` over ``runs`` interleaved runs (after one warm-up
    each), alternating which goes first: the machine's drift and any cost one call leaves
    for the next fall on both sides equally."""
    t_a, t_b = [], []
    for i in range(runs + 1):
        pair = ((fn_a, t_a), (fn_b, t_b)) if i % 2 == 0 else ((fn_b, t_b), (fn_a, t_a))
        for fn, ts in pair:
            ts.append(timeit(fn, 1, warmup=0))
    return statistics.median(t_a[1:]), statistics.median(t_b[1:])


def bench_kv_cache(args, device) -> dict:
    depth, width = (2, 128) if args.quick else (8, 512)
    pn = (1, 2, 3, 4) if args.quick else PN_256
    var = make_var(pn, depth, width, width // 64, 4096, 32, device)
    labels = torch.arange(args.batch, device=device) % 10
    from genmodels.sampling import from_var

    knobs = from_var(cfg=1.5, top_k=900, top_p=0.96)  # VAR's official knobs in our convention
    out = {"config": dict(depth=depth, width=width, patch_nums=pn, batch=args.batch, **knobs,
                          paper_knobs=dict(cfg=1.5, top_k=900, top_p=0.96))}
    toks = {}
    for use_cache in (True, False):
        def run():
            toks[use_cache] = var.sample(labels, **knobs, use_cache=use_cache,
                                         generator=torch.Generator(device).manual_seed(0))
        out["with_cache_s" if use_cache else "without_cache_s"] = timeit(run, args.repeats)
    out["same_tokens"] = bool(torch.equal(toks[True], toks[False]))
    out["speedup"] = out["without_cache_s"] / out["with_cache_s"]
    print(f"[kv_cache] VAR depth {depth} width {width} L={sum(p * p for p in pn)} B={args.batch}: "
          f"cache {out['with_cache_s']:.3f}s, no cache {out['without_cache_s']:.3f}s, x{out['speedup']:.2f}, "
          f"same tokens {out['same_tokens']}")
    return out


def bench_resolution(args, device) -> dict:
    depth, width, vocab = (2, 128, 512) if args.quick else (4, 256, 4096)
    sides = (4, 8) if args.quick else (4, 8, 12, 16, 24)
    rows = []
    labels = torch.arange(args.batch, device=device) % 10
    for n in sides:
        pn = schedule(n)
        var = make_var(pn, depth, width, width // 64, vocab, 32, device)
        ar = CausalAR(vocab, token_shape=(n, n), num_classes=10, hidden_size=width, depth=depth,
                      num_heads=width // 64).to(device).eval()
        g = lambda: torch.Generator(device).manual_seed(0)  # noqa: E731
        row = {"n": n, "tokens": n * n, "var_steps": len(pn), "var_patch_nums": pn,
               "var_s": timeit(lambda: var.sample(labels, cfg=1.0, generator=g()), args.repeats),
               "ar_cache_s": timeit(lambda: ar.sample(labels, cfg=1.0, generator=g()), args.repeats)}
        if n <= args.ar_nocache_max:
            row["ar_nocache_s"] = timeit(lambda: ar.sample(labels, cfg=1.0, generator=g(), use_cache=False),
                                         max(1, args.repeats // 2), warmup=0)
        rows.append(row)
        print(f"[resolution] n={n:3d} ({n * n:4d} tokens): VAR {len(pn):2d} steps {row['var_s']:.3f}s | "
              f"raster AR {n * n} steps, KV cache {row['ar_cache_s']:.3f}s"
              + (f", no cache {row['ar_nocache_s']:.3f}s" if "ar_nocache_s" in row else ""))

    def slope(key):
        pts = [(math.log(r["n"]), math.log(r[key])) for r in rows if key in r and r["n"] >= 8]
        if len(pts) < 2:
            return None
        mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
        return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)

    slopes = {k: slope(k) for k in ("var_s", "ar_cache_s", "ar_nocache_s")}
    print("[resolution] log-log slope of time vs n (n >= 8): " +
          ", ".join(f"{k} {v:.2f}" for k, v in slopes.items() if v is not None))
    return {"config": dict(depth=depth, width=width, vocab=vocab, batch=args.batch, var_cfg=1.0, ar_cfg=1.0),
            "rows": rows, "loglog_slopes_n_ge_8": slopes}


def import_official(root: Path):
    sys.path.insert(0, str(root))
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        stub = types.ModuleType("huggingface_hub")
        stub.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {})
        sys.modules["huggingface_hub"] = stub
    import models  # the official package
    return models


def bench_official(args, device) -> dict:
    from genmodels.checkpoints import from_official
    from genmodels.checkpoints.var import var_to_official

    off = import_official(args.official_root)
    depth, width = (2, 128) if args.quick else (8, 512)
    pn = (1, 2, 3, 4) if args.quick else PN_256
    vae_kw = dict(vocab_size=4096, z_channels=32, ch=32, share_quant_resi=4, v_patch_nums=pn, test_mode=True)
    torch.manual_seed(0)
    ovae = off.VQVAE(**vae_kw).to(device)
    ovar = off.VAR(ovae, num_classes=10, depth=depth, embed_dim=width, num_heads=width // 64, drop_path_rate=0.0,
                   attn_l2_norm=True, patch_nums=pn, cond_drop_rate=0.1, flash_if_available=False,
                   fused_if_available=False).to(device)
    ovar.init_weights(init_adaln_gamma=0.5, init_std=-1)
    ovar.rng = torch.Generator(device)
    vae = from_official("var-vqvae", ovae.state_dict(), **vae_kw).to(device)
    var = from_official("var", ovar.state_dict(), vae_local=vae, num_classes=10, depth=depth, embed_dim=width,
                        num_heads=width // 64, drop_path_rate=0.0, patch_nums=pn).to(device)
    assert all(torch.equal(a, ovar.state_dict()[k]) for k, a in var_to_official(var).items())
    B = args.batch
    labels = torch.arange(B, device=device) % 10
    from genmodels.sampling import from_var

    skw = dict(cfg=1.5, top_k=900, top_p=0.96)  # the official spelling; ours through from_var
    res = {"config": dict(depth=depth, width=width, patch_nums=pn, batch=B, vae_ch=32, paper_knobs=skw,
                          **from_var(**skw))}

    ovar.eval(), var.eval()
    captured = {}

    @torch.no_grad()
    def ours_sample():
        toks, f_hat = var.autoregressive_infer_cfg(labels, generator=torch.Generator(device).manual_seed(0),
                                                   **from_var(**skw))
        captured["ours"] = (toks, vae.fhat_to_img(f_hat))

    def official_sample():
        captured["official"] = ovar.autoregressive_infer_cfg(B, labels, g_seed=0, **skw)

    res["sample_official_s"], res["sample_ours_s"] = interleaved(official_sample, ours_sample, args.repeats)
    res["sample_same_images"] = bool(((captured["ours"][1] + 1) / 2 - captured["official"]).abs().max() < 1e-4)
    # the VQ-VAE decode alone (part of both sampling times)
    f_hat = torch.randn(B, 32, pn[-1], pn[-1], generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        res["decode_official_s"], res["decode_ours_s"] = interleaved(lambda: ovae.fhat_to_img(f_hat),
                                                                     lambda: vae.fhat_to_img(f_hat), args.repeats)
    res["sample_wo_decode_official_s"] = res["sample_official_s"] - res["decode_official_s"]
    res["sample_wo_decode_ours_s"] = res["sample_ours_s"] - res["decode_ours_s"]

    # training step: teacher forcing + forward + CE + backward, both in train mode
    ovar.train(), var.train()
    tokens = torch.randint(0, 4096, (B, sum(p * p for p in pn)), generator=torch.Generator().manual_seed(0)).to(device)
    L = tokens.shape[1]

    def official_step():
        idx = list(tokens.split([p * p for p in pn], dim=1))
        x = ovae.quantize.idxBl_to_var_input(idx)
        logits = ovar(labels, x)
        loss = F.cross_entropy(logits.view(-1, 4096), tokens.view(-1), reduction="none").view(B, -1)
        loss.mul(1 / L).sum(-1).mean().backward()
        ovar.zero_grad(set_to_none=True)

    def ours_step():
        var.forward_loss(tokens, labels)["loss"].backward()
        var.zero_grad(set_to_none=True)

    res["train_official_s"], res["train_ours_s"] = interleaved(official_step, ours_step, args.repeats)
    res["sample_ratio_official_over_ours"] = res["sample_official_s"] / res["sample_ours_s"]
    res["train_ratio_official_over_ours"] = res["train_official_s"] / res["train_ours_s"]
    res["sample_wo_decode_ratio_official_over_ours"] = (res["sample_wo_decode_official_s"]
                                                        / res["sample_wo_decode_ours_s"])
    print(f"[official] depth {depth} width {width} B={B}: sampling official {res['sample_official_s']:.3f}s / ours "
          f"{res['sample_ours_s']:.3f}s = x{res['sample_ratio_official_over_ours']:.2f} (same images "
          f"{res['sample_same_images']}); of which VQ-VAE decode official {res['decode_official_s']:.3f}s / ours "
          f"{res['decode_ours_s']:.3f}s; transformer part x{res['sample_wo_decode_ratio_official_over_ours']:.2f}; "
          f"train step official {res['train_official_s']:.3f}s / ours "
          f"{res['train_ours_s']:.3f}s = x{res['train_ratio_official_over_ours']:.2f}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ar-nocache-max", type=int, default=12, help="largest n for raster AR without KV cache")
    ap.add_argument("--official-root", type=Path, default=None, help="checkout of FoundationVision/VAR")
    ap.add_argument("--only", nargs="*", default=["kv_cache", "resolution", "official"])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--clock", choices=["wall", "process"], default="wall",
                    help="wall time, or this process's CPU time (use with --threads 1 on a busy machine)")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = {"machine": dict(platform=platform.platform(), processor=platform.processor(), threads=args.threads,
                               device=str(device), torch=torch.__version__, clock=args.clock)}
    with torch.no_grad():
        if "kv_cache" in args.only:
            results["kv_cache"] = bench_kv_cache(args, device)
        if "resolution" in args.only:
            results["resolution"] = bench_resolution(args, device)
    if "official" in args.only and args.official_root is not None:
        results["official"] = bench_official(args, device)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        print("wrote", args.out)


if __name__ == "__main__":
    main()
