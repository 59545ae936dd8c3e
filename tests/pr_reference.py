"""The precision/recall algorithm of genmodels before issue 17, kept as the reference the
faster ``genmodels.evaluation.metrics`` must equal (tests/test_precision_recall_fast.py,
benchmarks/precision_recall_bench.py --old). Every block pair is its own matmul; the k + 1
smallest per row are merged by a top-k over [best | block]."""
from __future__ import annotations

import torch

from genmodels.evaluation.metrics import _arithmetic, _sq_dists, distance_block


def old_manifold_radii(x: torch.Tensor, k: int = 3, chunk_size: int = 10_000, dtype=None, arithmetic=None):
    n = x.shape[0]
    arith = _arithmetic(dtype, arithmetic)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    radii = torch.empty(n, dtype=out_dtype, device=x.device)
    for i in range(0, n, chunk_size):
        rows = x[i:i + chunk_size]
        best = None
        for j in range(0, n, chunk_size):
            cols = x[j:j + chunk_size]
            d = _sq_dists(rows.double(), cols.double()) if out_dtype == torch.float64 else \
                distance_block(rows, cols, arith)
            if best is not None:
                d = torch.cat([best, d], dim=1)
            best = torch.topk(d, min(k + 1, d.shape[1]), dim=1, largest=False, sorted=True).values
        radii[i:i + chunk_size] = best[:, k]
    return radii


def old_precision_recall(real, fake, k=3, chunk_size=10_000, dtype=None, real_radii=None, arithmetic=None):
    arith = _arithmetic(dtype, arithmetic)
    f64 = dtype == torch.float64
    r_real = old_manifold_radii(real, k, chunk_size, dtype, arith) if real_radii is None else real_radii
    r_fake = old_manifold_radii(fake, k, chunk_size, dtype, arith)
    real_in = torch.zeros(len(real), dtype=torch.bool)
    fake_in = torch.zeros(len(fake), dtype=torch.bool)
    for i in range(0, len(real), chunk_size):
        for j in range(0, len(fake), chunk_size):
            a, b = real[i:i + chunk_size], fake[j:j + chunk_size]
            d = _sq_dists(a.double(), b.double()) if f64 else distance_block(a, b, arith)
            real_in[i:i + chunk_size] |= (d <= r_fake[None, j:j + chunk_size]).any(1)
            fake_in[j:j + chunk_size] |= (d <= r_real[i:i + chunk_size, None]).any(0)
    return float(fake_in.double().mean()), float(real_in.double().mean())
