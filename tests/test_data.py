"""Data modules: digits, image folders, CIFAR-10 files, the epoch-seeded sampler, predict labels."""
from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from genmodels.data import (CIFAR10DataModule, DigitsDataModule, EpochSeededSampler, ImageFolderDataModule,
                            balanced_labels, center_crop_arr)
from genmodels.data.digits import digits_tensors
from genmodels.errors import GenmodelsError


# ---------------------------------------------------------------------------------------------- digits
def test_digits_batches_shapes_range_labels():
    dm = DigitsDataModule(batch_size=16, image_size=32)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (16,) and labels.dtype == torch.int64
    assert images.min() >= -1 and images.max() <= 1
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])  # grey
    x, y = dm.dataset("train")[0]
    assert x.shape == (3, 32, 32) and 0 <= int(y) <= 9
    # mostly background (-1) and strokes reaching the top of the range
    all_train = torch.stack([dm.dataset("train")[i][0] for i in range(200)])
    assert (all_train == -1).float().mean() > 0.3 and (all_train[:, :, 0, 0] == -1).float().mean() > 0.8
    assert all_train.amax(dim=(1, 2, 3)).min() > 0.8
    # at the native 8x8 the values are exactly sklearn's 0..16 mapped to [-1, 1] (0 -> -1)
    from sklearn.datasets import load_digits
    raw = torch.tensor(load_digits().images, dtype=torch.float32)
    images8, labels8, splits8 = digits_tensors(8)
    assert torch.equal(images8[:, 0], (raw / 16 * 255).round().to(torch.uint8))
    assert torch.equal(labels8, torch.tensor(load_digits().target))
    x8 = DigitsDataModule(image_size=8).dataset("val")[0][0]
    assert torch.allclose(x8[0], (raw[splits8["val"][0]] / 16 * 255).round() / 127.5 - 1)
    assert dm.num_classes == 10 and dm.image_size == 32 and dm.dataset_id == "digits-32"
    assert DigitsDataModule(image_size=16).dataset("val")[0][0].shape == (3, 16, 16)


def test_digits_split_sizes_disjoint_stratified_and_seed_independent():
    _, labels, splits = digits_tensors(32)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [1437, 180, 180]
    all_idx = torch.cat([splits[s] for s in ("train", "val", "test")])
    assert len(set(all_idx.tolist())) == 1797  # disjoint and complete
    for s in ("val", "test"):
        counts = torch.bincount(labels[splits[s]], minlength=10)
        assert counts.min() >= 17 and counts.max() <= 19  # stratified: ~18 per class
    a, b = DigitsDataModule(seed=0), DigitsDataModule(seed=123)
    for split in ("train", "val", "test"):
        da, db = a.dataset(split), b.dataset(split)
        assert torch.equal(da.images, db.images) and torch.equal(da.labels, db.labels)
    # the training order does depend on the seed
    la = torch.cat([y for _, y in a.train_dataloader()])
    lb = torch.cat([y for _, y in b.train_dataloader()])
    assert not torch.equal(la, lb) and len(la) == 1437 // 64 * 64


# ---------------------------------------------------------------------------------------------- sampler / predict
def test_epoch_seeded_sampler_replays_per_epoch():
    s = EpochSeededSampler(100, seed=3)
    s.set_epoch(0)
    e0 = list(s)
    assert sorted(e0) == list(range(100)) and len(s) == 100
    assert list(s) == e0  # iterating again: same order
    s.set_epoch(1)
    e1 = list(s)
    assert e1 != e0 and sorted(e1) == list(range(100))
    fresh = EpochSeededSampler(100, seed=3)
    fresh.set_epoch(1)
    assert list(fresh) == e1  # a resumed run gets the same order for the same epoch
    other = EpochSeededSampler(100, seed=4)
    other.set_epoch(1)
    assert list(other) != e1
    torch.manual_seed(0)
    a = list(fresh)
    torch.manual_seed(1)
    assert list(fresh) == a  # independent of the global RNG


def test_train_loader_follows_set_epoch():
    dm = DigitsDataModule(batch_size=32, seed=1)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(0)
    first = [y for _, y in loader]
    loader.sampler.set_epoch(1)
    second = [y for _, y in loader]
    loader.sampler.set_epoch(0)
    again = [y for _, y in loader]
    assert all(torch.equal(p, q) for p, q in zip(first, again))
    assert not all(torch.equal(p, q) for p, q in zip(first, second))


def test_predict_labels_balanced():
    assert balanced_labels(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]
    dm = DigitsDataModule(eval_batch_size=16, predict_num_samples=45)
    batches = list(dm.predict_dataloader())
    labels = torch.cat([b[0] for b in batches])
    indices = torch.cat([b[1] for b in batches])
    assert labels.dtype == torch.int64 and indices.dtype == torch.int64
    assert torch.equal(indices, torch.arange(45)) and torch.equal(labels, torch.arange(45) % 10)
    counts = torch.bincount(labels[:40], minlength=10)
    assert (counts == 4).all()


