"""Record parity fixtures for FractalGen (genmodels.generators.fractal) from the OFFICIAL
LTH14/fractalgen code (commit c7d0990), on CPU.

Usage (outside the repo's test run; neither timm nor torchvision is needed -- the two timm
names the official code imports, ``Mlp`` and ``DropPath``, are re-implemented here with timm's
parameter names, and ``util.visualize`` is stubbed):

    /path/to/venv/bin/python scripts/record_fixtures/fractal.py --fractalgen-root /path/to/fractalgen \
        --out tests/fixtures/fractal

``--fractalgen-root`` is a checkout of github.com/LTH14/fractalgen (its ``models/``). The official
code calls ``.cuda()`` everywhere; here ``Tensor.cuda`` is a no-op so it runs on CPU unchanged.

* Weights: every parameter is overwritten with ``perturbed_state_dict`` (tests/fixtures/mar/weights.py,
  seeded by key name), so no weights are stored; the tests rebuild the same weights from the same
  (official) key names.
* Randomness: the official code draws from torch's global RNG (label drop, orders, quantisation noise,
  multinomial) and numpy's (MAR's training mask ratio ``truncnorm.rvs`` and the NLL mask count
  ``np.random.randint``). The two numpy draws are moved onto torch's global RNG at the same place in
  the stream (``rvs(n) = truncnorm.ppf(torch.rand(n))``, ``randint(L) = torch.randint(L, (1,))``):
  the same distributions, and our code draws exactly that way from its ``torch.Generator``, so the
  tests replay every run from the recorded seed.
* Dropout is set to 0 (every ``nn.Dropout``) so that train-mode losses are deterministic; train mode
  still selects the training masks, the label drop and PixelLoss's red-channel weight.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import types
from pathlib import Path

import numpy as np
import scipy.stats as stats
import torch
from safetensors.torch import save_file
from torch import nn

HERE = Path(__file__).resolve()
WEIGHTS = HERE.parents[2] / "tests" / "fixtures" / "mar" / "weights.py"

# the small configurations: (img_size_list, embed_dim_list, num_blocks_list, num_heads_list, types, kwargs)
CONFIGS = {
    "ar": ((8, 2, 1), (32, 16, 8), (2, 1, 1), (2, 2, 2), ("ar", "ar", "ar"), dict(num_conds=1)),
    "mar": ((8, 2, 1), (32, 16, 8), (2, 1, 1), (2, 2, 2), ("mar", "mar", "ar"), dict(num_conds=5)),
    "mar_gp": ((16, 4, 2, 1), (32, 24, 16, 8), (2, 1, 1, 1), (2, 2, 2, 2), ("mar", "mar", "mar", "ar"),
               dict(num_conds=5, guiding_pixel=True)),
}
NUM_CLASSES = 10
R_WEIGHT = 5.0
# sampling runs: (name, cfg, cfg_schedule, official temperature, filter_threshold, num_iter_list, seed)
SAMPLING = (("cfg", 3.0, "linear", 0.5, 1e-2, (3, 2, 2), 11),
            ("nocfg", 1.0, "constant", 2.0, 1e-4, (4, 4, 4), 12),
            ("cfgconst", 2.0, "constant", 1.0, 0.0, (16, 1, 3), 13))


def load_weights_helper():
    spec = importlib.util.spec_from_file_location("mar_fixture_weights", WEIGHTS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def stub_modules() -> None:
    """timm's Mlp / DropPath (names as timm 0.9) and the official util.visualize."""
    class Mlp(nn.Module):
        def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0, **_):
            super().__init__()
            hidden_features = hidden_features or in_features
            out_features = out_features or in_features
            self.fc1 = nn.Linear(in_features, hidden_features)
            self.act = act_layer()
            self.drop1 = nn.Dropout(drop)
            self.norm = nn.Identity()
            self.fc2 = nn.Linear(hidden_features, out_features)
            self.drop2 = nn.Dropout(drop)

        def forward(self, x):
            return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))

    class DropPath(nn.Module):
        def __init__(self, drop_prob=0.0, scale_by_keep=True):
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x):
            assert self.drop_prob == 0.0 or not self.training
            return x

    for name in ("timm", "timm.models"):
        m = types.ModuleType(name)
        m.__path__ = []
        sys.modules[name] = m
    vt = types.ModuleType("timm.models.vision_transformer")
    vt.Mlp, vt.DropPath = Mlp, DropPath
    sys.modules["timm.models.vision_transformer"] = vt
    util = types.ModuleType("util")
    util.__path__ = []
    vis = types.ModuleType("util.visualize")
    vis.visualize_patch = lambda *a, **k: None
    sys.modules["util"], sys.modules["util.visualize"] = util, vis


def import_official(root: Path):
    stub_modules()
    torch.Tensor.cuda = lambda self, *a, **k: self  # run the official CUDA code on CPU
    sys.path.insert(0, str(root))
    from models import fractalgen, mar
    # numpy's two draws -> torch's global RNG, same place in the stream (see module doc)
    np_proxy = types.SimpleNamespace(**{k: getattr(np, k) for k in ("sqrt", "ceil", "cos", "floor")})
    np_proxy.random = types.SimpleNamespace(randint=lambda n: int(torch.randint(n, (1,))))
    mar.np = np_proxy
    return fractalgen, mar


