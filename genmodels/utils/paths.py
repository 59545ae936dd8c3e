"""Where a run writes its files."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def run_dir(trainer: Any) -> Path:
    """The logger's folder of this run (``trainer.log_dir`` without its collective call).

    ``Trainer.log_dir`` broadcasts from rank 0, so calling it on one rank only (as code
    that writes files on rank 0 does) deadlocks under DDP; this reads the same folder
    locally on any rank. Without a logger: the trainer's ``default_root_dir``.
    """
    loggers = trainer.loggers
    if loggers:
        log_dir = getattr(loggers[0], "log_dir", None)
        return Path(log_dir if log_dir is not None else loggers[0].save_dir)
    return Path(trainer.default_root_dir)
