"""Base of every image LightningDataModule in genmodels.

Batches are ``(images, labels)``: images float32 (B, 3, H, W) in [-1, 1], labels int64 (B,).
Predict batches are ``(labels, indices)``, both int64 (B,): the class-balanced labels of the
samples to generate and their global sample index (so sample ``i`` is seeded and named the
same way however the work is batched or sharded).

Subclasses implement ``_make_dataset(split, augment)`` (``split`` in train/val/test),
``num_classes`` and ``dataset_id``; the base builds the dataloaders.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from genmodels.errors import GenmodelsError

SPLITS = ("train", "val", "test")


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """(n,) int64 labels ``i % num_classes``: every prefix is as class-balanced as it can be."""
    if num_classes < 1:
        raise ValueError(f"balanced_labels: num_classes must be >= 1, got {num_classes}")
    return torch.arange(n, dtype=torch.int64) % num_classes


class EpochSeededSampler(Sampler[int]):
    """Random permutation of ``range(num_items)`` that depends only on ``(seed, epoch)``.

    ``augment_seeds=True``: yield ``(index, seed)`` pairs instead, a seed per sample for its
    augmentation draws (see ``augment_key``); datasets that set ``accepts_augment_seeds`` take them.

    Lightning calls ``set_epoch(epoch)`` before every training epoch (and forwards it through
    its ``DistributedSamplerWrapper`` under DDP), so a run resumed from an end-of-epoch
    checkpoint sees exactly the batches an uninterrupted run sees. Independent of the global
    RNG, unlike ``RandomSampler``.
    """

    def __init__(self, num_items: int, seed: int = 0, augment_seeds: bool = False) -> None:
        self.num_items, self.seed, self.epoch = int(num_items), int(seed), 0
        self.augment_seeds = augment_seeds

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self) -> Iterator[int]:
        # SeedSequence mixes (seed, epoch) so that e.g. (0, 1) and (1, 0) give unrelated orders.
        state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(2, dtype=np.uint32)
        g = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        order = torch.randperm(self.num_items, generator=g).tolist()
        if not self.augment_seeds:
            return iter(order)
        seeds = torch.randint(0, 2 ** 62, (self.num_items,), generator=g).tolist()
        return iter(zip(order, seeds))


def augment_key(key: int | tuple[int, int]) -> tuple[int, torch.Generator | None]:
    """A dataset key -> (index, generator of this sample's augmentation draws).

    A key is an index, or ``(index, seed)`` from ``EpochSeededSampler(augment_seeds=True)``:
    then flips, crops and noise depend only on (seed, epoch, position), not on the global
    RNG, a DataLoader worker's seed or where a run was resumed. With a plain index the
    draws come from torch's global RNG (``None``).
    """
    if isinstance(key, (tuple, list)):
        return int(key[0]), torch.Generator().manual_seed(int(key[1]))
    return int(key), None


class ResumableDataLoader(DataLoader):
    """A training ``DataLoader`` that resumes mid-epoch exactly where a checkpoint left it.

    Lightning saves the ``state_dict()`` of a loader that has one (the ``Stateful`` protocol)
    in the checkpoint's ``loops`` section and calls ``load_state_dict`` on resume, before the
    first batch. The state is the epoch and the number of batches handed out in it; on
    resume the loader skips that many batches of *indices* (cheap: no image is read), so
    with the epoch-seeded order (``EpochSeededSampler``) and per-step seeds the resumed run
    sees exactly the batches the uninterrupted run sees. Works with any sampler Lightning
    injects (e.g. its ``DistributedSamplerWrapper`` under DDP): the skip applies to this
    rank's batches. Lightning fetches without look-ahead when the loader has a length, so the
    count is the number of batches trained on.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._epoch = 0     # epoch of the batches being handed out
        self._yielded = 0   # batches handed out in that epoch (including skipped ones)
        self._skip = 0      # batches to skip at the next iteration (set by load_state_dict)
        self._skipping = 0  # the skip of the iterator being created (read by _index_sampler)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._epoch, done = int(state["epoch"]), int(state["batches"])
        self._skip = done if done < len(self) else 0  # an epoch-end checkpoint starts the next epoch afresh
        for sampler in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
            if hasattr(sampler, "set_epoch"):  # the order is fixed before Lightning's own set_epoch
                sampler.set_epoch(self._epoch)

    @property
    def _index_sampler(self):  # torch's DataLoader iterators draw the batches' indices from here
        index_sampler = super()._index_sampler
        return _Skipping(index_sampler, self) if self._skipping else index_sampler

    def __iter__(self):
        sampler = getattr(self.batch_sampler, "sampler", None) or self.sampler
        self._epoch = int(getattr(sampler, "epoch", self._epoch))
        self._skipping, self._skip = self._skip, 0
        try:
            iterator = super().__iter__()
        finally:
            self._yielded, self._skipping = self._skipping, 0
        for batch in iterator:
            self._yielded += 1
            yield batch


class _Skipping:
    """An index sampler without its first ``loader._skipping`` items (batches of indices): torch
    iterates it once or twice while creating the loader's iterator (the skip is set then), and
    again at each later epoch of a reused persistent-workers iterator (the skip is 0 then)."""

    def __init__(self, sampler, loader: ResumableDataLoader) -> None:
        self.sampler, self.loader = sampler, loader

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.loader._skipping, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.loader._skipping)


