"""Class-conditional images in the ImageNet layout: ``root/<class name>/<image files>``.

Class index = position of the class folder name in the sorted list of the training
folder's class folders (ImageNet: synset ids n01440764.. -> 0..999, as torchvision's
ImageFolder and the official VAR / MAR / MaskGIT / FractalGen loaders).

Preprocessing (``preprocess``):
- ``"adm"`` (default): ADM's ``center_crop_arr`` (guided-diffusion, image_datasets.py), used by
  MAR and FractalGen: BOX-halve while the short side is >= 2x the target, BICUBIC resize so
  the short side equals the target, centre crop; no random crop.
- ``"resize_crop"``: torchvision-style ``Resize(short side = round(resize_ratio * size))`` with
  ``interpolation``, then ``RandomCrop`` (training, if ``random_crop``) or ``CenterCrop``.
  VAR (utils/data.py ``build_dataset``): resize_ratio 1.125, lanczos, random_flip False.
  TiTok (data/webdataset_reader.py ``ImageTransform``): resize_ratio 1.0, bicubic, random flip.
Random horizontal flips (``random_flip``) apply to training only.

Unreadable files: by default reading one raises an error naming it. With
``skip_corrupt=True`` the error is checked at read time (a scan at setup would decode every
image of ImageNet first): the bad file is reported with a warning and the next readable
file in the split is returned in its place, so a batch keeps its size and the epoch its
length, at the price of one image appearing twice.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from genmodels.data.base import ImageDataModule, augment_key
from genmodels.errors import GenmodelsError


class UnreadableImageError(GenmodelsError):
    """An image file that PIL cannot decode (see ``skip_corrupt``)."""

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # matched case-insensitively


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop: PIL image -> uint8 (image_size, image_size, C)."""
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


INTERPOLATIONS = {"bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS, "bilinear": Image.BILINEAR}


def resize_crop(image: Image.Image, image_size: int, resize_ratio: float = 1.125, interpolation: str = "lanczos",
                random_crop: bool = False, generator: torch.Generator | None = None) -> np.ndarray:
    """torchvision ``Resize(round(resize_ratio * image_size))`` (short side; long side truncated
    as torchvision does) + ``RandomCrop`` / ``CenterCrop(image_size)``: PIL -> uint8 (S, S, C)."""
    short = round(resize_ratio * image_size)
    w, h = image.size
    new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), resample=INTERPOLATIONS[interpolation])
    arr = np.asarray(image)
    if random_crop:
        top = int(torch.randint(0, new_h - image_size + 1, (), generator=generator))
        left = int(torch.randint(0, new_w - image_size + 1, (), generator=generator))
    else:
        top, left = int(round((new_h - image_size) / 2.0)), int(round((new_w - image_size) / 2.0))
    return arr[top:top + image_size, left:left + image_size]


def find_classes(root: Path, field: str = "data.init_args.train_dir") -> list[str]:
    """Sorted class folder names under ``root``; a ``GenmodelsError`` naming ``field`` for a
    missing / class-less folder."""
    if not root.exists():
        raise GenmodelsError(f"{field}: image folder {root} does not exist")
    if not root.is_dir():
        raise GenmodelsError(f"{field}: image folder {root} is not a directory")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise GenmodelsError(f"{field}: image folder {root} is empty (no class sub-folders); expected the layout "
                             f"{root}/<class name>/<images>")
    return classes


