"""Time and peak memory of precision/recall (k-NN manifolds, k=3) at ADM scale.

    .venv/bin/python benchmarks/precision_recall_bench.py                      # 50k x 50k x 2048, CPU
    .venv/bin/python benchmarks/precision_recall_bench.py --n_real 10000 --n_fake 10000
    python benchmarks/precision_recall_bench.py --device cuda --chunk_size 10000 --arithmetic adm-fp16

Random Gaussian features stand in for Inception pool_3 features (the cost does not depend
on the values). Prints wall time, the three passes' share, and peak memory: CUDA
``max_memory_allocated`` on GPU, the process's peak resident set size (ru_maxrss) on CPU,
both beside the features' own size and the theoretical block working set
(~ chunk^2 x (4 B distances + 4 B top-k merge + 1 B mask)).
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from genmodels.evaluation.metrics import manifold_radii, precision_recall


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n_real", type=int, default=50_000)
    ap.add_argument("--n_fake", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--chunk_size", type=int, default=10_000, help="block size (ADM: 10,000)")
    ap.add_argument("--arithmetic", default="fp32", choices=["fp32", "adm-fp16"],
                    help="distance blocks in float32, or ADM's float16 with a float32 fallback per block")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)

    g = torch.Generator().manual_seed(0)
    real = torch.randn(args.n_real, args.dim, generator=g).to(dev)
    fake = (torch.randn(args.n_fake, args.dim, generator=g) * 1.02).to(dev)
    feat_mb = (real.numel() + fake.numel()) * 4 / 2 ** 20
    block_mb = args.chunk_size * (args.chunk_size + args.k + 1) * 9 / 2 ** 20
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss = rss_mb()

    t0 = time.perf_counter()
    r_real = manifold_radii(real, args.k, args.chunk_size, arithmetic=args.arithmetic)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    precision, recall = precision_recall(real, fake, args.k, args.chunk_size, real_radii=r_real,
                                         arithmetic=args.arithmetic)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t2 = time.perf_counter()

    flops = 2 * args.dim * (args.n_real ** 2 + args.n_fake ** 2 + args.n_real * args.n_fake)
    print(f"precision/recall k={args.k}: {args.n_real} real x {args.n_fake} fake x {args.dim} dims, "
          f"chunk {args.chunk_size}, {args.arithmetic}, device {dev}, threads {torch.get_num_threads()}")
    print(f"  precision {precision:.4f}  recall {recall:.4f}")
    print(f"  time {t2 - t0:.1f} s  (real radii {t1 - t0:.1f} s, fake radii + cross pass {t2 - t1:.1f} s; "
          f"{flops / (t2 - t0) / 1e9:.0f} GFLOP/s on the distance matmuls)")
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
        print(f"  peak CUDA memory {peak:.0f} MiB (features {feat_mb:.0f} MiB, block working set ~{block_mb:.0f} MiB)")
    else:
        print(f"  peak RSS {rss_mb():.0f} MiB (+{rss_mb() - base_rss:.0f} MiB during the computation; "
              f"features {feat_mb:.0f} MiB, block working set ~{block_mb:.0f} MiB)")


if __name__ == "__main__":
    main()
