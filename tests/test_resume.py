"""Nothing lost: a `genmodels fit` killed with SIGKILL mid-epoch (after a checkpoint, or while
writing one) resumes from last.ckpt to the same weights and losses as an uninterrupted run; a
non-finite loss stops the run with one line, the last good checkpoint intact."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from genmodels.cli import main
from test_cli import GENERATOR, TOKENIZER, _data, _train_losses, _write

pytestmark = pytest.mark.usefixtures("one_thread")

TESTS = Path(__file__).parent
STEPS, PER_EPOCH = 8, 6  # the kill at step 4 is mid-epoch 0; the run crosses into epoch 1


def _trainer(root: Path, *callbacks: dict, plugins: list | None = None) -> dict:
    ckpt = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(root / "ckpt"), "every_n_train_steps": 2, "save_last": True,
                          "save_top_k": -1}}
    t = {"accelerator": "cpu", "devices": 1, "default_root_dir": str(root), "enable_progress_bar": False,
         "enable_model_summary": False, "log_every_n_steps": 1, "limit_train_batches": PER_EPOCH,
         "limit_val_batches": 0, "max_steps": STEPS, "callbacks": [ckpt, *callbacks],
         "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(root)}}}
    if plugins:
        t["plugins"] = plugins
    return {"trainer": t, "seed_everything": 0}


@pytest.fixture(scope="module")
def gen_config(tmp_path_factory):
    """A generator config on an (untrained) tiny tokenizer: exact resume does not need a good one."""
    root = tmp_path_factory.mktemp("resume")
    tok_root = root / "tok"
    t = {"accelerator": "cpu", "devices": 1, "default_root_dir": str(tok_root), "enable_progress_bar": False,
         "enable_model_summary": False, "max_steps": 1, "limit_val_batches": 0, "logger": False}
    main(["fit", "-c", str(_write(root / "tok.yaml", TOKENIZER, _data(), {"trainer": t}))])
    tok = next(tok_root.glob("**/*.ckpt"))
    gen = {"model": {**GENERATOR["model"], "init_args": {**GENERATOR["model"]["init_args"],
                                                         "tokenizer_ckpt": str(tok)}}}

    def make(run: Path, *callbacks: dict, plugins: list | None = None) -> Path:
        return _write(run.parent / f"{run.name}.yaml", gen, _data(), _trainer(run, *callbacks, plugins=plugins))

    full = root / "full"
    main(["fit", "-c", str(make(full))])
    return make, full


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _tensors(x, prefix: str = "") -> dict:
    if torch.is_tensor(x):
        return {prefix: x}
    if isinstance(x, dict):
        return {k2: v2 for k, v in x.items() for k2, v2 in _tensors(v, f"{prefix}.{k}").items()}
    return {}


def _assert_same_run(resumed: Path, full: Path, from_step: int) -> None:
    a, b = _state(resumed / "ckpt" / "last.ckpt"), _state(full / "ckpt" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == STEPS
    for k, v in b["state_dict"].items():
        tol = 1e-5 * max(1.0, float(v.abs().max())) if v.is_floating_point() else 0
        assert (a["state_dict"][k] - v).abs().max() <= tol, k
    ema = [name for name in b["callbacks"] if "WeightAveraging" in name]
    assert ema, list(b["callbacks"])
    for name in ema:  # the EMA weights
        for k, v in _tensors(b["callbacks"][name]).items():
            other = _tensors(a["callbacks"][name])[k]
            assert (other.float() - v.float()).abs().max() <= 1e-5 * max(1.0, float(v.float().abs().max())), (name, k)
    losses_full = _train_losses(full)
    losses_resumed = _train_losses(resumed)[-(STEPS - from_step):]  # the resumed run's own steps
    assert len(losses_full) == STEPS
    np.testing.assert_allclose(losses_resumed, losses_full[from_step:], rtol=1e-5, atol=1e-6)


def _fit_until_marker(config: Path, marker: Path, timeout: float = 240) -> None:
    """Start `genmodels fit -c config` in a subprocess, SIGKILL it once ``marker`` appears."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "genmodels.cli", "fit", "-c", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    start = time.time()
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before the kill point: {proc.stderr.read().decode()[-2000:]}")
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError("the run never reached the kill point")
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_mid_epoch_then_resume_is_exact(tmp_path, gen_config):
    make, full = gen_config
    run, marker = tmp_path / "run", tmp_path / "paused"
    pause = {"class_path": "faults.PauseAtStep", "init_args": {"step": 5, "marker": str(marker)}}
    _fit_until_marker(make(run, pause), marker)
    last = run / "ckpt" / "last.ckpt"
    state = _state(last)
    assert state["global_step"] == 4  # written at step 4, mid-epoch 0 (6 batches per epoch)
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "batches": 4}]
    main(["fit", "-c", str(make(run)), "--ckpt_path", str(last)])
    _assert_same_run(run, full, from_step=4)


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, gen_config):
    make, full = gen_config
    run, marker = tmp_path / "run", tmp_path / "writing"
    slow = {"class_path": "faults.SlowCheckpointIO", "init_args": {"name": "last.ckpt", "nth": 2,
                                                                    "marker": str(marker)}}
    _fit_until_marker(make(run, plugins=[slow]), marker)  # killed halfway through writing last.ckpt at step 4
    last = run / "ckpt" / "last.ckpt"
    assert _state(last)["global_step"] == 2  # the previous last.ckpt, whole and loadable
    assert list((run / "ckpt").glob(".last.ckpt.tmp-*")), "the half-written file should be the temporary one"
    main(["fit", "-c", str(make(run)), "--ckpt_path", str(last)])
    _assert_same_run(run, full, from_step=2)


