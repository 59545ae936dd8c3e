"""The real-data side of the judge: resolve a reference, compute it once, cache it by content.

A ``Reference`` holds the real features (N, D) (precision/recall) and the FID statistics
``mu`` (D,), ``sigma`` (D, D) in float64, plus the spatial statistics ``mu_s`` / ``sigma_s``
for sFID when the extractor has spatial features. Sources:

* an ADM reference ``.npz`` (``reference_from_npz``): FID / sFID against the file's stored
  ``mu``/``sigma`` and ``mu_s``/``sigma_s`` (when their dimensions match the extractor's),
  precision/recall against the features of its ``arr_0`` images;
* a data set (``reference_from_dataset``): e.g. ``datamodule.reference_dataset("train")``.

Features are computed sharded over ranks, each rank reading only the indices it owns, once
(``generation.extract_images``), whatever sampler a trainer uses. Rank 0 holds the result
(other ranks get ``Reference.elsewhere()``: scoring happens on rank 0).

Caches are keyed by content (``cache_key``): a sha256 of the reference's content (the
``.npz`` file's bytes, or the data set id + split + length), the extractor's name, weights
digest and dtype, the resolution and N. A different file with the same name, other extractor
weights, another N never reuse a stale cache. Folder: ``cache_dir`` or
``$GENMODELS_CACHE/reference`` or ``~/.cache/genmodels/reference``.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genmodels.errors import GenmodelsError
from genmodels.evaluation.adm_export import read_adm_npz_all
from genmodels.evaluation.features import FeatureExtractor
from genmodels.evaluation.generation import broadcast_from_zero, dist_info, extract_images
from genmodels.evaluation.metrics import feature_statistics

__all__ = ["Reference", "cache_key", "default_cache_dir", "file_digest", "reference_from_dataset", "reference_from_npz"]


@dataclass
class Reference:
    """Real-data side of the comparison. ``stored_statistics`` / ``stored_spatial``: the FID /
    sFID statistics were read from a reference file rather than computed from images."""

    features: torch.Tensor  # (N, D) float32
    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    source: str
    stored_statistics: bool = False
    mu_s: np.ndarray | None = None  # (S,) spatial statistics (sFID)
    sigma_s: np.ndarray | None = None
    stored_spatial: bool = False
    key: str | None = None  # content key of the cache entry
    dataset: str | None = None  # names the real data in rows / tables (data set id, or adm-<file stem>)

    @classmethod
    def elsewhere(cls) -> "Reference":
        """What ranks other than 0 hold: scoring happens on rank 0, which has the reference."""
        return cls(torch.zeros(0, 0), np.zeros(0), np.zeros((0, 0)), "held by rank 0")

    @property
    def num_images(self) -> int:
        return int(self.features.shape[0])

    def save(self, path: str | Path, **meta: str) -> Path:
        """Atomic write (tmp file + rename), so concurrent readers never see half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        extra = {} if self.mu_s is None else {"mu_s": self.mu_s, "sigma_s": self.sigma_s}
        np.savez(tmp, features=self.features.float().cpu().numpy(), mu=self.mu, sigma=self.sigma,
                 source=np.array(self.source), key=np.array(self.key or ""), **extra,
                 **{f"meta_{k}": np.array(str(v)) for k, v in meta.items()})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Reference":
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = {"features", "mu", "sigma"} - set(z.files)
                if missing:
                    raise GenmodelsError(f"reference cache {path} lacks {sorted(missing)}; delete it to recompute")
                has_s = "mu_s" in z.files
                return cls(torch.from_numpy(z["features"]), z["mu"].astype(np.float64), z["sigma"].astype(np.float64),
                           str(z["source"]) if "source" in z.files else str(path),
                           mu_s=z["mu_s"].astype(np.float64) if has_s else None,
                           sigma_s=z["sigma_s"].astype(np.float64) if has_s else None,
                           key=str(z["key"]) if "key" in z.files else None)
        except (zipfile.BadZipFile, EOFError, OSError) as e:
            raise GenmodelsError(f"reference cache {path} is unreadable ({e}); delete it to recompute") from e


