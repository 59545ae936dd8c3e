"""MAR's speed / quality trade-off: sampling time per image against the number of
autoregressive steps (``num_iter``) and of diffusion steps per token (MAR paper Fig. 6 /
§5.3: fewer AR steps and fewer DiffLoss steps are faster; the paper uses 64 and 100).

For each setting: seconds per image (median of ``--repeats`` batches, tokens only, and with
the tokenizer's decode when a checkpoint is given) and, with ``--fid N`` and a trained
GeneratorModule checkpoint, FID / IS / precision / recall of N samples from the evaluation
harness (digits-classifier features by default). The causal AR + DiffLoss variant (one
token per step, KV cache) can be measured the same way from its checkpoint.

    .venv/bin/python benchmarks/mar_sampling.py --threads 1                         # timing, random weights
    .venv/bin/python benchmarks/mar_sampling.py --ckpt outputs/digits_mar/checkpoints/last.ckpt \
        --fid 500 --out benchmarks/results/mar_digits_speed_quality.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIGITS_MAR = dict(token_shape=(8, 8), token_channels=4, num_classes=10, encoder_embed_dim=128, encoder_depth=2,
                  encoder_num_heads=4, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4, buffer_size=8,
                  diffloss_d=3, diffloss_w=128, num_sampling_steps="50")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", type=Path, default=None, help="GeneratorModule checkpoint of a MAR (else random weights)")
    ap.add_argument("--num-iters", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--diffusion-steps", type=int, nargs="+", default=[10, 25, 50, 100])
    ap.add_argument("--fixed-iter", type=int, default=16, help="num_iter while varying diffusion steps")
    ap.add_argument("--fixed-steps", type=int, default=50, help="diffusion steps while varying num_iter")
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fid", type=int, default=0, help="samples for FID/IS/P/R per setting (needs --ckpt)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    module = None
    if args.ckpt is not None:
        module = load_generator_module(args.ckpt)
        model = module.generator
    else:
        from genmodels.generators.mar import MAR
        torch.manual_seed(0)
        model = MAR(**DIGITS_MAR).eval()
    labels = torch.arange(args.batch) % model.num_classes
    causal = getattr(model, "attention", "") == "causal"
    settings = [(n, args.fixed_steps) for n in ([model.seq_len] if causal else args.num_iters)]
    settings += [(args.fixed_iter if not causal else model.seq_len, s) for s in args.diffusion_steps
                 if (args.fixed_iter if not causal else model.seq_len, s) not in settings]

    rows = []
    for num_iter, steps in settings:
        kw = dict(num_steps=num_iter, num_sampling_steps=steps, cfg=args.cfg, temperature=args.temperature)
        times = []
        for r in range(args.repeats + 1):
            t = time.perf_counter()
            if module is not None:  # tokens + decode, through the pipeline
                module.pipeline.sample(labels, generator=torch.Generator().manual_seed(r), **kw)
            else:
                model.sample(labels, generator=torch.Generator().manual_seed(r), **kw)
            if r:  # the first run warms up
                times.append(time.perf_counter() - t)
        row = {"num_iter": num_iter, "diffusion_steps": steps, "sec_per_image": statistics.median(times) / args.batch}
        if args.fid and module is not None:
            from genmodels.evaluation.evaluator import Evaluator
            ev = Evaluator(num_samples=args.fid, batch_size=100, sample_kwargs=kw, reference="train",
                           progress=False, metric_prefix="")
            from genmodels.data import DigitsDataModule
            dm = DigitsDataModule(image_size=module.tokenizer.spec.image_size or 32)
            ev_metrics = _evaluate(ev, module, dm)
            row.update({k: ev_metrics[k] for k in ("fid", "is", "precision", "recall") if k in ev_metrics})
        rows.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

    meta = {"ckpt": str(args.ckpt) if args.ckpt else None, "params": sum(p.numel() for p in model.parameters()),
            "causal": causal, "batch": args.batch, "cfg": args.cfg, "guidance_schedule": model.cfg_schedule,
            "temperature": args.temperature, "convention": "genmodels (MAR's knobs mean the same)",
            "fid_samples": args.fid, "threads": args.threads,
            "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


def load_generator_module(path: Path):
    """A GeneratorModule over ``genmodels.load(path)`` (the pipeline of a ``genmodels fit``
    checkpoint: generator, tokenizer stored inside it, EMA weights, default knobs), for the
    evaluation harness."""
    import genmodels
    from genmodels.training import GeneratorModule

    pipe = genmodels.load(path)
    return GeneratorModule(pipe.generator, tokenizer=pipe.tokenizer, sample_kwargs=pipe.sample_kwargs,
                           ema_decay=None).eval()


def _evaluate(ev, module, datamodule) -> dict[str, float]:
    """Run the judge outside a Trainer: explicit inputs (the module's sample_block, the data
    module for the train-split reference, cached by content)."""
    module.evaluator = ev
    sampler = module.block_sampler(seed=ev.seed, **ev.sample_kwargs)
    return ev.evaluate(sampler, sampler.block_size,
                       int(getattr(module.generator, "num_classes", 0) or 0) or 1, datamodule=datamodule,
                       device=module.device)


if __name__ == "__main__":
    main()
