"""FID, Inception Score, precision and recall on feature vectors.

Everything here works on features already extracted (``features.py``) and gathered over
ranks (``evaluator.py``); the definitions follow the OpenAI ADM evaluator
(openai/guided-diffusion ``evaluations/evaluator.py``), the protocol behind the ImageNet-256
numbers of VAR, MAR, TiTok and FractalGen:

* FID (Heusel et al. 2017): ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` with
  ``np.mean`` / ``np.cov`` statistics (unbiased, N - 1).
* IS (Salimans et al. 2016): ``exp(E_x KL(p(y|x) || p(y)))`` over ``splits`` consecutive
  chunks, mean (and std) over chunks; with 50,000 samples and 10 splits this is ADM's
  ``compute_inception_score`` (split_size 5000, no shuffling).
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
Precision/recall distances are squared Euclidean in float32 by default (ADM tries float16
first and falls back to float32), computed block by block so memory stays bounded.
"""
from __future__ import annotations

import math

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
def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception Score (mean, std over ``splits`` consecutive chunks) from logits (N, K).

    Chunk ``i`` is rows ``[i N // splits, (i + 1) N // splits)``; no shuffling, so order
    the samples so that every chunk is class-balanced (``balanced_labels`` does).
    """
    logits = torch.as_tensor(logits)
    if logits.ndim != 2:
        raise ValueError(f"inception_score needs logits (N, K), got shape {tuple(logits.shape)}")
    n = logits.shape[0]
    if n < splits:
        raise ValueError(f"inception_score: {n} samples cannot be cut into {splits} splits")
    log_p = torch.log_softmax(logits.double(), dim=1)
    scores = []
    for i in range(splits):
        lp = log_p[i * n // splits:(i + 1) * n // splits]
        log_py = torch.logsumexp(lp, dim=0) - math.log(lp.shape[0])  # log of the marginal p(y)
        kl = (lp.exp() * (lp - log_py)).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------------------- precision / recall
def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (len(a), len(b)), clamped at 0 (ADM ``_batch_pairwise_distances``)."""
    d = (a * a).sum(1, keepdim=True) - 2 * (a @ b.T) + (b * b).sum(1)[None]
    return d.clamp_min_(0)


def manifold_radii(features: torch.Tensor, k: int = 3, chunk_size: int = 8192,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Squared distance of every point to its k-th nearest neighbour in the same set (N,)
    (the point itself counts as the 0-th neighbour, as in ADM). Blocks of
    ``chunk_size x chunk_size`` distances keep memory at O(chunk_size^2)."""
    x = torch.as_tensor(features).to(dtype)
    n = x.shape[0]
    if n <= k:
        raise ValueError(f"manifold_radii: {n} points cannot have a {k}-th nearest neighbour")
    radii = torch.empty(n, dtype=dtype, device=x.device)
    for i in range(0, n, chunk_size):
        rows = x[i:i + chunk_size]
        best = None  # the k + 1 smallest distances seen so far, per row
        for j in range(0, n, chunk_size):
            d = _sq_dists(rows, x[j:j + chunk_size])
            if best is not None:
                d = torch.cat([best, d], dim=1)
            best = torch.topk(d, min(k + 1, d.shape[1]), dim=1, largest=False, sorted=True).values
        radii[i:i + chunk_size] = best[:, k]
    return radii


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk_size: int = 8192,
                     dtype: torch.dtype = torch.float32, real_radii: torch.Tensor | None = None,
                     ) -> tuple[float, float]:
    """Improved precision and recall (Kynkaenniemi et al. 2019) of ``fake`` (M, D) against
    ``real`` (N, D) with k-NN manifolds. Peak extra memory ~ 3 chunk_size^2 elements.

    ``real_radii`` (N,) may be passed to reuse the reference manifold (it only depends on
    the real features).
    """
    real = torch.as_tensor(real).to(dtype)
    fake = torch.as_tensor(fake).to(dtype=dtype, device=real.device)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision_recall: features must be (N, D) with equal D, got {tuple(real.shape)} "
                         f"and {tuple(fake.shape)}")
    r_real = manifold_radii(real, k, chunk_size, dtype) if real_radii is None else real_radii.to(real)
    r_fake = manifold_radii(fake, k, chunk_size, dtype)
    real_in = torch.zeros(len(real), dtype=torch.bool, device=real.device)  # -> recall
    fake_in = torch.zeros(len(fake), dtype=torch.bool, device=real.device)  # -> precision
    for i in range(0, len(real), chunk_size):
        for j in range(0, len(fake), chunk_size):
            d = _sq_dists(real[i:i + chunk_size], fake[j:j + chunk_size])
            real_in[i:i + chunk_size] |= (d <= r_fake[None, j:j + chunk_size]).any(1)
            fake_in[j:j + chunk_size] |= (d <= r_real[i:i + chunk_size, None]).any(0)
    return float(fake_in.double().mean()), float(real_in.double().mean())
