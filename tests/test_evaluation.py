"""The judge's maths and its sanity on real digits (genmodels/evaluation/metrics.py, features.py).

Measured with the shipped digits classifier (tests print them with -s):
FID(test vs train) ~5.5, FID(noise vs train) ~800; IS(train) ~9.2 (10 classes), IS(one class) ~1.01;
P/R(test vs train) ~0.88/0.91; one class: P 1.0, R ~0.10; noise: P 0.0.
"""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import scipy.linalg
import torch

from genmodels.evaluation import (DigitsClassifierFeatures, InceptionFeatures, ModuleFeatures, build_feature_extractor,
                                  feature_statistics, frechet_distance, inception_score, manifold_radii,
                                  precision_recall)
from genmodels.errors import GenmodelsError
from genmodels.evaluation.digits_classifier import load_digits_classifier, weights_metadata


# ---------------------------------------------------------------------------- helpers
def adm_frechet_distance(mu1, sigma1, mu2, sigma2):
    """The ADM / TTUR formula with scipy's sqrtm (reference implementation)."""
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    covmean = covmean.real
    diff = mu1 - mu2
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def brute_force_pr(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Kynkaenniemi et al. 2019 straight from the definition, float64, full matrices."""
    def radii(x):
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    r_real, r_fake = radii(real), radii(fake)
    d = ((real[:, None] - fake[None]) ** 2).sum(-1)  # (N_real, N_fake)
    precision = np.mean([(d[:, j] <= r_real).any() for j in range(len(fake))])
    recall = np.mean([(d[i] <= r_fake).any() for i in range(len(real))])
    return float(precision), float(recall)


@pytest.fixture(scope="module")
def digits():
    """Shipped classifier's features / logits of the digits splits (+ uniform noise images)."""
    from genmodels.data import DigitsDataModule

    dm = DigitsDataModule(image_size=32)
    ex = DigitsClassifierFeatures()
    out = {}
    for split in ("train", "test"):
        ds = dm.reference_dataset(split)
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        y = torch.stack([ds[i][1] for i in range(len(ds))])
        f, lg = ex(x)
        out[split] = (x, y, f, lg)
    noise = torch.rand(180, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out["noise_images"] = noise
    out["noise"] = ex(noise)
    out["extractor"] = ex
    return out


def fid_of(features, ref_features):
    return frechet_distance(*feature_statistics(features), *feature_statistics(ref_features))


# ---------------------------------------------------------------------------- FID maths
def test_frechet_distance_matches_scipy_sqrtm_and_is_zero_on_itself():
    g = np.random.default_rng(0)
    for d in (1, 5, 64):
        a, b = g.normal(size=(200, d)), g.normal(size=(300, d)) @ g.normal(size=(d, d)) * 0.5 + 1.0
        s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
        m1, m2 = a.mean(0), b.mean(0)
        ours = frechet_distance(m1, s1, m2, s2)
        ref = adm_frechet_distance(m1, s1, m2, s2)
        assert ours == pytest.approx(ref, rel=1e-8, abs=1e-8)
        assert frechet_distance(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-8)
    # rank-deficient covariances (fewer samples than dims) stay finite and real
    a, b = g.normal(size=(10, 64)), g.normal(size=(12, 64))
    val = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    assert np.isfinite(val) and val > 0


def test_feature_statistics_float64_and_independent_of_chunking():
    x = torch.randn(1001, 33, generator=torch.Generator().manual_seed(1)) * 100 + 1e4  # large offset
    mu, sigma = feature_statistics(x)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    xn = x.double().numpy()
    np.testing.assert_allclose(mu, xn.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(xn, rowvar=False), rtol=1e-9, atol=1e-9)
    mu7, sigma7 = feature_statistics(x, chunk_size=7)
    np.testing.assert_allclose(sigma7, sigma, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(mu7, mu, rtol=1e-13)
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(x[:1])


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="same feature extractor"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------------------- IS maths
def test_inception_score_limits_and_reference_formula():
    n, k = 1000, 10
    confident = torch.full((n, k), -1e4)
    confident[torch.arange(n), torch.arange(n) % k] = 0.0
    assert inception_score(confident, 10)[0] == pytest.approx(k, rel=1e-6)
    assert inception_score(torch.zeros(n, k), 10)[0] == pytest.approx(1.0, abs=1e-9)
    # ADM compute_inception_score (numpy, split_size = n / 10)
    logits = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 3
    p = torch.softmax(logits.double(), 1).numpy()
    scores = []
    for i in range(0, n, n // 10):
        part = p[i:i + n // 10]
        kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    mean, std = inception_score(logits, 10)
    assert mean == pytest.approx(np.mean(scores), rel=1e-10)
    assert std == pytest.approx(np.std(scores), rel=1e-8)


# ---------------------------------------------------------------------------- precision / recall maths
@pytest.mark.parametrize("n_real,n_fake,dim,chunk", [(50, 40, 8, 7), (64, 90, 3, 16), (30, 40, 4, 1000)])
def test_precision_recall_matches_brute_force(n_real, n_fake, dim, chunk):
    g = torch.Generator().manual_seed(n_real + dim)
    real = torch.randn(n_real, dim, generator=g, dtype=torch.float64)
    fake = torch.randn(n_fake, dim, generator=g, dtype=torch.float64) * 0.9 + 0.6
    ours = precision_recall(real, fake, k=3, chunk_size=chunk, dtype=torch.float64)
    ref = brute_force_pr(real.numpy(), fake.numpy(), k=3)
    assert ours == ref
    # float32 (the default) agrees on these well-separated random points too
    assert precision_recall(real, fake, k=3, chunk_size=chunk) == ref
    assert 0 < ref[0] < 1 and 0 < ref[1] < 1  # the test case is not degenerate


def test_manifold_radii_chunking_invariant():
    x = torch.randn(77, 5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(manifold_radii(x, 3, chunk_size=5), manifold_radii(x, 3, chunk_size=1000))
    with pytest.raises(ValueError, match="nearest neighbour"):
        manifold_radii(x[:3], 3)


# ---------------------------------------------------------------------------- the digits judge is sane
def test_digits_classifier_accuracy_and_metadata(digits):
    x, y, _, logits = digits["test"]
    acc = float((logits.argmax(1) == y).float().mean())
    print(f"digits classifier test accuracy {acc:.4f} on {len(y)} images")
    assert acc >= 0.97
    meta = weights_metadata()
    assert float(meta["test_accuracy"]) >= 0.97 and "train_digits_classifier.py" in meta["command"]
    net = load_digits_classifier()
    assert sum(p.numel() for p in net.parameters()) < 250_000  # < 1 MB of float32
    # any resolution goes in (resized to 32)
    f, lg = digits["extractor"](torch.nn.functional.interpolate(x[:4], size=64))
    assert f.shape == (4, 64) and lg.shape == (4, 10)


def test_fid_real_small_noise_large_and_monotone(digits):
    f_train, f_test, f_noise = digits["train"][2], digits["test"][2], digits["noise"][0]
    fid_real = fid_of(f_test, f_train)
    fid_noise = fid_of(f_noise, f_train)
    ex = digits["extractor"]
    x_test, noise = digits["test"][0], digits["noise_images"]
    fids = []
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        k = int(frac * len(x_test))
        fids.append(fid_of(ex(torch.cat([x_test[:k], noise[k:]]))[0], f_train))
    print(f"FID test-vs-train {fid_real:.2f}, noise {fid_noise:.1f}, real fraction 0..1: "
          + ", ".join(f"{v:.1f}" for v in fids))
    assert fid_real < 15
    assert fid_noise > 30 * fid_real
    assert all(a > b for a, b in zip(fids, fids[1:])), fids


def test_precision_recall_sanity(digits):
    _, y_train, f_train, _ = digits["train"]
    p_real, r_real = precision_recall(f_train, digits["test"][2])
    p_one, r_one = precision_recall(f_train, f_train[y_train == 3])
    p_noise, r_noise = precision_recall(f_train, digits["noise"][0])
    print(f"P/R test-vs-train {p_real:.3f}/{r_real:.3f}, one class {p_one:.3f}/{r_one:.3f}, "
          f"noise {p_noise:.3f}/{r_noise:.3f}")
    assert p_real > 0.75 and r_real > 0.75
    assert p_one > 0.9 and r_one < 0.2
    assert p_noise < 0.05 and r_noise < 0.05


def test_inception_score_sanity(digits):
    _, y_train, _, logits = digits["train"]
    is_all = inception_score(logits, 10)[0]
    is_one = inception_score(logits[y_train == 3], 10)[0]
    print(f"IS real train digits {is_all:.3f} (10 classes), one class {is_one:.4f}")
    assert is_all > 8.5
    assert is_one < 1.1


def test_statistics_do_not_depend_on_extraction_batch_size(digits):
    ex, x = digits["extractor"], digits["train"][0][:300]
    whole = ex(x)[0]
    pieces = torch.cat([ex(x[i:i + 7])[0] for i in range(0, len(x), 7)])
    mu_a, s_a = feature_statistics(whole)
    mu_b, s_b = feature_statistics(pieces)
    # float32 features in other batch sizes, then FID's own float64 floor: sqrtm of these
    # rank-deficient covariances is accurate to ~sqrt(eps64) x (tr S + |mu|^2) ~ 1.5e-5 (either
    # sign); a batch-size dependence of 1e-3 in the features would give ~1e-3.
    scale = np.trace(s_a) + mu_a @ mu_a
    assert abs(frechet_distance(mu_a, s_a, mu_b, s_b)) <= 1e-7 * scale


# ---------------------------------------------------------------------------- extractors
@pytest.mark.skipif("torch_fidelity" in sys.modules or __import__("importlib").util.find_spec("torch_fidelity")
                    is not None, reason="torch-fidelity is installed")
def test_inception_without_torch_fidelity_says_how_to_install():
    with pytest.raises(GenmodelsError, match=r"pip install 'genmodels\[fidelity\]'"):
        build_feature_extractor("inception")


class _FakeInceptionV3(torch.nn.Module):
    """Stands in for torch_fidelity.feature_extractor_inceptionv3.FeatureExtractorInceptionV3."""

    calls: list = []

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__()
        type(self).calls.append((name, list(features_list), feature_extractor_weights_path, kwargs))
        self.w = torch.nn.Parameter(torch.randn(3, 2048, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.ndim == 4 and x.shape[1] == 3
        pooled = x.float().mean((2, 3)) @ self.w
        return pooled, pooled[:, :1008] * 0.01


def test_inception_adapter_with_fake_torch_fidelity(monkeypatch):
    fake = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    fake.FeatureExtractorInceptionV3 = _FakeInceptionV3
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", fake)
    _FakeInceptionV3.calls.clear()
    ex = build_feature_extractor("inception", weights_path="/weights/pt_inception.pth")
    assert isinstance(ex, InceptionFeatures) and ex.name == "inception-v3-compat"
    assert _FakeInceptionV3.calls == [("inception-v3-compat", ["2048", "logits_unbiased"], "/weights/pt_inception.pth", {})]
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    f, lg = ex(images)
    assert f.shape == (2, 2048) and lg.shape == (2, 1008) and f.dtype == torch.float32
    # the network saw the PNG-rounded uint8 image
    u8 = ((images + 1) * 127.5).round()
    torch.testing.assert_close(f, u8.mean((2, 3)) @ ex.net.w)


def test_module_features_by_class_path_and_errors():
    ex = build_feature_extractor("torch.nn.Flatten", input_range="[0,1]")
    assert isinstance(ex, ModuleFeatures) and ex.name == "torch.nn.modules.flatten.Flatten"
    x = torch.rand(2, 3, 4, 4) * 2 - 1
    f, lg = ex(x)
    assert lg is None and f.shape == (2, 48)
    torch.testing.assert_close(f, ((x + 1) / 2).flatten(1))
    with pytest.raises(GenmodelsError, match="unknown feature_extractor"):
        build_feature_extractor("vgg")
    with pytest.raises(ImportError, match="no class"):
        build_feature_extractor("torch.nn.NoSuchNet")
    with pytest.raises(ValueError, match="input_range"):
        build_feature_extractor("torch.nn.Flatten", input_range="0-255")
