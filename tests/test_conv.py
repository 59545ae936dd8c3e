"""The shared LDM/VQGAN conv encoder/decoder: official sizes, key names, shapes, behaviour."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from genmodels.nn.conv import AttnBlock, Decoder, Downsample, Encoder, ResnetBlock, Upsample, ldm_attn_levels
from helpers import assert_close_f32

FIXTURES = Path(__file__).parent / "fixtures" / "conv"


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def var_ddconfig(ch=160, z=32):
    return dict(ch=ch, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=z, attn_levels=(4,), mid_attn=True,
                attn_type="qkv")


def test_var_vqvae_encoder_decoder_param_counts():
    """FoundationVision/VAR VQVAE(ch=160, z_channels=32): encoder 44,107,872, decoder 64,653,923 (anchors/var.md)."""
    with torch.device("meta"):
        enc = Encoder(**var_ddconfig())
        dec = Decoder(**var_ddconfig())
    assert n_params(enc) == 44_107_872
    assert n_params(dec) == 64_653_923
    keys = set(enc.state_dict()) | {f"d.{k}" for k in dec.state_dict()}
    assert "down.4.attn.1.qkv.weight" in keys and "down.3.attn.0.qkv.weight" not in keys
    assert "d.up.4.attn.2.proj_out.weight" in keys and "d.up.0.upsample.conv.weight" not in keys
    assert tuple(enc.state_dict()["conv_out.weight"].shape) == (32, 640, 3, 3)
    assert tuple(dec.state_dict()["up.3.block.0.nin_shortcut.weight"].shape) == (320, 640, 1, 1)


class KL16(nn.Module):
    """Assembles MAR's AutoencoderKL(embed_dim=16, ch_mult=(1,1,2,2,4)) from our blocks (its
    tokenizer lives elsewhere; this only checks that the blocks can build it key-for-key)."""

    def __init__(self):
        super().__init__()
        levels = ldm_attn_levels(256, (16,), 5)
        self.encoder = Encoder(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=16, double_z=True,
                               attn_levels=levels, attn_type="separate")
        self.decoder = Decoder(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=16, attn_levels=(),
                               attn_type="separate")
        self.quant_conv = nn.Conv2d(32, 32, 1)
        self.post_quant_conv = nn.Conv2d(16, 16, 1)


def collapse(state_dict) -> list[str]:
    """The anchor's listing format: integers -> {i}, first shape per pattern, ``[i in 0..max]``."""
    order, shape, top = [], {}, {}
    for k, v in state_dict.items():
        nums = [int(n) for n in re.findall(r"(?<=\.)\d+(?=\.)", k)]
        pat = re.sub(r"(?<=\.)\d+(?=\.)", "{i}", k)
        if pat not in shape:
            order.append(pat)
            shape[pat] = list(v.shape)
        if nums:
            top[pat] = max(top.get(pat, 0), *nums)
    return [f"  {p} {shape[p]}" + (f"  [i in 0..{top[p]}]" if p in top else "") for p in order]


def test_mar_kl16_keys_and_shapes_match_official_listing():
    lines = (FIXTURES / "mar_kl16_keys.txt").read_text().splitlines()
    header, want = lines[0], lines[1:]
    with torch.device("meta"):
        model = KL16()
    sd = model.state_dict()
    assert collapse(sd) == want
    assert len(sd) == int(re.search(r"(\d+) state_dict tensors", header).group(1)) == 312
    assert n_params(model) == int(re.search(r"\): (\d+) params", header).group(1)) == 66_456_019
    assert ldm_attn_levels(256, (16,), 5) == (4,)


def test_shapes_and_double_z():
    torch.manual_seed(0)
    enc = Encoder(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, double_z=True, attn_levels=(1,))
    dec = Decoder(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, attn_levels=(1,), blocks_per_level=1)
    x = torch.randn(2, 3, 16, 16)
    z = enc(x)
    assert z.shape == (2, 8, 8, 8)
    assert dec(z[:, :4]).shape == (2, 3, 16, 16)
    assert len(dec.up[0].block) == 1 and not hasattr(dec.up[0], "upsample") and hasattr(dec.up[1], "upsample")
    enc1 = Encoder(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, conv_out_ks=1, resamp_with_conv=False)
    assert enc1.conv_out.weight.shape == (4, 64, 1, 1) and enc1(x).shape == (2, 4, 8, 8)
    assert not hasattr(enc1.down[0].downsample, "conv")


def test_blocks_behave():
    torch.manual_seed(0)
    x = torch.randn(2, 32, 8, 8)
    # ResnetBlock: identity shortcut when channels equal, 1x1 conv otherwise
    assert isinstance(ResnetBlock(32).nin_shortcut, nn.Identity)
    rb = ResnetBlock(32, 64)
    assert rb(x).shape == (2, 64, 8, 8) and rb.nin_shortcut.weight.shape == (64, 32, 1, 1)
    # Downsample pads right/bottom only: a 3x3 stride-2 conv on an 8x8 map gives 4x4
    ds = Downsample(32)
    assert ds(x).shape == (2, 32, 4, 4)
    manual = nn.functional.conv2d(nn.functional.pad(x, (0, 1, 0, 1)), ds.conv.weight, ds.conv.bias, stride=2)
    torch.testing.assert_close(ds(x), manual)
    assert Downsample(32, with_conv=False)(x).shape == (2, 32, 4, 4)
    assert Upsample(32)(x).shape == (2, 32, 16, 16)
    # fused and separate attention compute the same function when weights are shared
    fused, sep = AttnBlock(32, "qkv"), AttnBlock(32, "separate")
    with torch.no_grad():
        for name, part in zip("qkv", fused.qkv.weight.chunk(3)):
            getattr(sep, name).weight.copy_(part)
        for name, part in zip("qkv", fused.qkv.bias.chunk(3)):
            getattr(sep, name).bias.copy_(part)
        sep.proj_out.load_state_dict(fused.proj_out.state_dict())
        sep.norm.load_state_dict(fused.norm.state_dict())
    assert_close_f32(fused(x), sep(x), what="fused vs separate q, k, v")
    # and equal an explicit softmax(q k^T / sqrt(C)) v
    h = fused.norm(x)
    q, k, v = fused.qkv(h).reshape(2, 3, 32, 64).unbind(1)
    w = torch.softmax(q.transpose(1, 2) @ k / 32 ** 0.5, dim=-1)
    ref = x + fused.proj_out((v @ w.transpose(1, 2)).reshape(2, 32, 8, 8))
    assert_close_f32(fused(x), ref, what="vs explicit softmax attention")


def test_bad_options_raise():
    with pytest.raises(ValueError, match="attn_type"):
        AttnBlock(32, "flash")
    with pytest.raises(ValueError, match="attn_levels"):
        Encoder(ch=32, ch_mult=(1, 2), z_channels=4, attn_levels=(2,))
    with pytest.raises(ValueError, match="divisible by 32"):
        Encoder(ch=24, ch_mult=(1,), z_channels=4)
