"""Speed-up of the approximate-tier knobs at the issue's model sizes (random weights, CPU, one
thread, process CPU time, variants interleaved, median of ``--repeats``):

* VAR d8 (41M), 256 px scales (1..16), VQ-VAE ch 32, B=4, cfg 2.5 linear, top-k 900, top-p 0.96,
  incl. decode: exact vs ``fastvar_prune=(0.5, 0.75)`` and ``(0.5,)``;
* MAR 4+4 x 512 + DiffLoss 3 x 512, 8 x 8 tokens, 16 iterations x 50 diffusion steps, B=1 and 8,
  cfg 3: exact vs ``cfg_cache_interval=2`` / ``4``, ``diffusion_steps_end=5``, 25 steps.

    PYTHONPATH=. python benchmarks/approx_speed.py --out benchmarks/results/approx_speed_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from genmodels.generators.mar import MAR  # noqa: E402
from genmodels.generators.var import VAR  # noqa: E402
from genmodels.tokenizers.multiscale_vq import VQVAE  # noqa: E402


def measure(fns: dict, repeats: int) -> dict:
    for fn in fns.values():
        fn()
    t = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            s = time.process_time()
            fn()
            t[k].append(time.process_time() - s)
    base = statistics.median(next(iter(t.values())))
    return {k: dict(median_s=statistics.median(v), min_s=min(v), max_s=max(v), speedup=base / statistics.median(v))
            for k, v in t.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    pn = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    vae = VQVAE(4096, 32, 32, share_quant_resi=4, v_patch_nums=pn, test_mode=True)
    var = VAR(vocab_size=4096, Cvae=32, patch_nums=pn, num_classes=10, depth=8, embed_dim=512, num_heads=8,
              init_adaln_gamma=0.5).eval()
    var.bind_tokenizer(vae)
    labels = torch.arange(4)
    kw = dict(cfg=2.5, guidance_schedule="linear", top_k=900, top_p=0.96)

    def v(**extra):
        return lambda: var.sample_images(labels, generator=torch.Generator().manual_seed(0), **kw, **extra)
    out = {"var_d8_B4": measure({"exact": v(), "fastvar (0.5, 0.75)": v(fastvar_prune=(0.5, 0.75)),
                                 "fastvar (0.5,)": v(fastvar_prune=(0.5,))}, args.repeats)}
    mar = MAR(token_shape=(8, 8), token_channels=16, num_classes=10, encoder_embed_dim=512, encoder_depth=4,
              encoder_num_heads=8, decoder_embed_dim=512, decoder_depth=4, decoder_num_heads=8, buffer_size=16,
              diffloss_d=3, diffloss_w=512, num_sampling_steps="50").eval()
    for B in (1, 8):
        lab = torch.arange(B) % 10

        def m(**extra):
            return lambda: mar.sample(lab, cfg=3.0, num_steps=16, generator=torch.Generator().manual_seed(0), **extra)
        out[f"mar_4+4x512_B{B}"] = measure({"exact": m(), "cfg cache 2": m(cfg_cache_interval=2),
                                            "cfg cache 4": m(cfg_cache_interval=4),
                                            "DiSA 50->5": m(diffusion_steps_end=5),
                                            "25 diffusion steps": m(num_sampling_steps=25)}, args.repeats)
    out["loadavg"] = list(os.getloadavg())
    out["clock"] = "process CPU time, 1 thread"
    for k, r in out.items():
        if isinstance(r, dict):
            print(k, ", ".join(f"{n} {x['median_s']:.2f}s x{x['speedup']:.2f}" for n, x in r.items()))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
