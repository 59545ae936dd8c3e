"""Every user mistake gets one line, `genmodels: error: ...`, naming the field / file / shape
(exit code 2, no traceback); programming errors keep their traceback; no file's pickle runs
unless the user opts in. Set GENMODELS_ERROR_TABLE=<file> to collect the messages."""
from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genmodels.checkpoints import from_official, read_checkpoint
from genmodels.cli import main, one_line
from genmodels.errors import GenmodelsError
from test_cli import GENERATOR, TOKENIZER, _data, _write

pytestmark = pytest.mark.usefixtures("one_thread")

MESSAGES: list[tuple[str, str]] = []


@pytest.fixture(scope="module", autouse=True)
def _table():
    yield
    out = os.environ.get("GENMODELS_ERROR_TABLE")
    if out:
        with open(out, "a") as f:
            for case, msg in MESSAGES:
                f.write(f"{case}\t{msg}\n")


def _trainer(root: Path, **kw) -> dict:
    t = {"accelerator": "cpu", "devices": 1, "default_root_dir": str(root), "enable_progress_bar": False,
         "enable_model_summary": False, "max_steps": 1, "limit_val_batches": 0, "logger": False}
    t.update(kw)
    return {"trainer": t}


def _error(case: str, args: list[str], capsys) -> str:
    """Run the CLI, expect exit code 2 and exactly one `genmodels: error:` line, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("genmodels: error:")]
    assert len(lines) == 1, err[-3000:]
    MESSAGES.append((case, lines[0]))
    return lines[0]


def _gen(**over) -> dict:
    init = {**GENERATOR["model"]["init_args"], **over}
    return {"model": {**GENERATOR["model"], "init_args": init}}


def _with_depth(gen: dict, depth: int) -> dict:
    g = gen["model"]["init_args"]["generator"]
    return _gen(**{**gen["model"]["init_args"],
                   "generator": {**g, "init_args": {**g["init_args"], "depth": depth}}})


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tokenizer checkpoint and a generator checkpoint (depth 2), one step each."""
    root = tmp_path_factory.mktemp("ckpts")
    main(["fit", "-c", str(_write(root / "tok.yaml", TOKENIZER, _data(), _trainer(root / "tok")))])
    tok = next((root / "tok").glob("**/*.ckpt"))
    gen = _gen(tokenizer_ckpt=str(tok))
    main(["fit", "-c", str(_write(root / "gen.yaml", gen, _data(), _trainer(root / "gen")))])
    return tok, next((root / "gen").glob("**/*.ckpt")), gen


# ---------------------------------------------------------------------------------------------- checkpoints
def test_ckpt_path_of_another_architecture_names_field_and_key(tmp_path, ckpts, capsys):
    tok, gen_ckpt, gen = ckpts
    cfg = _write(tmp_path / "d3.yaml", _with_depth(gen, 3), _data(), _trainer(tmp_path / "run"))
    msg = _error("--ckpt_path of a depth-2 generator, config depth 3", ["fit", "-c", str(cfg), "--ckpt_path",
                                                                        str(gen_ckpt)], capsys)
    assert "generator.init_args.depth=2 in the checkpoint but 3 in the config" in msg, msg
    assert "'generator.blocks.2." in msg and "not in the checkpoint" in msg and "(32,)" in msg, msg
    # the note names the architecture change, and no list-vs-tuple difference (betas)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["fit", "-c", str(cfg), "--ckpt_path", str(gen_ckpt)])
    err = capsys.readouterr().err
    assert "generator.init_args.depth: 2 (checkpoint) -> 3 (config)" in err, err
    assert "betas" not in err, err

    # a shape mismatch names both shapes
    g = gen["model"]["init_args"]["generator"]
    wide = _gen(**{**gen["model"]["init_args"], "generator": {**g, "init_args": {**g["init_args"], "hidden_size": 48,
                                                                                  "num_heads": 2}}})
    cfg = _write(tmp_path / "wide.yaml", wide, _data(), _trainer(tmp_path / "run"))
    msg = _error("--ckpt_path of hidden_size 32, config 48", ["fit", "-c", str(cfg), "--ckpt_path", str(gen_ckpt)],
                 capsys)
    assert "hidden_size=32 in the checkpoint but 48 in the config" in msg and "in the checkpoint but" in msg, msg
    assert "has shape (44, 32) in the checkpoint but (44, 48) in the model" in msg, msg


def test_same_config_resume_prints_no_false_note(tmp_path, ckpts, capsys):
    tok, gen_ckpt, gen = ckpts
    cfg = _write(tmp_path / "same.yaml", gen, _data(), _trainer(tmp_path / "run", max_steps=2))
    capsys.readouterr()
    main(["fit", "-c", str(cfg), "--ckpt_path", str(gen_ckpt)])
    assert "overrides" not in capsys.readouterr().err


