"""Faults that tests inject into `genmodels fit` runs (imported by class path; tests/ is on
PYTHONPATH in the subprocesses the tests start)."""
from __future__ import annotations

import io
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from genmodels.training.common import AtomicCheckpointIO


class PauseAtStep(Callback):
    """At the start of batch ``step`` (checkpoints of earlier steps are on disk), touch
    ``marker`` and hang, so that the test can SIGKILL the process at a known point."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            Path(self.marker).touch()
            time.sleep(600)


class PoisonAtStep(Callback):
    """Make the loss of batch ``step`` NaN (one weight set to NaN before the step)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(p for p in pl_module.parameters() if p.requires_grad).fill_(float("nan"))


class SlowCheckpointIO(AtomicCheckpointIO):
    """Our atomic checkpoint IO, except that the ``nth`` save of a file named ``name`` writes
    half of the bytes, touches ``marker`` and hangs: a SIGKILL then lands mid-write."""

    def __init__(self, name: str = "last.ckpt", nth: int = 2, marker: str = "writing") -> None:
        super().__init__()
        self.name, self.nth, self.marker, self.count = name, nth, marker, 0

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        self._target = Path(path).name
        super().save_checkpoint(checkpoint, path, storage_options)

    def _write(self, checkpoint, f) -> None:
        if self._target == self.name:
            self.count += 1
            if self.count == self.nth:
                buf = io.BytesIO()
                torch.save(checkpoint, buf)
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                f.flush()
                Path(self.marker).touch()
                time.sleep(600)
        super()._write(checkpoint, f)
