"""The foundation end to end: YAML -> `genmodels fit` (tokenizer, then generator) ->
resume -> predict, and the errors a user gets for bad configs."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from genmodels.cli import main

TOKENIZER = {
    "model": {"class_path": "genmodels.training.TokenizerModule", "init_args": {
        "lr": 2e-3, "tokenizer": {"class_path": "genmodels.tokenizers.multiscale_vq.VQVAE", "init_args": {
            "vocab_size": 32, "z_channels": 8, "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1,
            "decoder_blocks_per_level": 1, "using_sa": False, "using_mid_sa": False, "v_patch_nums": [8]}}}},
}
GENERATOR = {
    "model": {"class_path": "genmodels.training.GeneratorModule", "init_args": {
        "lr": 1e-3, "ema_decay": 0.9, "warmup_steps": 2, "grid_per_class": 1,
        "sample_kwargs": {"num_steps": 4, "cfg": 2.0},
        "generator": {"class_path": "genmodels.generators.maskgit.MaskGIT", "init_args": {
            "vocab_size": 32, "token_shape": [8, 8], "num_classes": 10, "hidden_size": 32, "depth": 2,
            "num_heads": 2, "intermediate_size": 64}}}},
}


def _data(batch_size: int = 16) -> dict:
    return {"data": {"class_path": "genmodels.data.DigitsDataModule",
                     "init_args": {"image_size": 16, "batch_size": batch_size, "predict_num_samples": 20}}}


def _trainer(root: Path, **kw) -> dict:
    t = {"accelerator": "cpu", "devices": 1, "default_root_dir": str(root), "enable_progress_bar": False,
         "enable_model_summary": False, "log_every_n_steps": 1, "limit_train_batches": 4, "limit_val_batches": 1,
         "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(root)}}}
    t.update(kw)
    return {"trainer": t, "seed_everything": 0}


def _write(path: Path, *parts: dict) -> Path:
    cfg: dict = {}
    for p in parts:
        for k, v in p.items():
            cfg[k] = v
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train_losses(root: Path) -> list[float]:
    rows = []
    for f in sorted(root.glob("lightning_logs/version_*/metrics.csv")):
        with open(f) as fh:
            rows += [r for r in csv.DictReader(fh) if r.get("train/loss")]
    return [float(r["train/loss"]) for r in sorted(rows, key=lambda r: int(r["step"]))]


@pytest.fixture(scope="module")
def tokenizer_ckpt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    cfg = _write(root / "tok.yaml", TOKENIZER, _data(), _trainer(root, max_epochs=2))
    main(["fit", "-c", str(cfg)])
    ckpts = sorted(root.glob("lightning_logs/version_0/checkpoints/*.ckpt"))
    assert ckpts, "the tokenizer fit wrote no checkpoint"
    grids = list(root.glob("lightning_logs/version_0/samples/recon_*.png"))
    assert grids, "validation wrote no reconstruction grid"
    return ckpts[-1]


def test_tokenizer_fit_lowers_reconstruction_error(tokenizer_ckpt):
    rows = list(csv.DictReader(open(tokenizer_ckpt.parent.parent / "metrics.csv")))
    rec = [float(r["train/rec_loss"]) for r in rows if r.get("train/rec_loss")]
    assert len(rec) == 8
    assert np.mean(rec[-2:]) < 0.8 * np.mean(rec[:2]), rec
    from genmodels.tokenizers import load_tokenizer
    tok = load_tokenizer(tokenizer_ckpt)
    assert tok.spec.vocab_size == 32 and tok.spec.shapes == ((8, 8),)
    assert not any(p.requires_grad for p in tok.parameters())


def test_generator_fit_resume_is_exact_and_predict_writes(tmp_path, tokenizer_ckpt, capsys):
    gen = {"model": {**GENERATOR["model"], "init_args": {**GENERATOR["model"]["init_args"],
                                                         "tokenizer_ckpt": str(tokenizer_ckpt)}}}
    full = tmp_path / "full"
    main(["fit", "-c", str(_write(tmp_path / "full.yaml", gen, _data(), _trainer(full, max_epochs=3)))])
    losses_full = _train_losses(full)
    assert len(losses_full) == 12
    assert np.mean(losses_full[-3:]) < np.mean(losses_full[:3]), losses_full
    assert list(full.glob("lightning_logs/version_0/samples/samples_*.png"))

    part = tmp_path / "part"
    cfg = _write(tmp_path / "part.yaml", gen, _data(), _trainer(part, max_epochs=3))
    main(["fit", "-c", str(cfg), "--trainer.callbacks+=helpers.StopAfterEpoch", "--trainer.callbacks.epoch=0"])
    ckpt = sorted(part.glob("lightning_logs/version_0/checkpoints/*.ckpt"))[-1]
    assert "epoch=0" in ckpt.name
    main(["fit", "-c", str(cfg), "--ckpt_path", str(ckpt)])
    losses_resumed = _train_losses(part)
    np.testing.assert_allclose(losses_resumed, losses_full, rtol=1e-5, atol=1e-6)

    final = sorted(part.glob("lightning_logs/version_1/checkpoints/*.ckpt"))[-1]
    out = tmp_path / "pred"
    main(["predict", "-c", str(cfg), "--trainer.default_root_dir", str(out),
          "--trainer.logger.init_args.save_dir", str(out), "--ckpt_path", str(final)])
    npz = list(out.glob("lightning_logs/*/predictions/samples_*.npz"))
    assert len(npz) == 1
    arr = np.load(npz[0])
    assert arr["arr_0"].shape == (20, 16, 16, 3) and arr["arr_0"].dtype == np.uint8
    # the seeding rule's enumeration (block 0 of every class, ...): 2 samples of each class
    np.testing.assert_array_equal(arr["arr_1"], np.repeat(np.arange(10), 2))
    assert len(list(out.glob("lightning_logs/*/predictions/png/*_class*.png"))) == 20
    assert len(list(out.glob("lightning_logs/*/predictions/grid.png"))) == 1

    # a sampling knob given on the command line wins over the checkpoint's hyper-parameters
    # (Lightning's CLI would silently put the checkpoint's cfg back), and the user is told
    out2 = tmp_path / "pred_cfg1"
    capsys.readouterr()
    main(["predict", "-c", str(cfg), "--trainer.default_root_dir", str(out2),
          "--trainer.logger.init_args.save_dir", str(out2), "--ckpt_path", str(final),
          "--model.init_args.sample_kwargs.num_steps=1"])
    assert "sample_kwargs.num_steps: 4 (checkpoint) -> 1 (config)" in capsys.readouterr().err
    used = yaml.safe_load(next(out2.glob("lightning_logs/*/config.yaml")).read_text())
    assert used["model"]["init_args"]["sample_kwargs"] == {"num_steps": 1, "cfg": 2.0}
    arr2 = np.load(next(out2.glob("lightning_logs/*/predictions/samples_*.npz")))
    assert not np.array_equal(arr2["arr_0"], arr["arr_0"])


def test_gan_path_uses_two_optimisers(tmp_path):
    tok = {"model": {**TOKENIZER["model"], "init_args": {**TOKENIZER["model"]["init_args"],
                                                         "disc_weight": 0.5, "disc_start": 2, "disc_layers": 2,
                                                         "disc_ndf": 16}}}
    root = tmp_path / "gan"
    main(["fit", "-c", str(_write(tmp_path / "gan.yaml", tok, _data(), _trainer(root, max_epochs=1)))])
    rows = list(csv.DictReader(open(next(root.glob("lightning_logs/version_0/metrics.csv")))))
    d = [r for r in rows if r.get("train/d_loss")]
    assert len(d) == 2  # batches 2 and 3: the discriminator starts at disc_start
    assert all(np.isfinite(float(r["train/g_loss"])) for r in d)


def _run_error(args, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code != 0
    cap = capsys.readouterr()
    return cap.err + cap.out


def test_bad_configs_name_the_problem(tmp_path, capsys, tokenizer_ckpt):
    gen_init = {**GENERATOR["model"]["init_args"], "tokenizer_ckpt": str(tmp_path / "missing.ckpt")}
    cfg = _write(tmp_path / "missing.yaml", {"model": {**GENERATOR["model"], "init_args": gen_init}}, _data(),
                 _trainer(tmp_path))
    err = _run_error(["fit", "-c", str(cfg)], capsys)
    assert "missing.ckpt" in err and "tokenizer_ckpt" in err

    bad_key = {**GENERATOR["model"]["init_args"], "tokenizer_ckpt": str(tokenizer_ckpt), "learning_rate": 1.0}
    cfg = _write(tmp_path / "key.yaml", {"model": {**GENERATOR["model"], "init_args": bad_key}}, _data(), _trainer(tmp_path))
    assert "learning_rate" in _run_error(["fit", "-c", str(cfg)], capsys)

    cfg = _write(tmp_path / "type.yaml", TOKENIZER, _data(), _trainer(tmp_path, max_epochs="many"))
    assert "max_epochs" in _run_error(["fit", "-c", str(cfg)], capsys)

    # a generator built for another vocabulary than the tokenizer's
    wrong = {**GENERATOR["model"]["init_args"], "tokenizer_ckpt": str(tokenizer_ckpt)}
    wrong["generator"] = {**wrong["generator"], "init_args": {**wrong["generator"]["init_args"], "vocab_size": 64}}
    cfg = _write(tmp_path / "vocab.yaml", {"model": {**GENERATOR["model"], "init_args": wrong}}, _data(), _trainer(tmp_path))
    err = _run_error(["fit", "-c", str(cfg)], capsys)
    assert "vocab_size" in err and "64" in err and "32" in err

    not_ckpt = tmp_path / "notes.ckpt"
    not_ckpt.write_text("not a checkpoint")
    gen_init = {**GENERATOR["model"]["init_args"], "tokenizer_ckpt": str(not_ckpt)}
    cfg = _write(tmp_path / "notckpt.yaml", {"model": {**GENERATOR["model"], "init_args": gen_init}}, _data(), _trainer(tmp_path))
    assert "not a PyTorch checkpoint" in _run_error(["fit", "-c", str(cfg)], capsys)


def test_omegaconf_interpolation_across_files(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    cfg = _write(tmp_path / "interp.yaml", TOKENIZER, _data(batch_size=12), _trainer(tmp_path, max_epochs=1))
    extra = tmp_path / "extra.yaml"
    extra.write_text("model:\n  init_args:\n    grid_images: ${data.init_args.batch_size}\n")
    cli = LightningCLI(model_class=None, subclass_mode_model=True, datamodule_class=None, subclass_mode_data=True,
                       parser_kwargs={"parser_mode": "omegaconf+"}, run=False,
                       args=["-c", str(cfg), "-c", str(extra)])
    assert cli.model.hparams.grid_images == 12