def test_checkpoint_of_the_other_kind(tmp_path, ckpts, capsys):
    tok, gen_ckpt, gen = ckpts
    cfg = _write(tmp_path / "g.yaml", gen, _data(), _trainer(tmp_path / "run"))
    msg = _error("tokenizer checkpoint as a generator's --ckpt_path",
                 ["fit", "-c", str(cfg), "--ckpt_path", str(tok)], capsys)
    assert "is a tokenizer checkpoint" in msg and "model.init_args.tokenizer_ckpt" in msg, msg

    cfg = _write(tmp_path / "t.yaml", TOKENIZER, _data(), _trainer(tmp_path / "run"))
    msg = _error("generator checkpoint as a tokenizer's --ckpt_path",
                 ["fit", "-c", str(cfg), "--ckpt_path", str(gen_ckpt)], capsys)
    assert "is a generator checkpoint" in msg and "GeneratorModule" in msg, msg

    cfg = _write(tmp_path / "gg.yaml", _gen(tokenizer_ckpt=str(gen_ckpt)), _data(), _trainer(tmp_path / "run"))
    msg = _error("generator checkpoint as tokenizer_ckpt", ["fit", "-c", str(cfg)], capsys)
    assert "model.init_args.tokenizer_ckpt" in msg and "is a generator checkpoint" in msg, msg

    msg = _error("--ckpt_path file missing", ["fit", "-c", str(cfg), "--ckpt_path", str(tmp_path / "nope.ckpt")],
                 capsys)
    assert "--ckpt_path" in msg and "nope.ckpt" in msg