class TorchTruncnorm:
    """``truncnorm(-4, 0, loc=1, scale=0.25).rvs(n)`` by inverse CDF of torch's global uniforms."""

    def __init__(self) -> None:
        self.dist = stats.truncnorm(-4, 0, loc=1.0, scale=0.25)

    def rvs(self, n):
        return self.dist.ppf(torch.rand(n).double().numpy())


def build(fractalgen, mar_mod, name: str, helper):
    sizes, dims, blocks, heads, types_, kw = CONFIGS[name]
    torch.manual_seed(0)
    model = fractalgen.FractalGen(img_size_list=sizes, embed_dim_list=dims, num_blocks_list=blocks,
                                  num_heads_list=heads, generator_type_list=types_, class_num=NUM_CLASSES,
                                  attn_dropout=0.0, proj_dropout=0.0, r_weight=R_WEIGHT, **kw)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(m, mar_mod.MAR):
            m.mask_ratio_generator = TorchTruncnorm()
    checksum = helper.perturb_(model, seed=3)
    return model, checksum


def images(n: int, size: int, seed: int) -> torch.Tensor:
    """8-bit images, normalised with the ImageNet mean / std (the official data pipeline)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


def record(fractalgen, mar_mod, name: str, helper) -> dict[str, torch.Tensor]:
    model, checksum = build(fractalgen, mar_mod, name, helper)
    S = CONFIGS[name][0][0]
    B = 4
    x = images(B, S, seed=1)
    labels = torch.tensor([0, 3, 7, 9])
    rec = {"images": x, "labels": labels, "checksum": torch.tensor(checksum, dtype=torch.float64)}

    with torch.no_grad():
        # --- training loss (train mode; label drop, masks, quantisation noise replayed from seed 100)
        model.train()
        torch.manual_seed(100)
        rec["train_loss"] = model(x, labels).reshape(())
        # --- level 0 alone: patches / conditions it passes down and its guiding loss (seed 101)
        emb = model.class_emb(labels)
        torch.manual_seed(101)
        patches, conds, gp_loss = model.generator(x, [emb for _ in range(5)])
        rec["level0_patches"] = patches
        for i, c in enumerate(conds):
            rec[f"level0_cond{i}"] = c
        rec["level0_guiding_loss"] = torch.as_tensor(gp_loss).reshape(())
        # --- the last level alone: logits, quantised targets, train and eval losses (seed 102)
        pix = model
        while not isinstance(pix, sys.modules["models.pixelloss"].PixelLoss):
            pix = pix.next_fractal
        c_dim = pix.cond_proj.weight.shape[1]
        g = torch.Generator().manual_seed(5)
        target = images(24, 1, seed=2).reshape(24, 3)
        cond = torch.randn(24, c_dim, generator=g)
        rec["pixel_target"], rec["pixel_cond"] = target, cond
        torch.manual_seed(102)
        logits, ids = pix.predict(target, [cond])
        rec["pixel_logits"], rec["pixel_ids"] = logits, ids
        torch.manual_seed(102)
        rec["pixel_train_loss"] = pix(target, [cond]).reshape(())
        pix.eval()
        torch.manual_seed(102)
        rec["pixel_eval_loss"] = pix(target, [cond]).reshape(())
        # --- NLL (eval mode, unconditional), bits/dim, official compute_nll with N passes (seed 103)
        model.eval()
        N = 1 if name == "ar" else 3
        torch.manual_seed(103)
        loss = sum(model(x, labels) for _ in range(N)) / N
        rec["nll_bpd"] = (loss / math.log(2)).reshape(())
        rec["nll_passes"] = torch.tensor(N)
        # --- depth-first sampling, global RNG replayed from the seed
        levels = len(CONFIGS[name][0]) - 1
        num_conds = CONFIGS[name][5]["num_conds"]
        for tag, cfg, sched, temp, thr, iters, seed in SAMPLING:
            emb = model.class_emb(labels)
            if cfg != 1.0:
                emb = torch.cat([emb, model.fake_latent.repeat(B, 1)])
            torch.manual_seed(seed)
            out = model.sample(cond_list=[emb for _ in range(num_conds)], num_iter_list=list(iters[:levels]), cfg=cfg,
                               cfg_schedule=sched, temperature=temp, filter_threshold=thr, fractal_level=0)
            rec[f"sample_{tag}"] = out
    return {k: v.detach().contiguous() for k, v in rec.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fractalgen-root", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=HERE.parents[2] / "tests" / "fixtures" / "fractal")
    args = ap.parse_args()
    torch.set_num_threads(1)
    helper = load_weights_helper()
    fractalgen, mar_mod = import_official(args.fractalgen_root)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in CONFIGS:
        rec = record(fractalgen, mar_mod, name, helper)
        save_file(rec, str(args.out / f"{name}.safetensors"))
        print(name, {k: tuple(v.shape) for k, v in rec.items()})


if __name__ == "__main__":
    main()
