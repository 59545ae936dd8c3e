"""Official LTH14/fractalgen checkpoints -> ``genmodels.generators.fractal.FractalGen``.

``from_official("fractalmar_in64", path_or_state_dict, **official_kwargs)`` for the kinds
``fractalar_in64``, ``fractalmar_in64``, ``fractalmar_base_in256``, ``fractalmar_large_in256``,
``fractalmar_huge_in256`` (the official constructors' names). The keyword arguments are the
official ``FractalGen`` ones the training script passes: ``class_num``, ``label_drop_prob``,
``attn_dropout``, ``proj_dropout``, ``guiding_pixel``, ``num_conds``, ``r_weight``,
``grad_checkpointing`` (ignored). Defaults are the README's commands: ``num_conds`` 1 for
FractalAR and 5 for FractalMAR, ``guiding_pixel`` for the 256-px models, ``r_weight`` 5.

The released files hold ``{"model": state_dict}`` (no EMA: FractalGen trains without one; a
training checkpoint also has ``optimizer``, ``epoch``, ``scaler``, ``args``). Names are the
official ones and load 1:1, strictly: a file of another size is refused naming the first
mismatching key and the size the file was made for.
"""
from __future__ import annotations

import argparse
import re
import warnings
from typing import Any, Mapping

import torch

from genmodels.checkpoints import register
from genmodels.checkpoints.common import CheckpointMismatchError, load_strict

KINDS = ("fractalar_in64", "fractalmar_in64", "fractalmar_base_in256", "fractalmar_large_in256",
         "fractalmar_huge_in256")
_OFFICIAL_ARGS = {"class_num", "label_drop_prob", "attn_dropout", "proj_dropout", "guiding_pixel", "num_conds",
                  "r_weight", "grad_checkpointing"}
# the official parameter counts, measured from the official classes (FractalAR's README says 432M)
OFFICIAL_PARAMS = {"fractalar_in64": 442_068_224, "fractalmar_in64": 431_995_648,
                   "fractalmar_base_in256": 186_300_224, "fractalmar_large_in256": 437_000_064,
                   "fractalmar_huge_in256": 849_586_240}


def describe_fractal_state_dict(sd: Mapping[str, torch.Tensor]) -> str:
    """The architecture a FractalGen state dict was made for, from its shapes."""
    widths, depths, types = [], [], []
    prefix = ""
    while f"{prefix}generator.patch_emb.weight" in sd:
        widths.append(sd[f"{prefix}generator.patch_emb.weight"].shape[0])
        idx = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"generator\.blocks\.(\d+)\.", k))}
        depths.append(max(idx) + 1 if idx else 0)
        types.append("mar" if f"{prefix}generator.mask_token" in sd else "ar")
        prefix += "next_fractal."
    widths.append(sd[f"{prefix}cond_proj.weight"].shape[0])
    name = {("ar", "ar"): "FractalAR", ("mar", "mar"): "FractalMAR"}.get(tuple(types[:2]), "a FractalGen")
    gp = any(k.endswith("generator.pix_proj.weight") for k in sd)
    return (f"{name} (widths={widths}, depths={depths}+PixelLoss, types={types}, guiding_pixel={gp}, "
            f"class_num={sd['class_emb.weight'].shape[0]})")


def _unwrap(ckpt: Any) -> tuple[Mapping[str, torch.Tensor], dict[str, Any]]:
    args: dict[str, Any] = {}
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get("args"), argparse.Namespace):
        args = vars(ckpt["args"])
    if isinstance(ckpt, Mapping) and "model" in ckpt and not isinstance(ckpt["model"], torch.Tensor):
        ckpt = ckpt["model"]
    if not isinstance(ckpt, Mapping) or not ckpt or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise CheckpointMismatchError(
            "expected an official FractalGen checkpoint (a state dict or a dict with 'model'), got "
            f"{type(ckpt).__name__}" + (f" with keys {list(ckpt)[:5]}" if isinstance(ckpt, Mapping) else ""))
    return ckpt, args


def fractal_kwargs(kind: str, **official: Any) -> dict[str, Any]:
    """Official constructor kwargs -> ``FractalGen.<kind>(**kwargs)`` kwargs."""
    unknown = set(official) - _OFFICIAL_ARGS
    if unknown:
        raise TypeError(f"from_official({kind!r}): unknown argument(s) {sorted(unknown)}; accepted: "
                        f"{', '.join(sorted(_OFFICIAL_ARGS))}")
    official.pop("grad_checkpointing", None)
    out = {"num_conds": 1 if kind == "fractalar_in64" else 5, "guiding_pixel": kind.endswith("in256"),
           "r_weight": 5.0}
    rename = {"class_num": "num_classes"}
    for k, v in official.items():
        out[rename.get(k, k)] = v
    return out


def _converter(kind: str):
    def convert(state_dict: Any, device: str | torch.device = "cpu", **official: Any):
        from genmodels.generators.fractal import FractalGen

        sd, args = _unwrap(state_dict)
        if args:  # the training args pickled in a training checkpoint are the defaults
            official = {**{k: v for k, v in args.items() if k in _OFFICIAL_ARGS}, **official}
        with torch.device("meta"):  # no random init of the full-size weights: the file replaces them all
            model = getattr(FractalGen, kind)(**fractal_kwargs(kind, **official))
        with warnings.catch_warnings():  # names and shapes first: copying into meta tensors is a no-op
            warnings.filterwarnings("ignore", message=".*meta parameter.*")
            load_strict(model, sd, what=f"official {kind} checkpoint", made_for=describe_fractal_state_dict)
        model = model.to_empty(device=device)
        model.load_state_dict(sd, strict=True)
        return model.reset_constants().eval()

    convert.__name__ = f"{kind}_from_official"
    convert.__doc__ = f"Official ``{kind}`` checkpoint -> ``FractalGen.{kind}`` in eval mode (see module doc)."
    return convert


for _kind in KINDS:
    register(_kind)(_converter(_kind))
