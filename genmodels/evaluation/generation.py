"""Generation and feature extraction of the judge, sharded over ranks, gathered exactly once.

The generation interface (shared with ``genmodels.pipeline``)::

    sample_block(class_id: int, block: int) -> uint8 images (S, 3, H, W)

returns block ``block`` of class ``class_id``, i.e. that class's per-class sample indices
``[block * S, (block + 1) * S)``, where ``S`` is the ``block_size`` the caller gives with it.
It seeds itself from ``(seed, class_id, block)`` only (``genmodels.pipeline.seed_for``), so a sample depends on
its class and index, never on the rank or the number of ranks. Unconditional models: class 0,
``num_classes`` 1.

The judge (``SamplingPlan``) fixes everything else:
* how many samples of each class: ``n_c = N // C`` (+1 for the first ``N % C`` classes);
* the fixed list of ``(class, block)`` pairs, block-major: ``(0, 0), (1, 0), ..., (C-1, 0),
  (0, 1), ...``; rank ``r`` of ``W`` generates pairs ``r, r + W, r + 2W, ...`` (round robin);
* the first ``n_c`` images of each class are kept (the last block may be cut);
* the sample order: sample ``j`` of class ``c`` sits at the place of ``(j, c)`` in
  lexicographic order, i.e. sample ``i`` has class ``i % C`` when ``C`` divides ``N`` (every
  prefix, hence every IS split, is class-balanced; the ADM protocol's 50 per class);
* features are extracted where the images were made (float32, autocast off) and gathered to
  rank 0 once (``torch.distributed.gather_object``), with the images too when exported.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from genmodels.evaluation.features import Extracted, FeatureExtractor
from genmodels.utils.images import quantize_uint8
from genmodels.utils.progress import progress as progress_bar

SampleBlock = Callable[[int, int], torch.Tensor]


# ---------------------------------------------------------------------------- ranks
def dist_info() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without an initialised process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_to_zero(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0 (``None`` elsewhere): the one gather."""
    rank, world = dist_info()
    if world == 1:
        return [obj]
    out = [None] * world if rank == 0 else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


