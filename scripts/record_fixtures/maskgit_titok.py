"""Record parity fixtures for genmodels' MaskGIT from the official TiTok ``ImageBert``.

Usage (outside the repo's venv; needs ``transformers<=4.51`` -- newer versions tie ``lm_head`` to the
word embeddings in ``post_init`` and break ``ImageBert``, 1d-tokenizer issue #113 / PR #108 -- and a
checkout of bytedance/1d-tokenizer; recorded with transformers 4.51.3, torch 2.13 CPU):

    python scripts/record_fixtures/maskgit_titok.py --official /path/to/1d-tokenizer \
        --out tests/fixtures/maskgit/imagebert_tiny.pt

Builds a tiny ``ImageBert`` (K=16 codes, 3 classes, 8 tokens, 2 layers x 32, 4 heads, MLP 64,
dropout 0 so that train-mode losses are deterministic) with seed 0 and saves:

* ``state_dict``: its state dict in the official (HF BERT) layout;
* ``forward``: input ids, conditions and logits for ``cond_drop_prob`` 0 and 1;
* ``train``: with ``torch.manual_seed(1)``: the official masking, class dropout (p 0.1), logits
  and ``MLMLoss`` (label smoothing 0.1, unmasked weight 0.1) -- torch's global CPU RNG gives the
  same stream as a ``torch.Generator`` with the same seed, so ours can replay it;
* ``generate``: for a few sampling settings, the ids ``generate`` returns and every
  ``uniform_`` draw it made (the Gumbel noise), to be replayed into our decoding.
"""
from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch


def _stub_torchvision() -> None:
    """1d-tokenizer's ``modeling.modules`` imports torchvision (perceptual loss); nothing of it is used here."""
    class _Anything(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            sub = _Anything(f"{self.__name__}.{name}")
            sub.__path__ = []
            sys.modules[sub.__name__] = sub
            return sub

        def __call__(self, *args, **kwargs):
            return None

    for name in ("torchvision", "torchvision.models", "torchvision.transforms", "torchvision.ops"):
        mod = _Anything(name)
        mod.__path__ = []
        sys.modules[name] = mod


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--official", required=True, help="checkout of bytedance/1d-tokenizer")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import transformers  # noqa: F401  (before the stub: transformers must see that torchvision is absent)
    if tuple(int(x) for x in transformers.__version__.split(".")[:2]) > (4, 51):
        raise SystemExit(f"transformers {transformers.__version__} ties ImageBert's lm_head (1d-tokenizer #113); "
                         "use transformers<=4.51")
    _stub_torchvision()
    sys.path.insert(0, args.official)
    from modeling.maskgit import ImageBert
    from modeling.modules.losses import MLMLoss
    from omegaconf import OmegaConf

    K, C, N, B = 16, 3, 8, 2
    config = OmegaConf.create({
        "model": {"vq_model": {"codebook_size": K},
                  "generator": {"condition_num_classes": C, "image_seq_len": N, "hidden_size": 32,
                                "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
                                "dropout": 0.0, "attn_drop": 0.0}},
        "losses": {"label_smoothing": 0.1, "loss_weight_unmasked_token": 0.1}})
    torch.manual_seed(0)
    model = ImageBert(config).eval()
    with torch.no_grad():  # larger weights than BERT's init so that logits are far from ties
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(5.0)
    rec: dict = {"config": OmegaConf.to_container(config),
                 "state_dict": {k: v.clone() for k, v in model.state_dict().items()}}

    ids = torch.randint(0, K + 1, (4, N))
    cond = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        rec["forward"] = {"ids": ids, "condition": cond,
                          "logits_cond": model(ids, cond.clone(), cond_drop_prob=0.0),
                          "logits_uncond": model(ids, cond.clone(), cond_drop_prob=1.0)}

    model.train()
    tokens = torch.randint(0, K, (6, N))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    torch.manual_seed(1)
    masked, masks = model.masking_input_tokens(tokens)
    logits = model(masked, labels.clone(), cond_drop_prob=0.1)
    loss, _ = MLMLoss(config)(logits, tokens, weights=masks)
    rec["train"] = {"tokens": tokens, "labels": labels, "seed": 1, "masked": masked, "masks": masks,
                    "logits": logits.detach(), "loss": loss.detach()}
    model.eval()

    settings = [
        dict(guidance_scale=2.0, guidance_decay="linear", randomize_temperature=3.0,
             softmax_temperature_annealing=True, num_sample_steps=4),
        dict(guidance_scale=3.0, guidance_decay="power-cosine", guidance_scale_pow=2.5, randomize_temperature=2.0,
             softmax_temperature_annealing=False, num_sample_steps=5),
        dict(guidance_scale=0.0, guidance_decay="constant", randomize_temperature=4.5,
             softmax_temperature_annealing=False, num_sample_steps=3),
        dict(guidance_scale=1.5, guidance_decay="constant", randomize_temperature=1.0,
             softmax_temperature_annealing=False, num_sample_steps=8),
    ]
    rec["generate"] = []
    orig_uniform = torch.Tensor.uniform_
    for i, kw in enumerate(settings):
        draws: list[torch.Tensor] = []

        def recording_uniform(self, *a, **k):
            out = orig_uniform(self, *a, **k)
            draws.append(out.detach().clone())
            return out

        torch.manual_seed(100 + i)
        torch.Tensor.uniform_ = recording_uniform
        try:
            out = model.generate(torch.tensor([0, 2, 1][:B]), **kw)
        finally:
            torch.Tensor.uniform_ = orig_uniform
        rec["generate"].append({"kwargs": kw, "condition": torch.tensor([0, 2, 1][:B]), "ids": out,
                                "uniforms": draws})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(rec, args.out)
    print(f"wrote {args.out}: {len(rec['state_dict'])} tensors, {len(settings)} generate settings")


if __name__ == "__main__":
    main()