class _Payload:
    """Unpickling this writes a file: the proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_code_never_runs_without_opt_in(tmp_path, ckpts, capsys):
    tok, gen_ckpt, gen = ckpts
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    ckpt = torch.load(tok, map_location="cpu", weights_only=True)
    ckpt["x"] = _Payload(marker)
    torch.save(ckpt, evil)

    with pytest.raises(GenmodelsError, match=r"evil\.ckpt holds a pickled object .*trust_pickle=True") as e:
        read_checkpoint(evil)
    MESSAGES.append(("read_checkpoint of a crafted pickle (Python)", str(e.value)))
    cfg = _write(tmp_path / "evil.yaml", _gen(tokenizer_ckpt=str(evil)), _data(), _trainer(tmp_path / "run"))
    msg = _error("crafted pickle as tokenizer_ckpt", ["fit", "-c", str(cfg)], capsys)
    assert "model.init_args.tokenizer_ckpt" in msg and "--trust_pickle" in msg, msg
    cfg = _write(tmp_path / "evil2.yaml", TOKENIZER, _data(), _trainer(tmp_path / "run"))
    msg = _error("crafted pickle as --ckpt_path", ["fit", "-c", str(cfg), "--ckpt_path", str(evil)], capsys)
    assert "evil.ckpt" in msg and "--trust_pickle" in msg, msg
    assert not marker.exists(), "a pickle ran"

    # the explicit opt-ins do unpickle (here: run the payload)
    cfg = _write(tmp_path / "evil3.yaml", _gen(tokenizer_ckpt=str(evil)), _data(), _trainer(tmp_path / "run3"))
    main(["fit", "-c", str(cfg), "--trust_pickle=true"])
    assert marker.exists()
    marker.unlink()
    with pytest.raises(GenmodelsError):  # the flag held for that run only
        read_checkpoint(evil)
    read_checkpoint(evil, trust_pickle=True)
    assert marker.exists()
    # what the official MAR / FractalGen files pickle loads without opt-in
    official = tmp_path / "mar.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "args": argparse.Namespace(model="mar_base")}, official)
    assert read_checkpoint(official)["args"].model == "mar_base"


def test_cifar_batches_are_not_unpickled_blindly(tmp_path):
    from genmodels.data.cifar10 import read_batches

    marker = tmp_path / "pwned"
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": _Payload(marker), b"labels": [0]}))
    with pytest.raises(GenmodelsError, match="data_batch_1.*refused") as e:
        read_batches(tmp_path, ("data_batch_1",))
    MESSAGES.append(("CIFAR-10 batch file with a pickled callable", f"genmodels: error: {e.value}"))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- data
def _png(path: Path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 20, 3), value, np.uint8)).save(path)


def _folder_data(root: Path, **kw) -> dict:
    return {"data": {"class_path": "genmodels.data.ImageFolderDataModule",
                     "init_args": {"train_dir": str(root), "image_size": 16, "batch_size": 2, "val_size": 1,
                                   "random_flip": False, **kw}}}


def test_corrupt_image_names_file_and_skip_corrupt(tmp_path, capsys):
    for c in ("a", "b"):
        for i in range(3):
            _png(tmp_path / "imgs" / c / f"{i}.png")
    (tmp_path / "imgs" / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    cfg = _write(tmp_path / "c.yaml", TOKENIZER, _folder_data(tmp_path / "imgs"),
                 _trainer(tmp_path / "run", max_steps=-1, max_epochs=1))
    msg = _error("corrupt image in an image folder", ["fit", "-c", str(cfg)], capsys)
    assert "broken.png" in msg and "data.init_args.skip_corrupt: true" in msg, msg
    # a DataLoader worker wraps the error in its traceback: the CLI still prints our line
    wrapped = GenmodelsError("Caught UnreadableImageError in DataLoader worker process 0.\nOriginal Traceback "
                             "(most recent call last):\n  File ...\ngenmodels.data.image_folder.UnreadableImageError: "
                             "cannot read image x.png (...)")
    assert one_line(wrapped) == "cannot read image x.png (...)"


def test_empty_data(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    cfg = _write(tmp_path / "e.yaml", TOKENIZER, _folder_data(tmp_path / "empty"), _trainer(tmp_path / "run"))
    msg = _error("empty image folder", ["fit", "-c", str(cfg)], capsys)
    assert "data.init_args.train_dir" in msg and "is empty" in msg, msg

    _png(tmp_path / "one" / "a" / "0.png")
    cfg = _write(tmp_path / "o.yaml", TOKENIZER, _folder_data(tmp_path / "one"), _trainer(tmp_path / "run"))
    msg = _error("a train split with 0 images (1 image, val_size 1)", ["fit", "-c", str(cfg)], capsys)
    assert "val_size=1 leaves no training images" in msg, msg

    from genmodels.data import ImageDataModule, UInt8ImageDataset

    class Empty(ImageDataModule):
        num_classes = 1

        def _make_dataset(self, split, augment):
            return UInt8ImageDataset(torch.zeros(0, 1, 8, 8, dtype=torch.uint8), torch.zeros(0))

    with pytest.raises(GenmodelsError, match="the train split has 0 images") as e:
        Empty(batch_size=2, drop_last=False).train_dataloader()
    MESSAGES.append(("a data module whose train split is empty", f"genmodels: error: {e.value}"))
    with pytest.raises(GenmodelsError, match="the test split has 0 images"):
        Empty().test_dataloader()


def test_image_size_the_tokenizer_does_not_fit(tmp_path, ckpts, capsys):
    tok, gen_ckpt, gen = ckpts
    cfg = _write(tmp_path / "s.yaml", gen, _data() | {"data": {**_data()["data"], "init_args": {
        **_data()["data"]["init_args"], "image_size": 17}}}, _trainer(tmp_path / "run"))
    msg = _error("data image_size 17 for a 16x16 tokenizer (stride 2)", ["fit", "-c", str(cfg)], capsys)
    assert "data.init_args.image_size=17" in msg and "stride 2 does not divide 17" in msg, msg

    bad = {"model": {**TOKENIZER["model"], "init_args": {**TOKENIZER["model"]["init_args"], "tokenizer": {
        "class_path": "genmodels.tokenizers.kl_vae.KLVAE", "init_args": {
            "embed_dim": 4, "ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "resolution": 18,
            "attn_resolutions": []}}}}}
    cfg = _write(tmp_path / "kl.yaml", bad, _data(), _trainer(tmp_path / "run"))
    msg = _error("KL-VAE resolution 18 with stride 4", ["fit", "-c", str(cfg)], capsys)
    assert "resolution 18" in msg and "stride 4" in msg, msg


def test_training_labels_outside_the_classes(tmp_path, ckpts, capsys):
    tok, gen_ckpt, gen = ckpts
    g = gen["model"]["init_args"]["generator"]
    five = _gen(**{**gen["model"]["init_args"], "generator": {**g, "init_args": {**g["init_args"],
                                                                                  "num_classes": 5}}})
    cfg = _write(tmp_path / "l.yaml", five, _data(), _trainer(tmp_path / "run"))
    msg = _error("10-class data, generator num_classes 5", ["fit", "-c", str(cfg)], capsys)
    assert "training labels must lie in [0, 5)" in msg and "num_classes" in msg, msg

    # the null class (label == num_classes) is never a data label, for any generator
    from genmodels.generators.var import VAR

    var = VAR(vocab_size=16, num_classes=10, depth=1, embed_dim=32, num_heads=2, patch_nums=(1, 2))
    with pytest.raises(GenmodelsError, match=r"\[0, 10\)"):
        var.check_training_labels(torch.tensor([3, 10]))
    var.check_training_labels(torch.tensor([0, 9]))


# ---------------------------------------------------------------------------------------------- the rest
def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    cfg = _write(tmp_path / "w.yaml", TOKENIZER, _data(), _trainer(blocker / "runs"))
    msg = _error("default_root_dir under a regular file", ["fit", "-c", str(cfg)], capsys)
    assert msg.startswith(f"genmodels: error: trainer.default_root_dir: cannot write to {blocker / 'runs'}"), msg
    t = _trainer(tmp_path / "ok", logger={"class_path": "lightning.pytorch.loggers.CSVLogger",
                                          "init_args": {"save_dir": str(blocker / "logs")}})
    cfg = _write(tmp_path / "w2.yaml", TOKENIZER, _data(), t)
    msg = _error("logger save_dir (predictions folder) under a regular file", ["predict", "-c", str(cfg)], capsys)
    assert "trainer.logger.init_args.save_dir: cannot write to" in msg, msg


def test_from_official_unknown_arguments():
    for kind, kw in (("var-vqvae", {"chh": 1}), ("mar-kl", {"embed_dims": 16}), ("maskgit-titok", {"heads": 2})):
        with pytest.raises(GenmodelsError, match=f"from_official\\('{kind}'\\): unknown keyword argument") as e:
            from_official(kind, {}, **kw)
        MESSAGES.append((f"from_official('{kind}', **{kw})", f"genmodels: error: {e.value}"))
    with pytest.raises(GenmodelsError, match="unknown official checkpoint kind 'vqgan'") as e:
        from_official("vqgan", {})
    MESSAGES.append(("from_official('vqgan', ...)", f"genmodels: error: {e.value}"))


def test_config_values_rejected_by_constructors(tmp_path, capsys):
    bad = {"model": {**TOKENIZER["model"], "init_args": {**TOKENIZER["model"]["init_args"], "lr_schedule": "step"}}}
    cfg = _write(tmp_path / "lr.yaml", bad, _data(), _trainer(tmp_path / "run"))
    assert "lr_schedule must be" in _error("lr_schedule: step", ["fit", "-c", str(cfg)], capsys)
    tok = TOKENIZER["model"]["init_args"]["tokenizer"]
    bad = {"model": {**TOKENIZER["model"], "init_args": {**TOKENIZER["model"]["init_args"], "tokenizer": {
        **tok, "init_args": {**tok["init_args"], "ch": 24}}}}}
    cfg = _write(tmp_path / "ch.yaml", bad, _data(), _trainer(tmp_path / "run"))
    assert "GroupNorm(32)" in _error("tokenizer ch: 24", ["fit", "-c", str(cfg)], capsys)


class Buggy(Exception):
    pass


def test_programming_errors_keep_their_traceback(tmp_path, capsys, monkeypatch):
    cfg = _write(tmp_path / "ok.yaml", TOKENIZER, _data(), _trainer(tmp_path / "run"))
    # a ValueError from inside the training loop is a bug: not swallowed, not turned into one line
    monkeypatch.setattr("genmodels.training.tokenizer_module.TokenizerModule.training_step",
                        lambda self, batch, idx: (_ for _ in ()).throw(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        main(["fit", "-c", str(cfg)])
    monkeypatch.undo()
    # GENMODELS_DEBUG=1 shows the traceback of a user mistake too
    monkeypatch.setenv("GENMODELS_DEBUG", "1")
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = _write(tmp_path / "w.yaml", TOKENIZER, _data(), _trainer(blocker / "runs"))
    with pytest.raises(GenmodelsError, match="default_root_dir"):
        main(["fit", "-c", str(cfg)])


def test_ckpt_path_trained_on_another_tokenizer(tmp_path, ckpts, capsys):
    tok, gen_ckpt, gen = ckpts
    t = TOKENIZER["model"]["init_args"]["tokenizer"]
    wide = {"model": {**TOKENIZER["model"], "init_args": {**TOKENIZER["model"]["init_args"], "tokenizer": {
        **t, "init_args": {**t["init_args"], "ch": 64}}}}}
    main(["fit", "-c", str(_write(tmp_path / "tok64.yaml", wide, _data(), _trainer(tmp_path / "tok64")))])
    tok64 = next((tmp_path / "tok64").glob("**/*.ckpt"))
    cfg = _write(tmp_path / "g.yaml", _gen(tokenizer_ckpt=str(tok64)), _data(), _trainer(tmp_path / "run"))
    msg = _error("--ckpt_path trained on a ch=32 tokenizer, tokenizer_ckpt with ch=64",
                 ["fit", "-c", str(cfg), "--ckpt_path", str(gen_ckpt)], capsys)
    assert "the tokenizer of model.init_args.tokenizer_ckpt: init_args.ch=32 in the checkpoint but 64" in msg, msg
    assert "'tokenizer." in msg and "in the checkpoint but" in msg, msg
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["fit", "-c", str(cfg), "--ckpt_path", str(gen_ckpt)])
    assert "tokenizer (of tokenizer_ckpt).init_args.ch: 32 (checkpoint) -> 64 (config)" in capsys.readouterr().err
