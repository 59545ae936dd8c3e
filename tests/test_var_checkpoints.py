"""Official VAR checkpoints: key layout, strict loading, clear refusals."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from genmodels.checkpoints import CheckpointMismatchError, from_official
from genmodels.checkpoints.var import var_to_official
from genmodels.generators.var import VAR
from genmodels.errors import GenmodelsError

FIX = Path(__file__).parent / "fixtures" / "var"


pytestmark = pytest.mark.usefixtures("one_thread")


def small_official_sd(depth: int, **kw) -> dict[str, torch.Tensor]:
    """An official-layout state dict of a small VAR built as build_vae_var(depth) would."""
    args = dict(vocab_size=32, Cvae=4, patch_nums=(1, 2, 3), num_classes=5, depth=depth, **kw)
    return var_to_official(VAR(**args))


SMALL = dict(V=32, Cvae=4, patch_nums=(1, 2, 3), num_classes=5)


@pytest.mark.parametrize("name", ["d16", "d36_saln_512"])
def test_official_key_layout(name):
    """Our model, exported with the official names, has exactly the official keys and shapes
    (recorded from the official build_vae_var), so var_d16.pth ... load strictly."""
    rec = json.loads((FIX / "official_var_keys.json").read_text())[name]
    kw = rec["build_vae_var"]
    with torch.device("meta"):
        model = VAR(depth=kw["depth"], shared_aln=kw.get("shared_aln", False),
                    patch_nums=tuple(kw.get("patch_nums", (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))))
    ours = {k: list(v.shape) for k, v in var_to_official(model).items()}
    assert ours == rec["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == rec["num_params"]


def test_round_trip_and_training_checkpoint_layout():
    sd = small_official_sd(2, embed_dim=64, num_heads=4, attn_l2_norm=True)
    m = from_official("var", sd, depth=2, embed_dim=64, num_heads=4, **SMALL)
    assert not m.training
    for k, v in var_to_official(m).items():
        assert torch.equal(v, sd[k]), k
    wrapped = {"epoch": 3, "trainer": {"var_wo_ddp": sd, "vae_local": {}}, "args": None}
    m2 = from_official("var", wrapped, depth=2, embed_dim=64, num_heads=4, **SMALL)
    assert torch.equal(m2.head.weight, m.head.weight)


def test_builder_defaults_follow_depth():
    sd = small_official_sd(3)  # width 192, 3 heads, drop path 0.1*3/24, l2-norm attention
    m = from_official("var", sd, depth=3, **SMALL)
    assert (m.C, m.num_heads) == (192, 3)
    assert m.blocks[-1].drop_path.drop_prob == pytest.approx(0.1 * 3 / 24)


def test_wrong_depth_is_refused_with_the_size_it_was_made_for():
    sd = small_official_sd(3)  # a "d3" file (width 192) into a d2 model (width 128)
    with pytest.raises(CheckpointMismatchError) as e:
        from_official("var", sd, depth=2, **SMALL)
    msg = str(e.value)
    assert "'pos_start'" in msg and "(1, 1, 192)" in msg and "(1, 1, 128)" in msg
    assert "VAR-d3" in msg and "depth=3" in msg and "embed_dim=192" in msg


def test_same_width_other_depth_is_refused():
    sd = small_official_sd(2, embed_dim=64, num_heads=2)
    with pytest.raises(CheckpointMismatchError, match=r"missing key.*blocks\.2\..*VAR-d2"):
        from_official("var", sd, depth=3, embed_dim=64, num_heads=2, **SMALL)


def test_attention_variant_mismatch_is_refused():
    sd = small_official_sd(2, attn_l2_norm=False)
    with pytest.raises(CheckpointMismatchError, match="unexpected|missing"):
        from_official("var", sd, depth=2, **SMALL)  # builder default attn_l2_norm=True
    from_official("var", sd, depth=2, attn_l2_norm=False, **SMALL)


def test_not_a_checkpoint_file(tmp_path):
    bad = tmp_path / "var_d16.pth"
    bad.write_text("<html>404 Not Found</html>")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        from_official("var", bad)
    with pytest.raises(GenmodelsError):
        from_official("var", tmp_path / "missing.pth")


def test_not_a_state_dict_and_unknown_kwargs(tmp_path):
    path = tmp_path / "x.pth"
    torch.save({"weights": [1, 2, 3]}, path)
    with pytest.raises(CheckpointMismatchError, match="state dict of tensors"):
        from_official("var", path)
    with pytest.raises(GenmodelsError, match="unknown argument"):
        from_official("var", small_official_sd(2), depth=2, widht=3, **SMALL)


def test_vqvae_mismatch_names_the_file_size():
    from safetensors import safe_open
    from safetensors.torch import load_file
    sd = {k: (v.float() / 64 if v.dtype == torch.int8 else v) for k, v in load_file(str(FIX / "vae.safetensors")).items()}
    with safe_open(str(FIX / "vae.safetensors"), "pt") as f:
        cfg = json.loads(f.metadata()["vae_config"])
    vae = from_official("var-vqvae", sd, **cfg)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    with pytest.raises(CheckpointMismatchError, match="vocab_size=64"):
        from_official("var-vqvae", sd, **{**cfg, "vocab_size": 128})
