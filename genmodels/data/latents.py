"""Cached latents: encode a data set ONCE with a frozen tokenizer, then train generators on
the stored latents instead of images (MAR ``main_cache.py`` + ``util/loader.py::CachedFolder``;
about 2x faster training in the MAR README).

* ``cache_latents(tokenizer, datamodule, out_dir)`` (or ``python -m genmodels.data.latents``)
  writes, for every image of each split, the KL-VAE posterior moments (``mean | logvar``,
  (2C, h, w)) of the image AND of its horizontal flip, as the official cache does (keys
  ``moments`` / ``moments_flip``), into safetensors shards plus a ``meta.json`` (tokenizer
  config and a weight fingerprint, scale factor, patch size, classes, data set id).
  Tokenizers without a posterior (VQ) store their tokens instead.
* ``CachedLatentsDataModule(path)`` reads them. A training item picks the image or its flip
  with probability 1/2 and draws a FRESH posterior sample ``mean + std * eps`` times the
  scale factor, patchified (official ``CachedFolder`` + ``posterior.sample() * 0.2325``).
  Validation / test items use a sample seeded by the item index (same tokens every epoch),
  without flip. Batches are ``{"tokens": (B, L, C), "labels": (B,)}``, which
  ``GeneratorModule`` uses directly; predict batches are the usual ``(labels, indices)``.

The generator's ``tokenizer_ckpt`` must be the tokenizer the cache was made with: on
``setup`` the data module compares the trainer's tokenizer with the fingerprint in
``meta.json`` and refuses a different one. Evaluation against real images (FID ...)
needs the image data module, not this one.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from genmodels.data.base import SPLITS, ImageDataModule, augment_key
from genmodels.errors import GenmodelsError
from genmodels.tokenizers.kl_vae import patchify
from genmodels.utils.progress import progress as progress_bar

META = "meta.json"
FORMAT = 1


def tokenizer_fingerprint(tokenizer: torch.nn.Module) -> float:
    """Sum of all parameters and float buffers (float64): tells tokenizers apart cheaply."""
    with torch.no_grad():
        return float(sum(t.detach().double().sum().item() for t in tokenizer.state_dict().values()
                         if t.is_floating_point()))


@torch.no_grad()
def cache_latents(tokenizer: torch.nn.Module, datamodule: ImageDataModule, out_dir: str | Path,
                  splits: Sequence[str] = ("train", "val"), flip: bool = True, batch_size: int = 64,
                  shard_size: int = 10000, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  progress: bool = True) -> Path:
    """Encode ``splits`` of ``datamodule`` (without augmentation) with ``tokenizer`` into
    ``out_dir`` (``{split}-{k:05d}.safetensors`` shards of about ``shard_size`` items, cut
    at batch boundaries, + ``meta.json``). Returns ``out_dir``. ``progress``: show images
    done / total, s/img and time left per split (rank 0 only)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer.to(device).eval()
    posterior = hasattr(tokenizer, "encode_posterior")
    meta: dict[str, Any] = {
        "format": FORMAT, "kind": "moments" if posterior else "tokens", "flip": bool(flip),
        "tokenizer": getattr(tokenizer, "config", None), "fingerprint": tokenizer_fingerprint(tokenizer),
        "scale_factor": float(getattr(tokenizer, "latent_scale", 1.0)),
        "patch_size": int(getattr(tokenizer, "patch_size", 1)),
        "grid": list(tokenizer.spec.grid), "num_classes": int(datamodule.num_classes),
        "dataset_id": datamodule.dataset_id, "image_size": int(datamodule.image_size), "splits": {},
    }

    def encode(images: torch.Tensor) -> torch.Tensor:
        if posterior:
            post = tokenizer.encode_posterior(images)
            return torch.cat([post.mean, post.logvar], dim=1).to(dtype)
        return tokenizer.encode(images)

    for split in splits:
        ds = datamodule.dataset(split, augment=False)
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=datamodule.num_workers)
        buf: dict[str, list[torch.Tensor]] = {"moments": [], "moments_flip": [], "labels": []}
        shards, n_done, n_buf = [], 0, 0

        def flush() -> None:
            nonlocal n_buf
            if not n_buf:
                return
            name = f"{split}-{len(shards):05d}.safetensors"
            tensors = {k: torch.cat(v).contiguous() for k, v in buf.items() if v}
            save_file(tensors, str(out / name))
            shards.append({"file": name, "n": n_buf})
            for v in buf.values():
                v.clear()
            n_buf = 0

        bar = progress_bar(len(ds), f"cache_latents {split}", unit="img", enabled=None if progress else False)
        for images, labels in loader:
            images = images.to(device)
            buf["moments"].append(encode(images).cpu())
            if flip:
                buf["moments_flip"].append(encode(images.flip(-1)).cpu())
            buf["labels"].append(labels.long().cpu())
            n_buf += len(labels)
            n_done += len(labels)
            if n_buf >= shard_size:
                flush()
            bar.update(len(labels))
        bar.close()
        flush()
        meta["splits"][split] = {"n": n_done, "shards": shards}
    (out / META).write_text(json.dumps(meta, indent=1))
    return out


