"""Speed and FID of the bf16 and approximate tiers on a trained digits checkpoint (issue 17).

For a VAR or MAR ``genmodels fit`` checkpoint, scores 1,000 class-balanced samples per seed
(seeds 0, 1, 2; the digits judge: digits-classifier features, ADM rules, reference = the
digits train split) for every variant of its paradigm:

* VAR: exact (float32), bf16 (autocast), bf16 weights (the bf16 tier, ``Pipeline.bf16()``),
  ``fastvar_prune=(0.5, 0.75)`` and ``(0.5,)``;
* MAR: exact, bf16 (autocast), bf16 weights, ``cfg_cache_interval=2`` / ``4`` (LazyMAR-style condition cache),
  ``diffusion_steps_end=5`` (DiSA-style annealing from the model's steps), and a fixed
  ``num_sampling_steps`` of half the model's (fewer DiffLoss steps, the existing knob).

Prints a table (tier, FID mean +- std over seeds, ΔFID vs exact, sampling CPU seconds per image
(process time of the sampler calls only), speed-up vs exact) and writes ``--out`` JSON.

    PYTHONPATH=. .venv/bin/python benchmarks/approx_tier.py --ckpt outputs/digits_var/checkpoints/last.ckpt \\
        --out benchmarks/results/approx_tier_var_digits.json
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import genmodels  # noqa: E402
from genmodels.data import DigitsDataModule  # noqa: E402
from genmodels.evaluation import Evaluator  # noqa: E402


def variants(pipe) -> list[tuple[str, str, dict, str | None]]:
    """(name, tier, knobs, precision) per variant of this generator; precision: None (float32),
    "bf16" (autocast) or "bf16-weights" (the bf16 tier's copy, ``Pipeline.bf16()``)."""
    kind = type(pipe.generator).__name__
    if kind == "VAR":
        return [("exact fp32", "exact", {}, None), ("bf16 autocast", "bf16", {}, "bf16"),
                ("bf16 weights (tier)", "bf16", {}, "bf16-weights"),
                ("FastVAR prune (0.5, 0.75)", "approximate", {"fastvar_prune": (0.5, 0.75)}, None),
                ("FastVAR prune (0.5,)", "approximate", {"fastvar_prune": (0.5,)}, None)]
    if kind == "MAR":
        steps = int(pipe.generator.diffloss.num_sampling_steps)
        return [("exact fp32", "exact", {}, None), ("bf16 autocast", "bf16", {}, "bf16"),
                ("bf16 weights (tier)", "bf16", {}, "bf16-weights"),
                ("LazyMAR cfg cache 2", "approximate", {"cfg_cache_interval": 2}, None),
                ("LazyMAR cfg cache 4", "approximate", {"cfg_cache_interval": 4}, None),
                (f"DiSA {steps}->5 diffusion steps", "approximate", {"diffusion_steps_end": 5}, None),
                (f"{steps // 2} diffusion steps", "approximate", {"num_sampling_steps": steps // 2}, None)]
    raise SystemExit(f"approx_tier: no variants for {kind}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--num_samples", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = genmodels.load(args.ckpt).eval()
    dm = DigitsDataModule(image_size=32)
    rows = []
    ref = None
    for name, tier, knobs, amp in variants(pipe):
        if args.only and name not in args.only:
            continue
        ev = Evaluator(num_samples=args.num_samples, batch_size=100, reference="train", progress=False,
                       metric_prefix="", autocast="bf16" if amp == "bf16" else None,
                       precision="bf16" if amp == "bf16-weights" else None)
        p = pipe.bf16() if amp == "bf16-weights" else pipe
        ref = ref or ev.resolve_reference(dm)
        per_seed = []
        for seed in args.seeds:
            fn = p.block_sampler(seed=seed, block_size=100, **knobs)
            spent = [0.0]

            def timed(class_id: int, block: int, fn=fn, spent=spent) -> torch.Tensor:
                t = time.process_time()
                x = fn(class_id, block)
                spent[0] += time.process_time() - t
                return x
            timed.block_size = fn.block_size
            m = ev.evaluate(timed, 100, num_classes=10, reference=ref)
            per_seed.append(dict(seed=seed, fid=m["fid"], precision=m["precision"], recall=m["recall"],
                                 sec_per_image=m["sec_per_image"], cpu_s=spent[0]))
        fids = [r["fid"] for r in per_seed]
        row = dict(variant=name, tier=tier, knobs={k: list(v) if isinstance(v, tuple) else v for k, v in knobs.items()},
                   autocast=amp, fid_mean=statistics.mean(fids), fid_std=statistics.pstdev(fids),
                   cpu_s_per_image=statistics.median(r["cpu_s"] for r in per_seed) / args.num_samples,
                   seeds=per_seed, sample_kwargs=pipe.sample_kwargs)
        rows.append(row)
        print(f"{name:<34} {tier:<12} FID {row['fid_mean']:.2f} +- {row['fid_std']:.2f}  "
              f"{row['cpu_s_per_image'] * 1e3:.1f} ms/img (CPU)", flush=True)
    base = next((r for r in rows if r["tier"] == "exact"), None)
    if base:
        for r in rows:
            r["delta_fid"] = r["fid_mean"] - base["fid_mean"]
            r["speedup"] = base["cpu_s_per_image"] / r["cpu_s_per_image"]
    out = dict(ckpt=str(args.ckpt), generator=type(pipe.generator).__name__, threads=args.threads,
               num_samples=args.num_samples, loadavg=list(os.getloadavg()), rows=rows)
    print(json.dumps([{k: r.get(k) for k in ("variant", "tier", "fid_mean", "fid_std", "delta_fid", "speedup")}
                      for r in rows], indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
