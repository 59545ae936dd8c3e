"""Record parity fixtures for genmodels.tokenizers.multiscale_vq from the OFFICIAL VAR code.

Usage (outside the repo's test run; needs only torch, numpy and safetensors):

    python scripts/record_fixtures/var_vqvae.py --var-root /path/to/FoundationVision/VAR \
        --out tests/fixtures/var_vqvae

``--var-root`` is a checkout of github.com/FoundationVision/VAR (its ``models/`` and
``dist.py``). The official ``models/__init__.py`` imports the VAR transformer too; we
bypass it by registering an empty ``models`` package that points at the directory. The
official quantizer's training forward reads ``torch.distributed``; we start a 1-process
gloo group and flag VAR's ``dist`` module as initialised so that code path runs as in
training (usage EMA updates included).

Weights: every parameter is drawn at random (normal) and rounded to a multiple of 1/64
in [-127/64, 127/64], so the state dict is stored losslessly as int8 (``k / 64``) and
the fixture stays small. The official ``VQVAE`` hard-codes ``ch_mult=(1,1,2,2,4)``; to
keep the file small we build it with ``ch_mult=(1, 2)`` by wrapping the official Encoder
/ Decoder constructors (their code is unchanged; only that keyword differs).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
from safetensors.torch import save_file

GRID = 64.0


def import_official(var_root: Path):
    sys.path.insert(0, str(var_root))  # for `import dist`
    pkg = types.ModuleType("models")
    pkg.__path__ = [str(var_root / "models")]
    sys.modules["models"] = pkg
    import dist  # noqa: F401  (VAR's own dist helpers)
    import models.basic_vae as basic_vae
    import models.quant as quant
    import models.vqvae as vqvae
    return dist, basic_vae, quant, vqvae


def init_single_process_group(dist_mod) -> None:
    init_file = tempfile.NamedTemporaryFile(delete=False)
    tdist.init_process_group("gloo", init_method=f"file://{init_file.name}", rank=0, world_size=1)
    setattr(dist_mod, "__initialized", True)  # VAR's dist.initialized() reads this module global


def perturb_(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Every parameter ~ random normal, on the 1/64 grid."""
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            n = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                v = 1 + 0.25 * n
            elif p.ndim == 1:
                v = 0.25 * n
            elif p.ndim == 4:
                v = n / (p[0].numel() ** 0.5)
            else:  # codebook
                v = n
            p.copy_((v * GRID).round().clamp(-127, 127) / GRID)


