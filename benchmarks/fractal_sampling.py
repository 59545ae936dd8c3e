"""FractalGen sampling speed, ours against the official LTH14/fractalgen sampler on the same weights
and config, in the same process, interleaved (ours, official, ours, official, ...), seconds per
image and the ratio official / ours (> 1: ours faster).

Both run the same depth-first recursion; ours uses a growing KV cache in the AR levels (one new
position per step through the blocks, the official embeds the whole sequence and attends over a
fixed-size cache every step) and in the PixelLoss (the official re-runs the 4-token sequence for
each of R, G, B). The lower levels are batched across all the patches of a step in both. Both
draw from the same seed in the same order, so the benchmark also checks that the images are
identical.

    .venv/bin/python benchmarks/fractal_sampling.py --fractalgen-root /tmp/official/fractalgen \
        --out benchmarks/results/fractal_sampling_cpu.json

``--fractalgen-root`` is a checkout of github.com/LTH14/fractalgen; it is imported the way
scripts/record_fixtures/fractal.py does (no timm / torchvision needed, ``.cuda()`` a no-op on CPU).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from genmodels.generators.fractal import FractalGen  # noqa: E402
from genmodels.sampling import from_fractal_temperature  # noqa: E402

# (name, img_size_list, embed_dim_list, num_blocks_list, num_heads_list, types, kwargs, num_iter_list)
CONFIGS = {
    "fractalar_16px": ((16, 4, 1), (128, 64, 32), (4, 2, 1), (4, 4, 2), ("ar", "ar", "ar"), dict(num_conds=1), (16, 16)),
    "fractalmar_16px": ((16, 4, 1), (128, 64, 32), (4, 2, 1), (4, 4, 2), ("mar", "mar", "ar"), dict(num_conds=5),
                        (8, 8)),
    "fractalmar_gp_32px": ((32, 8, 2, 1), (128, 64, 32, 32), (4, 2, 1, 1), (4, 4, 2, 2), ("mar", "mar", "mar", "ar"),
                           dict(num_conds=5, guiding_pixel=True), (8, 4, 4)),
}


def load_script(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fractalgen-root", type=Path, required=True)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--temperature", type=float, default=1.0, help="official temperature T (ours: 1 / T)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rec = load_script("record_fractal", ROOT / "scripts" / "record_fixtures" / "fractal.py")
    helper = rec.load_weights_helper()
    official_fractalgen, official_mar = rec.import_official(args.fractalgen_root)
    results = []
    for name in args.configs:
        sizes, dims, blocks, heads, types, kw, iters = CONFIGS[name]
        torch.manual_seed(0)
        off = official_fractalgen.FractalGen(img_size_list=sizes, embed_dim_list=dims, num_blocks_list=blocks,
                                             num_heads_list=heads, generator_type_list=types, class_num=10, **kw)
        ours = FractalGen(sizes, dims, blocks, heads, types, num_classes=10, **kw)
        for m in off.modules():
            if isinstance(m, official_mar.MAR):
                m.mask_ratio_generator = rec.TorchTruncnorm()
        helper.perturb_(off, seed=3)
        helper.perturb_(ours, seed=3)
        off.eval()
        ours.eval()
        labels = torch.arange(args.batch) % 10

        def run_official(seed: int) -> torch.Tensor:
            with torch.no_grad():
                emb = off.class_emb(labels)
                if args.cfg != 1.0:
                    emb = torch.cat([emb, off.fake_latent.repeat(args.batch, 1)])
                torch.manual_seed(seed)
                return off.sample(cond_list=[emb] * kw["num_conds"], num_iter_list=list(iters), cfg=args.cfg,
                                  cfg_schedule="linear", temperature=args.temperature, filter_threshold=1e-4,
                                  fractal_level=0)

        def run_ours(seed: int) -> torch.Tensor:
            return ours.sample(labels, cfg=args.cfg, guidance_schedule="linear", num_iter_list=iters,
                               temperature=from_fractal_temperature(args.temperature), filter_threshold=1e-4,
                               generator=torch.Generator().manual_seed(seed))

        t_ours, t_off, same = [], [], True
        for r in range(args.repeats + 1):  # the first round warms up and is not timed
            t0 = time.perf_counter()
            a = run_ours(r)
            t1 = time.perf_counter()
            b = run_official(r)
            t2 = time.perf_counter()
            same &= bool(torch.allclose(a, b, atol=1e-4))
            if r:
                t_ours.append((t1 - t0) / args.batch)
                t_off.append((t2 - t1) / args.batch)
        row = dict(config=name, img_size_list=sizes, embed_dim_list=dims, num_blocks_list=blocks, types=types,
                   num_iter_list=iters, batch=args.batch, cfg=args.cfg, repeats=args.repeats,
                   ours_s_per_img=statistics.median(t_ours), official_s_per_img=statistics.median(t_off),
                   ratio_official_over_ours=statistics.median(t_off) / statistics.median(t_ours),
                   identical_images=same, ours_all=t_ours, official_all=t_off)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_all")}), flush=True)
        results.append(row)
    meta = dict(device="cpu", threads=args.threads, torch=torch.__version__, machine=platform.machine(),
                processor=platform.processor(), note="shared CPU; interleaved runs, medians")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
