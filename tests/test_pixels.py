"""The Pixels tokenizer: the identity with the official ImageNet normalisation, or 8-bit ids in
raster order; its TokenSpec ("pixels, 256 values per channel, side S"); the GeneratorModule takes
it without a tokenizer checkpoint, for FractalGen and for a causal AR over pixel ids."""
from __future__ import annotations

import pytest
import torch

from genmodels.errors import GenmodelsError
from genmodels.generators.causal_ar import CausalAR
from genmodels.generators.fractal import FractalGen
from genmodels.tokenizers.base import TokenSpec
from genmodels.tokenizers.pixels import IMAGENET_MEAN, IMAGENET_STD, Pixels
from genmodels.training import GeneratorModule
from genmodels.utils.config import instantiate


def eight_bit(n: int = 3, s: int = 4) -> torch.Tensor:
    """Images in [-1, 1] on the 8-bit grid, as the data modules give them."""
    return torch.randint(0, 256, (n, 3, s, s), generator=torch.Generator().manual_seed(0)).float() / 127.5 - 1


def test_normalized_is_the_official_normalisation_and_inverts():
    tok = Pixels(image_size=4)
    x = eight_bit()
    z = tok.encode(x)
    x01 = (x + 1) / 2
    want = (x01 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(z, want)
    assert not torch.allclose(z, x)  # not [-1, 1]
    back = tok.decode(z)
    assert torch.equal(((back + 1) * 127.5).round(), ((x + 1) * 127.5).round())
    assert tok.spec == TokenSpec("pixels", ((4, 4),), vocab_size=256, channels=3)
    assert tok.spec.image_size == 4
    tok.spec.check(z)
    with pytest.raises(ValueError, match=r"\(B, 3, 4, 4\)"):
        tok.spec.check(z[:, :, :2])


def test_ids_are_raster_rgb_and_exact():
    tok = Pixels(image_size=4, output="ids")
    x = eight_bit()
    ids = tok.encode(x)
    assert ids.shape == (3, 48) and ids.dtype == torch.int64
    assert tok.spec.kind == "discrete" and tok.spec.vocab_size == 256 and tok.spec.seq_len == 48
    # token 3 * (row * S + col) + channel
    r, c, ch = 1, 2, 2
    assert ids[0, 3 * (r * 4 + c) + ch] == round((float(x[0, ch, r, c]) + 1) * 127.5)
    assert torch.equal(tok.decode(ids), x)


def test_user_mistakes_name_the_field():
    with pytest.raises(GenmodelsError, match="output"):
        Pixels(8, output="minus_one_one")
    with pytest.raises(GenmodelsError, match=r"image_size=8.*\(2, 3, 16, 16\)"):
        Pixels(8).encode(torch.zeros(2, 3, 16, 16))
    with pytest.raises(GenmodelsError, match="nothing to train"):
        Pixels(8).losses(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="pixels TokenSpec needs"):
        TokenSpec("pixels", ((4, 4),), vocab_size=256)


def test_generator_module_takes_pixels_without_checkpoint():
    gen = FractalGen((8, 2, 1), (16, 8, 8), (1, 1, 1), (2, 2, 2), ("ar", "ar", "ar"), num_classes=3)
    module = GeneratorModule(gen, tokenizer=Pixels(8))
    assert module.tokenizer.config == {"class_path": "genmodels.tokenizers.pixels.Pixels",
                                       "init_args": {"image_size": 8, "output": "normalized"}}
    assert isinstance(instantiate(module.tokenizer.config), Pixels)  # what a checkpoint stores, rebuilt
    with pytest.raises(ValueError, match="image_size|shapes"):
        GeneratorModule(gen, tokenizer=Pixels(16))
    ar = CausalAR(vocab_size=256, token_shape=(8, 24), num_classes=3, hidden_size=16, depth=1, num_heads=2)
    GeneratorModule(ar, tokenizer=Pixels(8, output="ids"))
    with pytest.raises(ValueError, match="kind"):
        GeneratorModule(ar, tokenizer=Pixels(8))