def scan_images(root: Path, classes: list[str], field: str = "data.init_args.train_dir") -> list[tuple[str, int]]:
    """(path, class index) for every image file of the class folders of ``root`` that are in
    ``classes``, sorted by class then file name (deterministic on any file system)."""
    found = find_classes(root, field)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise GenmodelsError(f"{field}: image folder {root} has class folders that the training folder lacks: "
                             f"{unknown[:5]}"
                             f"{' ...' if len(unknown) > 5 else ''}")
    index = {name: i for i, name in enumerate(classes)}
    samples, empty = [], []
    for name in found:
        files = sorted(e.name for e in os.scandir(root / name)
                       if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
        if not files:
            empty.append(str(root / name))
        samples += [(str(root / name / f), index[name]) for f in files]
    if empty:
        raise GenmodelsError(f"{field}: class folder(s) without images ({', '.join(IMG_EXTENSIONS)}): {empty[:5]}"
                             f"{' ...' if len(empty) > 5 else ''}")
    return samples


class ImageFolderDataset(Dataset):
    """(path, label) list -> (float32 (3, S, S) in [-1, 1], int64 label).

    ``crop``: a function PIL RGB image -> uint8 (S, S, 3) array (default: ADM's centre crop).
    """

    accepts_augment_seeds = True  # keys may be (index, seed): see genmodels.data.base.augment_key

    def __init__(self, samples: list[tuple[str, int]], image_size: int, flip: bool = False,
                 skip_corrupt: bool = False, crop: Callable[[Image.Image], np.ndarray] | None = None) -> None:
        self.samples, self.image_size, self.flip, self.skip_corrupt = samples, image_size, flip, skip_corrupt
        self.crop = crop or functools.partial(center_crop_arr, image_size=image_size)
        self._crop_draws = "generator" in inspect.signature(self.crop).parameters  # a random crop

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, path: str, generator: torch.Generator | None = None) -> torch.Tensor:
        try:
            with Image.open(path) as img:
                arr = self.crop(img.convert("RGB"), **({"generator": generator} if self._crop_draws else {}))
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on broken files
            why = (str(e).strip().splitlines() or [""])[0]
            raise UnreadableImageError(
                f"cannot read image {path} ({type(e).__name__}: {why}); fix or delete it, or set "
                "data.init_args.skip_corrupt: true to skip unreadable images") from e
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        i, g = augment_key(key)
        for k in range(len(self.samples)):
            path, label = self.samples[(i + k) % len(self.samples)]
            try:
                x = self.load(path, g)
                break
            except UnreadableImageError as e:
                if not self.skip_corrupt:
                    raise
                warnings.warn(f"skipping unreadable image (skip_corrupt=True): {e}", stacklevel=2)
        else:
            raise GenmodelsError(f"no readable image among the {len(self.samples)} files of this split")
        if self.flip and torch.rand((), generator=g) < 0.5:
            x = x.flip(-1)
        return x, torch.tensor(label, dtype=torch.int64)


