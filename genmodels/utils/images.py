"""Image helpers: [-1, 1] float <-> uint8, grids and PNGs.

Written here rather than taken from torchvision: torchvision has no CPU build on our
CI machines and breaks torchmetrics once installed (see DESIGN.md).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def quantize_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) float in [-1, 1] -> (B, C, H, W) uint8, ``round((x + 1) * 127.5)``: THE one
    float -> 8-bit rule (what a PNG or an ADM .npz stores), on the input's device."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) float in [-1, 1] -> (B, H, W, C) uint8 on the CPU (NHWC, as ADM .npz files)."""
    return quantize_uint8(images).permute(0, 2, 3, 1).cpu()


def write_adm_npz(path: str | Path, images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray | None = None
                  ) -> Path:
    """Write samples as the ADM evaluator (guided-diffusion ``evaluator.py``) reads them:
    ``arr_0`` uint8 (N, H, W, 3) (+ ``arr_1`` int64 labels). The one ``.npz`` writer of genmodels.

    ``images``: a uint8 numpy array (N, H, W, 3), a uint8 tensor (N, 3, H, W) (e.g. from
    ``Pipeline.sample_block``) or a float tensor (N, 3, H, W) in [-1, 1] (``quantize_uint8``).
    """
    if isinstance(images, torch.Tensor):
        if images.is_floating_point():
            images = quantize_uint8(images)
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"write_adm_npz: a tensor must be (N, 3, H, W) float or uint8, got {images.dtype} "
                             f"{tuple(images.shape)}")
        images = images.permute(0, 2, 3, 1).cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"write_adm_npz: images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"arr_0": np.ascontiguousarray(images)}
    if labels is not None:
        labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if len(labels) != len(images):
            raise ValueError(f"write_adm_npz: {len(images)} images but {len(labels)} labels")
        arrays["arr_1"] = labels.astype(np.int64)
    np.savez(path, **arrays)
    return path


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """Tile (B, C, H, W) images into one (C, H', W') image, ``nrow`` images per row."""
    b, c, h, w = images.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(b))))
    ncol = int(math.ceil(b / nrow))
    grid = images.new_full((c, ncol * (h + padding) + padding, nrow * (w + padding) + padding), pad_value)
    for i in range(b):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, y:y + h, x:x + w] = images[i]
    return grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 1) -> Path:
    """Save (B, C, H, W) images in [-1, 1] as one PNG grid; returns the path."""
    grid = to_uint8(make_grid(images.float(), nrow=nrow)[None])[0].numpy()
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def save_pngs(images: torch.Tensor, folder: str | Path, indices: torch.Tensor | list[int] | None = None,
              labels: torch.Tensor | None = None) -> list[Path]:
    """Save each image of (B, C, H, W) in [-1, 1] as ``{index:06d}[_class{label}].png``
    (``indices`` default to 0..B-1)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arr = to_uint8(images).numpy()
    paths = []
    for i, a in enumerate(arr):
        name = f"{int(indices[i]) if indices is not None else i:06d}" + (f"_class{int(labels[i])}" if labels is not None else "") + ".png"
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(folder / name)
        paths.append(folder / name)
    return paths


def load_png(path: str | Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))
