"""The ADM protocol's arithmetic (genmodels/evaluation/metrics.py, features.py) against a numpy
port, written here, of openai/guided-diffusion ``evaluations/evaluator.py``:
``DistanceBlock`` (float16 block, float32 fallback when not finite), ``ManifoldEstimator``
(row/col batches, k-th neighbour radius, ``evaluate_pr``), ``compute_inception_score``
(split size 5,000) and sFID (Fréchet distance of the spatial statistics)."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import scipy.linalg
import torch

from genmodels.errors import GenmodelsError
from genmodels.evaluation import Evaluator, Reference, build_feature_extractor, inception_score, precision_recall
from genmodels.evaluation.metrics import distance_block, feature_statistics


# ---------------------------------------------------------------------------- the numpy port of ADM
@np.errstate(over="ignore")
def adm_pairwise_distances(U: np.ndarray, V: np.ndarray, dtype=np.float16) -> np.ndarray:
    """ADM ``_batch_pairwise_distances`` in ``dtype``: every op rounded to it, sums in float32."""
    u, v = U.astype(dtype), V.astype(dtype)
    norm_u = np.square(u).astype(np.float32).sum(1).astype(dtype).reshape(-1, 1)
    norm_v = np.square(v).astype(np.float32).sum(1).astype(dtype).reshape(1, -1)
    uv = (u.astype(np.float32) @ v.astype(np.float32).T).astype(dtype)
    return np.maximum(norm_u - dtype(2) * uv + norm_v, dtype(0))


def adm_distance_block(U, V):
    """``DistanceBlock``: the float16 block as float32 if finite, else the float32 block."""
    d16 = adm_pairwise_distances(U, V, np.float16)
    if np.isfinite(d16).all():
        return d16.astype(np.float32)
    return adm_pairwise_distances(U.astype(np.float32), V.astype(np.float32), np.float32)


def adm_manifold_radii(features, k=3, row=10000, col=10000):
    n = len(features)
    radii = np.zeros([n, 1], np.float32)
    batch = np.zeros([row, n], np.float32)
    for b1 in range(0, n, row):
        e1 = min(b1 + row, n)
        for b2 in range(0, n, col):
            e2 = min(b2 + col, n)
            batch[0:e1 - b1, b2:e2] = adm_distance_block(features[b1:e1], features[b2:e2])
        radii[b1:e1, :] = np.partition(batch[0:e1 - b1, :], np.arange(k + 1), axis=1)[:, [k]]
    return radii


def adm_prec_recall(ref, sample, k=3, row=10000, col=10000):
    r1, r2 = adm_manifold_radii(ref, k, row, col), adm_manifold_radii(sample, k, row, col)
    s1 = np.zeros([len(ref), 1], bool)
    s2 = np.zeros([len(sample), 1], bool)
    for b1 in range(0, len(ref), row):
        for b2 in range(0, len(sample), col):
            d = adm_distance_block(ref[b1:b1 + row], sample[b2:b2 + col])[..., None]
            s1[b1:b1 + row] |= np.any(d <= r2[b2:b2 + col], axis=1)
            s2[b2:b2 + col] |= np.any(d <= r1[b1:b1 + row][:, None], axis=0)
    return float(np.mean(s2.astype(np.float64))), float(np.mean(s1.astype(np.float64)))  # precision, recall


def adm_inception_score(logits: np.ndarray, split_size=5000) -> float:
    z = logits.astype(np.float32)
    preds = np.exp(z - z.max(1, keepdims=True))
    preds = (preds / preds.sum(1, keepdims=True)).astype(np.float32)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def pool3_like(n, d, seed, shift=0.0):
    """Non-negative, pool_3-like features (ReLU'd): squared norms of a few hundred, where
    float16 rounding (spacing 0.25 - 0.5) moves distances."""
    g = np.random.default_rng(seed)
    return np.maximum(g.normal(0.6 + shift, 0.4, size=(n, d)), 0).astype(np.float32)


# ---------------------------------------------------------------------------- precision / recall
def test_adm_precision_recall_reproduces_the_float16_port(one_thread):
    real, fake = pool3_like(700, 512, 0), pool3_like(600, 512, 1, shift=0.02)
    block = 256  # several row / column blocks (ADM: 10,000; the arithmetic per block is the same)
    ours = precision_recall(torch.from_numpy(real), torch.from_numpy(fake), 3, block, arithmetic="adm-fp16")
    port = adm_prec_recall(real, fake, 3, block, block)
    fp32 = precision_recall(torch.from_numpy(real), torch.from_numpy(fake), 3, block, arithmetic="fp32")
    print(f"ADM port (fp16) {port}, ours adm-fp16 {ours}, ours fp32 {fp32}")
    # equal up to at most one sample flipping on a float16 rounding tie (summation order of the float32 sums)
    assert abs(ours[0] - port[0]) <= 1 / len(fake) + 1e-12 and abs(ours[1] - port[1]) <= 1 / len(real) + 1e-12
    # and the float16 arithmetic matters on these features (here +1.5 / +1.1 points, as on pool_3)
    assert abs(fp32[0] - port[0]) + abs(fp32[1] - port[1]) >= 5 / len(real), (fp32, port)


def test_adm_float16_block_falls_back_to_float32_per_block():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(6, 4, generator=g), torch.rand(5, 4, generator=g)
    d = distance_block(a, b, "adm-fp16")
    np.testing.assert_array_equal(d.numpy(), adm_pairwise_distances(a.numpy(), b.numpy()).astype(np.float32))
    big = a * 300  # squared norms > 65504: the float16 block overflows
    d_big = distance_block(big, b, "adm-fp16")
    assert torch.isfinite(d_big).all()
    torch.testing.assert_close(d_big, distance_block(big, b, "fp32"))
    np.testing.assert_array_equal(d_big.numpy(), adm_distance_block(big.numpy(), b.numpy()))
    # in precision/recall the fallback is per block: rows 0..3 overflow, the other blocks stay float16
    real = torch.cat([pool3_like_t(4, 64, 3) * 40, pool3_like_t(60, 64, 4)])
    fake = pool3_like_t(50, 64, 5)
    ours = precision_recall(real, fake, 3, 4, arithmetic="adm-fp16")
    assert ours == pytest.approx(adm_prec_recall(real.numpy(), fake.numpy(), 3, 4, 4), abs=1 / 50)


def pool3_like_t(n, d, seed):
    return torch.from_numpy(pool3_like(n, d, seed))


def test_precision_recall_arithmetic_names_are_checked():
    x = torch.rand(10, 3)
    with pytest.raises(ValueError, match="arithmetic"):
        precision_recall(x, x, arithmetic="bf16")


# ---------------------------------------------------------------------------- IS
def test_inception_score_split_size_5000_reproduces_adm():
    g = torch.Generator().manual_seed(0)
    n, k = 12_345, 40  # splits of 5000, 5000, 2345
    labels = torch.arange(n) % k
    logits = torch.randn(n, k, generator=g) * 2 + 6 * torch.nn.functional.one_hot(labels, k) * torch.rand(n, 1, generator=g)
    ours, _ = inception_score(logits, split_size=5000)
    adm = adm_inception_score(logits.numpy(), 5000)
    assert ours == pytest.approx(adm, rel=1e-5)
    # equal splits is another rule: at N = 2,000 ADM has one split, 10 equal splits are 200 each
    ten, _ = inception_score(logits[:2000], splits=10)
    one = adm_inception_score(logits[:2000].numpy(), 5000)
    assert inception_score(logits[:2000], split_size=5000)[0] == pytest.approx(one, rel=1e-5)
    assert (one - ten) / one > 0.01  # 1.9 % here
    # at N = 50,000 both rules cut the same chunks
    small = logits[:2000].repeat(25, 1)
    assert inception_score(small, split_size=5000)[0] == pytest.approx(inception_score(small, splits=10)[0], rel=1e-12)


def test_evaluator_rules_are_named_and_used():
    adm, f32 = Evaluator(), Evaluator(protocol="fp32")
    assert (adm.rules.is_rule, adm.rules.pr_arithmetic, adm.rules.pr_block) == ("split_size=5000", "adm-fp16", 10000)
    assert (f32.rules.is_rule, f32.rules.pr_arithmetic) == ("splits=10", "fp32")
    with pytest.raises(GenmodelsError, match="protocol"):
        Evaluator(protocol="tf")
    real, fake = pool3_like(300, 64, 0), pool3_like(300, 64, 1, shift=0.03)
    ref = Reference(torch.from_numpy(real), *feature_statistics(real), "synthetic")
    logits = np.random.default_rng(0).normal(size=(300, 7))
    a = Evaluator(pr_block=128).score(fake, logits, None, ref)
    assert (a["precision"], a["recall"]) == pytest.approx(adm_prec_recall(real, fake, 3, 128, 128), abs=1 / 300)
    assert a["is"] == pytest.approx(adm_inception_score(logits, 5000), rel=1e-5)


# ---------------------------------------------------------------------------- sFID
def test_sfid_from_spatial_statistics_matches_its_definition():
    g = np.random.default_rng(0)
    d = 7 * 3 * 3  # 7 channels of a 3 x 3 map (Inception: 17 x 17 x 7 = 2023)
    real_s = g.normal(size=(400, d)) @ g.normal(size=(d, d)) * 0.3
    fake_s = g.normal(size=(300, d)) @ g.normal(size=(d, d)) * 0.3 + 0.2
    pool_r, pool_f = g.normal(size=(400, 5)), g.normal(size=(300, 5))
    mu_s, sigma_s = real_s.mean(0), np.cov(real_s, rowvar=False)
    ref = Reference(torch.from_numpy(pool_r).float(), *feature_statistics(pool_r), "synthetic", mu_s=mu_s,
                    sigma_s=sigma_s)
    out = Evaluator(pr_block=512).score(torch.from_numpy(pool_f).float(), None, fake_s, ref)
    m2, s2 = fake_s.mean(0), np.cov(fake_s, rowvar=False)
    covmean = scipy.linalg.sqrtm(s2 @ sigma_s).real  # ADM FIDStatistics.frechet_distance
    sfid = (m2 - mu_s) @ (m2 - mu_s) + np.trace(s2) + np.trace(sigma_s) - 2 * np.trace(covmean)
    assert out["sfid"] == pytest.approx(sfid, rel=1e-7)
    assert "sfid" not in Evaluator(pr_block=512).score(torch.from_numpy(pool_f).float(), None, None, ref)


class _BasicConv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(192, 3, generator=torch.Generator().manual_seed(1)))

    def forward(self, x):  # (B, 3) -> a (B, 192, 17, 17) map whose values name (channel, row, col)
        b = x.shape[0]
        base = torch.arange(192 * 17 * 17, dtype=torch.float32).view(1, 192, 17, 17)
        return base.expand(b, -1, -1, -1) + x.mean(1).view(b, 1, 1, 1)


class _FakeInceptionWithMixed6(torch.nn.Module):
    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__()
        self.Mixed_6d = torch.nn.Module()
        self.Mixed_6d.branch1x1 = _BasicConv()
        self.fc = torch.nn.Linear(3, 2048)

    def forward(self, x):
        x = x.float().mean((2, 3))
        self.Mixed_6d.branch1x1(x)
        pooled = self.fc(x)
        return pooled, pooled[:, :1008]


def test_inception_spatial_features_are_mixed_6_conv_first_7_channels_nhwc(monkeypatch):
    fake = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    fake.FeatureExtractorInceptionV3 = _FakeInceptionWithMixed6
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", fake)
    ex = build_feature_extractor("inception")
    assert ex.provides_spatial
    out = ex.extract(torch.zeros(2, 3, 8, 8) - 1)  # uint8 0 -> mean 0
    assert out.features.shape == (2, 2048) and out.spatial.shape == (2, 17 * 17 * 7)
    base = torch.arange(192 * 17 * 17, dtype=torch.float32).view(192, 17, 17)
    torch.testing.assert_close(out.spatial[0], base.permute(1, 2, 0)[..., :7].reshape(-1))  # channels-last
    assert ex.cache_key().startswith("inception-v3-compat-w") and ex.cache_key().endswith("-float32")


# ---------------------------------------------------------------------------- DINOv2
@pytest.mark.skipif(__import__("importlib").util.find_spec("torch_fidelity") is not None,
                    reason="torch-fidelity is installed")
def test_dinov2_not_available_says_what_it_needs():
    with pytest.raises(GenmodelsError, match=r"torch-fidelity >= 0.4"):
        build_feature_extractor("dinov2")


def test_dinov2_adapter_with_fake_torch_fidelity(monkeypatch):
    calls = []

    class FakeDino(torch.nn.Module):
        def __init__(self, name, features_list, **kw):
            super().__init__()
            calls.append((name, features_list))
            self.w = torch.nn.Parameter(torch.ones(3, 1024))

        def forward(self, x):
            assert x.dtype == torch.uint8
            return (x.float().mean((2, 3)) @ self.w,)

    old = types.ModuleType("torch_fidelity.interpolate_compat_tensorflow")
    old.interpolate_bilinear_2d_like_tensorflow1x = lambda x, size, align_corners: x
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    monkeypatch.setitem(sys.modules, "torch_fidelity.interpolate_compat_tensorflow", old)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_dinov2", None)  # torch-fidelity 0.3
    with pytest.raises(GenmodelsError, match=">= 0.4"):
        build_feature_extractor("dinov2")
    mod = types.ModuleType("torch_fidelity.feature_extractor_dinov2")
    mod.FeatureExtractorDinoV2 = FakeDino
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_dinov2", mod)
    ex = build_feature_extractor("dinov2")
    assert calls == [("dinov2-vit-l-14", ["dinov2"])] and ex.name == "dinov2-vit-l-14"
    out = ex.extract(torch.zeros(2, 3, 8, 8))
    assert out.features.shape == (2, 1024) and out.logits is None and out.spatial is None
    with pytest.raises(GenmodelsError, match="hub_dir"):
        build_feature_extractor("dinov2", weights_path="/w.pth")