def broadcast_from_zero(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if dist_info()[1] == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class SamplingPlan:
    """N class-balanced samples of C classes in blocks of S (see the module docstring)."""

    num_samples: int
    num_classes: int
    block_size: int

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.num_classes < 1 or self.block_size < 1:
            raise ValueError(f"SamplingPlan: num_samples, num_classes and block_size must be >= 1, got "
                             f"{self.num_samples}, {self.num_classes}, {self.block_size}")

    @property
    def per_class(self) -> list[int]:
        """``n_c`` samples of class ``c``."""
        q, r = divmod(self.num_samples, self.num_classes)
        return [q + (1 if c < r else 0) for c in range(self.num_classes)]

    @property
    def blocks(self) -> list[tuple[int, int]]:
        """The fixed list of ``(class, block)`` pairs, block-major."""
        n_c = self.per_class
        most = -(-max(n_c) // self.block_size)
        return [(c, b) for b in range(most) for c in range(self.num_classes) if b * self.block_size < n_c[c]]

    def blocks_of(self, rank: int, world: int) -> list[tuple[int, int]]:
        return self.blocks[rank::world]

    def labels(self) -> np.ndarray:
        """Class of each sample in the judge's order (N,)."""
        return np.concatenate([np.full(n, c) for c, n in enumerate(self.per_class)])[self.order()]

    def order(self) -> np.ndarray:
        """Permutation taking the class-major concatenation (class 0's n_0 samples, then class 1's,
        ...) to the judge's order (``(j, c)`` lexicographic)."""
        keys = np.concatenate([np.arange(n, dtype=np.int64) * self.num_classes + c
                               for c, n in enumerate(self.per_class)])
        return np.argsort(keys, kind="stable")


# ---------------------------------------------------------------------------- extraction
def uint8_to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [-1, 1] (exactly invertible by rounding)."""
    return images.float() / 127.5 - 1.0


@torch.no_grad()
def extract(extractor: FeatureExtractor, images: torch.Tensor) -> Extracted:
    """Features of uint8 images (B, 3, H, W), float32, autocast off, checked finite."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"the judge extracts features of uint8 images (B, 3, H, W), got {images.dtype} "
                         f"{tuple(images.shape)}")
    with torch.autocast(device_type=images.device.type, enabled=False):
        out = extractor.extract(uint8_to_unit(images))
    if not torch.isfinite(out.features).all():
        raise ValueError(f"feature extractor {extractor.name} gave non-finite features")
    return Extracted(*(None if t is None else t.float().cpu() for t in out))


def _stack(parts: Sequence[Extracted | None], i: int) -> np.ndarray | None:
    vals = [p[i] for p in parts]
    return None if vals[0] is None else torch.cat(vals).numpy()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate_and_extract(sample_block: SampleBlock, plan: SamplingPlan, extractor: FeatureExtractor,
                         device: torch.device | str = "cpu", keep_images: bool = False, autocast: str | None = None,
                         progress: bool = True) -> dict[str, Any] | None:
    """This rank's blocks of ``plan`` -> features; rank 0 gets all N in the judge's order:
    ``{"features" (N, D), "logits" (N, K) | None, "spatial" (N, S) | None, "labels" (N,),
    "images" (N, H, W, 3) uint8 | None, "seconds" (sampling time summed over ranks)}``;
    other ranks get ``None``."""
    rank, world = dist_info()
    device = torch.device(device)
    extractor.to(device)
    amp = (torch.autocast(device.type, dtype=torch.bfloat16 if autocast == "bf16" else torch.float16)
           if autocast else nullcontext())
    n_c = plan.per_class
    mine = plan.blocks_of(rank, world)
    bar = progress_bar(plan.num_samples, "sampling + features", enabled=progress and rank == 0)
    results: dict[tuple[int, int], tuple[Extracted, np.ndarray | None]] = {}
    seconds = 0.0
    for c, b in mine:
        _sync(device)
        t0 = time.perf_counter()
        with amp:
            images = sample_block(c, b)
        _sync(device)
        seconds += time.perf_counter() - t0
        if (not torch.is_tensor(images) or images.dtype != torch.uint8 or images.ndim != 4
                or images.shape[0] != plan.block_size or images.shape[1] != 3):
            got = f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"sample_block({c}, {b}) must return uint8 images ({plan.block_size}, 3, H, W), got {got}")
        keep = min(plan.block_size, n_c[c] - b * plan.block_size)
        images = images[:keep].to(device)
        out = extract(extractor, images)
        results[(c, b)] = (out, images.permute(0, 2, 3, 1).cpu().numpy() if keep_images else None)
        bar.update(keep * world)
    bar.close()
    gathered = gather_to_zero((results, seconds))
    if gathered is None:
        return None
    merged: dict[tuple[int, int], tuple[Extracted, np.ndarray | None]] = {}
    for part, _ in gathered:
        merged.update(part)
    if len(merged) != len(plan.blocks):
        raise RuntimeError(f"the judge gathered {len(merged)} blocks, expected {len(plan.blocks)}")
    # class-major concatenation (class c: blocks 0, 1, ...), then the judge's order
    pairs = sorted(merged)
    parts = [merged[p][0] for p in pairs]
    order = plan.order()
    out: dict[str, Any] = {}
    for i, key in enumerate(("features", "logits", "spatial")):
        arr = _stack(parts, i)
        out[key] = None if arr is None else arr[order]
    if len(out["features"]) != plan.num_samples:
        raise RuntimeError(f"the judge gathered {len(out['features'])} samples, expected {plan.num_samples}")
    out["labels"] = plan.labels()
    out["images"] = np.concatenate([merged[p][1] for p in pairs])[order] if keep_images else None
    out["seconds"] = float(sum(s for _, s in gathered))
    return out


@torch.no_grad()
def extract_images(images: Any, extractor: FeatureExtractor, num: int | None = None, batch_size: int = 100,
                   device: torch.device | str = "cpu", transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   progress: bool = True, what: str = "features") -> dict[str, Any] | None:
    """Features of ``images[0:num]`` sharded over ranks, gathered to rank 0 in index order
    (``None`` on other ranks). ``images``: a uint8 array (N, H, W, 3), or a dataset whose items
    are images in [-1, 1] (3, H, W) or ``(image, label)`` pairs. Each rank reads only the
    batches it owns (``range(0, num, batch_size)``, round robin), whatever a trainer's sampler
    does. ``transform`` maps float images in [-1, 1] first (e.g. a tokenizer round trip)."""
    rank, world = dist_info()
    device = torch.device(device)
    extractor.to(device)
    n = len(images) if num is None else min(int(num), len(images))
    starts = list(range(0, n, batch_size))
    bar = progress_bar(n, what, enabled=progress and rank == 0)
    results: dict[int, Extracted] = {}
    for s in starts[rank::world]:
        e = min(n, s + batch_size)
        if isinstance(images, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(images[s:e])).permute(0, 3, 1, 2)
        else:
            items = [images[i] for i in range(s, e)]
            x = torch.stack([it[0] if isinstance(it, (tuple, list)) else it for it in items])
        x = x.to(device)
        if transform is not None:
            x = transform(x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x).clamp(-1, 1)
        if x.dtype != torch.uint8:  # [-1, 1] -> uint8 as a PNG stores it
            x = quantize_uint8(x)
        results[s] = extract(extractor, x)
        bar.update((e - s) * world)
    bar.close()
    gathered = gather_to_zero(results)
    if gathered is None:
        return None
    merged: dict[int, Extracted] = {}
    for part in gathered:
        merged.update(part)
    parts = [merged[s] for s in starts]
    out = {key: _stack(parts, i) for i, key in enumerate(("features", "logits", "spatial"))} if parts else {}
    out["num"] = n
    return out
