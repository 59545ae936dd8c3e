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


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) float in [-1, 1] -> (B, H, W, C) uint8 (NHWC, as ADM .npz files)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu()


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
