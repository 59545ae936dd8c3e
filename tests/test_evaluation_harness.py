"""The evaluation harness (genmodels/evaluation/evaluator.py): generation, reference cache,
ADM files, results rows, DDP (2 gloo processes) = 1 process, and ``Trainer.test`` with a
GeneratorModule."""
from __future__ import annotations

import json
import math
import os
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from genmodels.evaluation import Evaluator, frechet_distance, feature_statistics, read_adm_npz, read_rows
from genmodels.evaluation.reference import write_adm_npz
from genmodels.errors import GenmodelsError


def digits_split(split: str):
    from genmodels.data import DigitsDataModule

    ds = DigitsDataModule(image_size=32).reference_dataset(split)
    return torch.stack([ds[i][0] for i in range(len(ds))]), torch.stack([ds[i][1] for i in range(len(ds))])


class PoolGenerator(nn.Module):
    num_classes = 10

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(3))
        self.config = {"class_path": "tests.PoolGenerator", "init_args": {}}


class PoolModel(nn.Module):
    """Stands in for a GeneratorModule: ``sample_images`` returns real digits of the asked
    classes (drawn with the given generator) and replaces a ``noise`` fraction by noise."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, noise: float = 0.0, trainer=None) -> None:
        super().__init__()
        self.x, self.y, self.noise = x, y, noise
        self.generator = PoolGenerator()
        self.sample_kwargs = {"cfg": 1.0, "temperature": 1.0}
        self._trainer = trainer

    def sample_images(self, labels, generator=None, **overrides):
        out = []
        for lab in labels.tolist():
            pool = self.x[self.y == lab]
            img = pool[torch.randint(len(pool), (1,), generator=generator)][0]
            if torch.rand((), generator=generator) < self.noise:
                img = torch.rand(img.shape, generator=generator) * 2 - 1
            out.append(img)
        return torch.stack(out)


def fake_trainer(tmp_path, datamodule=None, test_dataset=None):
    loaders = [torch.utils.data.DataLoader(test_dataset, batch_size=8)] if test_dataset is not None else None
    return SimpleNamespace(datamodule=datamodule, log_dir=str(tmp_path / "logs"), ckpt_path=None,
                           test_dataloaders=loaders)


# ---------------------------------------------------------------------------- end to end
def test_evaluator_generates_scores_writes_row_and_caches_reference(tmp_path, monkeypatch):
    from genmodels.data import DigitsDataModule

    dm = DigitsDataModule(image_size=32)
    x, y = digits_split("test")
    kw = dict(num_samples=200, batch_size=32, reference="train", num_reference=600, cache_dir=str(tmp_path / "cache"),
              results_file=str(tmp_path / "results" / "rows.jsonl"), config_files=["configs/x/digits_fake.yaml"])
    good = Evaluator(**kw).evaluate(PoolModel(x, y, 0.0, fake_trainer(tmp_path, dm)))
    caches = list((tmp_path / "cache").glob("*.npz"))
    assert [c.name for c in caches] == [f"digits-32_train_32px_digits-classifier-"
                                        f"{Evaluator().extractor.name.rsplit('-', 1)[1]}_n600.npz"]
    bad = Evaluator(**kw).evaluate(PoolModel(x, y, 0.5, fake_trainer(tmp_path, dm)))
    print(f"pool of real test digits: {good}\nhalf noise: {bad}")
    assert set(good) >= {"test/fid", "test/is", "test/is_std", "test/precision", "test/recall", "test/sec_per_image"}
    assert good["test/fid"] < 25 and bad["test/fid"] > 8 * good["test/fid"]
    assert good["test/precision"] > 0.8 and bad["test/precision"] < 0.6
    assert good["test/is"] > 8.5

    # the second run read the cache, and the same seed gives the same numbers
    n_train = len(dm.reference_dataset("train"))  # 1437; the first 600 are used

    class NoImages(torch.utils.data.Dataset):
        def __len__(self):
            return n_train

        def __getitem__(self, i):
            raise AssertionError("reference features recomputed although cached")

    monkeypatch.setattr(dm, "reference_dataset", lambda split: NoImages())
    again = Evaluator(**kw).evaluate(PoolModel(x, y, 0.0, fake_trainer(tmp_path, dm)))
    for k in ("test/fid", "test/is", "test/precision", "test/recall"):
        assert again[k] == pytest.approx(good[k], rel=1e-9), k

    rows = read_rows(tmp_path / "results" / "rows.jsonl")
    assert len(rows) == 3 and rows[0]["name"] == "digits_fake" and rows[0]["model"] == "PoolGenerator"
    assert rows[0]["num_samples"] == 200 and rows[0]["sampling"] == {"cfg": 1.0, "temperature": 1.0}
    assert rows[0]["config_files"] == ["configs/x/digits_fake.yaml"] and rows[0]["params_generator"] == 3
    assert rows[0]["fid"] == pytest.approx(good["test/fid"])
    assert (tmp_path / "results" / "rows.csv").read_text().count("\n") == 4  # header + 3
    assert len(read_rows(tmp_path / "logs" / "results.jsonl")) == 3


def test_reference_from_test_batches_without_a_datamodule(tmp_path):
    """update_real (GeneratorModule.test_step) feeds the reference when the data module has
    no reference_dataset: same features as extracting the split directly."""
    x, y = digits_split("test")
    ds = torch.utils.data.TensorDataset(x, y)
    model = PoolModel(x, y, 0.0, fake_trainer(tmp_path, None, ds))
    ev = Evaluator(num_samples=50, batch_size=25, reference="test", cache_dir="off")
    for i in range(0, len(x), 16):
        ev.update_real(x[i:i + 16], y[i:i + 16])
    ev.evaluate(model)
    torch.testing.assert_close(ev._reference.features, ev.extract(x)[0])
    with pytest.raises(ValueError, match="reference_dataset"):
        Evaluator(reference="train").begin(PoolModel(x, y, 0.0, fake_trainer(tmp_path, None, ds)))


# ---------------------------------------------------------------------------- ADM protocol
def test_adm_reference_npz_stored_statistics_and_sample_export(tmp_path):
    x_train, _ = digits_split("train")
    x, y = digits_split("test")
    arr = ((x_train[:400].permute(0, 2, 3, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    probe = Evaluator()
    feats = probe.extract(x_train[:400])[0]
    mu, sigma = feature_statistics(feats)
    shift = np.full_like(mu, 0.5)
    ref_npz = tmp_path / "VIRTUAL_digits32_labeled.npz"
    np.savez(ref_npz, arr_0=arr, mu=mu + shift, sigma=sigma)

    trainer = fake_trainer(tmp_path)
    ev = Evaluator(num_samples=120, batch_size=50, reference=str(ref_npz), cache_dir=str(tmp_path / "cache"),
                   export_npz=True)
    m = ev.evaluate(PoolModel(x, y, 0.0, trainer))
    row = ev.last_row
    assert row["stored_statistics"] and row["num_reference"] == 400
    exported = Path(row["samples_npz"])
    assert exported.name == "samples_120x32x32x3.npz"
    images, _, _ = read_adm_npz(exported)
    assert images.dtype == np.uint8 and images.shape == (120, 32, 32, 3)
    with np.load(exported) as z:
        assert z["arr_1"].tolist() == [i % 10 for i in range(120)]

    # FID used the stored (shifted) statistics, P/R the arr_0 features
    fake_feats = probe.extract(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)[0]
    fmu, fsigma = feature_statistics(fake_feats)
    assert m["test/fid"] == pytest.approx(frechet_distance(fmu, fsigma, mu + shift, sigma), rel=1e-9)
    assert m["test/fid"] > frechet_distance(fmu, fsigma, mu, sigma) + 1.0

    # scoring the exported file gives the in-process numbers (8-bit quantisation on both paths)
    again = Evaluator(num_samples=120, batch_size=50, reference=str(ref_npz), cache_dir=str(tmp_path / "cache"))
    from_file = again.evaluate_npz(exported, PoolModel(x, y, 0.0, trainer))
    for k in ("test/fid", "test/is", "test/precision", "test/recall"):
        assert from_file[k] == pytest.approx(m[k], rel=1e-6, abs=1e-9), k


def test_adm_npz_errors_and_official_warnings(tmp_path):
    x, y = digits_split("test")
    with pytest.raises(GenmodelsError, match="VIRTUAL_imagenet256_labeled"):
        read_adm_npz(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, arr_0=np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="arr_0 must be uint8"):
        read_adm_npz(bad)
    # stored statistics of another dimension (e.g. Inception's 2048) are not used with the digits judge
    arr = ((x[:60].permute(0, 2, 3, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    other = tmp_path / "ref2048.npz"
    np.savez(other, arr_0=arr, mu=np.zeros(2048), sigma=np.eye(2048))
    ev = Evaluator(num_samples=20, batch_size=20, reference=str(other), cache_dir="off", official=True,
                   progress=False)
    with pytest.warns(UserWarning) as record:
        ev.evaluate(PoolModel(x, y, 0.0, fake_trainer(tmp_path)))
    text = "\n".join(str(r.message) for r in record)
    assert "2048" in text and "recomputed" in text
    assert "num_samples=20 < 50,000" in text and "NOT comparable" in text
    assert "Inception" in text
    write_adm_npz(tmp_path / "ok.npz", arr)
    with pytest.raises(ValueError, match=r"uint8 \(N, H, W, 3\)"):
        write_adm_npz(tmp_path / "no.npz", arr.astype(np.float32))


# ---------------------------------------------------------------------------- DDP
def _ddp_run(rank: int, world: int, port: int, out: str, tmp: str) -> None:
    if world > 1:
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    x, y = digits_split("test")
    n_real = 45  # odd: DistributedSampler pads it with duplicates, which must be dropped
    ds = torch.utils.data.TensorDataset(x[:n_real], y[:n_real])
    model = PoolModel(x, y, 0.3, fake_trainer(Path(tmp), None, ds))
    ev = Evaluator(num_samples=52, batch_size=8, reference="test", cache_dir="off", progress=False)
    total = math.ceil(n_real / world) * world
    mine = (list(range(n_real)) + list(range(total - n_real)))[rank::world]  # DistributedSampler(shuffle=False)
    for i in range(0, len(mine), 8):
        idx = mine[i:i + 8]
        ev.update_real(x[idx], y[idx])
    metrics = ev.evaluate(model)
    metrics["num_reference"] = ev._reference.num_images
    if rank == 0:
        torch.save(metrics, out)
    if world > 1:
        torch.distributed.destroy_process_group()


def test_ddp_two_processes_equal_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_run, args=(2, port, str(tmp_path / "ddp.pt"), str(tmp_path)), nprocs=2)
    _ddp_run(0, 1, 0, str(tmp_path / "single.pt"), str(tmp_path))
    ddp, single = torch.load(tmp_path / "ddp.pt"), torch.load(tmp_path / "single.pt")
    print(f"1 process: {single}\n2 processes: {ddp}")
    assert ddp["num_reference"] == single["num_reference"] == 45
    for k in ("test/fid", "test/is", "test/is_std", "test/precision", "test/recall"):
        assert ddp[k] == pytest.approx(single[k], rel=1e-5, abs=1e-7), k


# ---------------------------------------------------------------------------- Lightning
def test_trainer_test_with_generator_module_logs_metrics_and_row(tmp_path):
    lightning = pytest.importorskip("lightning")
    from lightning.pytorch.loggers import CSVLogger

    from genmodels.data import DigitsDataModule
    from genmodels.generators.base import Generator
    from genmodels.tokenizers.base import Tokenizer, TokenSpec
    from genmodels.training.generator_module import GeneratorModule

    spec = TokenSpec("continuous", ((1024,),), channels=3)

    class PixelTok(Tokenizer):
        def __init__(self) -> None:
            super().__init__()
            self.spec = spec

        def encode(self, images):
            return images.flatten(2).transpose(1, 2)

        def decode(self, tokens):
            return tokens.transpose(1, 2).reshape(len(tokens), 3, 32, 32)

    class PoolGen(Generator):
        def __init__(self, noise: float = 0.0) -> None:
            super().__init__()
            self.spec, self.num_classes, self.noise = spec, 10, noise
            self.w = nn.Parameter(torch.zeros(()))
            x, y = digits_split("test")
            self.register_buffer("pool", x.flatten(2).transpose(1, 2), persistent=False)
            self.register_buffer("pool_y", y, persistent=False)

        def forward_loss(self, tokens, labels):
            return {"loss": (self.w - 1) ** 2 + 0 * tokens.mean()}

        def sample(self, labels, *, cfg=1.0, temperature=1.0, num_steps=None, generator=None, **kw):
            out = []
            for lab in labels.tolist():
                pool = self.pool[self.pool_y == lab]
                out.append(pool[torch.randint(len(pool), (1,), generator=generator)][0])
            return torch.stack(out)

    dm = DigitsDataModule(image_size=32, batch_size=32, eval_batch_size=64)
    fit = GeneratorModule(generator=PoolGen(), tokenizer=PixelTok(), ema_decay=None, grid_classes=2, grid_per_class=1)
    trainer = lightning.Trainer(max_steps=2, limit_val_batches=0, accelerator="cpu", devices=1, enable_progress_bar=False,
                                logger=CSVLogger(tmp_path / "fit"), enable_model_summary=False)
    trainer.fit(fit, datamodule=dm)
    ckpt = trainer.checkpoint_callback.best_model_path or str(Path(trainer.log_dir) / "manual.ckpt")
    if not Path(ckpt).is_file():
        trainer.save_checkpoint(ckpt)

    ev = Evaluator(num_samples=100, batch_size=50, reference="train", cache_dir=str(tmp_path / "cache"),
                   sample_kwargs={"cfg": 1.5}, config_files=["digits_pool.yaml"], progress=False)
    module = GeneratorModule(generator=PoolGen(), tokenizer=PixelTok(), ema_decay=None, evaluator=ev,
                             sample_kwargs={"temperature": 1.0})
    tester = lightning.Trainer(accelerator="cpu", devices=1, enable_progress_bar=False,
                               logger=CSVLogger(tmp_path / "test"), enable_model_summary=False)
    out = tester.test(module, datamodule=dm, ckpt_path=ckpt)[0]  # strict load: the evaluator adds no keys
    assert out["test/fid"] < 30 and out["test/precision"] > 0.7
    rows = read_rows(Path(tester.log_dir) / "results.jsonl")
    assert len(rows) == 1 and rows[0]["model"] == "PoolGen" and rows[0]["tokenizer"] == "PixelTok"
    assert rows[0]["sampling"] == {"temperature": 1.0, "cfg": 1.5} and rows[0]["ckpt_path"] == ckpt
    assert rows[0]["fid"] == pytest.approx(out["test/fid"], rel=1e-6)
    assert "evaluator" not in "".join(torch.load(ckpt, weights_only=False)["state_dict"])


def test_genmodels_test_cli_with_evaluation_config(tmp_path, monkeypatch):
    """`genmodels test --config ... --config configs/evaluation/digits.yaml --ckpt_path ...` on a
    tiny (untrained) VQ-VAE + MaskGIT: metrics, a results row naming the experiment config."""
    from genmodels.cli import main

    root = Path(__file__).resolve().parents[1]
    exp = tmp_path / "tiny_maskgit.yaml"
    exp.write_text(f"""
