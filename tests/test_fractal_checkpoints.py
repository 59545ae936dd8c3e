"""Official FractalGen checkpoints through genmodels.checkpoints.from_official: the five official
sizes have the official parameter counts and exactly the official key names / shapes (the list was
measured from the official classes: tests/fixtures/fractal/official_keys.txt); files of another
size are refused naming the key, both shapes and the size the file was made for. Everything runs
on the meta device (no memory for the hundreds of millions of weights)."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

from genmodels.checkpoints import CheckpointMismatchError, from_official
from genmodels.checkpoints.fractal import KINDS, OFFICIAL_PARAMS
from genmodels.generators.fractal import FractalGen

KEYS = Path(__file__).parent / "fixtures" / "fractal" / "official_keys.txt"


def official_shapes() -> dict[str, dict[str, tuple[int, ...]]]:
    """{kind: {key: shape}} from the measured key list ("{i}" patterns expanded)."""
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    kind = None
    for line in KEYS.read_text().splitlines():
        if line.startswith("## "):
            kind = line.split()[1]
            out[kind] = {}
            continue
        m = re.match(r"\s+(\S+) \[([\d, ]*)\](?:\s+\[i in (\d+)\.\.(\d+)\])?", line)
        if not m:
            continue
        key, shape = m.group(1), tuple(int(s) for s in m.group(2).split(",") if s.strip())
        if m.group(3) is None:
            out[kind][key] = shape
        else:
            for i in range(int(m.group(3)), int(m.group(4)) + 1):
                out[kind][key.replace("{i}", str(i))] = shape
    return out


def meta_model(kind: str) -> FractalGen:
    with torch.device("meta"):
        return getattr(FractalGen, kind)(**({"num_conds": 1} if kind == "fractalar_in64" else {}))


@pytest.mark.parametrize("kind", KINDS)
def test_official_parameter_count_and_keys(kind):
    """442.07M (FractalAR-in64; its README's 432M is wrong), 432.00M, 186.30M, 437.00M, 849.59M."""
    model = meta_model(kind)
    n = sum(p.numel() for p in model.parameters())
    assert n == OFFICIAL_PARAMS[kind]
    assert round(n / 1e6, 2) == {"fractalar_in64": 442.07, "fractalmar_in64": 432.00, "fractalmar_base_in256": 186.30,
                                 "fractalmar_large_in256": 437.00, "fractalmar_huge_in256": 849.59}[kind]
    want = official_shapes()[kind]
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(ours) ^ set(want)) == []
    assert {k: s for k, s in ours.items() if want[k] != s} == {}


@pytest.mark.parametrize("kind", ["fractalar_in64", "fractalmar_huge_in256"])
def test_official_file_loads_strictly(kind):
    """A file with exactly the official names / shapes loads (meta tensors stand in for the weights);
    the ``{"model": ...}`` wrapper of the released files is unwrapped."""
    sd = {k: torch.empty(s, device="meta") for k, s in official_shapes()[kind].items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = from_official(kind, {"model": sd, "epoch": 799}, device="meta")
    assert isinstance(model, FractalGen) and not model.training
    assert model.spec.image_size == (64 if kind.endswith("in64") else 256)


def test_wrong_size_is_refused_with_the_key_and_the_size_it_was_made_for():
    sd = {k: torch.empty(s, device="meta") for k, s in official_shapes()["fractalmar_in64"].items()}
    with pytest.raises(CheckpointMismatchError, match=r"fractalar_in64 .*FractalMAR \(widths=\[1024, 512, 128\]"):
        from_official("fractalar_in64", sd, device="meta")
    del sd["next_fractal.next_fractal.b_mlm.bias"]
    with pytest.raises(CheckpointMismatchError, match=r"1 missing key\(s\), first 'next_fractal.next_fractal.b_mlm.bias'"):
        from_official("fractalmar_in64", sd, device="meta")
    sd256 = {k: torch.empty(s, device="meta") for k, s in official_shapes()["fractalmar_base_in256"].items()}
    with pytest.raises(CheckpointMismatchError, match=r"pos_embed_learned' has shape \(1, 22, 384\).*guiding_pixel=True"):
        from_official("fractalmar_base_in256", sd256, guiding_pixel=False, device="meta")


def test_unknown_official_argument_and_non_checkpoint():
    with pytest.raises(TypeError, match="unknown argument"):
        from_official("fractalmar_in64", {"x": torch.zeros(1)}, diffloss_d=3)
    with pytest.raises(CheckpointMismatchError, match="expected an official FractalGen checkpoint"):
        from_official("fractalmar_in64", {"model": {"args": 1}})