def default_cache_dir() -> Path:
    root = os.environ.get("GENMODELS_CACHE")
    return Path(root) / "reference" if root else Path.home() / ".cache" / "genmodels" / "reference"


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (memoised per path, size and mtime in this process)."""
    p = Path(path).resolve()
    st = p.stat()
    memo = (str(p), st.st_size, st.st_mtime_ns)
    if memo not in _DIGESTS:
        h = hashlib.sha256()
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _DIGESTS[memo] = h.hexdigest()
    return _DIGESTS[memo]


def cache_key(content: str, extractor: FeatureExtractor, resolution: Any, num_images: int) -> str:
    """sha256 (first 20 hex digits) of the content id, extractor key (name, weights digest,
    dtype), resolution and N."""
    blob = json.dumps({"content": content, "extractor": extractor.cache_key(), "resolution": str(resolution),
                       "n": int(num_images), "version": 2}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _cache_path(cache_dir: str | Path | None, label: str, key: str) -> Path | None:
    if cache_dir == "off":
        return None
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    safe = "".join(ch if ch.isalnum() or ch in ".+-" else "-" for ch in label)[:60]
    return folder / f"{safe}_{key}.npz"


def _cached(path: Path | None, key: str) -> tuple[bool, Reference | None]:
    """Rank 0 loads the cache entry if present; every rank learns whether it was found."""
    ref = None
    if dist_info()[0] == 0 and path is not None and path.is_file():
        ref = Reference.load(path)
        if ref.key != key:  # a foreign file under our name: recompute
            ref = None
    return bool(broadcast_from_zero(ref is not None)), ref


def _from_features(out: dict, source: str, key: str) -> Reference:
    if len(out["features"]) < 2:
        raise GenmodelsError(f"reference {source} has {len(out['features'])} images; need at least 2")
    mu, sigma = feature_statistics(out["features"])
    mu_s = sigma_s = None
    if out.get("spatial") is not None:
        mu_s, sigma_s = feature_statistics(out["spatial"])
    return Reference(torch.from_numpy(out["features"]), mu, sigma, source, mu_s=mu_s, sigma_s=sigma_s, key=key)


def reference_from_npz(path: str | Path, extractor: FeatureExtractor, num_reference: int | None = None,
                       cache_dir: str | Path | None = None, batch_size: int = 100, device: Any = "cpu",
                       progress: bool = True) -> Reference:
    """ADM reference batch -> ``Reference`` on rank 0 (``Reference.elsewhere()`` on others); see the module doc."""
    path = Path(path).expanduser()
    rank = dist_info()[0]
    images = stats = head = None
    if rank == 0:  # only rank 0 reads and digests the file unless features must be computed
        try:
            images, stats, _ = read_adm_npz_all(path)
            n = len(images) if num_reference is None else min(int(num_reference), len(images))
            head = (n, cache_key(f"npz:{file_digest(path)}", extractor, images.shape[1], n))
        except Exception as e:  # every rank raises it (no rank left waiting)
            head = e
    head = broadcast_from_zero(head)
    if isinstance(head, Exception):
        raise head
    n, key = head
    cpath = _cache_path(cache_dir, f"adm-{path.stem}", key)
    found, ref = _cached(cpath, key)
    if not found:
        if images is None:
            images = read_adm_npz_all(path)[0]
        out = extract_images(images, extractor, n, batch_size, device, progress=progress, what="reference features")
        if out is None:
            return Reference.elsewhere()
        ref = _from_features(out, f"{path} (arr_0[:{n}])", key)
        if cpath is not None:  # rank 0
            ref.save(cpath, source_file=str(path), extractor=extractor.cache_key())
    if rank != 0:
        return Reference.elsewhere()
    ref.source, ref.dataset = f"{path} (arr_0[:{n}])", f"adm-{path.stem}"
    d = ref.features.shape[1]
    if "mu" in stats and len(stats["mu"]) == d:
        ref.mu, ref.sigma, ref.stored_statistics = stats["mu"], stats["sigma"], True
        ref.source = f"{path} (stored mu/sigma; arr_0[:{n}] for P/R)"
    if "mu_s" in stats and ref.mu_s is not None and len(stats["mu_s"]) == len(ref.mu_s):
        ref.mu_s, ref.sigma_s, ref.stored_spatial = stats["mu_s"], stats["sigma_s"], True
    return ref


def reference_from_dataset(dataset: Any, content_id: str, extractor: FeatureExtractor, resolution: Any = None,
                           num_reference: int | None = None, cache_dir: str | Path | None = None,
                           batch_size: int = 100, device: Any = "cpu", progress: bool = True) -> Reference:
    """Features of ``dataset[0:num_reference]`` (items ``(image, label)`` or images in [-1, 1])
    -> ``Reference`` on rank 0 (``Reference.elsewhere()`` on others). ``content_id`` names the data (e.g.
    ``"digits-32:train"``); it is part of the cache key with ``len(dataset)``."""
    n = len(dataset) if num_reference is None else min(int(num_reference), len(dataset))
    key = cache_key(f"dataset:{content_id}:len{len(dataset)}", extractor, resolution, n)
    cpath = _cache_path(cache_dir, content_id, key)
    found, ref = _cached(cpath, key)
    if not found:
        out = extract_images(dataset, extractor, n, batch_size, device, progress=progress, what="reference features")
        if out is None:
            return Reference.elsewhere()
        ref = _from_features(out, f"{content_id}[:{n}]", key)
        if cpath is not None:  # rank 0
            ref.save(cpath, extractor=extractor.cache_key())
    if dist_info()[0] != 0:
        return Reference.elsewhere()
    ref.dataset = content_id.rsplit(":", 1)[0]
    return ref
