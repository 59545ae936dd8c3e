"""Zero-shot editing (issue 18): ``Pipeline.edit`` / ``genmodels edit`` for MaskGIT, MAR (CE and
DiffLoss heads, and its causal variant), VAR and the causal AR, on tiny random models.

* tokens outside the mask are the image's own tokens, exactly (every paradigm, masks that differ
  per row, including an all-zero and an all-one row);
* an all-zero mask gives the tokenizer's reconstruction; an all-one mask gives ``sample``'s tokens
  for the same seed;
* the footprint rule per scale; raster-order models refuse in-painting; a 1D tokenizer (TiTok) and
  masks of the wrong size are refused with one line naming them;
* ``genmodels edit`` round trip through PNG files.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from genmodels.errors import GenmodelsError
from genmodels.generators.causal_ar import CausalAR
from genmodels.generators.fractal import FractalGen
from genmodels.generators.mar import MAR
from genmodels.generators.maskgit import MaskGIT
from genmodels.generators.var import VAR
from genmodels.pipeline import Pipeline, token_mask
from genmodels.tokenizers.kl_vae import KLVAE
from genmodels.tokenizers.pixels import Pixels

from helpers import gen, tiny_kl, tiny_vq

pytestmark = pytest.mark.usefixtures("one_thread")
C, S = 3, 16  # classes, image side (8x8 tokens)
CAUSAL = ("causal_ar", "mar_causal")
ALL = ["maskgit", "mar", "mar_ce", "var", "causal_ar", "mar_causal", "fractalmar"]


vq, kl = tiny_vq, tiny_kl  # the tiny random tokenizers every pipeline test builds on (tests/helpers.py)


MAR_SMALL = dict(token_shape=(8, 8), num_classes=C, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
                 decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, buffer_size=2, diffloss_d=1,
                 diffloss_w=32, num_sampling_steps="3", num_iter=4, attn_dropout=0.0, proj_dropout=0.0)


def build(name: str) -> Pipeline:
    torch.manual_seed(1)
    if name == "var":
        tok = vq((1, 2, 3, 8))  # a 3x3 scale: footprints that straddle pixel rows
        g = VAR(vocab_size=32, Cvae=8, patch_nums=(1, 2, 3, 8), num_classes=C, depth=1, embed_dim=32, num_heads=2,
                init_head=1.0, init_adaln_gamma=0.5)
    elif name == "mar":
        tok, g = kl(), MAR(token_channels=4, **MAR_SMALL)
    elif name == "mar_ce":
        tok, g = vq(), MAR(token_channels=None, vocab_size=32, **MAR_SMALL)
    elif name == "mar_causal":
        tok, g = vq(), MAR(token_channels=None, vocab_size=32, order="raster", attention="causal", **MAR_SMALL)
    elif name == "causal_ar":
        tok, g = vq(), CausalAR(vocab_size=32, token_shape=(8, 8), num_classes=C, hidden_size=32, depth=1,
                                num_heads=2)
    elif name == "fractalmar":  # pixels of 8x8 images: 4x4 patches of 2x2 pixels, then the PixelLoss
        tok = Pixels(image_size=8)
        g = FractalGen(img_size_list=(8, 2, 1), embed_dim_list=(32, 16, 16), num_blocks_list=(1, 1, 1),
                       num_heads_list=(2, 2, 2), generator_type_list=("mar", "mar", "ar"), num_classes=C,
                       attn_dropout=0.0, proj_dropout=0.0, num_iter_list=(4, 2))
    else:
        tok, g = vq(), MaskGIT(vocab_size=32, token_shape=(8, 8), num_classes=C, hidden_size=32, depth=1,
                               num_heads=2, intermediate_size=64, dropout=0.0, attn_dropout=0.0)
    if name not in ("mar", "fractalmar"):  # 0.02-initialised heads make every logit about equal: give them weight
        for p in g.parameters():
            if p.ndim >= 2 and p.abs().max() < 0.2:
                torch.nn.init.normal_(p, std=0.5)
    elif name == "mar":
        for p in g.diffloss.parameters():  # the DiffLoss MLP starts with zero adaLN / output layers
            if p.abs().max() == 0:
                torch.nn.init.normal_(p, std=0.05)
    return Pipeline(g.eval(), tok, {"cfg": 2.0})


@pytest.fixture(scope="module")
def pipes():
    return {}


def pipe_of(pipes, name) -> Pipeline:
    if name not in pipes:
        pipes[name] = build(name)
    return pipes[name]


def side(name: str) -> int:
    return 8 if name == "fractalmar" else S


def images(n: int = 4, s: int = S) -> torch.Tensor:
    return (torch.rand(n, 3, s, s, generator=gen(5)) * 255).round() / 127.5 - 1  # 8-bit values


def centre(n: int = 1, s: int = S) -> torch.Tensor:
    m = torch.zeros(n, 1, s, s)
    m[..., s // 4:3 * s // 4, s // 4:3 * s // 4] = 1
    return m


def bottom(n: int = 1, rows: int | None = None, s: int = S) -> torch.Tensor:
    m = torch.zeros(n, 1, s, s)
    m[..., s - (rows or s // 2):, :] = 1
    return m


def mixed_masks(name: str) -> torch.Tensor:
    """One mask per row: a different region in each, plus an all-zero and an all-one row."""
    s = side(name)
    first = bottom(1, s=s) if name in CAUSAL else centre(1, s=s)
    # 5 of 16 pixel rows: the footprint covers 3 token rows; 3 of 8: FractalMAR's 2x2 patches half masked
    second = bottom(1, rows=5 * s // 16, s=s)
    return torch.cat([first, second, torch.zeros(1, 1, s, s), torch.ones(1, 1, s, s)])


def per_token(t: torch.Tensor) -> torch.Tensor:
    """Pixel tokens (B, 3, S, S) -> (B, S*S, 3), one row per pixel as the token mask counts them."""
    return t.flatten(2).transpose(1, 2) if t.ndim == 4 else t


@torch.no_grad()  # as the editing path decodes (inference decodes take the channels-last CPU path)
def reconstruction(p: Pipeline, x: torch.Tensor) -> torch.Tensor:
    tok = p.tokenizer
    z = tok.encode(x, sample=False) if isinstance(tok, KLVAE) else tok.encode(x)
    return tok.decode(z).float().clamp(-1, 1)


# ----------------------------------------------------------------------------- the mask
def test_footprint_per_scale():
    """A token is regenerated when any pixel of its footprint is masked, each scale on its own."""
    m = torch.zeros(1, 1, S, S)
    m[0, 0, 5, 5] = 1  # on a 3x3 grid, pixel row 5 lies in token rows 0 (px 0..5) and 1 (px 5..10)
    t = token_mask(m, ((1, 1), (2, 2), (3, 3), (8, 8)))
    one, two, three, eight = t[0].split([1, 4, 9, 64])
    assert one.tolist() == [True]
    assert two.view(2, 2).tolist() == [[True, False], [False, False]]
    assert three.view(3, 3).tolist() == [[True, True, False], [True, True, False], [False, False, False]]
    assert eight.view(8, 8).nonzero().tolist() == [[2, 2]]
    # pixel ids tokens (Pixels(output="ids"): (S, 3S), R G B of a pixel side by side)
    assert token_mask(m, ((S, 3 * S),))[0].view(S, 3 * S).nonzero().tolist() == [[5, 15], [5, 16], [5, 17]]
    # footprint="all": only tokens whose every pixel is masked (the 2x2 pixel block of token (2, 2))
    assert not token_mask(m, ((1, 1), (3, 3), (8, 8)), footprint="all").any()
    m[0, 0, 4:6, 4:6] = 1
    t = token_mask(m, ((1, 1), (3, 3), (8, 8)), footprint="all")[0]
    assert t[:10].sum() == 0 and t[10:].view(8, 8).nonzero().tolist() == [[2, 2]]
    assert not token_mask(torch.zeros(2, 1, S, S), ((8, 8),)).any()
    assert token_mask(torch.ones(2, 1, S, S), ((2, 2), (8, 8))).all()


# ----------------------------------------------------------------------------- every paradigm
@pytest.mark.parametrize("name", ALL)
def test_tokens_outside_the_mask_are_the_images(pipes, name):
    p = pipe_of(pipes, name)
    x, m = images(s=side(name)), mixed_masks(name)
    tokens, tmask, edited = p.edit_tokens(x, m, torch.tensor([0, 1, 2, 1]), generator=gen(0))
    tokens, edited = per_token(tokens), per_token(edited)
    assert tmask.shape == tokens.shape[:2] and tmask[2].sum() == 0 and tmask[3].all()
    assert 0 < tmask[0].sum() < tmask.shape[1]
    keep = ~tmask
    assert torch.equal(edited[keep], tokens[keep])  # exact, token space (continuous tokens too)
    assert not torch.equal(edited[tmask], tokens[tmask])  # and the masked ones were generated
    out = p.edit(x, m, [0, 1, 2, 1], generator=gen(0))
    assert out.shape == x.shape and out.abs().max() <= 1
    torch.testing.assert_close(out[2], reconstruction(p, x)[2], rtol=0, atol=1e-5)  # the all-zero row


def test_footprint_all_keeps_the_coarse_scales(pipes):
    """VAR with footprint="all": the coarse tokens that straddle the box are kept, exactly."""
    p = pipe_of(pipes, "var")
    tokens, tmask, edited = p.edit_tokens(images(2), centre(), 1, generator=gen(0), footprint="all")
    assert tmask[:, :5].sum() == 0 and tmask[:, 5:14].nonzero()[:, 1].tolist() == [4, 4]  # 3x3: the centre only
    assert tmask[:, 14:].sum(1).tolist() == [16, 16]
    assert torch.equal(edited[~tmask], tokens[~tmask]) and not torch.equal(edited, tokens)
    with pytest.raises(GenmodelsError, match="footprint must be one of"):
        p.edit(images(1), centre(), 0, footprint="some")


def test_fractalmar_more_steps_than_masked_patches(pipes):
    """8 level-0 steps for the 4 patches of the centre box: the steps with nothing to draw pass."""
    p = pipe_of(pipes, "fractalmar")
    x = images(1, 8)
    tokens, tmask, edited = p.edit_tokens(x, centre(1, 8), 1, generator=gen(0), num_steps=8)
    assert torch.equal(per_token(edited)[~tmask], per_token(tokens)[~tmask])
    assert not torch.equal(per_token(edited)[tmask], per_token(tokens)[tmask])


@pytest.mark.parametrize("name", ALL)
def test_all_zero_mask_gives_the_reconstruction(pipes, name):
    p = pipe_of(pipes, name)
    s = side(name)
    x = images(2, s)
    tokens, _, edited = p.edit_tokens(x, torch.zeros(1, 1, s, s), 1, generator=gen(0))
    assert torch.equal(edited, tokens)
    assert torch.equal(p.edit(x, torch.zeros(1, 1, s, s), 1, generator=gen(0)), reconstruction(p, x))


@pytest.mark.parametrize("name", ALL)
def test_all_one_mask_gives_sample(pipes, name):
    p = pipe_of(pipes, name)
    labels = torch.tensor([2, 0])
    s = side(name)
    _, _, edited = p.edit_tokens(images(2, s), torch.ones(1, 1, s, s), labels, generator=gen(3))
    assert torch.equal(edited, p.generator.sample(labels, generator=gen(3), cfg=2.0))


def test_knobs_follow_the_convention(pipes):
    """The pipeline's sample_kwargs are the defaults and a call's knobs override them; cfg=1 is
    guidance off (no unconditional pass), so the result differs from cfg=2 for the same seed."""
    p = pipe_of(pipes, "var")
    x, m = images(2), centre()
    a = p.edit_tokens(x, m, 1, generator=gen(0))[2]
    b = p.edit_tokens(x, m, 1, generator=gen(0), cfg=2.0)[2]
    c = p.edit_tokens(x, m, 1, generator=gen(0), cfg=1.0)[2]
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("name", CAUSAL)
def test_raster_models_refuse_in_painting(pipes, name):
    p = pipe_of(pipes, name)
    with pytest.raises(GenmodelsError, match="raster order.*after everything known"):
        p.edit(images(1), centre(), 0, generator=gen(0))
    top = 1 - bottom(1)  # regenerate the top half: known tokens after masked ones
    with pytest.raises(GenmodelsError, match="in-painting"):
        p.edit(images(1), top, 0, generator=gen(0))


def test_wrong_mask_size_names_both_sizes(pipes):
    p = pipe_of(pipes, "maskgit")
    with pytest.raises(GenmodelsError, match=r"mask is 12x12 but the images are 16x16"):
        p.edit(images(1), torch.ones(1, 1, 12, 12), 0)
    with pytest.raises(GenmodelsError, match=r"images are 20x20 but the tokenizer VQVAE takes 16x16"):
        p.edit(torch.zeros(1, 3, 20, 20), torch.ones(1, 1, 20, 20), 0)


def test_1d_tokenizer_is_refused_by_name():
    from genmodels.tokenizers.titok import TiTok

    torch.manual_seed(0)
    tok = TiTok(image_size=S, patch_size=4, encoder_size=[32, 1, 4], decoder_size=[32, 1, 4], num_latent_tokens=6,
                codebook_size=32, token_size=4).eval()
    g = MaskGIT(vocab_size=32, seq_len=6, num_classes=C, hidden_size=32, depth=1, num_heads=2, intermediate_size=64)
    with pytest.raises(GenmodelsError, match=r"TiTok gives 1D tokens \(shapes=\(\(6,\),\)\)"):
        Pipeline(g.eval(), tok).edit(images(1), centre(), 0, generator=gen(0))


# ----------------------------------------------------------------------------- the command
def _checkpoint(tmp_path, p: Pipeline):
    path = tmp_path / "gen.ckpt"
    torch.save({"genmodels": {"generator": p.generator.config, "tokenizer": p.tokenizer.config,
                              "tokenizer_state_dict": p.tokenizer.state_dict(), "sample_kwargs": {"cfg": 2.0}},
                "state_dict": {f"generator.{k}": v for k, v in p.generator.state_dict().items()}}, path)
    return path


def test_cli_round_trip(tmp_path, pipes, capsys):
    from genmodels.cli import main

    p = pipe_of(pipes, "var")
    ckpt = _checkpoint(tmp_path, p)
    x = ((images(1) + 1) * 127.5).round().to(torch.uint8)
    Image.fromarray(x[0].permute(1, 2, 0).numpy()).save(tmp_path / "in.png")
    Image.fromarray((centre()[0, 0].numpy() * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    main(["edit", "--ckpt", str(ckpt), "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
          "--class", "2", "--out", str(tmp_path / "out.png"), "--seed", "7", "--device", "cpu"])
    out = torch.from_numpy(np.asarray(Image.open(tmp_path / "out.png").convert("RGB")).copy()).permute(2, 0, 1)
    want = p.edit(x, centre(), [2], generator=gen(7), output="uint8")[0]
    assert torch.equal(out, want)
    assert "64 of 256 pixels regenerated as class 2" in capsys.readouterr().out

    Image.fromarray(np.zeros((12, 12), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(SystemExit) as e:
        main(["edit", "--ckpt", str(ckpt), "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "small.png"),
              "--class", "2", "--out", str(tmp_path / "x.png"), "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "small.png is 12x12 but --image" in err and "in.png is 16x16" in err