# ---------------------------------------------------------------------------------------------- image folder
def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def _bands(h, w):
    """Three vertical bands red | green | blue."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 3, 0] = 255
    a[:, w // 3: 2 * w // 3, 1] = 255
    a[:, 2 * w // 3:, 2] = 255
    return a


@pytest.fixture
def folder(tmp_path):
    """train/{a_dog,b_cat} with 4 small images each (mixed sizes, one .JPEG), val/ likewise."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for c, name in enumerate(["b_cat", "a_dog"]):
            for i in range(n):
                h, w = [(20, 30), (40, 24), (16, 16), (70, 50)][i]
                _png(tmp_path / split / name / f"img{i}.png", rng.integers(0, 256, (h, w, 3)))
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(
            tmp_path / split / "a_dog" / "extra.JPEG", format="JPEG")
        (tmp_path / split / "a_dog" / "notes.txt").write_text("not an image")
    return tmp_path


def test_center_crop_arr_is_adm_crop():
    # 96x32 -> BOX-halved once (short side 32 >= 2*16) to 48x16 -> centre 16x16 = the green band
    out = center_crop_arr(Image.fromarray(_bands(32, 96)), 16)
    assert out.shape == (16, 16, 3)
    assert (out == np.array([0, 255, 0], np.uint8)).all()
    # portrait 40x20 -> bicubic to 32x16 (short side 16) -> centre crop of rows 8..24
    a = np.zeros((40, 20, 3), np.uint8)
    a[5:35] = 200  # -> rows 4..28 after the resize, covering the crop
    out = center_crop_arr(Image.fromarray(a), 16)
    assert out.shape == (16, 16, 3) and np.abs(out.astype(int) - 200).max() <= 2


def test_resize_crop_is_torchvision_resize_then_crop():
    from genmodels.data.image_folder import resize_crop
    # 30 (h) x 50 (w), size 16, ratio 1.125 -> short side 18, long int(18 * 50 / 30) = 30 -> centre crop
    a = np.zeros((30, 50, 3), np.uint8)
    a[:, 20:30] = 255  # a centred white column band
    out = resize_crop(Image.fromarray(a), 16, resize_ratio=1.125, interpolation="lanczos")
    assert out.shape == (16, 16, 3)
    # the band lands at columns 12..18 of the 30-wide resize, i.e. 5..11 of the crop (left = 7)
    assert out[:, 6:10].min() > 200 and out[:, :3].max() < 30 and out[:, 13:].max() < 30
    torch.manual_seed(0)
    lefts = {int(np.argmax(resize_crop(Image.fromarray(a), 16, random_crop=True)[0, :, 0] > 128))
             for _ in range(30)}
    assert len(lefts) > 3  # the random crop moves


def test_image_folder_resize_crop_mode(folder):
    kw = dict(train_dir=str(folder / "train"), val_dir=str(folder / "val"), image_size=16,
              preprocess="resize_crop", resize_ratio=1.125, interpolation="lanczos", random_flip=False)
    dm = ImageFolderDataModule(**kw)
    assert dm.dataset("train", augment=True)[3][0].shape == (3, 16, 16)
    torch.manual_seed(0)
    train = [dm.dataset("train", augment=True)[3][0] for _ in range(10)]
    assert not all(torch.equal(train[0], t) for t in train[1:])  # random crops
    val = [dm.dataset("val")[3][0] for _ in range(3)]
    assert all(torch.equal(val[0], v) for v in val)
    assert dm.dataset_id != ImageFolderDataModule(**{**kw, "preprocess": "adm"}).dataset_id
    with pytest.raises(GenmodelsError, match="preprocess"):
        ImageFolderDataModule(**{**kw, "preprocess": "var"})


def test_image_folder_shapes_labels_and_splits(folder):
    dm = ImageFolderDataModule(train_dir=str(folder / "train"), val_dir=str(folder / "val"), image_size=16,
                               batch_size=4, eval_batch_size=3)
    dm.setup("fit")
    assert dm.class_names == ["a_dog", "b_cat"] and dm.num_classes == 2
    assert len(dm.dataset("train")) == 9 and len(dm.dataset("val")) == 5 and len(dm.dataset("test")) == 5
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert images.min() >= -1 and images.max() <= 1
    val_labels = torch.cat([y for _, y in dm.val_dataloader()])
    assert val_labels.tolist() == [0, 0, 0, 1, 1]  # a_dog (3 incl. .JPEG) then b_cat; .txt ignored
    assert dm.dataset_id.startswith("imagefolder-") and dm.dataset_id.split("-")[2] == "16"
    assert dm.dataset_id != ImageFolderDataModule(train_dir=str(folder / "val"), image_size=16).dataset_id
    with pytest.raises(GenmodelsError, match="num_classes=3"):
        ImageFolderDataModule(train_dir=str(folder / "train"), num_classes=3).num_classes


