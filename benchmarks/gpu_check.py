"""GPU check of issue 17 (one GPU, <= 8 minutes): images/second and peak memory of VAR-d16 and
MAR-B sampling at the official sizes with random weights, ours vs the official code, batch 1
and 64, bfloat16 autocast and ours with bf16 weights (``genmodels.precision``, the bf16 tier), and
float32 at batch 64; training-step throughput; peak memory.

    bash benchmarks/gpu_check.sh                      # on the GPU machine, writes $OUT/gpu_check.{json,md}
    PYTHONPATH=. python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_dry   # CPU, tiny sizes

Models (random weights, one shared state dict per pair):
* VAR-d16 (310M) + the VAR VQ-VAE (ch 160, 108.9M), 256 px, 10 scales, official knobs cfg 1.5,
  top-k 900, top-p 0.96 (ours: ``sampling.from_var``); images incl. the VQ-VAE decode.
* MAR-B (208M: 768 wide, 12 + 12 blocks, DiffLoss 6 x 1024), 16 x 16 tokens of 16 channels,
  64 AR iterations, 100 diffusion steps, cfg 2.9 linear; tokens only (the KL-16 decode is the
  same convolutional net on both sides and is timed once for ours: ``mar_decode_s``).
* training steps: VAR-d16 B=32 and MAR-B B=64 (diffusion_batch_mul 4), AdamW, bf16 autocast.

The official code is imported from ``--official-var`` / ``--official-mar`` (checkouts of
FoundationVision/VAR and LTH14/mar; MAR needs timm 0.9.x importable, torchvision is stubbed);
a side whose code is missing is skipped and says so. Rows ``ours*_graphs``: VAR with its static
KV caches and one CUDA graph per scale (``cuda_graphs=True``; recorded in the warm-up call,
never run on a GPU before this script's first GPU run); MAR ``ours_bf16_weights_graphs``: the
DiffLoss network evaluations replayed as CUDA graphs, one per row count (the encoder / decoder
eager). ``--compile`` wraps our
blocks' forward in ``torch.compile`` (untested on a GPU). Every section checks the time budget (``--budget-s``) and is skipped,
with a note, when it would run past it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
import types
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PN_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
T0 = time.perf_counter()


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def autocast(dev, dtype):
    return torch.autocast(dev.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


def timed(fn, dev, repeats: int) -> dict:
    """Median seconds per call (after a warm-up) and the peak memory of the calls (MiB)."""
    fn()
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ts = []
    for _ in range(repeats):
        sync(dev)
        t = time.perf_counter()
        fn()
        sync(dev)
        ts.append(time.perf_counter() - t)
    out = {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "repeats": repeats}
    if dev.type == "cuda":
        out["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2 ** 20)
    return out


def stub_hub():
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        stub = types.ModuleType("huggingface_hub")
        stub.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {})
        sys.modules["huggingface_hub"] = stub


def build_var(args, dev):
    from genmodels.checkpoints import from_official
    from genmodels.generators.var import VAR
    from genmodels.tokenizers.multiscale_vq import VQVAE

    depth, ch, pn = (2, 32, (1, 2, 3, 4)) if args.dry_run else (16, 160, PN_256)
    vae_kw = dict(vocab_size=4096, z_channels=32, ch=ch, share_quant_resi=4, v_patch_nums=pn, test_mode=True)
    var_kw = dict(num_classes=1000, depth=depth, embed_dim=64 * depth, num_heads=depth, drop_path_rate=0.0,
                  patch_nums=pn)
    off = None
    torch.manual_seed(0)
    if args.official_var and Path(args.official_var).is_dir():
        sys.path.insert(0, str(args.official_var))
        stub_hub()
        import models as offm
        ovae = offm.VQVAE(**vae_kw)
        ovar = offm.VAR(ovae, num_classes=1000, depth=depth, embed_dim=64 * depth, num_heads=depth,
                        drop_path_rate=0.0, attn_l2_norm=True, patch_nums=pn, cond_drop_rate=0.1,
                        flash_if_available=True, fused_if_available=True)
        ovar.init_weights(init_adaln=0.5, init_adaln_gamma=1e-3, init_head=0.02, init_std=-1)
        vae = from_official("var-vqvae", ovae.state_dict(), **vae_kw)
        var = from_official("var", ovar.state_dict(), vae_local=vae, **var_kw)
        ovae, ovar = ovae.to(dev), ovar.to(dev)
        ovar.rng = torch.Generator(dev)
        off = (ovae, ovar)
    else:
        vae = VQVAE(4096, 32, ch, share_quant_resi=4, v_patch_nums=pn, test_mode=True)
        var = VAR(vocab_size=4096, Cvae=32, **var_kw)
        var.bind_tokenizer(vae)
    return vae.to(dev), var.to(dev), off, pn


def build_mar(args, dev):
    from genmodels.checkpoints.mar import mar_kwargs
    from genmodels.generators.mar import MAR

    side = 4 if args.dry_run else 16
    size = dict(encoder_embed_dim=64, encoder_depth=1, encoder_num_heads=2, decoder_embed_dim=64, decoder_depth=1,
                decoder_num_heads=2, diffloss_d=2, diffloss_w=64) if args.dry_run else dict(
        encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12, decoder_embed_dim=768, decoder_depth=12,
        decoder_num_heads=12, diffloss_d=6, diffloss_w=1024)
    kw = dict(img_size=side * 16, vae_stride=16, patch_size=1, vae_embed_dim=16, class_num=1000, buffer_size=64,
              num_sampling_steps="10" if args.dry_run else "100", diffusion_batch_mul=4, **size)
    torch.manual_seed(0)
    theirs = None
    if args.official_mar and Path(args.official_mar).is_dir():
        try:
            import importlib.util
            spec = importlib.util.spec_from_file_location("record_mar", ROOT / "scripts" / "record_fixtures" / "mar.py")
            rec = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(rec)
            rec.stub_torchvision()
            for name in [n for n in sys.modules if n == "models" or n.startswith("models.")]:
                del sys.modules[name]  # the official VAR's package has the same name
            sys.path[:] = [p for p in sys.path if not Path(p, "models").is_dir() or Path(p).resolve() == ROOT]
            sys.path.insert(0, str(args.official_mar))
            if dev.type != "cuda":
                torch.Tensor.cuda = lambda self, *a, **k: self  # the official sampler calls .cuda()
            from models import mar as mar_mod
            theirs = mar_mod.MAR(norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), **kw)
        except ImportError as e:
            print(f"official MAR not importable ({e}); ours only")
    ours = MAR(**mar_kwargs(**kw))
    if theirs is not None:
        ours.load_state_dict(theirs.state_dict())
        theirs = theirs.to(dev).eval()
    return ours.to(dev).eval(), theirs, side


def left(args) -> float:
    return args.budget_s - (time.perf_counter() - T0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, 1 repeat: checks the script runs")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    ap.add_argument("--official-var", default=os.environ.get("OFFICIAL_VAR", ".official/VAR"))
    ap.add_argument("--official-mar", default=os.environ.get("OFFICIAL_MAR", ".official/mar"))
    ap.add_argument("--budget-s", type=float, default=450.0, help="stop starting sections after this (s)")
    ap.add_argument("--compile", action="store_true", help="torch.compile our blocks (experimental)")
    args = ap.parse_args()
    dev = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    reps1, reps64 = (1, 1) if args.dry_run else (3, 2)
    batches = (1, 4) if args.dry_run else (1, 64)
    args.out.mkdir(parents=True, exist_ok=True)
    res = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor(),
           "torch": torch.__version__, "dry_run": args.dry_run, "notes": [], "rows": []}

    def row(**kw):
        res["rows"].append(kw)
        print(json.dumps(kw), flush=True)

    from genmodels.precision import bf16_for_sampling
    from genmodels.sampling import from_var
    bf16 = torch.bfloat16
    # ------------------------------------------------------------------ VAR-d16
    vae, var, off, pn = build_var(args, dev)
    if off is None:
        res["notes"].append("official VAR code not found: VAR rows are ours only")
    if args.compile:
        for b in var.blocks:
            b.forward = torch.compile(b.forward, dynamic=True)
    skw = dict(cfg=1.5, top_k=900, top_p=0.96)
    fvar, fvae = bf16_for_sampling(var, vae)  # the bf16 tier: bf16 trunk / decoder weights, float32 logits
    for B in batches:
        for dtype in ((bf16, torch.float32) if B == batches[-1] else (bf16,)):
            labels = torch.arange(B, device=dev) % 1000
            for side in ("ours", "ours_bf16_weights", "official", "ours_bf16_weights_graphs", "ours_graphs"):
                if (side == "official" and off is None) or (side.startswith("ours_bf16") and dtype != bf16) \
                        or (side == "ours_graphs" and dtype != torch.float32):
                    continue
                if left(args) < 60:
                    res["notes"].append(f"VAR sampling B={B} {side} skipped: time budget")
                    continue

                @torch.no_grad()
                def run():
                    if side.endswith("graphs"):  # static KV caches, one CUDA graph per scale (no autocast)
                        m, d = (fvar, fvae) if side.startswith("ours_bf16") else (var, vae)
                        _, f_hat = m.autoregressive_infer_cfg(labels, generator=torch.Generator(dev).manual_seed(0),
                                                              cuda_graphs=True, **from_var(**skw))
                        return d.fhat_to_img(f_hat)
                    if side == "ours_bf16_weights":
                        _, f_hat = fvar.autoregressive_infer_cfg(labels, generator=torch.Generator(dev).manual_seed(0),
                                                                 **from_var(**skw))
                        return fvae.fhat_to_img(f_hat)
                    with autocast(dev, dtype):
                        if side == "official":
                            return off[1].autoregressive_infer_cfg(B, labels, g_seed=0, **skw)
                        _, f_hat = var.autoregressive_infer_cfg(labels, generator=torch.Generator(dev).manual_seed(0),
                                                                **from_var(**skw))
                        return vae.fhat_to_img(f_hat)
                var.eval()
                try:
                    t = timed(run, dev, reps1 if B == 1 else reps64)
                except Exception as e:  # a failing variant (e.g. graph capture) must not lose the other rows
                    res["notes"].append(f"VAR sampling B={B} {side} {dtype} failed: {type(e).__name__}: {e}"[:500])
                    continue
                row(model="VAR-d16", what="sample+decode", side=side, batch=B, dtype=str(dtype).split(".")[-1],
                    images_per_s=B / t["median_s"], **t)
    # VAR training step, bf16
    Bt = 4 if args.dry_run else 32
    L = sum(p * p for p in pn)
    tokens = torch.randint(0, 4096, (Bt, L), device=dev)
    tl = torch.arange(Bt, device=dev) % 1000
    for side in ("ours", "official"):
        if (side == "official" and off is None) or left(args) < 60:
            continue
        model = var if side == "ours" else off[1]
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")

        def step():
            with autocast(dev, bf16):
                if side == "ours":
                    loss = var.forward_loss(tokens, tl)["loss"]
                else:
                    x = off[0].quantize.idxBl_to_var_input(list(tokens.split([p * p for p in pn], dim=1)))
                    loss = F.cross_entropy(off[1](tl, x).view(-1, 4096).float(), tokens.view(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        t = timed(step, dev, reps64 + 1)
        row(model="VAR-d16", what="train_step", side=side, batch=Bt, dtype="bfloat16", images_per_s=Bt / t["median_s"],
            **t)
        model.eval()
    del var, vae, off, fvar, fvae
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    # ------------------------------------------------------------------ MAR-B
    ours, theirs, side_len = build_mar(args, dev)
    if theirs is None:
        res["notes"].append("official MAR code not found / not importable: MAR rows are ours only")
    iters = 4 if args.dry_run else 64
    fast = bf16_for_sampling(ours)
    for B in batches:
        for dtype in ((bf16, torch.float32) if B == batches[-1] else (bf16,)):
            lab = torch.arange(B, device=dev) % 1000
            for side in ("ours", "ours_bf16_weights", "official", "ours_bf16_weights_graphs"):
                if (side == "official" and theirs is None) or (side.startswith("ours_bf16") and dtype != bf16):
                    continue
                if left(args) < 90:
                    res["notes"].append(f"MAR sampling B={B} {side} {dtype} skipped: time budget")
                    continue

                @torch.no_grad()
                def run():
                    if side.startswith("ours_bf16_weights"):  # _graphs: DiffLoss steps replayed as CUDA graphs
                        return fast.sample(lab, num_steps=iters, cfg=2.9, guidance_schedule="linear", temperature=1.0,
                                           generator=torch.Generator(dev).manual_seed(0),
                                           cuda_graphs=side.endswith("graphs"))
                    with autocast(dev, dtype):
                        if side == "official":
                            return theirs.sample_tokens(bsz=B, num_iter=iters, cfg=2.9, cfg_schedule="linear",
                                                        labels=lab, temperature=1.0)
                        return ours.sample(lab, num_steps=iters, cfg=2.9, guidance_schedule="linear", temperature=1.0,
                                           generator=torch.Generator(dev).manual_seed(0))
                try:
                    t = timed(run, dev, 1 if not args.dry_run and B > 1 else reps1)
                except Exception as e:  # a failing variant (e.g. graph capture) must not lose the other rows
                    res["notes"].append(f"MAR sampling B={B} {side} {dtype} failed: {type(e).__name__}: {e}"[:500])
                    continue
                row(model="MAR-B", what="sample tokens", side=side, batch=B, dtype=str(dtype).split(".")[-1],
                    num_iter=iters, images_per_s=B / t["median_s"], **t)
    Bt = 4 if args.dry_run else 64
    g = torch.Generator(dev).manual_seed(0)
    latents = torch.randn(Bt, 16, side_len, side_len, device=dev, generator=g)
    tok = latents.flatten(2).transpose(1, 2)  # (B, L, 16), patch size 1
    tl = torch.arange(Bt, device=dev) % 1000
    for side in ("ours", "official"):
        if (side == "official" and theirs is None) or left(args) < 30:
            continue
        model = ours if side == "ours" else theirs
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=dev.type == "cuda")

        def step():
            with autocast(dev, bf16):
                loss = ours.forward_loss(tok, tl)["loss"] if side == "ours" else theirs(latents, tl)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        t = timed(step, dev, reps64 + 1)
        row(model="MAR-B", what="train_step", side=side, batch=Bt, dtype="bfloat16", images_per_s=Bt / t["median_s"],
            **t)
        model.eval()
    res["elapsed_s"] = time.perf_counter() - T0
    (args.out / "gpu_check.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [f"# gpu_check ({res['device']}, torch {res['torch']}{', DRY RUN' if args.dry_run else ''})", "",
             "| model | what | side | batch | dtype | images/s | median s | peak MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['model']} | {r['what']} | {r['side']} | {r['batch']} | {r['dtype']} | "
                     f"{r['images_per_s']:.2f} | {r['median_s']:.3f} | {r.get('peak_mib', '-')} |")
    lines += [""] + [f"- {n}" for n in res["notes"]] + [f"- elapsed {res['elapsed_s']:.0f} s"]
    (args.out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
