"""Reference statistics of real data: the cache and the ADM ``.npz`` format.

A ``Reference`` holds the real features (N, D) (for precision/recall) and the FID
statistics ``mu`` (D,), ``sigma`` (D, D) in float64. It is cached as an ``.npz`` named by
data set id, split, resolution, extractor and N (``cache_name``) under a cache folder:
``$GENMODELS_CACHE/reference`` or ``~/.cache/genmodels/reference`` unless the evaluator is
given ``cache_dir``.

ADM format (openai/guided-diffusion ``evaluations``): ``arr_0`` uint8 images (N, H, W, 3);
a reference batch such as ``VIRTUAL_imagenet256_labeled.npz`` also stores ``mu``/``sigma``
(pool_3 statistics over the whole ImageNet train set, the FID reference the papers use;
recomputing them from the 10,000 images in ``arr_0`` moves FID, guided-diffusion#166).
``write_adm_npz`` writes samples in that format for a cross-check with ADM's script.
"""
from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from genmodels.errors import GenmodelsError


@dataclass
class Reference:
    """Real-data side of the comparison. ``stored_statistics``: mu/sigma were read from a
    reference file rather than computed from ``features``."""

    features: torch.Tensor  # (N, D) float32
    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    source: str
    stored_statistics: bool = False

    @property
    def num_images(self) -> int:
        return int(self.features.shape[0])

    def save(self, path: str | Path, **meta: str) -> Path:
        """Atomic write (tmp file + rename), so concurrent readers never see half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, features=self.features.float().cpu().numpy(), mu=self.mu, sigma=self.sigma,
                 source=np.array(self.source), stored_statistics=np.array(self.stored_statistics),
                 **{f"meta_{k}": np.array(str(v)) for k, v in meta.items()})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Reference":
        path = Path(path)
        try:
            with np.load(path) as z:
                missing = {"features", "mu", "sigma"} - set(z.files)
                if missing:
                    raise ValueError(f"reference cache {path} lacks {sorted(missing)}; delete it to recompute")
                return cls(torch.from_numpy(z["features"]), z["mu"].astype(np.float64), z["sigma"].astype(np.float64),
                           str(z["source"]) if "source" in z.files else str(path),
                           bool(z["stored_statistics"]) if "stored_statistics" in z.files else False)
        except (zipfile.BadZipFile, EOFError, OSError) as e:
            raise ValueError(f"reference cache {path} is unreadable ({e}); delete it to recompute") from e


def default_cache_dir() -> Path:
    root = os.environ.get("GENMODELS_CACHE")
    return Path(root) / "reference" if root else Path.home() / ".cache" / "genmodels" / "reference"


def cache_name(dataset_id: str, split: str, resolution: int | str, extractor: str, num_images: int | str) -> str:
    """``{dataset_id}_{split}_{resolution}px_{extractor}_n{N}.npz`` (unsafe characters -> ``-``)."""
    parts = [dataset_id, split, f"{resolution}px", extractor, f"n{num_images}"]
    return "_".join(re.sub(r"[^A-Za-z0-9.+-]", "-", str(p)) for p in parts) + ".npz"


# ---------------------------------------------------------------------------- ADM files
def read_adm_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``(images uint8 (N, H, W, 3), mu or None, sigma or None)`` from an ADM-format npz."""
    path = Path(path)
    if not path.is_file():
        raise GenmodelsError(f"reference npz not found: {path} (for ImageNet 256 download "
                             "VIRTUAL_imagenet256_labeled.npz from openai/guided-diffusion's evaluations README)")
    try:
        z = np.load(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise GenmodelsError(f"{path} is not a readable .npz file ({e})") from e
    with z:
        if "arr_0" not in z.files:
            raise GenmodelsError(f"{path}: ADM reference npz needs 'arr_0' (uint8 images N x H x W x 3), has {z.files}")
        images = z["arr_0"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise GenmodelsError(f"{path}: arr_0 must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        mu = z["mu"].astype(np.float64) if "mu" in z.files else None
        sigma = z["sigma"].astype(np.float64) if "sigma" in z.files else None
    if (mu is None) != (sigma is None):
        raise GenmodelsError(f"{path}: has only one of 'mu' / 'sigma'")
    if mu is not None and (mu.ndim != 1 or sigma.shape != (len(mu), len(mu))):
        raise GenmodelsError(f"{path}: mu {mu.shape} / sigma {sigma.shape} are not (D,) / (D, D)")
    return images, mu, sigma


def nhwc_uint8_to_images(arr: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1] (inverse of ``to_uint8``)."""
    x = torch.as_tensor(arr)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def write_adm_npz(path: str | Path, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """Samples as ADM expects them: ``arr_0`` uint8 (N, H, W, 3) (+ ``arr_1`` labels)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"write_adm_npz: images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": np.asarray(labels)}
    np.savez(path, **arrays)
    return path
