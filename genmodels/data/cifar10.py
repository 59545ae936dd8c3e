"""CIFAR-10 from the standard python-pickle folder ``cifar-10-batches-py``.

The folder (from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz) holds
``data_batch_1`` .. ``data_batch_5`` and ``test_batch``: pickles with ``b'data'``, uint8
(N, 3072), each row the R, G and B 32x32 planes in row-major order, and ``b'labels'``.
genmodels never downloads it.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.nn.functional as F

from genmodels.data.base import ImageDataModule, UInt8ImageDataset
from genmodels.errors import GenmodelsError

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
NOT_DOWNLOADED = ("genmodels does not download data: download cifar-10-python.tar.gz from "
                  "https://www.cs.toronto.edu/~kriz/cifar.html and extract it")


def find_cifar_folder(root: str | Path) -> Path:
    """``root`` itself or ``root/cifar-10-batches-py``, whichever holds the batch files."""
    root = Path(root).expanduser()
    for folder in (root, root / "cifar-10-batches-py"):
        if (folder / TEST_FILES[0]).is_file():
            return folder
    if not root.is_dir():
        raise GenmodelsError(f"CIFAR-10 folder {root} does not exist; {NOT_DOWNLOADED}")
    raise GenmodelsError(f"no CIFAR-10 batches (test_batch) in {root} nor in {root / 'cifar-10-batches-py'}; "
                         f"{NOT_DOWNLOADED}")


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch (dicts, bytes, lists, numpy arrays) and nothing else: a file
    that pickles any other callable is refused instead of run."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"pickles {module}.{name}, which a CIFAR-10 batch never holds "
                                         "(refused: unpickling it could run code)")
        return super().find_class(module, name)


def read_batches(folder: Path, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate pickled batches -> uint8 (N, 3, 32, 32) RGB, int64 (N,)."""
    images, labels = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise GenmodelsError(f"CIFAR-10 file {path} is missing; {NOT_DOWNLOADED}")
        try:
            with open(path, "rb") as f:
                batch = _BatchUnpickler(f, encoding="bytes").load()
            data, target = batch[b"data"], batch[b"labels"]
        except Exception as e:
            raise GenmodelsError(f"cannot read CIFAR-10 batch {path}: {type(e).__name__}: {e}") from None
        data = torch.as_tensor(data)
        if data.dtype != torch.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(target) != len(data):
            raise GenmodelsError(f"CIFAR-10 batch {path}: expected b'data' uint8 (N, 3072) and N labels, got "
                                 f"{data.dtype} {tuple(data.shape)} and {len(target)} labels")
        target = torch.as_tensor(target, dtype=torch.int64)
        if len(target) and (target.min() < 0 or target.max() > 9):
            raise GenmodelsError(f"CIFAR-10 batch {path}: labels outside 0..9")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(target)
    return torch.cat(images), torch.cat(labels)


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 train (minus ``val_size`` images) / val / test (the official 10k test batch).

    Args:
        root: the ``cifar-10-batches-py`` folder or its parent.
        val_size: images held out of the 50k training images for validation, chosen by a
            fixed permutation (``split_seed``), independent of the training ``seed``.
        split_seed: seed of that permutation.
        random_flip: random horizontal flips of training images.
        image_size: 32 is native; other sizes are bicubic-resized (antialiased) once.
        Others: see ``ImageDataModule``.
    """

    def __init__(self, root: str, val_size: int = 5000, split_seed: int = 0, random_flip: bool = True,
                 batch_size: int = 64, num_workers: int = 0, seed: int = 0, image_size: int = 32,
                 eval_batch_size: int | None = None, predict_num_samples: int = 100, drop_last: bool = True,
                 pin_memory: bool = False) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, image_size=image_size,
                         eval_batch_size=eval_batch_size, predict_num_samples=predict_num_samples,
                         drop_last=drop_last, pin_memory=pin_memory)
        self.save_hyperparameters()
        self.root, self.val_size, self.split_seed, self.random_flip = root, val_size, split_seed, random_flip
        self._tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def num_classes(self) -> int:
        return 10

    @property
    def class_names(self) -> list[str]:
        return list(CLASS_NAMES)

    @property
    def dataset_id(self) -> str:
        suffix = "" if (self.val_size, self.split_seed) == (5000, 0) else f"-val{self.val_size}-split{self.split_seed}"
        return f"cifar10-{self.image_size}{suffix}"

    def _load(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if self._tensors is None:
            folder = find_cifar_folder(self.root)
            train_x, train_y = read_batches(folder, TRAIN_FILES)
            test_x, test_y = read_batches(folder, TEST_FILES)
            if self.image_size != 32:
                train_x, test_x = (_resize(x, self.image_size) for x in (train_x, test_x))
            if not 0 <= self.val_size < len(train_x):
                raise GenmodelsError(f"data.init_args.val_size={self.val_size} must be in [0, {len(train_x)}) "
                                     f"(training images in {folder})")
            perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(self.split_seed))
            val_idx, train_idx = perm[:self.val_size].sort().values, perm[self.val_size:].sort().values
            self._tensors = {"train": (train_x[train_idx], train_y[train_idx]),
                             "val": (train_x[val_idx], train_y[val_idx]), "test": (test_x, test_y)}
        return self._tensors

    def setup(self, stage: str | None = None) -> None:
        self._load()

    def _make_dataset(self, split: str, augment: bool) -> UInt8ImageDataset:
        x, y = self._load()[split]
        return UInt8ImageDataset(x, y, flip=augment and self.random_flip)


def _resize(x: torch.Tensor, size: int, chunk: int = 1000) -> torch.Tensor:
    out = [F.interpolate(c.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=True)
           .round().clamp(0, 255).to(torch.uint8) for c in x.split(chunk)]
    return torch.cat(out)