class ImageFolderDataModule(ImageDataModule):
    """Images in class folders (ImageNet layout).

    Args:
        train_dir: ``train_dir/<class>/<images>``; its sorted class folders define the labels.
        val_dir: a folder in the same layout; if None, ``val_size`` training images are held
            out (fixed permutation of ``split_seed``, independent of the training ``seed``).
        test_dir: same layout; if None the test split is the val split.
        val_size: with ``val_dir=None``: a count (int >= 1) or a fraction of the training images
            (float in (0, 1); at least 1 image).
        split_seed: seed of the held-out permutation.
        random_flip: random horizontal flips of training images.
        skip_corrupt: warn about and skip unreadable files instead of failing (see module doc).
        preprocess: "adm" or "resize_crop" (see module doc); ``resize_ratio``, ``interpolation``
            ("lanczos", "bicubic", "bilinear") and ``random_crop`` apply to "resize_crop".
        num_classes: optional check: the number of class folders must equal it.
        image_size: side of the centre crop (ADM preprocessing).
        Others: see ``ImageDataModule``.
    """

    def __init__(self, train_dir: str, val_dir: str | None = None, test_dir: str | None = None,
                 val_size: int | float = 0.01, split_seed: int = 0, random_flip: bool = True,
                 skip_corrupt: bool = False, num_classes: int | None = None, preprocess: str = "adm",
                 resize_ratio: float = 1.125, interpolation: str = "lanczos", random_crop: bool = True,
                 batch_size: int = 64, num_workers: int = 0, seed: int = 0, image_size: int = 256,
                 eval_batch_size: int | None = None, predict_num_samples: int = 100, drop_last: bool = True,
                 pin_memory: bool = False) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, image_size=image_size,
                         eval_batch_size=eval_batch_size, predict_num_samples=predict_num_samples,
                         drop_last=drop_last, pin_memory=pin_memory)
        self.save_hyperparameters()
        if val_dir is None and not (isinstance(val_size, int) and val_size >= 1 or
                                    isinstance(val_size, float) and 0 < val_size < 1):
            raise GenmodelsError(f"data.init_args.val_size must be an int >= 1 or a float in (0, 1) when val_dir is None, "
                                 f"got {val_size!r}")
        self.train_dir = Path(train_dir).expanduser()
        self.val_dir = Path(val_dir).expanduser() if val_dir is not None else None
        self.test_dir = Path(test_dir).expanduser() if test_dir is not None else None
        if preprocess not in ("adm", "resize_crop"):
            raise GenmodelsError(f"data.init_args.preprocess must be 'adm' or 'resize_crop', got {preprocess!r}")
        if interpolation not in INTERPOLATIONS:
            raise GenmodelsError(f"data.init_args.interpolation must be one of {sorted(INTERPOLATIONS)}, "
                                 f"got {interpolation!r}")
        if resize_ratio < 1:
            raise GenmodelsError(f"data.init_args.resize_ratio must be >= 1 (the short side is resized to ratio * "
                                 "image_size), "
                                 f"got {resize_ratio}")
        self.val_size, self.split_seed, self.random_flip = val_size, split_seed, random_flip
        self.preprocess, self.resize_ratio, self.interpolation = preprocess, resize_ratio, interpolation
        self.random_crop = random_crop
        self.skip_corrupt, self._expected_classes = skip_corrupt, num_classes
        self._classes: list[str] | None = None
        self._samples: dict[str, list[tuple[str, int]]] | None = None

    @property
    def class_names(self) -> list[str]:
        if self._classes is None:
            classes = find_classes(self.train_dir)
            if self._expected_classes is not None and len(classes) != self._expected_classes:
                raise GenmodelsError(f"data.init_args.num_classes: image folder {self.train_dir} has {len(classes)} "
                                     "class folders, "
                                     f"but num_classes={self._expected_classes}")
            self._classes = classes
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def dataset_id(self) -> str:
        """``imagefolder-<name>-<size>-<hash>``: <name> is the training folder's name (its
        parent's when it is called train), <hash> covers the resolved folders and the split
        recipe, so two different folders never share cached statistics."""
        name = self.train_dir.resolve().name
        if name.lower() in ("train", "training") and self.train_dir.resolve().parent.name:
            name = self.train_dir.resolve().parent.name
        recipe = [str(p.resolve()) if p else None for p in (self.train_dir, self.val_dir, self.test_dir)]
        recipe += [self.val_size, self.split_seed] if self.val_dir is None else []
        if self.preprocess != "adm":  # eval-time preprocessing changes the reference images
            recipe += [self.preprocess, self.resize_ratio, self.interpolation]
        digest = hashlib.sha1(repr(recipe).encode()).hexdigest()[:8]
        return f"imagefolder-{name}-{self.image_size}-{digest}"

    def _scan(self) -> dict[str, list[tuple[str, int]]]:
        if self._samples is None:
            classes = self.class_names
            train = scan_images(self.train_dir, classes)
            if self.val_dir is not None:
                val = scan_images(self.val_dir, classes, "data.init_args.val_dir")
            else:
                n_val = self.val_size if isinstance(self.val_size, int) else max(1, round(self.val_size * len(train)))
                if n_val >= len(train):
                    raise GenmodelsError(f"data.init_args.val_size={self.val_size} leaves no training images in {self.train_dir} "
                                         f"({len(train)} images)")
                perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.split_seed)).tolist()
                held_out = set(perm[:n_val])
                val = [s for i, s in enumerate(train) if i in held_out]
                train = [s for i, s in enumerate(train) if i not in held_out]
            test = scan_images(self.test_dir, classes, "data.init_args.test_dir") if self.test_dir is not None else val
            self._samples = {"train": train, "val": val, "test": test}
        return self._samples

    def setup(self, stage: str | None = None) -> None:
        self._scan()

    def _make_dataset(self, split: str, augment: bool) -> ImageFolderDataset:
        if self.preprocess == "adm":
            crop = functools.partial(center_crop_arr, image_size=self.image_size)
        else:
            crop = functools.partial(resize_crop, image_size=self.image_size, resize_ratio=self.resize_ratio,
                                     interpolation=self.interpolation, random_crop=augment and self.random_crop)
        return ImageFolderDataset(self._scan()[split], self.image_size, flip=augment and self.random_flip,
                                  skip_corrupt=self.skip_corrupt, crop=crop)
