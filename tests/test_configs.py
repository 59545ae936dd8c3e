"""Every YAML under configs/ parses and builds what it names; the foundation's paper config
has the paper's size. (Paper sizes of VAR / MAR are asserted in their own test files.)"""
from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from omegaconf import OmegaConf

from genmodels.utils.config import import_class, instantiate

CONFIGS = Path(__file__).parents[1] / "configs"
ALL = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml"))
TRAINER_ARGS = set(inspect.signature(Trainer.__init__).parameters)


def _load(rel: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONFIGS / rel), resolve=False)


def _check_init_args(block: dict, where: str) -> None:
    """class_path imports and every init_args key is a constructor argument (recursively)."""
    cls = import_class(block["class_path"])
    params = inspect.signature(cls.__init__).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key, value in (block.get("init_args") or {}).items():
        assert takes_kwargs or key in params, f"{where}: {cls.__name__} has no argument {key!r}"
        if isinstance(value, dict) and "class_path" in value:
            _check_init_args(value, f"{where}.{key}")


@pytest.mark.parametrize("rel", ALL)
def test_config_keys_exist(rel):
    cfg = _load(rel)
    assert cfg, f"{rel} is empty"
    for section in ("model", "data"):
        if section in cfg and "class_path" in cfg[section]:
            _check_init_args(cfg[section], f"{rel}:{section}")
    for key in (cfg.get("trainer") or {}):
        assert key in TRAINER_ARGS, f"{rel}: trainer has no argument {key!r}"
    for cb in (cfg.get("trainer") or {}).get("callbacks") or []:
        _check_init_args(cb, f"{rel}:trainer.callbacks")


@pytest.mark.parametrize("rel", [r for r in ALL if r.startswith(("generators/", "tokenizers/"))])
def test_model_configs_build(rel):
    block = _load(rel)["model"]["init_args"]
    key = "generator" if rel.startswith("generators/") else "tokenizer"
    with torch.device("meta"):
        module = instantiate(block[key])
    assert sum(p.numel() for p in module.parameters()) > 0
    assert module.config["class_path"] == block[key]["class_path"]


def test_maskgit_paper_config_has_the_paper_size():
    """MaskGIT (Chang et al. 2022) reports 227M parameters: transformer + VQGAN f16."""
    with torch.device("meta"):
        gen = instantiate(_load("generators/maskgit_imagenet256.yaml")["model"]["init_args"]["generator"])
        tok = instantiate(_load("tokenizers/maskgit_vqgan_f16.yaml")["model"]["init_args"]["tokenizer"])
    n_gen = sum(p.numel() for p in gen.parameters())
    n_tok = sum(p.numel() for p in tok.parameters())
    assert n_gen == 172_652_800
    assert abs(n_gen + n_tok - 227e6) / 227e6 < 0.002, (n_gen, n_tok)
    gen.check_spec(tok.spec)  # 1024 codes on a 16x16 grid


@pytest.mark.parametrize("gen_rel,tok_rel", [("generators/maskgit_digits.yaml", "tokenizers/vq_digits.yaml"),
                                             ("generators/causal_ar_digits.yaml", "tokenizers/vq_digits.yaml"),
                                             ("generators/maskgit_digits.yaml", "tokenizers/vq_digits_large.yaml")])
def test_digits_generators_fit_their_tokenizer(gen_rel, tok_rel):
    with torch.device("meta"):
        gen = instantiate(_load(gen_rel)["model"]["init_args"]["generator"])
        tok = instantiate(_load(tok_rel)["model"]["init_args"]["tokenizer"])
    gen.check_spec(tok.spec)
