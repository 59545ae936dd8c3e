"""genmodels.nn.dropout: the CPU dropout masks from numpy's PCG64 (issue 17, MAR training)."""
import math

import pytest
import torch
import torch.nn.functional as F

from genmodels.nn.attention import Attention, scaled_dot_product_attention
from genmodels.nn.dropout import Dropout, dropout, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_and_scale(p):
    torch.manual_seed(0)
    n = 400_000
    x = torch.ones(n)
    y = dropout(x, p)
    kept = (y != 0).float().mean().item()
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)  # 5 sigma
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p)))
    assert abs(y.mean().item() - 1.0) < 6 * math.sqrt(p / (1 - p) / n)  # unbiased


def test_masks_are_independent_across_positions():
    torch.manual_seed(1)
    m = keep_mask((200_000,), 0.5).float()
    # neighbours (the two 32-bit halves of one 64-bit draw) are uncorrelated
    corr = torch.corrcoef(torch.stack([m[:-1], m[1:]]))[0, 1].item()
    assert abs(corr) < 0.02


def test_reproducible_from_torch_seed_and_advances():
    torch.manual_seed(3)
    a, b = keep_mask((7, 9), 0.3), keep_mask((7, 9), 0.3)
    torch.manual_seed(3)
    assert torch.equal(keep_mask((7, 9), 0.3), a)
    assert not torch.equal(a, b)  # the global RNG advanced


def test_module_eval_p0_p1_and_gradient():
    x = torch.randn(5, 6, requires_grad=True)
    d = Dropout(0.25)
    d.eval()
    assert d(x) is x
    assert dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    d.train()
    torch.manual_seed(0)
    y = d(x)
    y.sum().backward()
    torch.manual_seed(0)
    keep = keep_mask(x.shape, 0.25)
    assert torch.equal(x.grad, keep.float() / 0.75)
    torch.testing.assert_close(y, torch.where(keep, x / 0.75, 0.0))
    assert isinstance(d, torch.nn.Dropout)
    with pytest.raises(ValueError, match="between 0 and 1"):
        Dropout(1.5)


@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool", "float"])
def test_cpu_attention_with_dropout_is_the_math_path(mask_kind):
    g = torch.Generator().manual_seed(0)
    B, H, T, d = 2, 3, 5, 4
    q, k, v = (torch.randn(B, H, T, d, generator=g, dtype=torch.float64) for _ in range(3))
    mask, causal = None, mask_kind == "causal"
    if mask_kind == "bool":
        mask = torch.rand(T, T, generator=g) < 0.7
        mask |= torch.eye(T, dtype=torch.bool)
    elif mask_kind == "float":
        mask = torch.randn(T, T, generator=g, dtype=torch.float64)
    torch.manual_seed(5)
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.2, is_causal=causal, scale=0.7)
    torch.manual_seed(5)
    keep = keep_mask((B, H, T, T), 0.2)
    w = (q @ k.transpose(-2, -1)) * 0.7
    if causal:
        w = w.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf)
    if mask_kind == "bool":
        w = w.masked_fill(~mask, -math.inf)
    elif mask_kind == "float":
        w = w + mask
    ref = (w.softmax(-1) * keep / 0.8) @ v
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # without dropout it is F.scaled_dot_product_attention itself
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=0.7),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=0.7))


def test_attention_module_trains_with_dropout_and_is_deterministic_in_eval():
    torch.manual_seed(0)
    att = Attention(16, 4, attn_drop=0.1, proj_drop=0.1)
    x = torch.randn(2, 6, 16, requires_grad=True)
    att.train()
    att(x).square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    att.eval()
    torch.testing.assert_close(att(x), att(x))