class CachedLatentsDataset(Dataset):
    """Items ``{"tokens": (L, C) float (or (L,) ids), "labels": int64}`` from cache shards.

    ``augment``: pick the flipped image's moments with probability 1/2 (global torch RNG,
    like the official CachedFolder's ``torch.rand``) and draw the posterior noise from the
    global RNG; otherwise no flip and noise from a generator seeded by the item index.
    """

    def __init__(self, root: Path, meta: dict[str, Any], split: str, augment: bool) -> None:
        info = meta["splits"][split]
        self.root, self.meta, self.augment = root, meta, augment
        self.files = [s["file"] for s in info["shards"]]
        self.offsets = [0]
        for s in info["shards"]:
            self.offsets.append(self.offsets[-1] + s["n"])
        self._handles: dict[str, Any] = {}
        self.kind, self.flip = meta["kind"], bool(meta["flip"]) and augment
        self.scale, self.p = float(meta["scale_factor"]), int(meta["patch_size"])
        self.labels = torch.cat([self._handle(f).get_tensor("labels") for f in self.files]) if self.files \
            else torch.zeros(0, dtype=torch.long)

    def _handle(self, f: str):
        if f not in self._handles:  # opened lazily: safe_open handles do not pickle to workers
            self._handles[f] = safe_open(str(self.root / f), framework="pt")
        return self._handles[f]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}

    def __len__(self) -> int:
        return self.offsets[-1]

    accepts_augment_seeds = True  # keys may be (index, seed): see genmodels.data.base.augment_key

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        i, g = augment_key(key)
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = next(j for j in range(len(self.files)) if i < self.offsets[j + 1])
        h, j = self._handle(self.files[k]), i - self.offsets[k]
        name = "moments_flip" if self.flip and torch.rand((), generator=g) < 0.5 else "moments"
        x = h.get_slice(name)[j:j + 1][0]
        if self.kind == "tokens":
            return {"tokens": x, "labels": self.labels[i]}
        mean, logvar = x.float().chunk(2, dim=0)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        if self.augment:
            noise = torch.randn(mean.shape, generator=g)
        else:
            noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(i))
        z = (mean + std * noise) * self.scale
        return {"tokens": patchify(z, self.p), "labels": self.labels[i]}


