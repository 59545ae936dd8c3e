"""Precision/recall at the matmul floor (issue 17) gives exactly the results of the old
block-by-block algorithm (tests/pr_reference.py): same k-th-neighbour radii, same precision
and recall, in ADM's float16 arithmetic (with its per-block float32 fallback), in float32 and
in float64."""
from __future__ import annotations

import pytest
import torch

from genmodels.evaluation.metrics import manifold_radii, precision_recall
from pr_reference import old_manifold_radii, old_precision_recall

pytestmark = pytest.mark.usefixtures("one_thread")


def pool3_like(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    """ReLU'd N(0.6, 0.4) features: squared norms of a few hundred, where float16 rounding
    moves distances (and ties between them are common)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g) * 0.4 + 0.6 + shift).clamp_min(0)


@pytest.mark.parametrize("arithmetic", ["adm-fp16", "fp32"])
@pytest.mark.parametrize("n_real,n_fake,dim,chunk", [(300, 260, 256, 64), (203, 150, 64, 50), (90, 70, 32, 1000)])
def test_fast_precision_recall_equals_the_old_algorithm(arithmetic, n_real, n_fake, dim, chunk):
    real, fake = pool3_like(n_real, dim, n_real), pool3_like(n_fake, dim, n_fake + 1, shift=0.03)
    assert torch.equal(manifold_radii(real, 3, chunk, arithmetic=arithmetic),
                       old_manifold_radii(real, 3, chunk, arithmetic=arithmetic))
    new = precision_recall(real, fake, 3, chunk, arithmetic=arithmetic)
    old = old_precision_recall(real, fake, 3, chunk, arithmetic=arithmetic)
    assert new == old
    assert 0 < new[0] < 1 and 0 < new[1] < 1


def test_fast_precision_recall_float64_and_other_k():
    g = torch.Generator().manual_seed(7)
    real, fake = torch.randn(120, 16, generator=g, dtype=torch.float64), torch.randn(95, 16, generator=g,
                                                                                     dtype=torch.float64) + 0.3
    for k in (1, 3, 5):
        assert torch.equal(manifold_radii(real, k, 37, dtype=torch.float64),
                           old_manifold_radii(real, k, 37, dtype=torch.float64))
        assert precision_recall(real, fake, k, 37, dtype=torch.float64) == \
            old_precision_recall(real, fake, k, 37, dtype=torch.float64)


def test_fast_precision_recall_float16_overflow_falls_back_per_block_as_before():
    # rows 0..39 of the real set have squared norms > 65504: every block (in either orientation)
    # that touches them overflows in float16 and is recomputed in float32, the others stay float16
    real = torch.cat([pool3_like(40, 64, 3) * 40, pool3_like(100, 64, 4)])
    fake = torch.cat([pool3_like(80, 64, 5), pool3_like(10, 64, 6) * 40])
    assert torch.equal(manifold_radii(real, 3, 32, arithmetic="adm-fp16"),
                       old_manifold_radii(real, 3, 32, arithmetic="adm-fp16"))
    assert precision_recall(real, fake, 3, 32, arithmetic="adm-fp16") == \
        old_precision_recall(real, fake, 3, 32, arithmetic="adm-fp16")


def test_fast_precision_recall_reuses_given_real_radii():
    real, fake = pool3_like(150, 32, 1), pool3_like(120, 32, 2, shift=0.05)
    r = manifold_radii(real, 3, 40, arithmetic="adm-fp16")
    assert precision_recall(real, fake, 3, 40, real_radii=r, arithmetic="adm-fp16") == \
        precision_recall(real, fake, 3, 40, arithmetic="adm-fp16")
