"""Small things tests import by class path (tests/ is on sys.path under pytest)."""
from lightning.pytorch.callbacks import Callback


class StopAfterEpoch(Callback):
    """Simulate an interrupted run: stop after ``epoch`` (0-based) has finished."""

    def __init__(self, epoch: int = 0) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch >= self.epoch:
            trainer.should_stop = True


def mar_fixture_weights():
    """The module ``tests/fixtures/mar/weights.py`` (deterministic perturbation of weights, shared
    with the script that recorded the MAR fixtures from the official code)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("mar_fixture_weights",
                                                  Path(__file__).parent / "fixtures" / "mar" / "weights.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