def test_image_folder_val_split_from_train(folder):
    make = lambda seed: ImageFolderDataModule(train_dir=str(folder / "train"), val_size=3, seed=seed,
                                              image_size=8)
    a, b = make(0), make(5)
    sa, sb = a._scan(), b._scan()
    assert len(sa["train"]) == 6 and len(sa["val"]) == 3 and sa["test"] == sa["val"]
    assert not set(sa["train"]) & set(sa["val"])
    assert sa == sb  # the split does not depend on the training seed
    frac = ImageFolderDataModule(train_dir=str(folder / "train"), val_size=0.2, image_size=8)._scan()
    assert len(frac["val"]) == 2


def test_image_folder_flip_only_in_train(tmp_path):
    a = np.zeros((16, 16, 3), np.uint8)
    a[:, :8] = 255  # left half white
    for root in ("train", "val"):
        _png(tmp_path / root / "c" / "x.png", a)
    dm = ImageFolderDataModule(train_dir=str(tmp_path / "train"), val_dir=str(tmp_path / "val"), image_size=16,
                               batch_size=1)
    torch.manual_seed(0)
    left_white = lambda x: bool(x[0, 0, 0] > 0)
    train = [left_white(dm.dataset("train", augment=True)[0][0]) for _ in range(40)]
    assert any(train) and not all(train)
    assert all(left_white(dm.dataset("val")[0][0]) for _ in range(20))
    assert all(left_white(dm.reference_dataset("train")[0][0]) for _ in range(20))
    no_flip = ImageFolderDataModule(train_dir=str(tmp_path / "train"), val_dir=str(tmp_path / "val"),
                                    image_size=16, random_flip=False)
    assert all(left_white(no_flip.dataset("train", augment=True)[0][0]) for _ in range(20))


def test_image_folder_corrupt_file(folder):
    bad = folder / "train" / "a_dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    dm = ImageFolderDataModule(train_dir=str(folder / "train"), val_dir=str(folder / "val"), image_size=8)
    ds = dm.dataset("train")
    i = [p for p, _ in ds.samples].index(str(bad))
    with pytest.raises(GenmodelsError, match="broken.png"):
        ds[i]
    with pytest.raises(GenmodelsError, match="broken.png"):
        list(dm.reference_dataset("train"))
    skip = ImageFolderDataModule(train_dir=str(folder / "train"), val_dir=str(folder / "val"), image_size=8,
                                 skip_corrupt=True).dataset("train")
    with pytest.warns(UserWarning, match="broken.png"):
        x, y = skip[i]
    assert x.shape == (3, 8, 8) and torch.equal(x, skip[i + 1][0])  # the next file stands in
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len([skip[k] for k in range(len(skip))]) == len(skip)


