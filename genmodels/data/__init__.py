"""LightningDataModules: batches ``(images float32 (B, 3, H, W) in [-1, 1], labels int64 (B,))``."""
from genmodels.data.base import (EpochSeededSampler, ImageDataModule, ResumableDataLoader, UInt8ImageDataset,
                                 balanced_labels)
from genmodels.data.cifar10 import CIFAR10DataModule
from genmodels.data.digits import DigitsDataModule
from genmodels.data.image_folder import ImageFolderDataModule, ImageFolderDataset, center_crop_arr

__all__ = [
    "CIFAR10DataModule", "DigitsDataModule", "EpochSeededSampler", "ImageDataModule", "ImageFolderDataModule",
    "ImageFolderDataset", "ResumableDataLoader", "UInt8ImageDataset", "balanced_labels", "center_crop_arr",
]
