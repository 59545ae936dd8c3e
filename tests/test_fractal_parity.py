"""FractalGen against the official LTH14/fractalgen code (fixtures recorded by
scripts/record_fixtures/fractal.py, see tests/fixtures/fractal/README.md): perturbed random weights,
three small configurations (FractalAR; FractalMAR; FractalMAR with guiding pixels, 4 levels).

Compared: the training loss (label drop, per-sample masks, quantisation noise replayed from the
official seed), level 0's patches and five conditions, PixelLoss logits / targets / train and eval
losses, the NLL in bits/dim, and depth-first sampling with the official RNG replayed (CFG linear and
constant, with and without the filter, several temperatures; official T -> ours 1 / T).
Floats: float32 relative tolerance; sampled pixels exact."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from genmodels.generators.fractal import FractalGen, PixelLoss
from genmodels.sampling import from_fractal_temperature
from helpers import mar_fixture_weights

pytestmark = pytest.mark.usefixtures("one_thread")
FIX = Path(__file__).parent / "fixtures" / "fractal"
CONFIGS = {  # as scripts/record_fixtures/fractal.py
    "ar": ((8, 2, 1), (32, 16, 8), (2, 1, 1), (2, 2, 2), ("ar", "ar", "ar"), dict(num_conds=1)),
    "mar": ((8, 2, 1), (32, 16, 8), (2, 1, 1), (2, 2, 2), ("mar", "mar", "ar"), dict(num_conds=5)),
    "mar_gp": ((16, 4, 2, 1), (32, 24, 16, 8), (2, 1, 1, 1), (2, 2, 2, 2), ("mar", "mar", "mar", "ar"),
               dict(num_conds=5, guiding_pixel=True)),
}
SAMPLING = (("cfg", 3.0, "linear", 0.5, 1e-2, (3, 2, 2), 11),
            ("nocfg", 1.0, "constant", 2.0, 1e-4, (4, 4, 4), 12),
            ("cfgconst", 2.0, "constant", 1.0, 0.0, (16, 1, 3), 13))


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    tol = rtol * max(1.0, float(b.abs().max()))
    assert float((a.double() - b.double()).abs().max()) <= tol


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request):
    name = request.param
    sizes, dims, blocks, heads, types, kw = CONFIGS[name]
    model = FractalGen(sizes, dims, blocks, heads, types, num_classes=10, attn_dropout=0.0, proj_dropout=0.0,
                       r_weight=5.0, **kw)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    rec = load_file(str(FIX / f"{name}.safetensors"))
    checksum = mar_fixture_weights().perturb_(model, seed=3)
    assert checksum == pytest.approx(float(rec["checksum"]), rel=1e-9)  # the same keys -> the same weights
    return name, model, rec


def g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_training_loss(case):
    name, model, rec = case
    model.train()
    with torch.no_grad():
        out = model.forward_loss(rec["images"], rec["labels"], generator=g(100))
    close(out["loss"], rec["train_loss"])


def test_level0_outputs(case):
    name, model, rec = case
    model.train()
    emb = model.class_emb(rec["labels"])
    with torch.no_grad():
        patches, conds, guiding = model.generator(rec["images"], [emb] * 5, g(101))
    close(patches, rec["level0_patches"])
    assert len(conds) == (1 if name == "ar" else 5)
    for i, c in enumerate(conds):
        close(c, rec[f"level0_cond{i}"])
    close(guiding, rec["level0_guiding_loss"])


def test_pixelloss_logits_and_losses(case):
    name, model, rec = case
    pix = model
    while not isinstance(pix, PixelLoss):
        pix = pix.next_fractal
    pix.train()
    with torch.no_grad():
        ids = pix.quantize(rec["pixel_target"], g(102))
        assert torch.equal(ids, rec["pixel_ids"])
        close(pix.logits(ids, rec["pixel_cond"]), rec["pixel_logits"])
        close(pix(rec["pixel_target"], [rec["pixel_cond"]], g(102)), rec["pixel_train_loss"])
        pix.eval()
        close(pix(rec["pixel_target"], [rec["pixel_cond"]], g(102)), rec["pixel_eval_loss"])
    pix.train()


def test_nll_bits_per_dim(case):
    name, model, rec = case
    bpd = model.nll(rec["images"], rec["labels"], num_passes=int(rec["nll_passes"]), generator=g(103))
    close(bpd, rec["nll_bpd"])
    assert model.training  # restored


@pytest.mark.parametrize("run", SAMPLING, ids=[s[0] for s in SAMPLING])
def test_depth_first_sampling_replays_official_rng(case, run):
    name, model, rec = case
    tag, cfg, sched, temp, thr, iters, seed = run
    levels = len(CONFIGS[name][0]) - 1
    model.eval()
    out = model.sample(rec["labels"], cfg=cfg, guidance_schedule=sched, temperature=from_fractal_temperature(temp),
                       filter_threshold=thr, num_iter_list=iters[:levels], generator=g(seed))
    model.train()
    ref = rec[f"sample_{tag}"]
    close(out, ref)
    to_ids = lambda x: ((x * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)  # noqa: E731
                         + torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) * 255).round()
    assert torch.equal(to_ids(out), to_ids(ref))