class UInt8ImageDataset(Dataset):
    """Images kept as uint8 (N, C, H, W) (C = 1 or 3) -> (float32 (3, H, W) in [-1, 1], int64 label).

    ``flip``: random horizontal flip with probability 1/2 (training augmentation), drawn
    from the key's seed (``augment_key``) or torch's global RNG.
    """

    accepts_augment_seeds = True

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, flip: bool = False) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be uint8 (N, 1|3, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.flip = images, labels.long(), flip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        i, g = augment_key(key)
        x = self.images[i].float() / 127.5 - 1.0
        x = x.expand(3, -1, -1) if x.shape[0] == 1 else x
        if self.flip and torch.rand((), generator=g) < 0.5:
            x = x.flip(-1)
        return x.contiguous(), self.labels[i]


class ImageDataModule(LightningDataModule):
    """Common dataloaders.

    Args:
        batch_size: training batch size (per device).
        num_workers: DataLoader workers (persistent when > 0).
        seed: seed of the training order (``EpochSeededSampler``); the train/val/test split
            never depends on it.
        image_size: side of the square images.
        eval_batch_size: batch size of val/test/predict (default: ``batch_size``).
        predict_num_samples: how many samples ``genmodels predict`` generates.
        drop_last: drop the last incomplete training batch.
        pin_memory: DataLoader ``pin_memory`` (useful on GPU).
    """

    def __init__(self, batch_size: int = 64, num_workers: int = 0, seed: int = 0, image_size: int = 32,
                 eval_batch_size: int | None = None, predict_num_samples: int = 100, drop_last: bool = True,
                 pin_memory: bool = False) -> None:
        super().__init__()
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise GenmodelsError(f"data.init_args.batch_size / eval_batch_size must be >= 1, got {batch_size} / "
                                 f"{eval_batch_size}")
        if image_size < 1:
            raise GenmodelsError(f"data.init_args.image_size must be >= 1, got {image_size}")
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self._image_size = image_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.predict_num_samples, self.drop_last, self.pin_memory = predict_num_samples, drop_last, pin_memory
        self._datasets: dict[tuple[str, bool], Dataset] = {}

    # ------------------------------------------------------------------ to implement
    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    @property
    def dataset_id(self) -> str:
        """Names the data (content, resolution, split recipe): a cache key for reference statistics."""
        raise NotImplementedError

    def _make_dataset(self, split: str, augment: bool) -> Dataset:
        raise NotImplementedError

    # ------------------------------------------------------------------ common
    @property
    def image_size(self) -> int:
        return self._image_size

    def dataset(self, split: str, augment: bool = False) -> Dataset:
        """The dataset of ``split`` (built once); ``augment`` turns on training augmentation."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        key = (split, augment)
        if key not in self._datasets:
            self._datasets[key] = self._make_dataset(split, augment)
        return self._datasets[key]

    def _nonempty(self, split: str, augment: bool = False) -> Dataset:
        """``dataset(split)``, refusing an empty split with a one-line error (an empty val split
        is allowed: it only skips validation, e.g. CIFAR-10 with ``val_size: 0``)."""
        ds = self.dataset(split, augment)
        if len(ds) == 0:
            raise GenmodelsError(f"{type(self).__name__}: the {split} split has 0 images; check the data folders / "
                                 "files and the split fields of data.init_args")
        return ds

    def reference_dataset(self, split: str) -> Dataset:
        """Real images of ``split`` without augmentation (reference features for FID etc.)."""
        return self.dataset(split, augment=False)

    def _loader(self, dataset: Dataset, batch_size: int, **kw) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0, **kw)

    def train_dataloader(self) -> DataLoader:
        ds = self._nonempty("train", augment=True)
        if self.drop_last and len(ds) < self.batch_size:
            raise GenmodelsError(f"{type(self).__name__}: the train split has {len(ds)} images, fewer than "
                                 f"batch_size={self.batch_size} with drop_last=True: no batch would be produced")
        sampler = EpochSeededSampler(len(ds), self.seed, augment_seeds=getattr(ds, "accepts_augment_seeds", False))
        return ResumableDataLoader(ds, batch_size=self.batch_size, sampler=sampler,
                                   drop_last=self.drop_last, num_workers=self.num_workers, pin_memory=self.pin_memory,
                                   persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"), self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._nonempty("test"), self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        n = self.predict_num_samples
        ds = TensorDataset(balanced_labels(n, self.num_classes), torch.arange(n, dtype=torch.int64))
        return DataLoader(ds, batch_size=self.eval_batch_size, shuffle=False)
