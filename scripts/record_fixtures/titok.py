"""Record parity fixtures for genmodels' TiTok, MaskGIT-VQGAN and UViTBert from bytedance/1d-tokenizer.

Usage (the official code is imported from a checkout given on the command line; its optional
dependencies -- huggingface_hub, accelerate, transformers, torchvision, requests, tqdm -- are
stubbed, none of their code runs here; needs torch, einops, omegaconf, safetensors):

    python scripts/record_fixtures/titok.py --official /path/to/1d-tokenizer --out tests/fixtures/titok

Recorded with torch 2.13 (CPU) from 1d-tokenizer HEAD 942a96f. Small sizes: the official
ViT size table (small / base / large) is extended, in memory, by a ``"tiny"`` entry (width
32, 2 layers, 4 heads) -- the only change to the official code; two-stage TiTok's hard-coded
pixel decoder (MaskGIT-VQGAN, 128 channels) is replaced by a small one (``PIXEL_CONF``, 1024
codes of 16 dims). Every parameter is perturbed with ``0.05 * randn`` (and the codebooks
re-drawn with ``randn``, TiTok's patch embedding x10
and its transformer matrices x4) after the official init, so biases,
LayerNorms, codes and the image all matter.

Writes one safetensors file per case (keys ``sd.<official key>``, ``in.*``, ``out.*``; the
config as JSON in the metadata):

* ``titok_legacy.safetensors``: two-stage, ``is_legacy`` True, l2-normalised VQ, with the pixel
  decoder (finetune_decoder True): encoder latents, codes, proxy logits, decode_tokens pixels;
* ``titok_vq.safetensors``: single-stage, ``is_legacy`` False, plain VQ, pixel head;
* ``titok_vae.safetensors``: single-stage VAE: latents (mean / logvar), KL, pixels of the mean;
* ``vqgan.safetensors``: MaskGIT-VQGAN encoder features, codes, decode of the codes;
* ``uvit.safetensors``: UViTBert logits (cond / uncond) and greedy ``generate`` ids
  (randomize_temperature 0) for constant, linear and power-cosine guidance, with and without
  softmax-temperature annealing.
"""
from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch
from torch import nn

TINY = {"width": 32, "layers": 2, "heads": 4}
PIXEL_CONF = {"channel_mult": [1, 1, 2], "num_resolutions": 3, "dropout": 0.0, "hidden_channels": 32,
              "num_channels": 3, "num_res_blocks": 1, "resolution": 32, "z_channels": 16}

CASES = {
    "titok_legacy": dict(codebook_size=64, token_size=6, use_l2_norm=True, commitment_cost=0.25,
                         num_latent_tokens=6, finetune_decoder=True, is_legacy=True, quantize_mode="vq"),
    "titok_vq": dict(codebook_size=128, token_size=16, use_l2_norm=False, commitment_cost=0.25,
                     num_latent_tokens=5, finetune_decoder=False, is_legacy=False, quantize_mode="vq"),
    "titok_vae": dict(token_size=4, num_latent_tokens=7, finetune_decoder=False, is_legacy=False,
                      quantize_mode="vae"),
}
IMAGE_SIZE, PATCH = 32, 8
UVIT = dict(codebook_size=16, condition_num_classes=3, image_seq_len=8, hidden_size=32, num_hidden_layers=4,
            num_attention_heads=4, intermediate_size=64)
GENERATE = [
    dict(guidance_scale=3.0, guidance_decay="power-cosine", guidance_scale_pow=2.5, softmax_temperature_annealing=True,
         num_sample_steps=6),
    dict(guidance_scale=2.0, guidance_decay="linear", softmax_temperature_annealing=False, num_sample_steps=4),
    dict(guidance_scale=1.5, guidance_decay="constant", softmax_temperature_annealing=True, num_sample_steps=5),
    dict(guidance_scale=0.0, guidance_decay="constant", softmax_temperature_annealing=False, num_sample_steps=8),
]


