"""The embedded default data: scikit-learn's handwritten digits (UCI optdigits test set).

1797 grey images, 8x8, values 0..16, 10 classes; the file ships inside scikit-learn, so
nothing is downloaded. Upsampled to ``image_size``, quantised to uint8 like any real image
data set (so real and generated images live on the same 8-bit grid), stored once per process.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from genmodels.data.base import ImageDataModule, UInt8ImageDataset

SPLIT_SEED = 0  # the split is part of the data set's definition, never the training seed
NUM_VAL = NUM_TEST = 180  # -> 1437 / 180 / 180, stratified by class


@functools.lru_cache(maxsize=4)
def digits_tensors(image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """All digits as uint8 (1797, 1, S, S) (background 0), int64 labels (1797,), and the
    split -> indices map (stratified, fixed seed)."""
    from sklearn.datasets import load_digits  # lazy: importing sklearn costs ~1 s
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    # Bicubic gives smooth strokes with sharper edges than bilinear (nearest keeps the 8x8
    # blocks); its small overshoot is clamped, so the background stays exactly 0 (-> -1).
    # antialias only matters when downsampling (image_size < 8).
    x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False, antialias=True)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    labels = torch.tensor(digits.target, dtype=torch.int64)

    idx = torch.arange(len(labels)).numpy()
    rest, test = train_test_split(idx, test_size=NUM_TEST, stratify=digits.target, random_state=SPLIT_SEED)
    train, val = train_test_split(rest, test_size=NUM_VAL, stratify=digits.target[rest], random_state=SPLIT_SEED)
    splits = {name: torch.as_tensor(sorted(s)) for name, s in (("train", train), ("val", val), ("test", test))}
    return images, labels, splits


class DigitsDataModule(ImageDataModule):
    """scikit-learn digits, 10 classes, split 1437 / 180 / 180. No augmentation (digits are
    not mirror-symmetric). Args: see ``ImageDataModule``."""

    def __init__(self, batch_size: int = 64, num_workers: int = 0, seed: int = 0, image_size: int = 32,
                 eval_batch_size: int | None = None, predict_num_samples: int = 100, drop_last: bool = True,
                 pin_memory: bool = False) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, image_size=image_size,
                         eval_batch_size=eval_batch_size, predict_num_samples=predict_num_samples,
                         drop_last=drop_last, pin_memory=pin_memory)
        self.save_hyperparameters()

    @property
    def num_classes(self) -> int:
        return 10

    @property
    def class_names(self) -> list[str]:
        return [str(i) for i in range(10)]

    @property
    def dataset_id(self) -> str:
        return f"digits-{self.image_size}"

    def _make_dataset(self, split: str, augment: bool) -> UInt8ImageDataset:
        images, labels, splits = digits_tensors(self.image_size)
        idx = splits[split]
        return UInt8ImageDataset(images[idx], labels[idx], flip=False)
