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


# ----------------------------------------------------------------------------- genmodels.from_official names
PIPELINE_NAMES = {"fractalar-in64": "fractalar_in64", "fractalmar-in64": "fractalmar_in64",
                  "fractalmar-base-in256": "fractalmar_base_in256", "fractalmar-large-in256": "fractalmar_large_in256",
                  "fractalmar-huge-in256": "fractalmar_huge_in256"}


def test_pipeline_names_files_and_readme_knobs(tmp_path):
    """The five releases are ``genmodels.from_official`` names: the official download's folder /
    file, the README's Dropbox link (direct download), no invented checksum, the README's FID knobs
    in our convention (temperature 1 / T); a missing file names itself. No network."""
    import genmodels
    from genmodels import pipeline
    from genmodels.errors import GenmodelsError

    for name, kind in PIPELINE_NAMES.items():
        spec = pipeline.OFFICIAL[name]
        assert spec["kind"] == "fractal" and spec["generator_kwargs"] == {"model": kind} and kind in KINDS
        rel, url, sha = spec["files"]["generator"]
        assert rel == f"fractalgen/{kind}/checkpoint-last.pth" and sha is None
        assert url.startswith("https://www.dropbox.com/scl/fi/") and url.endswith("&dl=1") and "rlkey=" in url
        assert spec["tokenizer_kwargs"] == {"image_size": 64 if kind.endswith("in64") else 256}
        assert pipeline._official_name(kind) == name  # the official spelling works too
        with pytest.raises(GenmodelsError, match=f"{kind}/checkpoint-last.pth.*dropbox"):
            genmodels.from_official(name, tmp_path)
    knobs = {n: (pipeline.OFFICIAL[n]["sample_kwargs"]["cfg"], round(1 / pipeline.OFFICIAL[n]["sample_kwargs"]["temperature"], 6),
                 pipeline.OFFICIAL[n]["sample_kwargs"]["num_iter_list"]) for n in PIPELINE_NAMES}
    assert knobs == {"fractalar-in64": (11.0, 1.03, [64, 16]), "fractalmar-in64": (6.5, 1.02, [64, 16]),
                     "fractalmar-base-in256": (29.0, 1.1, [64, 16, 16]),
                     "fractalmar-large-in256": (21.0, 1.1, [64, 16, 16]),
                     "fractalmar-huge-in256": (19.0, 1.1, [64, 16, 16])}
    assert all(pipeline.OFFICIAL[n]["sample_kwargs"]["guidance_schedule"] == "linear" for n in PIPELINE_NAMES)


def test_from_official_fractal_pipeline_replays_the_official_sampler(tmp_path, monkeypatch):
    """``genmodels.from_official`` on an official-format file (``{"model": state_dict}`` with the
    perturbed weights of the recorded FractalMAR parity fixture, in a folder laid out as the official
    download) samples the official pixels through the pipeline's default knobs."""
    import genmodels
    from genmodels import checkpoints, pipeline
    from genmodels.checkpoints import fractal as fractal_ckpt
    from genmodels.sampling import from_fractal_temperature
    from helpers import mar_fixture_weights
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    tiny = dict(img_size_list=(8, 2, 1), embed_dim_list=(32, 16, 8), num_blocks_list=(2, 1, 1),
                num_heads_list=(2, 2, 2), generator_type_list=("mar", "mar", "ar"))  # the "mar" fixture's
    monkeypatch.setattr(FractalGen, "fractal_tiny", classmethod(lambda cls, **kw: cls(**tiny, **kw)), raising=False)
    monkeypatch.setitem(checkpoints._CONVERTERS, "fractal_tiny", fractal_ckpt._converter("fractal_tiny"))
    rec = load_file(str(Path(__file__).parent / "fixtures" / "fractal" / "mar.safetensors"))
    model = FractalGen(**tiny, num_classes=10, num_conds=5)
    assert mar_fixture_weights().perturb_(model, seed=3) == pytest.approx(float(rec["checksum"]), rel=1e-9)
    (tmp_path / "fractal_tiny").mkdir()
    torch.save({"model": model.state_dict()}, tmp_path / "fractal_tiny" / "checkpoint-last.pth")
    # the recorded run "cfg": official cfg 3, linear, T 0.5, filter 1e-2, num_iter_list 3,2, seed 11
    monkeypatch.setitem(pipeline.OFFICIAL, "fractalmar-tiny", {
        "kind": "fractal", "generator_kwargs": {"model": "fractal_tiny", "class_num": 10},
        "tokenizer_kwargs": {"image_size": 8},
        "sample_kwargs": {"cfg": 3.0, "guidance_schedule": "linear", "temperature": from_fractal_temperature(0.5),
                          "num_iter_list": [3, 2], "filter_threshold": 1e-2},
        "files": {"generator": ("fractalgen/fractal_tiny/checkpoint-last.pth", "https://example.invalid/f", None)}})
    pipe = genmodels.from_official("fractalmar-tiny", tmp_path)
    assert isinstance(pipe.generator, FractalGen) and not pipe.generator.training
    images = pipe.sample(rec["labels"], generator=torch.Generator().manual_seed(11), output="uint8")
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    want = ((rec["sample_cfg"] * std + mean) * 255).round()
    assert torch.equal(images.float(), want)

    # ``genmodels edit --official NAME --weights DIR`` goes through the same loader: the known pixels
    # of the image come back unchanged, and the output is the pipeline's own edit for that seed
    import numpy as np
    from PIL import Image

    from genmodels.cli import main
    Image.fromarray(images[0].permute(1, 2, 0).numpy()).save(tmp_path / "in.png")
    mask = np.zeros((8, 8), np.uint8)
    mask[4:] = 255                                    # out-paint the bottom half
    Image.fromarray(mask).save(tmp_path / "mask.png")
    main(["edit", "--official", "fractalmar-tiny", "--weights", str(tmp_path), "--image", str(tmp_path / "in.png"),
          "--mask", str(tmp_path / "mask.png"), "--class", "3", "--out", str(tmp_path / "out.png"), "--seed", "5",
          "--device", "cpu"])
    out = torch.from_numpy(np.asarray(Image.open(tmp_path / "out.png").convert("RGB")).copy()).permute(2, 0, 1)
    assert torch.equal(out[:, :4], images[0, :, :4])
    m = torch.from_numpy(mask > 0).view(1, 1, 8, 8).float()
    assert torch.equal(out, pipe.edit(images[:1], m, [3], generator=torch.Generator().manual_seed(5), output="uint8")[0])
