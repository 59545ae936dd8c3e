"""Record parity fixtures for MAR (genmodels.losses.diffusion, generators.mar, tokenizers.kl_vae)
from the OFFICIAL LTH14/mar code, on CPU.

Usage (outside the repo's test run, in an environment with timm 0.9.x; torchvision is NOT
needed -- the few torchvision names timm imports are stubbed here):

    /path/to/venv/bin/python scripts/record_fixtures/mar.py --mar-root /path/to/LTH14/mar \
        --out tests/fixtures/mar

``--mar-root`` is a checkout of github.com/LTH14/mar (its ``models/`` and ``diffusion/``).
The official code calls ``.cuda()`` everywhere; here ``Tensor.cuda`` is a no-op so it runs
on CPU unchanged. Weights: every parameter is overwritten with ``perturbed_state_dict``
(``tests/fixtures/mar/weights.py``, seeded by key name), so no weights are stored; the
tests rebuild the same weights for our modules from the same key names. The random draws
of the official samplers (orders, ``torch.randn``, ``randn_like``) are replaced by recorded
tensors so the tests can replay them.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve()
WEIGHTS = HERE.parents[2] / "tests" / "fixtures" / "mar" / "weights.py"


def load_weights_helper():
    spec = importlib.util.spec_from_file_location("mar_fixture_weights", WEIGHTS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def stub_torchvision() -> None:
    """timm 0.9.x imports a few torchvision names at import time; MAR uses none of them."""
    try:
        import torchvision  # noqa: F401
        return
    except ImportError:
        pass

    class _Anything(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            sub = f"{self.__name__}.{name}"
            if sub not in sys.modules:
                m = _Anything(sub)
                m.__path__ = []
                sys.modules[sub] = m
            return sys.modules[sub]

    for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc", "torchvision.transforms",
                 "torchvision.transforms.functional", "torchvision.datasets"):
        m = _Anything(name)
        m.__path__ = []
        sys.modules[name] = m


def import_official(root: Path):
    stub_torchvision()
    torch.Tensor.cuda = lambda self, *a, **k: self  # run the official CUDA code on CPU
    sys.path.insert(0, str(root))
    import diffusion  # noqa: F401
    from models import diffloss, mar, vae
    return diffloss, mar, vae


class NoiseTape:
    """Replaces torch.randn / torch.randn_like during an official sampling call with draws from a
    seeded generator, and keeps every draw (shape and values) in call order."""

    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.draws: list[torch.Tensor] = []

    def __enter__(self):
        self._randn, self._randn_like = torch.randn, torch.randn_like
        tape = self

        def randn(*size, **kw):
            shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
            x = tape._randn(tuple(shape), generator=tape.g)
            tape.draws.append(x)
            return x

        def randn_like(t, **kw):
            return randn(tuple(t.shape))

        torch.randn, torch.randn_like = randn, randn_like
        return self

    def __exit__(self, *exc):
        torch.randn, torch.randn_like = self._randn, self._randn_like


def record_diffloss(diffloss_mod, helper, out: Path) -> None:
    torch.manual_seed(0)
    C, D, W, depth, N = 4, 8, 32, 2, 12
    dl = diffloss_mod.DiffLoss(target_channels=C, z_channels=D, depth=depth, width=W, num_sampling_steps="10").eval()
    checksum = helper.perturb_(dl, seed=1)
    g = torch.Generator().manual_seed(123)
    x = torch.randn(N, C, generator=g)
    z = torch.randn(N, D, generator=g)
    t = torch.tensor([0, 1, 2, 999, 500, 17, 250, 998, 0, 63, 700, 3])
    noise = torch.randn(N, C, generator=g)
    target = torch.randn(N, C, generator=g).clamp(-2, 2)
    rec = {"x": x, "z": z, "t": t, "noise": noise, "target": target,
           "checksum": torch.tensor(checksum, dtype=torch.float64)}
    with torch.no_grad():
        rec["net_out"] = dl.net(x, t, z)
        rec["net_out_cfg"] = dl.net.forward_with_cfg(x, t, z, 2.5)
        terms = dl.train_diffusion.training_losses(dl.net, target, t, dict(c=z), noise=noise)
        for k in ("loss", "mse", "vb"):
            rec[f"train_{k}"] = terms[k]
        rec["train_x_t"] = dl.train_diffusion.q_sample(target, t, noise=noise)
        # the respaced sampling schedule of the paper ("100" of 1000 steps)
        from diffusion import create_diffusion
        d100 = create_diffusion(timestep_respacing="100", noise_schedule="cosine")
        rec["gen100_timestep_map"] = torch.tensor(d100.timestep_map)
        rec["gen100_betas"] = torch.from_numpy(d100.betas)
        # sampler, no guidance: fixed initial noise, recorded per-step noise
        n = 6
        noise0 = torch.randn(n, C, generator=g)
        with NoiseTape(7) as tape:
            s = dl.gen_diffusion.p_sample_loop(dl.net.forward, noise0.shape, noise0, clip_denoised=False,
                                               model_kwargs=dict(c=z[:n]), progress=False, temperature=0.9)
        rec["sample_noise0"] = noise0
        rec["sample_step_noises"] = torch.stack(tape.draws)  # one per step (the last one unused)
        rec["sample_out"] = s
        # sampler with guidance: z = [cond | uncond], the same noise for both halves
        zc = torch.cat([z[:n], z[n:2 * n]])
        noise2 = torch.cat([noise0, noise0])
        with NoiseTape(8) as tape:
            s2 = dl.gen_diffusion.p_sample_loop(dl.net.forward_with_cfg, noise2.shape, noise2, clip_denoised=False,
                                                model_kwargs=dict(c=zc, cfg_scale=3.0), progress=False,
                                                temperature=0.8)
        rec["cfg_step_noises"] = torch.stack([d[:n] for d in tape.draws])  # only the first half matters
        rec["cfg_out"] = s2[:n]
    save_file({k: v.contiguous() for k, v in rec.items()}, str(out / "diffloss.safetensors"),
              metadata={"config": f"DiffLoss(target_channels={C}, z_channels={D}, depth={depth}, width={W}, "
                                  "num_sampling_steps='10'); perturb seed 1"})


MAR_KW = dict(img_size=16, vae_stride=2, patch_size=2, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=4,
              decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4, mlp_ratio=4.0, vae_embed_dim=4,
              class_num=10, buffer_size=4, diffloss_d=2, diffloss_w=32, num_sampling_steps="5",
              diffusion_batch_mul=2)


def record_mar(mar_mod, helper, out: Path) -> None:
    from functools import partial
    torch.manual_seed(0)
    np.random.seed(0)
    model = mar_mod.MAR(norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), **MAR_KW).eval()
    checksum = helper.perturb_(model, seed=2)
    g = torch.Generator().manual_seed(321)
    B, L = 2, model.seq_len
    latents = torch.randn(B, MAR_KW["vae_embed_dim"], 8, 8, generator=g)
    labels = torch.tensor([3, 7])
    orders = torch.stack([torch.randperm(L, generator=g) for _ in range(B)])
    num_masked = 11
    mask = torch.zeros(B, L).scatter(-1, orders[:, :num_masked], torch.ones(B, L))
    rec = {"latents": latents, "labels": labels, "orders": orders, "mask": mask,
           "checksum": torch.tensor(checksum, dtype=torch.float64)}
    with torch.no_grad():
        tokens = model.patchify(latents)
        rec["tokens"] = tokens
        rec["unpatchify"] = model.unpatchify(tokens)
        cls = model.class_emb(labels)
        x = model.forward_mae_encoder(tokens, mask, cls)
        z = model.forward_mae_decoder(x, mask)
        rec["encoder_out"] = x
        rec["decoder_z"] = z
        # the unconditional class (fake_latent) through the same path, with a different mask
        mask2 = torch.zeros(B, L).scatter(-1, orders[:, :L], torch.ones(B, L))  # all masked
        x2 = model.forward_mae_encoder(tokens, mask2, model.fake_latent.repeat(B, 1))
        rec["mask_all"] = mask2
        rec["decoder_z_uncond_all_masked"] = model.forward_mae_decoder(x2, mask2)

        # full sampling with fixed orders and recorded noise
        for name, kw in {"sample_cfg": dict(num_iter=4, cfg=3.0, temperature=0.95),
                         "sample_nocfg": dict(num_iter=3, cfg=1.0, temperature=1.0),
                         "sample_const": dict(num_iter=5, cfg=2.0, cfg_schedule="constant", temperature=0.9)}.items():
            sample_orders = torch.stack([torch.randperm(L, generator=g) for _ in range(B)])
            model.sample_orders = lambda bsz, o=sample_orders: o.clone()
            with NoiseTape(11) as tape:
                out_tokens = model.sample_tokens(bsz=B, labels=labels, **kw)
            rec[f"{name}_orders"] = sample_orders
            rec[f"{name}_tokens"] = model.patchify(out_tokens)
            # the draws in call order, flattened (shapes vary); the test replays them
            rec[f"{name}_draws"] = torch.cat([d.flatten() for d in tape.draws])
            rec[f"{name}_draw_rows"] = torch.tensor([d.shape[0] for d in tape.draws])
    save_file({k: v.contiguous() for k, v in rec.items()}, str(out / "mar.safetensors"),
              metadata={"config": repr(MAR_KW) + "; perturb seed 2"})


VAE_KW = dict(embed_dim=4, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=16, attn_resolutions=(4,))


def record_vae(vae_mod, helper, out: Path) -> None:
    torch.manual_seed(0)
    kw = VAE_KW
    # the official AutoencoderKL hard-codes ch=128 / num_res_blocks=2 / resolution=256 in its
    # Encoder / Decoder defaults; build it, then swap in the official classes at a small size
    model = vae_mod.AutoencoderKL(embed_dim=kw["embed_dim"], ch_mult=kw["ch_mult"])
    model.encoder = vae_mod.Encoder(ch=kw["ch"], ch_mult=kw["ch_mult"], num_res_blocks=kw["num_res_blocks"],
                                    resolution=kw["resolution"], attn_resolutions=kw["attn_resolutions"],
                                    z_channels=kw["embed_dim"])
    model.decoder = vae_mod.Decoder(ch=kw["ch"], ch_mult=kw["ch_mult"], num_res_blocks=kw["num_res_blocks"],
                                    resolution=kw["resolution"], z_channels=kw["embed_dim"])
    model.eval()
    checksum = helper.perturb_(model, seed=3)
    g = torch.Generator().manual_seed(99)
    images = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    z = torch.randn(2, kw["embed_dim"], 4, 4, generator=g)
    with torch.no_grad():
        post = model.encode(images)
        rec = {"images": images, "z": z, "mean": post.mean, "logvar": post.logvar, "kl": post.kl(),
               "decoded": model.decode(z), "checksum": torch.tensor(checksum, dtype=torch.float64)}
    save_file({k: v.contiguous() for k, v in rec.items()}, str(out / "kl_vae.safetensors"),
              metadata={"config": repr(VAE_KW) + "; decoder attn_resolutions=(); perturb seed 3"})


def record_keys(mar_mod, vae_mod, out: Path) -> None:
    """Key names and shapes of the official mar_base (released DiffLoss 6 x 1024) and KL-16, built on meta."""
    with torch.device("meta"):
        base = mar_mod.mar_base(diffloss_d=6, diffloss_w=1024)
        kl16 = vae_mod.AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))
    for name, m in (("mar_base_keys.txt", base), ("kl16_keys.txt", kl16)):
        lines = [f"{k} {','.join(str(s) for s in v.shape)}" for k, v in m.state_dict().items()]
        (out / name).write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mar-root", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=HERE.parents[2] / "tests" / "fixtures" / "mar")
    ap.add_argument("--only", choices=["diffloss", "mar", "vae"], default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    helper = load_weights_helper()
    diffloss, mar, vae = import_official(args.mar_root)
    if args.only is None:
        record_keys(mar, vae, args.out)
    if args.only in (None, "diffloss"):
        record_diffloss(diffloss, helper, args.out)
    if args.only in (None, "mar"):
        record_mar(mar, helper, args.out)
    if args.only in (None, "vae"):
        record_vae(vae, helper, args.out)
    for f in sorted(args.out.glob("*.safetensors")):
        print(f, f.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
