"""FID, Inception Score, precision and recall on feature vectors.

Everything here works on features already extracted (``features.py``) and gathered over
ranks (``evaluator.py``); the definitions follow the OpenAI ADM evaluator
(openai/guided-diffusion ``evaluations/evaluator.py``), the protocol behind the ImageNet-256
numbers of VAR, MAR, TiTok and FractalGen:

* FID (Heusel et al. 2017): ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` with
  ``np.mean`` / ``np.cov`` statistics (unbiased, N - 1).
* IS (Salimans et al. 2016): ``exp(E_x KL(p(y|x) || p(y)))`` over consecutive chunks, mean
  (and std) over chunks. ADM's rule is a fixed *split size* of 5,000 (``range(0, N, 5000)``,
  the last chunk may be shorter, no shuffling); ``splits=10`` equal chunks is the other named
  rule (equal to ADM's at N = 50,000 only).
* precision / recall (Kynkaenniemi et al. 2019, k = 3): a sample is "in" a set's manifold
  if it lies within the k-th-nearest-neighbour radius of some point of the set; precision =
  fraction of generated samples in the real manifold, recall = fraction of real samples in
  the generated manifold (ADM ``ManifoldEstimator``).

Numerics. Statistics are float64 and computed from the full (gathered) feature matrix,
two-pass (centre, then ``X^T X``), so they do not depend on how samples were batched or
sharded. torchmetrics' ``FrechetInceptionDistance`` also keeps float64 running sums, but it
runs its own feature network per metric, uses the one-pass ``sum(x x^T) - N mu mu^T``
formula, takes the square root through ``eigvals`` of the non-symmetric ``S1 S2`` and casts
the result back to float32; we need the features themselves anyway (precision/recall, IS,
the reference cache), so we keep them and compute the distance here. The matrix square
root is eigen-based and symmetric: ``tr (S1 S2)^(1/2) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2)))``
with ``S1^(1/2)`` from ``eigh`` (negative round-off eigenvalues clamped to 0); it agrees
with ADM's ``scipy.linalg.sqrtm`` route (tested) and never produces complex parts.
Precision/recall distances are squared Euclidean, computed block by block so memory stays
bounded, in one of two named arithmetics (``PR_ARITHMETICS``):

* ``"adm-fp16"`` (the ADM protocol): each distance block is computed in float16
  (``max(|u|^2 - 2 u.v + |v|^2, 0)``, every operation rounded to float16, products summed in
  float32) and used as float32; a block that is not finite (float16 overflow) is recomputed in
  float32. Blocks are 10,000 x 10,000 (ADM's ``row_batch_size`` / ``col_batch_size``), so the
  fallback happens for the same blocks as in ADM. Published precision/recall come from this
  path (Inception pool_3 features never overflow float16).
* ``"fp32"``: every block in float32.

sFID (Nash et al. 2021, as ADM computes it) is the Fréchet distance of *spatial* features:
the first 7 channels of Inception's ``mixed_6/conv`` (17 x 17 x 7, flattened channels-last,
2,023-d); the extractor provides them (``features.py``), the maths is ``frechet_distance``.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch


# ---------------------------------------------------------------------------- FID
def feature_statistics(features: torch.Tensor | np.ndarray, chunk_size: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), float64 (= ``np.mean``,
    ``np.cov(rowvar=False)``), accumulated over row chunks of ``chunk_size``."""
    x = torch.as_tensor(features)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"feature_statistics needs features (N >= 2, D), got shape {tuple(x.shape)}")
    n = x.shape[0]
    mu = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for i in range(0, n, chunk_size):
        mu += x[i:i + chunk_size].double().sum(0)
    mu /= n
    cov = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    for i in range(0, n, chunk_size):
        xc = x[i:i + chunk_size].double() - mu
        cov += xc.T @ xc
    cov /= n - 1
    return mu.cpu().numpy(), cov.cpu().numpy()


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), float64 (see module doc)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"FID statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape} (reference and samples must use the same feature extractor)")
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise ValueError(f"FID statistics {name} contain NaN/inf (features of generated images NaN?)")
    s1 = _sqrt_psd((sigma1 + sigma1.T) / 2)
    m = s1 @ sigma2 @ s1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eig, 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


# ---------------------------------------------------------------------------- IS
ADM_IS_SPLIT_SIZE = 5000


def is_rule_name(split_size: int | None = None, splits: int | None = None) -> str:
    """How IS was split, for results rows: ``"split_size=5000"`` or ``"splits=10"``."""
    return f"split_size={split_size}" if split_size else f"splits={splits}"