class CachedLatentsDataModule(ImageDataModule):
    """Generator training on cached latents (see the module doc).

    Args:
        path: directory written by ``cache_latents``.
        flip: use the cached flips in training (default: when they were cached).
        check_tokenizer: on ``setup``, refuse a GeneratorModule whose tokenizer differs from
            the one the cache was made with.
        batch_size, num_workers, seed, eval_batch_size, predict_num_samples, drop_last,
        pin_memory: as ``ImageDataModule``.
    """

    def __init__(self, path: str, batch_size: int = 64, num_workers: int = 0, seed: int = 0,
                 eval_batch_size: int | None = None, predict_num_samples: int = 100, drop_last: bool = True,
                 pin_memory: bool = False, flip: bool | None = None, check_tokenizer: bool = True) -> None:
        self.root = Path(path)
        meta_path = self.root / META
        if not meta_path.is_file():
            raise GenmodelsError(f"CachedLatentsDataModule.path: no {META} in {self.root} (make the cache with "
                                 "`python -m genmodels.data.latents --help`)")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise GenmodelsError(f"{meta_path}: unknown cache format {self.meta.get('format')!r} (expected {FORMAT})")
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed,
                         image_size=int(self.meta["image_size"]), eval_batch_size=eval_batch_size,
                         predict_num_samples=predict_num_samples, drop_last=drop_last, pin_memory=pin_memory)
        self.save_hyperparameters()
        self.flip = self.meta["flip"] if flip is None else flip
        if self.flip and not self.meta["flip"]:
            raise GenmodelsError(f"CachedLatentsDataModule.flip=True but {self.root} was cached without flips")
        self.check_tokenizer = check_tokenizer

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def dataset_id(self) -> str:
        return f"{self.meta['dataset_id']}-latents"

    def _make_dataset(self, split: str, augment: bool) -> Dataset:
        if split not in self.meta["splits"]:
            raise GenmodelsError(f"split {split!r} was not cached in {self.root} (cached: {sorted(self.meta['splits'])}); "
                                 "re-run cache_latents with it")
        ds = CachedLatentsDataset(self.root, self.meta, split, augment)
        ds.flip = ds.flip and self.flip
        return ds

    def reference_dataset(self, split: str) -> Dataset:
        raise NotImplementedError("cached latents hold no images: evaluate with the image data module "
                                  f"(the cache was made from {self.meta['dataset_id']!r})")

    def setup(self, stage: str) -> None:
        trainer = getattr(self, "trainer", None)
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        tok = getattr(module, "tokenizer", None)
        if not self.check_tokenizer or tok is None:
            return
        fp, want = tokenizer_fingerprint(tok), float(self.meta["fingerprint"])
        if not math.isclose(fp, want, rel_tol=1e-6, abs_tol=1e-6):
            raise GenmodelsError(f"the generator's tokenizer (weight fingerprint {fp:.6g}) is not the one the latents in "
                                 f"{self.root} were cached with ({want:.6g}): set model.init_args.tokenizer_ckpt to that "
                                 "tokenizer, or re-cache (check_tokenizer=false skips this check)")


def _load_data_config(path: str) -> ImageDataModule:
    from omegaconf import OmegaConf

    from genmodels.utils.config import instantiate
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    cfg = cfg.get("data", cfg)
    return instantiate(cfg)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m genmodels.data.latents",
                                 description="Encode a data set once with a frozen tokenizer (MAR main_cache.py).")
    ap.add_argument("--data", required=True, help="data config YAML (e.g. configs/data/digits.yaml)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokenizer-ckpt", help="genmodels tokenizer checkpoint (from `genmodels fit`)")
    src.add_argument("--official-kl16", help="official MAR kl16.ckpt")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--splits", nargs="+", default=["train", "val"], choices=SPLITS)
    ap.add_argument("--no-flip", action="store_true", help="do not cache horizontal flips (e.g. digits)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=10000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.tokenizer_ckpt:
        from genmodels.tokenizers import load_tokenizer
        tokenizer = load_tokenizer(args.tokenizer_ckpt, field="--tokenizer-ckpt")
    else:
        from genmodels.checkpoints import from_official
        tokenizer = from_official("mar-kl", args.official_kl16)
    dm = _load_data_config(args.data)
    out = cache_latents(tokenizer, dm, args.out, splits=args.splits, flip=not args.no_flip,
                        batch_size=args.batch_size, shard_size=args.shard_size, device=args.device)
    print(f"cached latents in {out}")


if __name__ == "__main__":
    main()