def _stub_modules() -> None:
    """Stand-ins for imports the recorded code paths never use."""
    class _Anything(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            sub = _Anything(f"{self.__name__}.{name}")
            sub.__path__ = []
            sys.modules[sub.__name__] = sub
            return sub

        def __call__(self, *a, **k):
            return None

    for name in ("torchvision", "torchvision.models", "torchvision.transforms", "torchvision.ops", "requests",
                 "tqdm", "accelerate", "accelerate.utils", "accelerate.utils.operations"):
        mod = _Anything(name)
        mod.__path__ = []
        sys.modules[name] = mod
    hub = types.ModuleType("huggingface_hub")

    class PyTorchModelHubMixin:
        def __init_subclass__(cls, **kwargs):
            super().__init_subclass__()
    hub.PyTorchModelHubMixin = PyTorchModelHubMixin
    sys.modules["huggingface_hub"] = hub
    tr = types.ModuleType("transformers")

    class BertConfig:  # UViTBert deletes the BERT model its parent builds
        def __init__(self, **kw):
            self.__dict__.update(kw)

    class BertModel(nn.Module):
        def __init__(self, config, add_pooling_layer=False):
            super().__init__()

        def post_init(self):
            pass
    tr.BertConfig, tr.BertModel = BertConfig, BertModel
    sys.modules["transformers"] = tr


def _import_official(root: Path):
    """Import the official modules, with a "tiny" entry added to the ViT size table of blocks.py."""
    sys.path.insert(0, str(root))
    src = (root / "modeling/modules/blocks.py").read_text()
    for old, new in (('"large": 1024,', f'"large": 1024, "tiny": {TINY["width"]},'),
                     ('"large": 24,', f'"large": 24, "tiny": {TINY["layers"]},'),
                     ('"large": 16,', f'"large": 16, "tiny": {TINY["heads"]},')):
        assert src.count(old) >= 2, old
        src = src.replace(old, new)
    import modeling.modules  # noqa: F401  (package first; then swap in the patched blocks)
    blocks = types.ModuleType("modeling.modules.blocks")
    blocks.__file__ = str(root / "modeling/modules/blocks.py")
    exec(compile(src, blocks.__file__, "exec"), blocks.__dict__)
    sys.modules["modeling.modules.blocks"] = blocks
    import modeling.titok as titok
    titok.TiTokEncoder, titok.TiTokDecoder = blocks.TiTokEncoder, blocks.TiTokDecoder
    import modeling.maskgit as maskgit
    maskgit.UViTBlock = blocks.UViTBlock
    from modeling.modules import maskgit_vqgan
    return titok, maskgit, maskgit_vqgan


@torch.no_grad()
def _perturb(model: nn.Module, seed: int, code_scale: float = 1.0, patch_gain: float = 1.0,
             matrix_gain: float = 1.0) -> None:
    """Add 0.05 randn to every parameter; codebooks become ``code_scale * randn``; the patch
    embedding is multiplied by ``patch_gain`` and the transformers' matrices by ``matrix_gain``
    (so that the image, not the learned latent tokens, decides the codes)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("embedding.weight") and ("quantize" in name):
            p.copy_(code_scale * torch.randn(p.shape, generator=g))
        else:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        if name == "encoder.patch_embed.weight":
            p.mul_(patch_gain)
        if ".transformer." in name and p.ndim == 2:
            p.mul_(matrix_gain)


def _images(n: int, seed: int) -> torch.Tensor:
    """(n, 3, 32, 32) in [0, 1]: random 2x2 colour blocks plus a little noise (iid noise images all
    look alike to a ViT that averages over patches)."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.rand(n, 3, 2, 2, generator=g).repeat_interleave(IMAGE_SIZE // 2, 2).repeat_interleave(IMAGE_SIZE // 2, 3)
    return (0.8 * blocks + 0.2 * torch.rand(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)).clamp(0, 1)


def _save(path: Path, sd: dict, tensors: dict, config: dict) -> None:
    from safetensors.torch import save_file
    out = {f"sd.{k}": v.contiguous().clone() for k, v in sd.items()}
    out.update({k: v.contiguous().clone() for k, v in tensors.items()})
    save_file(out, str(path), metadata={"config": json.dumps(config)})
    print(f"wrote {path}: {len(out)} tensors")


def record_titok(titok, maskgit_vqgan, name: str, out_dir: Path, seed: int) -> None:
    from omegaconf import OmegaConf
    vq = dict(CASES[name], vit_enc_model_size="tiny", vit_dec_model_size="tiny", vit_enc_patch_size=PATCH,
              vit_dec_patch_size=PATCH)
    config = OmegaConf.create({"model": {"vq_model": vq}, "dataset": {"preprocessing": {"crop_size": IMAGE_SIZE}}})
    conf = OmegaConf.create(PIXEL_CONF)
    titok.Pixel_Decoder = lambda _conf: maskgit_vqgan.Decoder(conf)
    titok.Pixel_Quantizer = lambda num_embeddings, embedding_dim, commitment_cost: maskgit_vqgan.VectorQuantizer(
        num_embeddings, PIXEL_CONF["z_channels"], commitment_cost)
    torch.manual_seed(seed)
    model = titok.TiTok(config).eval()
    _perturb(model, seed + 1, code_scale=0.5, patch_gain=10.0, matrix_gain=4.0)
    images = _images(3, seed + 2)
    t = {"in.images01": images}
    with torch.no_grad():
        z = model.encoder(pixel_values=images, latent_tokens=model.latent_tokens)        # (B, C, 1, N)
        t["out.latents"] = z
        if model.quantize_mode == "vq":
            z_q, res = model.quantize(z)
            t["out.z_quantized"] = z_q
            t["out.codes"] = res["min_encoding_indices"]                               # (B, 1, N)
            t["out.quantizer_loss"] = res["quantizer_loss"].reshape(1)
            t["out.decoder"] = model.decoder(z_q)                                     # logits or pixels
            t["out.decode_tokens"] = model.decode_tokens(res["min_encoding_indices"])
        else:
            post = model.quantize(z)
            t["out.mean"], t["out.logvar"], t["out.kl"] = post.mean, post.logvar, post.kl()
            t["out.decoder"] = model.decoder(post.mean)
    _save(out_dir / f"{name}.safetensors", model.state_dict(), t,
          {"vq_model": OmegaConf.to_container(config.model.vq_model), "image_size": IMAGE_SIZE,
           "pixel_conf": PIXEL_CONF, "tiny": TINY})


def record_vqgan(maskgit_vqgan, out_dir: Path, seed: int) -> None:
    from omegaconf import OmegaConf
    conf = OmegaConf.create(PIXEL_CONF)
    torch.manual_seed(seed)
    m = nn.Module()
    m.encoder, m.decoder = maskgit_vqgan.Encoder(conf), maskgit_vqgan.Decoder(conf)
    m.quantize = maskgit_vqgan.VectorQuantizer(64, PIXEL_CONF["z_channels"], 0.25)
    m.eval()
    _perturb(m, seed + 1)
    with torch.no_grad():  # the perturbation leaves the codes near the (small) features' scale
        m.quantize.embedding.weight.mul_(0.3)
    images = _images(2, seed + 2)
    with torch.no_grad():
        h = m.encoder(images)
        z_q, codes, _ = m.quantize(h)
        rec = m.decoder(m.quantize.get_codebook_entry(codes))
    _save(out_dir / "vqgan.safetensors", m.state_dict(),
          {"in.images01": images, "out.features": h, "out.codes": codes, "out.z_q": z_q, "out.decoded": rec},
          {"conf": PIXEL_CONF, "codebook_size": 64})


def record_uvit(maskgit, out_dir: Path, seed: int) -> None:
    from omegaconf import OmegaConf
    u = UVIT
    config = OmegaConf.create({"model": {
        "vq_model": {"codebook_size": u["codebook_size"]},
        "generator": {k: v for k, v in u.items() if k != "codebook_size"} | {"dropout": 0.0, "attn_drop": 0.0}}})
    torch.manual_seed(seed)
    model = maskgit.UViTBert(config).eval()
    _perturb(model, seed + 1)
    with torch.no_grad():
        for p in model.parameters():  # larger weights: logits far from ties
            if p.ndim == 2:
                p.mul_(3.0)
    K, N = u["codebook_size"], u["image_seq_len"]
    ids = torch.randint(0, K + 1, (4, N), generator=torch.Generator().manual_seed(seed + 2))
    cond = torch.tensor([0, 1, 2, 1])
    t = {"in.ids": ids, "in.condition": cond}
    with torch.no_grad():
        t["out.logits_cond"] = model(ids, cond.clone(), cond_drop_prob=0.0)
        t["out.logits_uncond"] = model(ids, cond.clone(), cond_drop_prob=1.0)
        for i, kw in enumerate(GENERATE):
            torch.manual_seed(100 + i)
            t[f"out.generate{i}"] = model.generate(torch.tensor([0, 2, 1]), randomize_temperature=0.0, **kw)
    _save(out_dir / "uvit.safetensors", model.state_dict(), t, {"uvit": u, "generate": GENERATE})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--official", required=True, help="checkout of bytedance/1d-tokenizer")
    ap.add_argument("--out", required=True, help="output folder (tests/fixtures/titok)")
    args = ap.parse_args()
    _stub_modules()
    titok, maskgit, maskgit_vqgan = _import_official(Path(args.official))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(CASES):
        record_titok(titok, maskgit_vqgan, name, out, seed=10 * i)
    record_vqgan(maskgit_vqgan, out, seed=50)
    record_uvit(maskgit, out, seed=60)


if __name__ == "__main__":
    main()
