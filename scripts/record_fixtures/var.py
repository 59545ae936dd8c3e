"""Record parity fixtures for genmodels.generators.var from the OFFICIAL VAR code.

Usage (outside the test run; needs torch, numpy, safetensors):

    python scripts/record_fixtures/var.py --var-root /path/to/FoundationVision/VAR --out tests/fixtures/var

``--var-root`` is a checkout of github.com/FoundationVision/VAR (``models/``, ``dist.py``).
The official ``models/var.py`` imports ``huggingface_hub`` only for the ``VARHF`` mixin;
when it is absent we register a stub module. flash-attn / xformers are absent on CPU, so
the official attention runs through ``F.scaled_dot_product_attention`` (its fallback).

For each config (``shared_aln`` False / True, plus ``attn_l2_norm=False`` for logits) we
build the official VQVAE (small: ``ch_mult=(1, 1)``, ``num_res_blocks=1``, by wrapping
the official Encoder / Decoder constructors -- their code is unchanged) and the official
``VAR``, set EVERY parameter to random values on the 1/64 grid (so the int8 copy in the
fixture is lossless and zero-initialised gates such as AdaLN's gamma rows cannot hide a
mistake), and record:

* ``logits``: ``VAR.forward(labels, x_BLCv_wo_first_l)`` in eval mode (cond_drop_rate=0),
  with ``x`` from the official ``idxBl_to_var_input`` of random ground-truth tokens;
* ``loss`` and gradients of the official training loss (token-mean CE, ``trainer.py``);
* ``logits_prog1``: progressive training stage ``prog_si=1``;
* ``official_var_keys.json``: state-dict keys and shapes of the official d16 and d36-saln
  (512 px) models from ``build_vae_var`` on the meta device;
* sampling with ``autoregressive_infer_cfg``: greedy (top_k=1) with cfg 0 and 1.5, and
  random (top_k=8, top_p=0.9, cfg 2.0; top_p=0.7, cfg 0.5) and ``more_smooth`` draws (cfg 1
  without filtering; cfg 1.5 and 0 with top-k AND top-p active) seeded with ``g_seed``.
  Tokens are captured by wrapping ``sample_with_top_k_top_p_``; images are the official
  output in [0, 1]. The official sampler draws from ``self.rng`` (a CPU generator seeded
  with ``g_seed``); passing ``torch.Generator().manual_seed(g_seed)`` to our sampler gives
  the same draws, so even the random samples must match exactly.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

GRID = 64.0
PATCH_NUMS = (1, 2, 3, 4)
VAE_CFG = dict(vocab_size=64, z_channels=8, ch=32, dropout=0.0, beta=0.25, using_znorm=False, quant_conv_ks=3,
               quant_resi=0.5, share_quant_resi=4, default_qresi_counts=0, v_patch_nums=list(PATCH_NUMS),
               test_mode=True)
VAE_NET = dict(ch_mult=[1, 1], num_res_blocks=1)
VAR_BASE = dict(num_classes=10, depth=2, embed_dim=64, num_heads=2, mlp_ratio=4.0, drop_rate=0.0,
                attn_drop_rate=0.0, drop_path_rate=0.0, norm_eps=1e-6, cond_drop_rate=0.0,
                patch_nums=list(PATCH_NUMS), flash_if_available=False, fused_if_available=False)
CONFIGS = {
    "aln": dict(shared_aln=False, attn_l2_norm=True),
    "saln": dict(shared_aln=True, attn_l2_norm=True),
    "nol2": dict(shared_aln=False, attn_l2_norm=False),
}
SAMPLING = {  # name -> kwargs of autoregressive_infer_cfg
    "greedy_cfg0": dict(cfg=0.0, top_k=1, top_p=0.0, g_seed=0),
    "greedy_cfg1.5": dict(cfg=1.5, top_k=1, top_p=0.0, g_seed=0),
    "random_cfg2": dict(cfg=2.0, top_k=8, top_p=0.9, g_seed=7),
    "smooth_cfg1": dict(cfg=1.0, top_k=0, top_p=0.0, g_seed=3, more_smooth=True),
    # issue 11: the smoothed codes must see the logits AFTER top-k / top-p masked them in place
    "smooth_cfg1.5_k8_p0.9": dict(cfg=1.5, top_k=8, top_p=0.9, g_seed=11, more_smooth=True),
    "smooth_cfg0_k16_p0.8": dict(cfg=0.0, top_k=16, top_p=0.8, g_seed=13, more_smooth=True),
    "random_cfg0.5_p0.7": dict(cfg=0.5, top_k=0, top_p=0.7, g_seed=17),
}


def import_official(var_root: Path):
    sys.path.insert(0, str(var_root))  # for `import dist` and `import models`
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        stub = types.ModuleType("huggingface_hub")
        stub.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {})
        sys.modules["huggingface_hub"] = stub
    import models.basic_vae as basic_vae
    import models.var as var_mod
    import models.vqvae as vqvae
    return basic_vae, vqvae, var_mod


def perturb_(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Every parameter random, rounded to the 1/64 grid in [-127/64, 127/64]."""
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            n = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                v = 1 + 0.25 * n
            elif "scale_mul" in name:
                v = torch.log(torch.tensor(4.0)) + 0.5 * n
            elif p.ndim == 1 or "ada_gss" in name:
                v = 0.25 * n
            elif name.startswith(("pos_", "lvl_embed", "class_emb")) or "embedding" in name:
                v = 0.5 * n
            else:  # Linear / Conv weights
                v = n / (p[0].numel() ** 0.5)
            p.copy_((v * GRID).round().clamp(-127, 127) / GRID)