def test_non_finite_loss_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, gen_config, capsys):
    make, _ = gen_config
    run = tmp_path / "nan"
    poison = {"class_path": "faults.PoisonAtStep", "init_args": {"step": 3}}
    with pytest.raises(SystemExit) as e:
        main(["fit", "-c", str(make(run, poison))])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("genmodels: error: training stopped at step 3: loss term 'loss' is nan"), err[-1]
    last = _state(run / "ckpt" / "last.ckpt")
    assert last["global_step"] == 2 and all(torch.isfinite(v).all() for v in last["state_dict"].values()
                                            if v.is_floating_point())


def test_resumed_loader_replays_augmented_batches_exactly(tmp_path):
    """Random crops and flips of the resumed epoch depend on (seed, epoch, position) only: a fresh
    loader restored to "epoch 1, 2 batches done" hands out exactly the rest of that epoch, whatever
    the global RNG says."""
    from PIL import Image

    from genmodels.data import ImageFolderDataModule

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for i in range(5):
            (tmp_path / c).mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")

    def loader():
        dm = ImageFolderDataModule(train_dir=str(tmp_path), val_size=2, image_size=8, batch_size=2, seed=5,
                                   preprocess="resize_crop", resize_ratio=1.5, random_crop=True, random_flip=True)
        dm.setup("fit")
        return dm.train_dataloader()

    full = loader()
    full.sampler.set_epoch(1)
    torch.manual_seed(0)
    batches = [x for x, _ in full]
    assert full.state_dict() == {"epoch": 1, "batches": 4}
    resumed = loader()
    resumed.load_state_dict({"epoch": 1, "batches": 2})
    torch.manual_seed(1)  # another global RNG state: nothing may depend on it
    rest = [x for x, _ in resumed]
    assert len(rest) == 2 and all(torch.equal(a, b) for a, b in zip(rest, batches[2:]))
    again = loader()
    again.sampler.set_epoch(1)
    assert not all(torch.equal(a, b) for a, b in zip([x for x, _ in again][:2], batches[2:]))  # not a constant


def test_check_finite_losses_names_the_term_and_agrees_across_ranks():
    from genmodels.training.common import NonFiniteLossError, check_finite_losses

    check_finite_losses({"loss": torch.tensor(1.0), "recon": torch.full((2, 3), float("nan"))}, 7)  # not a scalar
    with pytest.raises(NonFiniteLossError, match=r"step 7: loss term 'vb' is inf \(also non-finite: loss\)"):
        check_finite_losses({"mse": torch.tensor(0.5), "vb": torch.tensor(float("inf")),
                             "loss": torch.tensor(float("nan"))}, 7)

    class OtherRankDiverged:  # a 2-process strategy whose other rank saw a NaN
        world_size = 2

        def reduce_boolean_decision(self, decision, all=True):
            return False

    with pytest.raises(NonFiniteLossError, match="non-finite on another process"):
        check_finite_losses({"loss": torch.tensor(1.0)}, 3, OtherRankDiverged())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumable_loader_skips_what_was_trained_on(num_workers):
    """Restored to "epoch 3, 5 batches done", the loader hands out exactly the other batches of
    epoch 3, then whole epochs (with worker processes too: torch iterates the index sampler
    twice while creating a multi-process iterator, and reuses a persistent one)."""
    from genmodels.data import DigitsDataModule

    def loader():
        return DigitsDataModule(image_size=8, batch_size=64, num_workers=num_workers).train_dataloader()

    full = loader()
    full.sampler.set_epoch(3)
    labels = [y for _, y in full]
    resumed = loader()
    resumed.load_state_dict({"epoch": 3, "batches": 5})
    assert len(resumed) == len(labels) == 22  # Lightning counts the epoch's batches from the full length
    rest = [y for _, y in resumed]
    assert len(rest) == 17 and all(torch.equal(a, b) for a, b in zip(rest, labels[5:]))
    assert resumed.state_dict() == {"epoch": 3, "batches": 22}
    resumed.sampler.set_epoch(4)
    fresh = loader()
    fresh.sampler.set_epoch(4)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(resumed, fresh))
    assert resumed.state_dict() == {"epoch": 4, "batches": 22}
