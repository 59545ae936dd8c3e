"""The bf16 tier on CPU: our VAR / MAR sampling and training step under bfloat16 autocast
against the official code in float32 and under the same autocast (issue 17).

Same sizes as the issue's side-by-side table: VAR d8 (41M; VQ-VAE ch 32) sampling B=4 with
official cfg 1.5 / top-k 900 / top-p 0.96 incl. the VQ-VAE decode, VAR training step B=2;
MAR 4+4 x 512 with DiffLoss 3 x 512 (64 tokens of 16 dims), sampling 16 iterations x 50
diffusion steps B=1 cfg 3, training step B=4 (forward + backward + AdamW). One shared random
state dict is loaded into both sides. For every measure the four variants (official fp32,
official bf16, ours fp32, ours bf16) run interleaved, ``--repeats`` rounds; the time is this
process's CPU time (``time.process_time``, robust on a shared machine at 1 thread); the
median and the spread (min-max) over rounds are reported.

bf16 = ``torch.autocast("cpu", dtype=torch.bfloat16)`` around the call (what Lightning's
``trainer.precision: bf16-mixed`` and the evaluator's ``autocast: bf16`` do); on CPUs with
AMX-BF16 (``lscpu | grep amx_bf16``) oneDNN runs the bf16 matmuls on the tile unit.
``ours_tier`` (sampling only) = the bf16 tier, ``genmodels.precision.bf16_for_sampling``: a copy
with bfloat16 trunk / decoder weights, logits and draws in float32 (``evaluator.precision: bf16``,
``Pipeline.bf16()``).

    PYTHONPATH=.:/tmp/h17b/site .venv/bin/python benchmarks/bf16_tier.py \\
        --official-var /tmp/official/VAR --official-mar /tmp/official/mar --out benchmarks/results/bf16_tier_cpu.json

(``/tmp/h17b/site``: ``pip install --no-deps --target /tmp/h17b/site timm==0.9.16``, which
the official MAR imports; torchvision is stubbed.) ``--quick``: tiny sizes, a smoke run.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from genmodels.training.common import adamw  # noqa: E402  (imports Lightning before the torchvision stub)

PN_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def measure(fns: dict, repeats: int) -> dict:
    """CPU time of each fn (after one warm-up each), interleaved rounds -> median / min / max."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.process_time()
            fn()
            times[k].append(time.process_time() - t)
    return {k: dict(median_s=statistics.median(v), min_s=min(v), max_s=max(v)) for k, v in times.items()}


def forget_models() -> None:
    """Both official repositories name their package ``models``: drop the one imported first."""
    for name in [n for n in sys.modules if n == "models" or n.startswith("models.")]:
        del sys.modules[name]
    sys.path[:] = [p for p in sys.path if not Path(p, "models").is_dir() or Path(p).resolve() == ROOT]