def int8_state(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if v.is_floating_point():
            k8 = (v * GRID).round()
            if not (torch.equal(k8 / GRID, v) and k8.abs().max() <= 127):
                continue  # buffers VAR recomputes (attention mask with -inf)
            out[prefix + k] = k8.to(torch.int8).contiguous()
        else:
            out[prefix + k] = v.clone().contiguous()
    return out


def record_official_keys(out_dir: Path) -> None:
    """Key names and shapes of the official d16 (256 px) and d36-saln (512 px) VARs, built
    on the meta device by the official ``build_vae_var`` (``torch.tensor`` / ``linspace``
    calls that the official constructor ``.item()``s are kept on the CPU)."""
    import models as official

    tensor, linspace = torch.tensor, torch.linspace
    torch.tensor = lambda *a, **k: tensor(*a, **{**k, "device": k.get("device", "cpu")})
    torch.linspace = lambda *a, **k: linspace(*a, **{**k, "device": "cpu"})
    try:
        runs = {"d16": dict(depth=16), "d36_saln_512": dict(depth=36, shared_aln=True,
                                                            patch_nums=(1, 2, 3, 4, 6, 9, 13, 18, 24, 32))}
        keys = {}
        for name, kw in runs.items():
            with torch.device("meta"):
                _, var = official.build_vae_var(device="meta", **kw)
            keys[name] = {"build_vae_var": {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()},
                          "num_params": sum(p.numel() for p in var.parameters()),
                          "state_dict": {k: list(v.shape) for k, v in var.state_dict().items()}}
    finally:
        torch.tensor, torch.linspace = tensor, linspace
    (out_dir / "official_var_keys.json").write_text(json.dumps(keys, indent=0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--var-root", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    basic_vae, vqvae, var_mod = import_official(args.var_root)
    Enc, Dec = basic_vae.Encoder, basic_vae.Decoder
    vqvae.Encoder = lambda **kw: Enc(**{**kw, **VAE_NET})
    vqvae.Decoder = lambda **kw: Dec(**{**kw, **VAE_NET})
    captured: list[torch.Tensor] = []
    sampler = var_mod.sample_with_top_k_top_p_

    def capturing_sampler(*a, **kw):
        idx = sampler(*a, **kw)
        captured.append(idx[:, :, 0].clone())
        return idx

    var_mod.sample_with_top_k_top_p_ = capturing_sampler
    args.out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    L = sum(p * p for p in PATCH_NUMS)

    vae = vqvae.VQVAE(**{**VAE_CFG, "v_patch_nums": PATCH_NUMS})
    perturb_(vae, gen)
    vae.eval()
    save_file(int8_state(vae.state_dict(), ""), str(args.out / "vae.safetensors"),
              metadata={"vae_config": json.dumps({**VAE_CFG, **VAE_NET}), "grid": str(GRID)})
    for cname, ckw in CONFIGS.items():
        var = var_mod.VAR(vae_local=vae, **{**VAR_BASE, **ckw, "patch_nums": PATCH_NUMS})
        perturb_(var, gen)
        var.eval()
        out = int8_state(var.state_dict(), "var.")
        B, V = 4, VAE_CFG["vocab_size"]
        labels = torch.tensor([3, 0, VAR_BASE["num_classes"], 9])  # includes the null class
        gt = torch.randint(0, V, (B, L), generator=gen)
        gt_Bl = list(gt.split([p * p for p in PATCH_NUMS], dim=1))
        x = vae.quantize.idxBl_to_var_input(gt_Bl)
        out.update(labels=labels, tokens=gt, x_BLCv_wo_first_l=x.contiguous())
        with torch.no_grad():
            out["logits"] = var(labels, x).contiguous()
        # progressive stage 1: the official trainer sets prog_si on both VAR and the quantizer
        var.prog_si = vae.quantize.prog_si = 1
        with torch.no_grad():
            out["logits_prog1"] = var(labels, vae.quantize.idxBl_to_var_input(gt_Bl)).contiguous()
        var.prog_si = vae.quantize.prog_si = -1
        # training loss + gradients (trainer.py: CE(reduction=none) * 1/L, summed over L, mean over B)
        var.train()
        var.zero_grad()
        logits = var(labels, x)
        loss = F.cross_entropy(logits.view(-1, V), gt.view(-1), label_smoothing=0.1, reduction="none")
        loss = loss.view(B, -1).mul(1 / L).sum(-1).mean()
        loss.backward()
        out["loss_ls0.1"] = loss.detach().reshape(1)
        for name, p in var.named_parameters():  # every gradient's norm, a few small ones whole
            out["gradnorm." + name] = p.grad.norm().reshape(1)
            if name in ("word_embed.weight", "blocks.0.attn.q_bias", "blocks.1.attn.v_bias",
                        "blocks.1.attn.scale_mul_1H11", "pos_start", "blocks.0.ada_gss"):
                out["grad." + name] = p.grad.contiguous()
        var.eval()
        if cname != "nol2":
            for sname, skw in SAMPLING.items():
                captured.clear()
                with torch.no_grad():
                    img = var.autoregressive_infer_cfg(B=B, label_B=labels, **skw)
                out[f"sample.{sname}.tokens"] = torch.cat(captured, dim=1).contiguous()
                out[f"sample.{sname}.images01"] = img.contiguous()
        meta = {"var_config": json.dumps({**VAR_BASE, **ckw}), "sampling": json.dumps(SAMPLING), "grid": str(GRID)}
        path = args.out / f"var_{cname}.safetensors"
        save_file(out, str(path), metadata=meta)
        toks = {k: v for k, v in out.items() if k.endswith(".tokens")}
        print(cname, os.path.getsize(path), "bytes; logits std", float(out["logits"].std()),
              "| unique tokens per sampling run", {k: int(v.unique().numel()) for k, v in toks.items()},
              "| image range", [(round(float(v.min()), 3), round(float(v.max()), 3))
                                for k, v in out.items() if k.endswith("images01")][:2])
    record_official_keys(args.out)  # last: build_vae_var switches off reset_parameters globally


if __name__ == "__main__":
    main()
