"""MAR / KL-VAE YAML configs build the intended modules (paper sizes on the meta device)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from genmodels.utils.config import instantiate

CONFIGS = Path(__file__).parents[1] / "configs"


def build(path: str, key: str):
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / path), resolve=True)
    with torch.device("meta"):
        return instantiate(cfg["model"]["init_args"][key]), cfg


@pytest.mark.parametrize("name,params", [("mar_base", 207_924_768), ("mar_large", 478_326_304),
                                         ("mar_huge", 942_403_104)])
def test_paper_generator_configs(name, params):
    gen, cfg = build(f"generators/{name}.yaml", "generator")
    assert sum(p.numel() for p in gen.parameters()) == params
    assert gen.spec.grid == (16, 16) and gen.spec.channels == 16
    assert cfg["model"]["init_args"]["lr_schedule"] == "constant" and cfg["model"]["init_args"]["ema_decay"] == 0.9999


def test_kl16_config():
    vae, _ = build("tokenizers/kl16.yaml", "tokenizer")
    assert sum(p.numel() for p in vae.parameters()) == 66_456_019 and vae.latent_scale == 0.2325


@pytest.mark.parametrize("path,kind,attention", [("generators/mar_digits.yaml", "continuous", "bidirectional"),
                                                 ("generators/mar_ar_digits.yaml", "continuous", "causal"),
                                                 ("generators/mar_ce_digits.yaml", "discrete", "bidirectional")])
def test_digits_generator_configs_fit_digits_tokenizers(path, kind, attention):
    gen, _ = build(path, "generator")
    tok_cfg = "tokenizers/kl_digits.yaml" if kind == "continuous" else "tokenizers/vq_digits.yaml"
    tok, _ = build(tok_cfg, "tokenizer")
    gen.check_spec(tok.spec)
    assert gen.spec.kind == kind and gen.attention == attention
    exp = OmegaConf.load(CONFIGS / "experiments" / Path(path).name.replace("mar_ar_digits", "mar_digits_ar")
                         .replace("mar_ce_digits", "mar_digits_ce"))
    assert exp.model.init_args.tokenizer_ckpt.endswith("last.ckpt")
