"""Our MAR against the official LTH14/mar code on the same config and weights, on this machine.

Measures, for one small config (default: 64 tokens of 16 dims, 256 wide, 4 + 4 blocks, DiffLoss
3 x 256, batch 16):

* ``train_step``: forward (random orders + masking, encoder, decoder, DiffLoss with
  ``diffusion_batch_mul`` draws) + backward + AdamW step;
* ``sample``: ``sample_tokens`` / ``sample`` of a batch with CFG (linear schedule) for
  ``num_iter`` AR steps and ``num_sampling_steps`` diffusion steps (and without CFG).

The official code runs unchanged on CPU (``Tensor.cuda`` made a no-op, torchvision stubbed
for timm's imports, see scripts/record_fixtures/mar.py). It needs timm 0.9.x, so run this
script with a Python that has timm (our package only needs to be importable), e.g.::

    /work/official/venv/bin/python benchmarks/mar_official.py --official-root /work/official/mar \
        --threads 1 --out benchmarks/results/mar_official_cpu.json

Prints a table and writes JSON with the median times and the ratio official / ours
(> 1: ours is faster).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # our package, also from a Python whose environment only has timm


def timeit_pair(fn_a, fn_b, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """Median wall times of ``fn_a`` and ``fn_b``, run alternately (a shared, loaded CPU
    then slows both alike)."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, acc in ((fn_a, ta), (fn_b, tb)):
            t = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def load_official(root: Path):
    spec = importlib.util.spec_from_file_location("record_mar", ROOT / "scripts" / "record_fixtures" / "mar.py")
    rec = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rec)
    _, mar, _ = rec.import_official(root)
    return mar


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official-root", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seq-side", type=int, default=8, help="token grid side (img_size / vae_stride)")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--diffloss-d", type=int, default=3)
    ap.add_argument("--diffloss-w", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--sample-batch", type=int, default=8)
    ap.add_argument("--num-iter", type=int, default=16)
    ap.add_argument("--sampling-steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    mar_mod = load_official(args.official_root)
    from genmodels.checkpoints.mar import mar_kwargs
    from genmodels.generators.mar import MAR

    official_kw = dict(img_size=args.seq_side * 16, vae_stride=16, patch_size=1, vae_embed_dim=16,
                       encoder_embed_dim=args.width, encoder_depth=args.depth, encoder_num_heads=args.heads,
                       decoder_embed_dim=args.width, decoder_depth=args.depth, decoder_num_heads=args.heads,
                       class_num=10, buffer_size=16, diffloss_d=args.diffloss_d, diffloss_w=args.diffloss_w,
                       num_sampling_steps=str(args.sampling_steps), diffusion_batch_mul=4)
    torch.manual_seed(0)
    theirs = mar_mod.MAR(norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), **official_kw)
    ours = MAR(**mar_kwargs(**official_kw))
    ours.load_state_dict(theirs.state_dict())
    L, C = args.seq_side ** 2, 16
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(args.batch, C, args.seq_side, args.seq_side, generator=g)
    tokens = theirs.patchify(latents)
    labels = torch.randint(0, 10, (args.batch,), generator=g)
    sample_labels = torch.arange(args.sample_batch) % 10

    def step(model, fwd):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.02)
        model.train()

        def run():
            loss = fwd()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return run

    results = {}
    np.random.seed(0)
    t_off, t_our = timeit_pair(step(theirs, lambda: theirs(latents, labels)),
                               step(ours, lambda: ours.forward_loss(tokens, labels)["loss"]), args.repeats)
    results["train_step"] = {"official_s": t_off, "ours_s": t_our, "ratio": t_off / t_our}

    theirs.eval()
    ours.eval()
    for name, cfg, bsz in (("sample_cfg", 2.0, args.sample_batch), ("sample_nocfg", 1.0, args.sample_batch),
                           ("sample_cfg_bs1", 2.0, 1)):
        lab = sample_labels[:bsz]

        def official():
            with torch.no_grad():
                theirs.sample_tokens(bsz=bsz, num_iter=args.num_iter, cfg=cfg, labels=lab, temperature=1.0)

        def our():
            ours.sample(lab, num_steps=args.num_iter, cfg=cfg, temperature=1.0, generator=torch.Generator().manual_seed(0))

        t_off, t_our = timeit_pair(official, our, args.repeats)
        results[name] = {"official_s": t_off, "ours_s": t_our, "ratio": t_off / t_our, "batch": bsz,
                         "per_image_ours_s": t_our / bsz}

    meta = {"config": official_kw, "batch": args.batch, "sample_batch": args.sample_batch, "num_iter": args.num_iter,
            "threads": args.threads, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "params": sum(p.numel() for p in ours.parameters())}
    print(f"MAR ours vs official (LTH14/mar), {meta['params'] / 1e6:.2f}M params, {args.threads} thread(s)")
    print(f"{'measure':<14}{'official s':>12}{'ours s':>10}{'official/ours':>15}")
    for k, v in results.items():
        print(f"{k:<14}{v['official_s']:>12.3f}{v['ours_s']:>10.3f}{v['ratio']:>15.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
