"""F.linear against ``nn.linear.linear_t`` (the weight pre-transposed to (in, out)) on the CPU.

Times both at the rows a sampler's few-row steps see, for the layer shapes of our samplers
(DiffLoss 512-wide MLP, transformer blocks at width 512 / 1024, VAR's head), interleaved,
median of ``--repeats`` rounds, weights cycled so that they are not all in cache; checks that
how far apart the outputs are (bitwise equal, or the float32
rounding of another summation order). Writes a Markdown table (ratio > 1: ``linear_t`` is faster) and a plot.

    python benchmarks/linear_layout.py --threads 1 2 --out benchmarks/results/linear_layout
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from genmodels.nn.linear import SMALL_ROWS, linear_t  # noqa: E402

SHAPES = [(512, 512), (512, 1536), (512, 2048), (2048, 512), (1024, 1024), (512, 4096)]
ROWS = [2, 4, 8, 16, 32, 64, 128, 256, 512]


def timed(fn, calls: int) -> float:
    t = time.perf_counter()
    for i in range(calls):
        fn(i)
    return (time.perf_counter() - t) / calls


def measure(K: int, N: int, M: int, repeats: int, calls: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(N, K, generator=g) for _ in range(6)]
    wts = [w.t().contiguous() for w in ws]
    bs = [torch.randn(N, generator=g) for _ in range(6)]
    x = torch.randn(M, K, generator=g)
    plain = lambda i: F.linear(x, ws[i % 6], bs[i % 6])  # noqa: E731
    trans = lambda i: linear_t(x, wts[i % 6], bs[i % 6])  # noqa: E731
    ref, out = plain(0), trans(0)
    equal = bool(torch.equal(ref, out))
    rel = float((out - ref).abs().max() / ref.abs().max())
    plain(0), trans(0)
    a, b = [], []
    for _ in range(repeats):
        a.append(timed(plain, calls))
        b.append(timed(trans, calls))
    return {"K": K, "N": N, "rows": M, "f_linear_us": statistics.median(a) * 1e6,
            "linear_t_us": statistics.median(b) * 1e6, "ratio": statistics.median(a) / statistics.median(b),
            "equal": equal, "max_rel_diff": rel}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--calls", type=int, default=60)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/linear_layout"))
    args = ap.parse_args()
    rows = []
    with torch.no_grad():
        for t in args.threads:
            torch.set_num_threads(t)
            for K, N in SHAPES:
                for M in ROWS:
                    r = measure(K, N, M, args.repeats, args.calls) | {"threads": t}
                    rows.append(r)
                    print(f"[{t} t] {K}->{N} rows {M}: x{r['ratio']:.2f} bitwise={r['equal']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"command": " ".join(sys.argv), "torch": torch.__version__,
                                                         "small_rows": SMALL_ROWS, "rows": rows}, indent=1))
    lines = [f"# F.linear vs linear_t (weight pre-transposed), CPU float32\n",
             f"Written by `benchmarks/linear_layout.py`; command: `python {' '.join(sys.argv)}`; torch "
             f"{torch.__version__}. Ratio = F.linear time / linear_t time, median of {args.repeats} rounds of "
             f"{args.calls} calls (> 1: the transposed copy is faster). `nn.linear.SMALL_ROWS` = {SMALL_ROWS} "
             f"is the range the DiffLoss sampler takes it in. A `*`: the outputs differ in the last bits (MKL sums in "
             f"another order there); the last column: the largest such difference over the shape's rows, relative "
             f"to the largest output.\n"]
    for t in args.threads:
        lines.append(f"\n## {t} thread(s)\n\n| in -> out | " + " | ".join(f"{m} rows" for m in ROWS) + " | max diff / max out |")
        lines.append("|---|" + "---|" * (len(ROWS) + 1))
        for K, N in SHAPES:
            rs = [r for r in rows if r["threads"] == t and (r["K"], r["N"]) == (K, N)]
            lines.append(f"| {K} -> {N} | " + " | ".join(f"{r['ratio']:.2f}{'' if r['equal'] else '*'}" for r in rs)
                         + f" | {max(r['max_rel_diff'] for r in rs):.1e} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(args.threads), figsize=(5.5 * len(args.threads), 4), squeeze=False)
    for ax, t in zip(axes[0], args.threads):
        for K, N in SHAPES:
            rs = [r for r in rows if r["threads"] == t and (r["K"], r["N"]) == (K, N)]
            ax.plot([r["rows"] for r in rs], [r["ratio"] for r in rs], marker="o", label=f"{K}->{N}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axvspan(*SMALL_ROWS, color="g", alpha=0.08, label="SMALL_ROWS")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rows")
        ax.set_ylabel("F.linear time / linear_t time")
        ax.set_title(f"{t} thread(s)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=110)
    print("wrote", args.out.with_suffix(".md"), args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
