"""Time and peak memory of precision/recall (k-NN manifolds, k=3) at ADM scale, against the
matmul floor measured in the same run.

    PYTHONPATH=. .venv/bin/python benchmarks/precision_recall_bench.py                  # 50k x 50k x 2048, CPU
    PYTHONPATH=. .venv/bin/python benchmarks/precision_recall_bench.py --n_real 10000 --n_fake 10000 --old
    python benchmarks/precision_recall_bench.py --device cuda --arithmetic adm-fp16

Random pool_3-like features (ReLU'd N(0.6, 0.4)) stand in for Inception features (the cost
does not depend on the values). Prints and (``--out``) appends one JSON line with:

* ``time_s``: ``precision_recall`` (both radius passes + the cross pass), and its passes;
* ``floor_s``: the matmul floor = a plain float32 ``a @ b.T`` of every block pair the
  metric's definition needs (real x real, fake x fake, real x fake in ``chunk_size``
  blocks: (N^2 + M^2 + N M) x D multiply-adds), each distinct block shape timed here
  (median of ``--floor_repeats``) and summed; ``floor16_s`` the same with float16 operands
  (ADM's arithmetic); ``ratio`` = time_s / floor_s (target <= 1.3);
* ``old_time_s`` (``--old``): the pre-issue-17 algorithm (``tests/pr_reference.py``) on the
  same features, and whether its results are identical;
* peak memory: CUDA ``max_memory_allocated`` on GPU, the process's peak resident set size
  (ru_maxrss) on CPU, beside the features' own size.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from genmodels.evaluation.metrics import manifold_radii, precision_recall  # noqa: E402


CLOCK = time.perf_counter  # --clock process: this process's CPU time (robust on a shared machine)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def block_shapes(n: int, m: int, c: int) -> dict[tuple[int, int], int]:
    """How many (rows, cols) blocks of each shape an n x m product in c-blocks has."""
    out: dict[tuple[int, int], int] = {}
    for i in range(0, n, c):
        for j in range(0, m, c):
            key = (min(c, n - i), min(c, m - j))
            out[key] = out.get(key, 0) + 1
    return out


def matmul_floor(n_real: int, n_fake: int, dim: int, c: int, dtype: torch.dtype, dev: torch.device,
                 repeats: int) -> float:
    """Seconds of plain ``a @ b.T`` (out= preallocated) over every block pair of the three
    products real x real, fake x fake, real x fake, timed per distinct shape and summed."""
    counts: dict[tuple[int, int], int] = {}
    for n, m in ((n_real, n_real), (n_fake, n_fake), (n_real, n_fake)):
        for key, v in block_shapes(n, m, c).items():
            counts[key] = counts.get(key, 0) + v
    g = torch.Generator().manual_seed(1)
    total = 0.0
    for (r, s), count in counts.items():
        a = torch.rand(r, dim, generator=g).to(dev, dtype)
        b = torch.rand(s, dim, generator=g).to(dev, dtype)
        out = torch.empty(r, s, dtype=dtype, device=dev)
        torch.mm(a, b.T, out=out)  # warm-up
        times = []
        for _ in range(repeats):
            sync(dev)
            t = CLOCK()
            torch.mm(a, b.T, out=out)
            sync(dev)
            times.append(CLOCK() - t)
        total += statistics.median(times) * count
        del a, b, out
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n_real", type=int, default=50_000)
    ap.add_argument("--n_fake", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--chunk_size", type=int, default=10_000, help="block size (ADM: 10,000)")
    ap.add_argument("--arithmetic", default="adm-fp16", choices=["fp32", "adm-fp16"],
                    help="distance blocks in ADM's float16 (float32 fallback per block; the judge's ADM mode) "
                         "or float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--floor_repeats", type=int, default=3)
    ap.add_argument("--no_floor", action="store_true", help="skip the matmul floor")
    ap.add_argument("--old", action="store_true", help="also time the pre-issue-17 algorithm (tests/pr_reference.py)")
    ap.add_argument("--clock", choices=["wall", "process"], default="wall",
                    help="wall time, or this process's CPU time (CPU, --threads 1, on a busy machine)")
    ap.add_argument("--out", type=Path, default=None, help="append the JSON line here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    global CLOCK
    if args.clock == "process":
        CLOCK = time.process_time

    g = torch.Generator().manual_seed(0)
    real = (torch.randn(args.n_real, args.dim, generator=g) * 0.4 + 0.6).clamp_min_(0).to(dev)
    fake = (torch.randn(args.n_fake, args.dim, generator=g) * 0.4 + 0.62).clamp_min_(0).to(dev)
    feat_mb = (real.numel() + fake.numel()) * 4 / 2 ** 20
    rec = dict(n_real=args.n_real, n_fake=args.n_fake, dim=args.dim, k=args.k, chunk=args.chunk_size,
               arithmetic=args.arithmetic, device=str(dev), threads=torch.get_num_threads(),
               cpu=platform.processor() or platform.machine(), torch=torch.__version__,
               features_mib=round(feat_mb), clock=args.clock)
    try:
        rec["loadavg_start"] = list(__import__("os").getloadavg())
    except OSError:
        pass
    if dev.type == "cuda":
        sync(dev)
        torch.cuda.reset_peak_memory_stats()
    base_rss = rss_mb()

    t0 = CLOCK()
    r_real = manifold_radii(real, args.k, args.chunk_size, arithmetic=args.arithmetic)
    sync(dev)
    t1 = CLOCK()
    p, r = precision_recall(real, fake, args.k, args.chunk_size, real_radii=r_real, arithmetic=args.arithmetic)
    sync(dev)
    t2 = CLOCK()
    rec.update(precision=p, recall=r, time_s=round(t2 - t0, 2), real_radii_s=round(t1 - t0, 2),
               fake_radii_and_cross_s=round(t2 - t1, 2))
    if dev.type == "cuda":
        rec["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2 ** 20)
    else:
        rec["peak_rss_mib"], rec["rss_during_mib"] = round(rss_mb()), round(rss_mb() - base_rss)

    if args.old:
        from tests.pr_reference import old_precision_recall
        t = CLOCK()
        old = old_precision_recall(real, fake, args.k, args.chunk_size, arithmetic=args.arithmetic)
        sync(dev)
        rec["old_time_s"] = round(CLOCK() - t, 2)
        rec["old_identical"] = old == (p, r)
    if not args.no_floor:
        rec["floor_s"] = round(matmul_floor(args.n_real, args.n_fake, args.dim, args.chunk_size, torch.float32, dev,
                                            args.floor_repeats), 2)
        rec["floor16_s"] = round(matmul_floor(args.n_real, args.n_fake, args.dim, args.chunk_size, torch.float16,
                                              dev, args.floor_repeats), 2)
        rec["ratio"] = round(rec["time_s"] / rec["floor_s"], 3)
        if "old_time_s" in rec:
            rec["old_ratio"] = round(rec["old_time_s"] / rec["floor_s"], 3)
    try:
        rec["loadavg_end"] = list(__import__("os").getloadavg())
    except OSError:
        pass
    print(json.dumps(rec))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