def test_image_folder_layout_errors(tmp_path):
    with pytest.raises(GenmodelsError, match="does not exist"):
        ImageFolderDataModule(train_dir=str(tmp_path / "nope")).setup("fit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GenmodelsError, match="no class sub-folders") as e:
        ImageFolderDataModule(train_dir=str(tmp_path / "empty")).setup("fit")
    assert str(tmp_path / "empty") in str(e.value)
    _png(tmp_path / "flat" / "x.png", np.zeros((8, 8, 3)))  # images but no class folders
    with pytest.raises(GenmodelsError, match="no class sub-folders"):
        ImageFolderDataModule(train_dir=str(tmp_path / "flat")).setup("fit")
    _png(tmp_path / "partial" / "a" / "x.png", np.zeros((8, 8, 3)))
    (tmp_path / "partial" / "b").mkdir()
    with pytest.raises(GenmodelsError, match="without images") as e:
        ImageFolderDataModule(train_dir=str(tmp_path / "partial")).setup("fit")
    assert str(tmp_path / "partial" / "b") in str(e.value)
    _png(tmp_path / "val" / "zzz" / "x.png", np.zeros((8, 8, 3)))
    with pytest.raises(GenmodelsError, match="zzz"):
        (tmp_path / "partial" / "b").rmdir()
        ImageFolderDataModule(train_dir=str(tmp_path / "partial"), val_dir=str(tmp_path / "val")).setup("fit")


# ---------------------------------------------------------------------------------------------- CIFAR-10
def _cifar_pattern():
    """uint8 (3, 32, 32): R = 255, G = 8 * row, B = 8 * column."""
    img = np.zeros((3, 32, 32), np.uint8)
    img[0] = 255
    img[1] = (np.arange(32) * 8)[:, None]
    img[2] = (np.arange(32) * 8)[None, :]
    return img


@pytest.fixture
def cifar_dir(tmp_path):
    """A tiny cifar-10-batches-py: 5 train batches x 4 images, test batch of 6."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 6)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        if name == "data_batch_1":
            data[0] = _cifar_pattern().reshape(-1)
            labels[0] = 7
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
    return tmp_path


def test_cifar10_reads_pixels_and_labels(cifar_dir):
    dm = CIFAR10DataModule(root=str(cifar_dir), val_size=0, batch_size=4)  # parent of cifar-10-batches-py
    dm.setup("fit")
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [20, 0, 6]
    x, y = dm.reference_dataset("train")[0]
    expected = torch.from_numpy(_cifar_pattern()).float() / 127.5 - 1
    assert int(y) == 7 and x.shape == (3, 32, 32) and torch.equal(x, expected)
    assert torch.allclose(x[0], torch.ones(32, 32)) and x[1, 31, 0] > x[1, 0, 0] and x[2, 0, 31] > x[2, 0, 0]
    with open(cifar_dir / "cifar-10-batches-py" / "test_batch", "rb") as f:
        test_labels = pickle.load(f, encoding="bytes")[b"labels"]
    assert torch.cat([b[1] for b in dm.test_dataloader()]).tolist() == test_labels
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.int64
    assert dm.dataset_id == "cifar10-32-val0-split0" and dm.num_classes == 10


def test_cifar10_val_split_and_resize(cifar_dir):
    dm = CIFAR10DataModule(root=str(cifar_dir / "cifar-10-batches-py"), val_size=5, image_size=16)
    tr, va = dm.dataset("train"), dm.dataset("val")
    assert len(tr) == 15 and len(va) == 5 and tr[0][0].shape == (3, 16, 16)
    other = CIFAR10DataModule(root=str(cifar_dir), val_size=5, image_size=16, seed=9)
    assert torch.equal(other.dataset("val").images, va.images)  # split independent of the training seed
    train_rows = {tuple(v.flatten().tolist()) for v in tr.images}
    assert not any(tuple(v.flatten().tolist()) in train_rows for v in va.images)


def test_cifar10_missing_files(cifar_dir, tmp_path):
    (cifar_dir / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(GenmodelsError, match="data_batch_3.*does not download"):
        CIFAR10DataModule(root=str(cifar_dir)).setup("fit")
    with pytest.raises(GenmodelsError, match="nowhere.*does not download"):
        CIFAR10DataModule(root=str(tmp_path / "nowhere")).setup("fit")


# ---------------------------------------------------------------------------------------------- Lightning loop
def test_trainer_loop_replays_epochs_on_resume(tmp_path):
    from lightning.pytorch import LightningModule, Trainer

    class Recorder(LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.seen = []

        def training_step(self, batch, batch_idx):
            images, labels = batch
            self.seen.append((self.current_epoch, labels.clone()))
            return (self.w * images.mean()) ** 2 + self.w ** 2

        def validation_step(self, batch, batch_idx):
            assert batch[0].shape[1:] == (3, 32, 32)

        def predict_step(self, batch, batch_idx):
            return batch[0]

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    kw = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              limit_train_batches=3, limit_val_batches=1, default_root_dir=tmp_path, enable_checkpointing=False)
    dm = DigitsDataModule(batch_size=8, seed=2)
    full = Recorder()
    Trainer(max_epochs=2, **kw).fit(full, datamodule=dm)
    sampler = EpochSeededSampler(1437, seed=2)
    labels = dm.dataset("train").labels
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))
        got = torch.cat([y for e, y in full.seen if e == epoch])
        assert torch.equal(got, labels[order[:24]])

    first = Recorder()
    t1 = Trainer(max_epochs=1, **kw)
    t1.fit(first, datamodule=DigitsDataModule(batch_size=8, seed=2))
    t1.save_checkpoint(tmp_path / "e1.ckpt")
    resumed = Recorder()
    Trainer(max_epochs=2, **kw).fit(resumed, datamodule=DigitsDataModule(batch_size=8, seed=2),
                                    ckpt_path=tmp_path / "e1.ckpt")
    assert [e for e, _ in resumed.seen] == [1, 1, 1]
    assert all(torch.equal(y, z) for (_, y), (_, z) in zip(resumed.seen, full.seen[3:]))

    preds = Trainer(**kw).predict(Recorder(), datamodule=DigitsDataModule(eval_batch_size=32,
                                                                           predict_num_samples=50))
    assert torch.equal(torch.cat(preds), torch.arange(50) % 10)