def cpu_flags() -> list[str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Flags")), [])
    return sorted(f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512_fp16", "avx_vnni")))


def var_measures(args) -> dict:
    sys.path.insert(0, str(args.official_var))
    import types
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        stub = types.ModuleType("huggingface_hub")
        stub.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {})
        sys.modules["huggingface_hub"] = stub
    import models as off  # the official package
    from genmodels.checkpoints import from_official
    from genmodels.precision import bf16_for_sampling
    from genmodels.sampling import from_var

    depth, width = (2, 128) if args.quick else (8, 512)
    pn = (1, 2, 3, 4) if args.quick else PN_256
    vae_kw = dict(vocab_size=4096, z_channels=32, ch=32, share_quant_resi=4, v_patch_nums=pn, test_mode=True)
    torch.manual_seed(0)
    ovae = off.VQVAE(**vae_kw)
    ovar = off.VAR(ovae, num_classes=10, depth=depth, embed_dim=width, num_heads=width // 64, drop_path_rate=0.0,
                   attn_l2_norm=True, patch_nums=pn, cond_drop_rate=0.1, flash_if_available=False,
                   fused_if_available=False)
    ovar.init_weights(init_adaln_gamma=0.5, init_std=-1)
    ovar.rng = torch.Generator()
    vae = from_official("var-vqvae", ovae.state_dict(), **vae_kw)
    var = from_official("var", ovar.state_dict(), vae_local=vae, num_classes=10, depth=depth, embed_dim=width,
                        num_heads=width // 64, drop_path_rate=0.0, patch_nums=pn)
    skw = dict(cfg=1.5, top_k=900, top_p=0.96)
    B = 4
    labels = torch.arange(B) % 10
    ovar.eval(), var.eval()

    fvar, fvae = bf16_for_sampling(var, vae)  # the bf16 tier: bfloat16 trunk + decoder weights

    def sample(which: str, bf16: bool | str):
        @torch.no_grad()
        def run():
            if bf16 == "tier":
                toks, f_hat = fvar.autoregressive_infer_cfg(labels, generator=torch.Generator().manual_seed(0),
                                                            **from_var(**skw))
                return fvae.fhat_to_img(f_hat)
            with autocast(bf16):
                if which == "official":
                    return ovar.autoregressive_infer_cfg(B, labels, g_seed=0, **skw)
                toks, f_hat = var.autoregressive_infer_cfg(labels, generator=torch.Generator().manual_seed(0),
                                                           **from_var(**skw))
                return vae.fhat_to_img(f_hat)
        return run

    res = {"config": dict(depth=depth, width=width, patch_nums=pn, batch=B, official_knobs=skw)}
    res["sample"] = measure({**{f"{w}_{p}": sample(w, p == "bf16") for w in ("official", "ours")
                                for p in ("fp32", "bf16")}, "ours_tier": sample("ours", "tier")}, args.repeats)
    # the same tokens? (fp32: exact tier; bf16: how many tokens change)
    with torch.no_grad():
        t32 = var.autoregressive_infer_cfg(labels, generator=torch.Generator().manual_seed(0), **from_var(**skw))[0]
        with autocast(True):
            t16 = var.autoregressive_infer_cfg(labels, generator=torch.Generator().manual_seed(0), **from_var(**skw))[0]
        tt = fvar.autoregressive_infer_cfg(labels, generator=torch.Generator().manual_seed(0), **from_var(**skw))[0]
    res["bf16_tokens_changed_frac"] = float((t32 != t16).float().mean())
    res["tier_tokens_changed_frac"] = float((t32 != tt).float().mean())

    Bt = 2
    tokens = torch.randint(0, 4096, (Bt, sum(p * p for p in pn)), generator=torch.Generator().manual_seed(0))
    tl = labels[:Bt]
    L = tokens.shape[1]
    ovar.train(), var.train()
    # each side's own optimizer: the official VAR trains with fused AdamW (train.py ``afuse=True``),
    # ours with the trainer's (training.common.adamw: fused on the CPU, in bf16-mixed too)
    opt_o = torch.optim.AdamW(ovar.parameters(), lr=1e-4, fused=True)
    opt_u = adamw(var.parameters(), SimpleNamespace(precision="bf16-mixed"), bf16_clip_safe=True, lr=1e-4)

    def train(which: str, bf16: bool):
        def run():
            with autocast(bf16):
                if which == "official":
                    idx = list(tokens.split([p * p for p in pn], dim=1))
                    x = ovae.quantize.idxBl_to_var_input(idx)
                    logits = ovar(tl, x)
                    loss = F.cross_entropy(logits.view(-1, 4096).float(), tokens.view(-1),
                                           reduction="none").view(Bt, -1).mul(1 / L).sum(-1).mean()
                    opt = opt_o
                else:
                    loss = var.forward_loss(tokens, tl)["loss"]
                    opt = opt_u
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return run

    res["train_step"] = measure({f"{w}_{p}": train(w, p == "bf16") for w in ("official", "ours")
                                 for p in ("fp32", "bf16")}, args.repeats)
    return res


def mar_measures(args) -> dict:
    spec = importlib.util.spec_from_file_location("record_mar", ROOT / "scripts" / "record_fixtures" / "mar.py")
    rec = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rec)
    forget_models()
    _, mar_mod, _ = rec.import_official(args.official_mar)
    from genmodels.checkpoints.mar import mar_kwargs
    from genmodels.generators.mar import MAR
    from genmodels.precision import bf16_for_sampling

    side, width, depth, heads, dw = (4, 128, 2, 4, 128) if args.quick else (8, 512, 4, 8, 512)
    iters, steps = (4, 10) if args.quick else (16, 50)
    kw = dict(img_size=side * 16, vae_stride=16, patch_size=1, vae_embed_dim=16, encoder_embed_dim=width,
              encoder_depth=depth, encoder_num_heads=heads, decoder_embed_dim=width, decoder_depth=depth,
              decoder_num_heads=heads, class_num=10, buffer_size=16, diffloss_d=3, diffloss_w=dw,
              num_sampling_steps=str(steps), diffusion_batch_mul=4)
    torch.manual_seed(0)
    theirs = mar_mod.MAR(norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), **kw)
    ours = MAR(**mar_kwargs(**kw))
    ours.load_state_dict(theirs.state_dict())
    theirs.eval(), ours.eval()
    lab = torch.tensor([3])
    fast = bf16_for_sampling(ours)  # the bf16 tier: bfloat16 encoder / decoder / DiffLoss MLP weights

    def sample(which: str, bf16: bool | str):
        @torch.no_grad()
        def run():
            if bf16 == "tier":
                return fast.sample(lab, num_steps=iters, cfg=3.0, temperature=1.0,
                                   generator=torch.Generator().manual_seed(0))
            with autocast(bf16):
                if which == "official":
                    return theirs.sample_tokens(bsz=1, num_iter=iters, cfg=3.0, labels=lab, temperature=1.0)
                return ours.sample(lab, num_steps=iters, cfg=3.0, temperature=1.0,
                                   generator=torch.Generator().manual_seed(0))
        return run

    res = {"config": dict(kw, num_iter=iters, sample_batch=1, cfg=3.0, train_batch=4)}
    np.random.seed(0)
    res["sample"] = measure({**{f"{w}_{p}": sample(w, p == "bf16") for w in ("official", "ours")
                                for p in ("fp32", "bf16")}, "ours_tier": sample("ours", "tier")}, args.repeats)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 16, side, side, generator=g)
    tokens = theirs.patchify(latents)
    labels = torch.randint(0, 10, (4,), generator=g)
    theirs.train(), ours.train()
    # each side's own optimizer: the official MAR's plain AdamW (main_mar.py), ours the trainer's
    # (training.common.adamw: fused on the CPU, in bf16-mixed too)
    opt_o = torch.optim.AdamW(theirs.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.02)
    opt_u = adamw(ours.parameters(), SimpleNamespace(precision="bf16-mixed"), bf16_clip_safe=True, lr=1e-4,
                  betas=(0.9, 0.95), weight_decay=0.02)
    # the same masks on both sides (the masked count sets the work): the official draws its orders
    # and mask ratio from numpy's global RNG, seeded per call; ours gets that call's mask
    masks = []
    for i in range(args.repeats + 1):
        np.random.seed(i)
        masks.append(theirs.random_masking(tokens, theirs.sample_orders(tokens.shape[0])).bool())
    calls = {"official": 0, "ours": 0}

    def train(which: str, bf16: bool):
        def run():
            i = calls[which] % len(masks)
            calls[which] += 1
            np.random.seed(i)
            with autocast(bf16):
                loss = theirs(latents, labels) if which == "official" else \
                    ours.forward_loss(tokens, labels, mask=masks[i])["loss"]
            opt = opt_o if which == "official" else opt_u
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return run

    res["train_step"] = measure({f"{w}_{p}": train(w, p == "bf16") for w in ("official", "ours")
                                 for p in ("fp32", "bf16")}, args.repeats)
    return res


