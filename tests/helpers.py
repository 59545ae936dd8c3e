"""Small things tests import by class path (tests/ is on sys.path under pytest)."""
from lightning.pytorch.callbacks import Callback


class StopAfterEpoch(Callback):
    """Simulate an interrupted run: stop after ``epoch`` (0-based) has finished."""

    def __init__(self, epoch: int = 0) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch >= self.epoch:
            trainer.should_stop = True
