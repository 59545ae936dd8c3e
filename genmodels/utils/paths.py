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
        folder = getattr(loggers[0], "log_dir", None) or getattr(loggers[0], "save_dir", None)
        if folder is not None:  # fast_dev_run's DummyLogger has neither
            return Path(folder)
    if hasattr(trainer, "strategy"):  # a Lightning Trainer without a logger
        return Path(trainer.default_root_dir)
    # a stand-in object (tests, scripts): its own log_dir / default_root_dir
    return Path(getattr(trainer, "log_dir", None) or getattr(trainer, "default_root_dir", None) or ".")


def check_writable(folder: str | Path, field: str) -> None:
    """Create ``folder`` (and parents) and write a test file there; a ``GenmodelsError``
    naming ``field`` and the folder if that fails (read-only disk, a file in the way, no
    permission), before any work is done."""
    import tempfile

    from genmodels.errors import GenmodelsError

    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".genmodels-write-test-"):
            pass
    except OSError as e:
        raise GenmodelsError(f"{field}: cannot write to {folder} ({type(e).__name__}: {e.strerror or e})") from None