def ratios(m: dict) -> dict:
    t = {k: v["median_s"] for k, v in m.items()}
    return {"ours_bf16_vs_official_fp32": t["official_fp32"] / t["ours_bf16"],
            "ours_bf16_vs_official_bf16": t["official_bf16"] / t["ours_bf16"],
            "ours_fp32_vs_official_fp32": t["official_fp32"] / t["ours_fp32"],
            "ours_bf16_vs_ours_fp32": t["ours_fp32"] / t["ours_bf16"],
            **({"ours_tier_vs_official_fp32": t["official_fp32"] / t["ours_tier"],
                "ours_tier_vs_official_bf16": t["official_bf16"] / t["ours_tier"]} if "ours_tier" in t else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official-var", type=Path, default=Path("/tmp/official/VAR"))
    ap.add_argument("--official-mar", type=Path, default=Path("/tmp/official/mar"))
    ap.add_argument("--only", nargs="*", default=["var", "mar"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = {"threads": args.threads, "repeats": args.repeats, "clock": "process CPU time", "torch": torch.__version__,
           "cpu": platform.processor(), "cpu_flags": cpu_flags(), "loadavg_start": list(os.getloadavg())}
    if "var" in args.only:
        out["var"] = var_measures(args)
    if "mar" in args.only:
        out["mar"] = mar_measures(args)
    out["loadavg_end"] = list(os.getloadavg())
    for model in ("var", "mar"):
        for what in ("sample", "train_step"):
            if model in out:
                m = out[model][what]
                out[model][what + "_ratios"] = r = ratios(m)
                print(f"{model} {what}: " + ", ".join(f"{k} {v['median_s']:.3f}s" for k, v in m.items()))
                print("    " + ", ".join(f"{k} x{v:.2f}" for k, v in r.items()))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
