"""Cached latents (genmodels.data.latents): encode once (with flips, as MAR's main_cache.py),
read back as token batches with fresh posterior samples, tokenizer consistency checks."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from genmodels.data.latents import CachedLatentsDataModule, main as cache_main
from genmodels.tokenizers.kl_vae import KLVAE, patchify
from genmodels.errors import GenmodelsError

VAE = dict(embed_dim=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16, attn_resolutions=(),
           scale_factor=0.5)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Cache digits (16 px) with a tiny random KL-VAE through the command-line entry point."""
    tmp = tmp_path_factory.mktemp("latents")
    torch.manual_seed(0)
    vae = KLVAE(**VAE).eval()
    ckpt = tmp / "tok.ckpt"
    torch.save({"genmodels": {"tokenizer": vae.config},
                "state_dict": {f"tokenizer.{k}": v for k, v in vae.state_dict().items()}}, ckpt)
    data = tmp / "digits16.yaml"
    data.write_text("data:\n  class_path: genmodels.data.DigitsDataModule\n  init_args:\n    image_size: 16\n"
                    "    batch_size: 32\n")
    out = tmp / "cache"
    cache_main(["--data", str(data), "--tokenizer-ckpt", str(ckpt), "--out", str(out), "--splits", "train", "val",
                "--batch-size", "100", "--shard-size", "600", "--device", "cpu"])
    return out, vae


def test_cache_layout_and_meta(cache):
    out, vae = cache
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kind"] == "moments" and meta["flip"] is True and meta["num_classes"] == 10
    assert meta["scale_factor"] == 0.5 and meta["grid"] == [8, 8]
    assert meta["splits"]["train"]["n"] == 1437 and len(meta["splits"]["train"]["shards"]) == 3  # 600+600+237
    assert meta["splits"]["val"]["n"] == 180
    assert meta["tokenizer"]["class_path"] == "genmodels.tokenizers.kl_vae.KLVAE"


def test_items_are_fresh_posterior_samples_of_image_or_flip(cache):
    out, vae = cache
    dm = CachedLatentsDataModule(str(out), batch_size=16)
    train = dm.dataset("train", augment=True)
    val = dm.dataset("val")
    assert len(train) == 1437 and len(val) == 180
    from genmodels.data.digits import digits_tensors
    images, labels, splits = digits_tensors(16)
    i = 700  # in the second shard
    img = images[splits["train"][i]].float().div(127.5).sub(1).expand(3, -1, -1)[None]
    with torch.no_grad():
        post = vae.encode_posterior(img)
        post_f = vae.encode_posterior(img.flip(-1))
    mean, mean_f = patchify(post.mean * 0.5, 1)[0], patchify(post_f.mean * 0.5, 1)[0]
    torch.manual_seed(0)
    items = [train[i] for _ in range(400)]
    assert all(it["labels"] == labels[splits["train"][i]] for it in items)
    toks = torch.stack([it["tokens"] for it in items])
    assert toks.shape == (400, 64, 4)
    near = [(t - mean).abs().mean() < (t - mean_f).abs().mean() for t in toks]
    assert 120 < sum(near) < 280  # the flip is picked about half of the time
    picked = toks[torch.tensor(near)]
    assert (picked.mean(0) - mean).abs().max() < 0.15  # samples around the (scaled) mean
    assert picked.std(0).mean() > 0.05  # ... with noise
    # validation: deterministic per item, no flip
    assert torch.equal(val[3]["tokens"], val[3]["tokens"])
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"tokens", "labels"} and batch["tokens"].shape == (16, 64, 4)
    assert batch["labels"].dtype == torch.int64


def test_tokenizer_consistency_and_errors(cache, tmp_path):
    out, vae = cache
    dm = CachedLatentsDataModule(str(out))
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=vae))
    dm.setup("fit")  # the same tokenizer: fine
    other = KLVAE(**VAE)
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=other))
    with pytest.raises(GenmodelsError, match="not the one the latents"):
        dm.setup("fit")
    with pytest.raises(GenmodelsError, match="split 'test' was not cached"):
        dm.dataset("test")
    with pytest.raises(GenmodelsError, match="no meta.json"):
        CachedLatentsDataModule(str(tmp_path))
    with pytest.raises(NotImplementedError, match="hold no images"):
        dm.reference_dataset("val")


def test_generator_module_trains_on_cached_batches(cache):
    from genmodels.generators.mar import MAR
    from genmodels.training import GeneratorModule
    out, vae = cache
    gen = MAR(token_shape=(8, 8), token_channels=4, num_classes=10, encoder_embed_dim=32, encoder_depth=1,
              encoder_num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, buffer_size=2,
              diffloss_d=1, diffloss_w=32)
    module = GeneratorModule(gen, tokenizer=vae)
    batch = next(iter(CachedLatentsDataModule(str(out), batch_size=8).train_dataloader()))
    tokens, labels = module.tokens_and_labels(batch)
    assert torch.equal(tokens, batch["tokens"])
    loss = gen.forward_loss(tokens, labels)["loss"]
    loss.backward()
    assert torch.isfinite(loss)