def inception_score(logits: torch.Tensor, splits: int | None = 10, split_size: int | None = None,
                    ) -> tuple[float, float]:
    """Inception Score (mean, std over chunks) from logits (N, K).

    ``split_size`` (ADM: 5000): chunks ``[i, i + split_size)`` for ``i`` in
    ``range(0, N, split_size)`` (the last may be shorter). Otherwise ``splits`` equal chunks,
    chunk ``i`` = rows ``[i N // splits, (i + 1) N // splits)``. No shuffling: order the
    samples so that every chunk is class-balanced (the judge's class order does).
    """
    logits = torch.as_tensor(logits)
    if logits.ndim != 2:
        raise ValueError(f"inception_score needs logits (N, K), got shape {tuple(logits.shape)}")
    n = logits.shape[0]
    if split_size is not None:
        if split_size < 1:
            raise ValueError(f"inception_score: split_size must be >= 1, got {split_size}")
        bounds = [(i, min(n, i + split_size)) for i in range(0, n, split_size)]
    else:
        if not splits or n < splits:
            raise ValueError(f"inception_score: {n} samples cannot be cut into {splits} splits")
        bounds = [(i * n // splits, (i + 1) * n // splits) for i in range(splits)]
    if n < 1:
        raise ValueError("inception_score: no samples")
    log_p = torch.log_softmax(logits.double(), dim=1)
    scores = []
    for s, e in bounds:
        lp = log_p[s:e]
        log_py = torch.logsumexp(lp, dim=0) - math.log(lp.shape[0])  # log of the marginal p(y)
        kl = (lp.exp() * (lp - log_py)).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------------------- precision / recall
PR_ARITHMETICS = ("adm-fp16", "fp32")
ADM_PR_BLOCK = 10_000  # ADM ManifoldEstimator row_batch_size = col_batch_size


@contextmanager
def _exact_cuda_matmul() -> Iterator[None]:
    """Full-precision accumulation for the distance matmuls (no TF32, no reduced-precision
    fp16 split-K reductions), restored afterwards."""
    if not torch.cuda.is_available():
        yield
        return
    m = torch.backends.cuda.matmul
    saved = (m.allow_tf32, m.allow_fp16_reduced_precision_reduction)
    m.allow_tf32, m.allow_fp16_reduced_precision_reduction = False, False
    try:
        yield
    finally:
        m.allow_tf32, m.allow_fp16_reduced_precision_reduction = saved


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``max(|a|^2 - 2 a b^T + |b|^2, 0)`` (len(a), len(b)) in the dtype of ``a`` / ``b``, each
    operation rounded to that dtype (ADM ``_batch_pairwise_distances``)."""
    norm_a = (a * a).sum(1, keepdim=True)
    norm_b = (b * b).sum(1)[None]
    return (norm_a - 2 * (a @ b.T) + norm_b).clamp_min_(0)


def distance_block(a: torch.Tensor, b: torch.Tensor, arithmetic: str = "fp32") -> torch.Tensor:
    """Squared distances of one block, float32 (ADM ``DistanceBlock``): ``"adm-fp16"`` computes
    it in float16 and falls back to float32 when the float16 block is not finite."""
    if arithmetic == "adm-fp16":
        d16 = _sq_dists(a.half(), b.half())
        if bool(torch.isfinite(d16).all()):
            return d16.float()
    elif arithmetic != "fp32":
        raise ValueError(f"unknown precision/recall arithmetic {arithmetic!r}; use one of {PR_ARITHMETICS}")
    return _sq_dists(a.float(), b.float())


def _arithmetic(dtype: torch.dtype | None, arithmetic: str | None) -> str:
    if arithmetic is not None:
        if arithmetic not in PR_ARITHMETICS:
            raise ValueError(f"unknown precision/recall arithmetic {arithmetic!r}; use one of {PR_ARITHMETICS}")
        return arithmetic
    return "adm-fp16" if dtype == torch.float16 else "fp32"


# A float16 block cannot overflow when every squared norm is below this: |u.v| <= ~|u||v|, so
# every intermediate of |u|^2 - 2 u.v + |v|^2 stays below ~4.02 x 16,000 < 65,504.
_FP16_SAFE_NORM = 16_000.0


class _BlockedSet:
    """A feature set (N, D) cut into ADM's blocks ``[s, s + chunk)``, with each block's copy
    in the block arithmetic's dtype and its squared norms ``(u * u).sum(1)`` in that dtype,
    computed once (``_sq_dists`` recomputes them for every block pair; same op, same
    slices, so the same values)."""

    def __init__(self, x: torch.Tensor, chunk: int, low: torch.dtype) -> None:
        self.x, self.low_dtype = x, low
        self.bounds = [(s, min(s + chunk, x.shape[0])) for s in range(0, x.shape[0], chunk)]
        self.low = [x[s:e].to(low) for s, e in self.bounds]
        self.norms = [(u * u).sum(1) for u in self.low]
        # float16 blocks need the finiteness check (ADM's float32 fallback) unless they cannot overflow
        self.may_overflow = low == torch.float16 and not all(
            bool(torch.isfinite(n).all()) and float(n.max()) < _FP16_SAFE_NORM for n in self.norms if n.numel())


def _distance_blocks(A: _BlockedSet, i: int, B: _BlockedSet, j: int, both: bool
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Squared distances of A's block i to B's block j (ADM ``DistanceBlock``) from ONE
    matmul: ``d`` (n_i, n_j) = ``max(|a|^2 - 2 a.b + |b|^2, 0)`` and, with ``both``, the
    block (j, i), ``e`` (n_j, n_i) = ``max(|b|^2 - 2 b.a + |a|^2, 0)`` from the transposed
    product -- rounded in that order, as ``_sq_dists(b, a)`` rounds it. Every element-wise op is the one
    ``_sq_dists`` does (``x - 2 G`` == ``x + (-2 G)``, doubling is exact), so the values are
    ``distance_block``'s; a float16 block that is not finite is replaced by the float32
    block, each orientation on its own, as ADM decides per block."""
    G = A.low[i] @ B.low[j].T
    G.mul_(-2)
    na, nb = A.norms[i][:, None], B.norms[j][None, :]
    d = torch.add(G, na).add_(nb).clamp_min_(0)
    e = G.T.contiguous().add_(nb.T).add_(na.T).clamp_min_(0) if both else None
    if A.may_overflow or B.may_overflow:
        (sa, ea), (sb, eb) = A.bounds[i], B.bounds[j]
        if not bool(torch.isfinite(d).all()):
            d = _sq_dists(A.x[sa:ea].float(), B.x[sb:eb].float())
        if e is not None and not bool(torch.isfinite(e).all()):
            e = _sq_dists(B.x[sb:eb].float(), A.x[sa:ea].float())
    return d, e


def _merge_smallest(best: torch.Tensor | None, new: torch.Tensor, m: int) -> torch.Tensor:
    """The m smallest values per row of [best | new] (rows of ``new`` already reduced)."""
    if best is not None:
        if best.dtype != new.dtype:
            best, new = best.float(), new.float()
        new = torch.cat([best, new], dim=1)
    return torch.topk(new, min(m, new.shape[1]), dim=1, largest=False, sorted=True).values


def _radii(S: _BlockedSet, k: int, out_dtype: torch.dtype) -> torch.Tensor:
    """k-th-neighbour squared radius of every point of S (the point itself is the 0-th).

    Block pair (i, j > i) is one matmul serving both orientations (``_distance_blocks``);
    each block contributes its k + 1 smallest per row, merged across blocks -- the k-th
    smallest of a row does not depend on how it was split."""
    m = k + 1
    nb = len(S.bounds)
    best: list[torch.Tensor | None] = [None] * nb
    for i in range(nb):
        for j in range(i, nb):
            d, e = _distance_blocks(S, i, S, j, both=j != i)
            best[i] = _merge_smallest(best[i], torch.topk(d, min(m, d.shape[1]), dim=1, largest=False).values, m)
            if e is not None:
                best[j] = _merge_smallest(best[j], torch.topk(e, min(m, e.shape[1]), dim=1, largest=False).values, m)
    return torch.cat([b[:, k] for b in best]).to(out_dtype)


def _as_threshold(r: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Radii to compare distance blocks of ``dtype`` with: ``d <= r`` in float32 equals
    ``d <= r'`` in ``dtype`` when r' = r converts exactly (radii from float16 blocks do);
    otherwise keep float32 (the comparison then promotes)."""
    if dtype == r.dtype:
        return r
    low = r.to(dtype)
    return low if bool((low.to(r.dtype) == r).all()) else r


def manifold_radii(features: torch.Tensor, k: int = 3, chunk_size: int = ADM_PR_BLOCK,
                   dtype: torch.dtype | None = None, arithmetic: str | None = None) -> torch.Tensor:
    """Squared distance of every point to its k-th nearest neighbour in the same set (N,)
    float32 (the point itself counts as the 0-th neighbour, as in ADM). Distances come in
    ``chunk_size x chunk_size`` blocks with ``distance_block``'s values (one matmul for the
    blocks (i, j) and (j, i)); the k + 1 smallest per row are merged across blocks, which
    selects the same value as ADM's partition of the full row.
    ``dtype=torch.float64`` computes everything in float64 (tests)."""
    x = torch.as_tensor(features)
    n = x.shape[0]
    if n <= k:
        raise ValueError(f"manifold_radii: {n} points cannot have a {k}-th nearest neighbour")
    arith = _arithmetic(dtype, arithmetic)
    f64 = dtype == torch.float64
    low = torch.float64 if f64 else torch.float16 if arith == "adm-fp16" else torch.float32
    with _exact_cuda_matmul():
        return _radii(_BlockedSet(x, chunk_size, low), k, torch.float64 if f64 else torch.float32)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk_size: int = ADM_PR_BLOCK,
                     dtype: torch.dtype | None = None, real_radii: torch.Tensor | None = None,
                     arithmetic: str | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkaenniemi et al. 2019) of ``fake`` (M, D) against
    ``real`` (N, D) with k-NN manifolds, as ADM's ``ManifoldEstimator.evaluate_pr``: rows are
    blocks of the real set, columns blocks of the samples; a sample is in the real manifold
    when ``d <= radius`` of some real point (precision), a real point is in the sample manifold
    when ``d <= radius`` of some sample (recall); comparisons in float32 (done in float16 on
    float16 blocks when the radii are float16 values, which is the same test).

    ``arithmetic``: ``"adm-fp16"`` or ``"fp32"`` (module doc); ``dtype=torch.float16`` is the
    old spelling of ``"adm-fp16"``, ``torch.float64`` computes everything in float64.
    ``real_radii`` (N,) reuses the reference manifold (it only depends on the real features
    and the arithmetic).

    Cost: the matmuls of ADM's blocks, with each symmetric pair of blocks of the two radius
    passes computed once (~ (N^2 + M^2) / 2 + N M multiply-adds x D instead of N^2 + M^2 + N M);
    extra memory ~ 3 chunk_size^2 block elements plus a float16 copy of the features.
    ``benchmarks/precision_recall_bench.py`` times it against a plain matmul of the same sizes.
    """
    real, fake = torch.as_tensor(real), torch.as_tensor(fake)
    fake = fake.to(real.device)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision_recall: features must be (N, D) with equal D, got {tuple(real.shape)} "
                         f"and {tuple(fake.shape)}")
    for name, t in (("real", real), ("fake", fake)):
        if t.shape[0] <= k:
            raise ValueError(f"manifold_radii: {t.shape[0]} points cannot have a {k}-th nearest neighbour "
                             f"({name} features)")
    arith = _arithmetic(dtype, arithmetic)
    f64 = dtype == torch.float64
    low = torch.float64 if f64 else torch.float16 if arith == "adm-fp16" else torch.float32
    out_dtype = torch.float64 if f64 else torch.float32
    R, F_ = _BlockedSet(real, chunk_size, low), _BlockedSet(fake, chunk_size, low)
    with _exact_cuda_matmul():
        r_real = _radii(R, k, out_dtype) if real_radii is None else real_radii.to(real.device, out_dtype)
        r_fake = _radii(F_, k, out_dtype)
        real_in = torch.zeros(len(real), dtype=torch.bool, device=real.device)  # -> recall
        fake_in = torch.zeros(len(fake), dtype=torch.bool, device=real.device)  # -> precision
        thr_real = {low: _as_threshold(r_real, low), out_dtype: r_real}
        thr_fake = {low: _as_threshold(r_fake, low), out_dtype: r_fake}
        for i, (si, ei) in enumerate(R.bounds):
            for j, (sj, ej) in enumerate(F_.bounds):
                d, _ = _distance_blocks(R, i, F_, j, both=False)
                rf = thr_fake.get(d.dtype, r_fake)[None, sj:ej]
                rr = thr_real.get(d.dtype, r_real)[si:ei, None]
                real_in[si:ei] |= (d <= rf).any(1)
                fake_in[sj:ej] |= (d <= rr).any(0)
    return float(fake_in.double().mean()), float(real_in.double().mean())