model:
  class_path: genmodels.training.GeneratorModule
  init_args:
    tokenizer:
      class_path: genmodels.tokenizers.multiscale_vq.VQVAE
      init_args: {{vocab_size: 64, z_channels: 8, ch: 32, ch_mult: [1, 2, 2], num_res_blocks: 1,
                  using_sa: false, using_mid_sa: false, v_patch_nums: [8]}}
    generator:
      class_path: genmodels.generators.maskgit.MaskGIT
      init_args: {{vocab_size: 64, token_shape: [8, 8], num_classes: 10, hidden_size: 32, depth: 1,
                  num_heads: 2, intermediate_size: 64}}
    ema_decay: null
    sample_kwargs: {{num_steps: 2, cfg: 2.0}}
trainer:
  max_steps: 1
  limit_val_batches: 0
  accelerator: cpu
  devices: 1
  enable_progress_bar: false
  default_root_dir: {tmp_path / 'runs'}
""")
    data = str(root / "configs" / "data" / "digits.yaml")
    main(["fit", "--config", data, "--config", str(exp)])
    ckpt = next((tmp_path / "runs").rglob("*.ckpt"))
    results = tmp_path / "results" / "digits.jsonl"
    # as the console script runs it: the row's config files come from sys.argv
    monkeypatch.setattr(sys, "argv", [
        "genmodels", "test", "--config", data, "--config", str(exp), "--config", str(root / "configs/evaluation/digits.yaml"),
        "--model.init_args.evaluator.init_args.num_samples", "40",
        "--model.init_args.evaluator.init_args.num_reference", "200",
        "--model.init_args.evaluator.init_args.cache_dir", str(tmp_path / "cache"),
        "--model.init_args.evaluator.init_args.results_file", str(results),
        "--ckpt_path", str(ckpt)])
    main()
    rows = read_rows(results)
    assert len(rows) == 1
    r = rows[0]
    assert r["name"] == "tiny_maskgit" and r["model"] == "MaskGIT" and r["tokenizer"] == "VQVAE"
    assert r["num_samples"] == 40 and r["num_reference"] == 200 and r["sampling"] == {"num_steps": 2, "cfg": 2.0}
    assert r["config_files"][-1].endswith("configs/evaluation/digits.yaml") and r["ckpt_path"] == str(ckpt)
    assert r["fid"] > 0 and 0 <= r["precision"] <= 1 and r["sec_per_image"] > 0


def test_evaluate_reconstructions_rfid(tmp_path):
    """Tokenizer evaluation: a perfect tokenizer has rFID 0 and P = R = 1; a lossy one does worse."""
    from genmodels.data import DigitsDataModule

    class Tok(nn.Module):
        def __init__(self, noise: float) -> None:
            super().__init__()
            self.noise = noise

        def encode(self, x):
            return x

        def decode(self, z):
            return z + self.noise * torch.randn(z.shape, generator=torch.Generator().manual_seed(0))

    dm = DigitsDataModule(image_size=32)
    scores = {}
    for noise in (0.0, 0.5):
        module = SimpleNamespace(tokenizer=Tok(noise), _trainer=fake_trainer(tmp_path, dm), sample_kwargs={})
        ev = Evaluator(reference="val", batch_size=64, cache_dir=str(tmp_path / "cache"), progress=False)
        scores[noise] = ev.evaluate_reconstructions(module)
    print(scores)
    assert abs(scores[0.0]["test/rfid"]) < 1e-3  # ~1e-5: eigenvalue round-off of rank-deficient covariances
    assert scores[0.0]["test/precision"] == scores[0.0]["test/recall"] == 1.0
    assert scores[0.5]["test/rfid"] > 10
    assert len(read_rows(tmp_path / "logs" / "results.jsonl")) == 2
