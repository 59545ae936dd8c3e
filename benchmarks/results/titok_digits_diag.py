"""Cheap TiTok-on-digits diagnostics (lab tool for benchmarks/results/titok_digits.md).

A plain loop with the TokenizerModule's optimisation (AdamW with genmodels' param groups, linear
warm-up + cosine, grad-norm clip 1.0, batch 64 shuffled epochs, drop_last) and no Lightning, so
that a variant costs seconds per 20 steps on one thread. Prints the training loss curve (mean of
each 20-step window: pixel L2 or stage-1 CE / proxy accuracy) and code usage.

    PYTHONPATH=$PWD python benchmarks/results/titok_digits_diag.py --steps 300 \
        --set num_latent_tokens=16 --set codebook_size=64 --lr 3e-3

``--set k=v`` overrides a TiTok argument of configs/tokenizers/titok_digits.yaml (or of
titok_digits_two_stage.yaml with ``--two-stage TEACHER.ckpt``); values are parsed as YAML.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import yaml


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--wd", type=float, default=1e-4)
    p.add_argument("--beta2", type=float, default=0.99)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--total", type=int, default=None, help="schedule length (default: --steps)")
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--two-stage", default=None, help="teacher checkpoint: stage-1 proxy-code training")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--init", default="official", choices=["official", "torch", "xavier"],
                   help="diagnostic only: re-initialise every Linear / Conv of encoder and decoder")
    a = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)

    from genmodels.data.digits import digits_tensors
    from genmodels.tokenizers.titok import TiTok
    from genmodels.training.common import lr_lambda, param_groups

    cfg_file = "configs/tokenizers/titok_digits_two_stage.yaml" if a.two_stage else "configs/tokenizers/titok_digits.yaml"
    kw = yaml.safe_load(open(cfg_file))["model"]["init_args"]["tokenizer"]["init_args"]
    for s in a.set:
        k, v = s.split("=", 1)
        kw[k] = yaml.safe_load(v)
    if a.two_stage:
        kw.update(teacher_ckpt=a.two_stage, stage=1)
        kw.pop("proxy_codebook_size", None)
    tok = TiTok(**kw)
    if a.init != "official":
        for m in list(tok.encoder.modules()) + list(tok.decoder.modules()):
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                if a.init == "torch":
                    m.reset_parameters()
                else:
                    torch.nn.init.xavier_uniform_(m.weight)
                    torch.nn.init.zeros_(m.bias)
    n_params = sum(p.numel() for n, p in tok.named_parameters() if not n.startswith("teacher."))
    images, _, splits = digits_tensors(32)
    x = images[splits["train"]].float().div(127.5).sub(1).expand(-1, 3, -1, -1).contiguous()
    opt = torch.optim.AdamW(param_groups(tok, a.wd), lr=a.lr, betas=(0.9, a.beta2))
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("cosine", a.warmup, a.total or a.steps, a.min_lr_ratio))
    print(f"# {cfg_file} {kw} lr={a.lr} warmup={a.warmup} params={n_params}", flush=True)
    g = torch.Generator().manual_seed(a.seed)
    perm, pos, t0 = torch.randperm(len(x), generator=g), 0, time.time()
    acc: dict[str, float] = {}
    tok.train()
    for step in range(1, a.steps + 1):
        if pos + a.batch > len(x):
            perm, pos = torch.randperm(len(x), generator=g), 0
        batch = x[perm[pos:pos + a.batch]]
        pos += a.batch
        out = tok.losses(batch)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(tok.parameters(), 1.0)
        opt.step()
        sch.step()
        for k in ("rec_loss", "proxy_acc", "usage", "perplexity", "kl"):
            if k in out:
                acc[k] = acc.get(k, 0.0) + float(out[k]) / a.every
        if step % a.every == 0:
            print(f"{step:5d} " + " ".join(f"{k}={v:.4f}" for k, v in acc.items()) + f" t={time.time() - t0:.0f}s",
                  flush=True)
            if not math.isfinite(acc.get("rec_loss", 0.0)):
                break
            acc = {}


if __name__ == "__main__":
    main()
