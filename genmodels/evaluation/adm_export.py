"""The ADM file format (openai/guided-diffusion ``evaluations``) and image folders.

``arr_0``: uint8 images (N, H, W, 3); optional ``arr_1``: labels (N,). A reference batch such
as ``VIRTUAL_imagenet256_labeled.npz`` also stores ``mu``/``sigma`` (pool_3 statistics over the
whole ImageNet train set) and ``mu_s``/``sigma_s`` (``mixed_6/conv`` spatial statistics, sFID):
the FID references the papers use (recomputing them from the 10,000 images moves FID,
guided-diffusion#166). ``write_adm_npz`` writes samples in that format for a cross-check with
ADM's own script.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from genmodels.errors import GenmodelsError
from genmodels.utils.images import write_adm_npz  # the one ADM .npz writer (re-exported here)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def read_adm_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``(images uint8 (N, H, W, 3), mu or None, sigma or None)`` from an ADM-format npz."""
    images, stats, _ = read_adm_npz_all(path)
    return images, stats.get("mu"), stats.get("sigma")


def read_adm_npz_all(path: str | Path) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray | None]:
    """``(images uint8 (N, H, W, 3), {mu, sigma, mu_s, sigma_s} present in the file, labels | None)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz not found: {path} (for ImageNet 256 download VIRTUAL_imagenet256_labeled.npz "
                                "from openai/guided-diffusion's evaluations README)")
    try:
        z = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise GenmodelsError(f"{path} is not a readable .npz file ({e})") from e
    with z:
        if "arr_0" not in z.files:
            raise GenmodelsError(f"{path}: an ADM npz needs 'arr_0' (uint8 images N x H x W x 3), has {z.files}")
        images = z["arr_0"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise GenmodelsError(f"{path}: arr_0 must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        stats = {k: z[k].astype(np.float64) for k in ("mu", "sigma", "mu_s", "sigma_s") if k in z.files}
        labels = z["arr_1"] if "arr_1" in z.files else None
    for m, s in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if (m in stats) != (s in stats):
            raise GenmodelsError(f"{path}: has only one of '{m}' / '{s}'")
        if m in stats and (stats[m].ndim != 1 or stats[s].shape != (len(stats[m]), len(stats[m]))):
            raise GenmodelsError(f"{path}: {m} {stats[m].shape} / {s} {stats[s].shape} are not (D,) / (D, D)")
    return images, stats, labels


def read_image_dir(path: str | Path) -> np.ndarray:
    """All images of a folder (sorted by file name) as uint8 (N, H, W, 3)."""
    from PIL import Image

    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise GenmodelsError(f"--samples {path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    arrays = []
    for f in files:
        with Image.open(f) as im:
            arrays.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise GenmodelsError(f"--samples {path}: images of different sizes {sorted(shapes)[:3]}")
    return np.stack(arrays)


def nhwc_uint8_to_images(arr: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1] (inverse of ``to_uint8``)."""
    x = torch.as_tensor(arr)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