def int8_state(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if v.is_floating_point():
            k8 = (v * GRID).round()
            assert torch.equal(k8 / GRID, v) and k8.abs().max() <= 127, k
            out[prefix + k] = k8.to(torch.int8).contiguous()
        else:
            out[prefix + k] = v.clone().contiguous()
    return out


def record_quantizer_outputs(q, f: torch.Tensor, prefix: str, out: dict) -> None:
    """Inference API of a VectorQuantizer2 on features f (B, C, H, W)."""
    B, C, H, W = f.shape
    SN = len(q.v_patch_nums)
    with torch.no_grad():
        idx = q.f_to_idxBl_or_fhat(f, to_fhat=False)
        fhats = q.f_to_idxBl_or_fhat(f, to_fhat=True)
        for si, (i, fh) in enumerate(zip(idx, fhats)):
            out[f"{prefix}idx_s{si}"] = i.contiguous()
            out[f"{prefix}fhat_s{si}"] = fh.contiguous()
        out[f"{prefix}var_input"] = q.idxBl_to_var_input(idx).contiguous()
        ms_h = [q.embedding(i).transpose(1, 2).reshape(B, C, pn, pn) for i, pn in zip(idx, q.v_patch_nums)]
        grow = q.embed_to_fhat(ms_h, all_to_max_scale=False, last_one=False)
        for si, g in enumerate(grow):
            out[f"{prefix}fhat_grow_s{si}"] = g.contiguous()
        f_hat = f.new_zeros(B, C, H, W)
        for si, pn in enumerate(q.v_patch_nums):
            h = q.embedding(idx[si]).transpose(1, 2).reshape(B, C, pn, pn)
            f_hat, nxt = q.get_next_autoregressive_input(si, SN, f_hat, h)
            out[f"{prefix}ar_next_s{si}"] = nxt.clone().contiguous()


def record_quantizer_training(q, f: torch.Tensor, prefix: str, out: dict, gen: torch.Generator) -> None:
    """Training forward: straight-through f_hat, VQ loss, gradients, usage EMA after two steps."""
    q.train()
    f = f.clone().requires_grad_(True)
    f_hat, _, vq_loss = q(f, ret_usages=True)
    w = torch.randn(f_hat.shape, generator=gen)
    (vq_loss + (f_hat * w).mean()).backward()
    out[prefix + "train_w"] = w
    out[prefix + "train_fhat"] = f_hat.detach().contiguous()
    out[prefix + "train_vq_loss"] = vq_loss.detach().reshape(1)
    out[prefix + "grad_f"] = f.grad.contiguous()
    for name, p in q.named_parameters():
        out[prefix + "grad." + name] = p.grad.contiguous()
    q(f.detach() * 0.5)  # a second step: the EMA moves from "copy" to "0.9 mix"
    out[prefix + "ema_vocab_hit_SV"] = q.ema_vocab_hit_SV.clone()
    q.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--var-root", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist_mod, basic_vae, quant, vqvae = import_official(args.var_root)
    init_single_process_group(dist_mod)
    args.out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)

    # ---------------------------------------------------------------- full VQVAE
    ch_mult = (1, 2)
    Enc, Dec = basic_vae.Encoder, basic_vae.Decoder
    vqvae.Encoder = lambda **kw: Enc(**{**kw, "ch_mult": ch_mult})
    vqvae.Decoder = lambda **kw: Dec(**{**kw, "ch_mult": ch_mult})
    cfg = dict(vocab_size=64, z_channels=8, ch=32, dropout=0.0, beta=0.25, using_znorm=False, quant_conv_ks=3,
               quant_resi=0.5, share_quant_resi=4, default_qresi_counts=0, v_patch_nums=[1, 2, 3, 5, 8],
               test_mode=False)
    vae = vqvae.VQVAE(**{**cfg, "v_patch_nums": tuple(cfg["v_patch_nums"])})
    perturb_(vae, gen)
    vae.eval()
    out = int8_state(vae.state_dict(), "sd.")
    x = torch.rand((2, 3, 16, 16), generator=gen) * 2 - 1
    out["x"] = x
    with torch.no_grad():
        f = vae.quant_conv(vae.encoder(x))
        out["f"] = f.contiguous()
        idx = vae.img_to_idxBl(x)
        for si, i in enumerate(idx):
            out[f"idx_s{si}"] = i.contiguous()
        out["img_from_idx"] = vae.idxBl_to_img(idx, same_shape=True, last_one=True).contiguous()
        f_hat = vae.quantize.embed_to_fhat(
            [vae.quantize.embedding(i).transpose(1, 2).reshape(2, 8, pn, pn) for i, pn in zip(idx, cfg["v_patch_nums"])],
            all_to_max_scale=True, last_one=True)
        out["dec_raw"] = vae.decoder(vae.post_quant_conv(f_hat)).contiguous()
        recs = vae.img_to_reconstructed_img(x, last_one=False)
        for si, r in enumerate(recs):
            out[f"recon_s{si}"] = r.contiguous()
    record_quantizer_outputs(vae.quantize, f, "q.", out)
    vae.train()
    rec, usages, vq_loss = vae(x, ret_usages=True)
    out["train_rec"] = rec.detach().contiguous()
    out["train_vq_loss"] = vq_loss.detach().reshape(1)
    print("usages %:", usages, "| codes used at the last scale:", out["idx_s4"].unique().numel(),
          "| dec_raw range", float(out["dec_raw"].min()), float(out["dec_raw"].max()))
    meta = {"config": json.dumps({**cfg, "ch_mult": list(ch_mult), "num_res_blocks": 2}), "grid": str(GRID)}
    save_file(out, str(args.out / "vqvae_small.safetensors"), metadata=meta)

    # ---------------------------------------------------------------- quantizer variants
    variants = {
        "partial4": dict(share_quant_resi=4, quant_resi=0.5, v_patch_nums=[1, 2, 3, 4, 6]),
        "partial3": dict(share_quant_resi=3, quant_resi=0.5, v_patch_nums=[1, 2, 3, 4, 6]),
        "shared": dict(share_quant_resi=1, quant_resi=0.5, v_patch_nums=[1, 2, 4, 6]),
        "nonshared": dict(share_quant_resi=0, quant_resi=0.5, v_patch_nums=[1, 2, 3, 4, 6]),
        "nonshared_counts3": dict(share_quant_resi=0, default_qresi_counts=3, quant_resi=0.5,
                                  v_patch_nums=[1, 2, 3, 4, 6]),
        "noresi": dict(share_quant_resi=4, quant_resi=0.0, v_patch_nums=[1, 3, 6]),
        "znorm": dict(share_quant_resi=4, quant_resi=0.5, using_znorm=True, v_patch_nums=[1, 2, 3, 4, 6]),
        "negresi_beta1": dict(share_quant_resi=2, quant_resi=-0.3, beta=1.0, v_patch_nums=[2, 3, 6]),
    }
    out, configs = {}, {}
    for name, kw in variants.items():
        full = {**dict(vocab_size=32, Cvae=8, using_znorm=False, beta=0.25, default_qresi_counts=0), **kw}
        configs[name] = full
        q = quant.VectorQuantizer2(**{**full, "v_patch_nums": tuple(full["v_patch_nums"])})
        perturb_(q, gen)
        q.eval()
        out.update(int8_state(q.state_dict(), f"{name}.sd."))
        f = torch.randn((2, 8, 6, 6), generator=gen)
        out[f"{name}.f"] = f
        record_quantizer_outputs(q, f, f"{name}.", out)
        record_quantizer_training(q, f, f"{name}.", out, gen)
    save_file(out, str(args.out / "quantizer_variants.safetensors"),
              metadata={"configs": json.dumps(configs), "grid": str(GRID)})
    tdist.destroy_process_group()
    for p in sorted(args.out.glob("*.safetensors")):
        print(p, os.path.getsize(p), "bytes")


if __name__ == "__main__":
    main()
