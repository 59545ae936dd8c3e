"""Silence the messages Lightning and torch print on EVERY run that say nothing about the run.

Each filter matches one exact message; every other warning still shows:

* ``isinstance(treespec, LeafSpec)`` is deprecated: torch (2.10+) about Lightning's own
  ``utilities/_pytree.py``, nothing a user can act on;
* Lightning's "`tensorboardX` has been removed as a dependency" notice: the CSV logger it
  falls back to is our default (``metrics.csv`` in the run folder);
* Lightning's "Tip: ... litlogger" advertisement (an info log line, not a warning);
* "Found N module(s) in eval mode at the start of training" when those N modules are
  exactly the frozen parts of a module (a generator's tokenizer, an LPIPS network, the
  evaluator's feature extractor): ``ignore_frozen_eval_modules``. If any other module is in
  eval mode, the warning shows as usual.
"""
from __future__ import annotations

import logging
import re
import warnings
from typing import Callable, Iterable

import torch

_MESSAGES = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    (r"Starting from v1\.9\.0, `tensorboardX` has been removed as a dependency of the `lightning\.pytorch` package",
     UserWarning),
)
_TIP = "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]"


class _DropTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_TIP)


_drop_tip = _DropTip()


def silence_known_noise() -> None:
    """Install the filters above (idempotent)."""
    for message, category in _MESSAGES:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if _drop_tip not in log.filters:
            log.addFilter(_drop_tip)


def ignore_frozen_eval_modules(module: torch.nn.Module, frozen: Iterable[str]) -> Callable[[], None]:
    """If every submodule of ``module`` in eval mode lies under one of the attribute names
    ``frozen`` (e.g. ``("tokenizer", "evaluator")``), ignore Lightning's warning about exactly
    that many eval-mode modules. Call from ``on_fit_start``; returns the function that removes
    the filter again (call it from ``on_train_start``, right after Lightning's check)."""
    frozen = tuple(frozen)
    in_eval = [name for name, m in module.named_modules() if not m.training]
    if not in_eval or not all(name.split(".")[0] in frozen for name in in_eval):
        return lambda: None
    message = rf"Found {len(in_eval)} module\(s\) in eval mode at the start of training\."
    warnings.filterwarnings("ignore", message=message)
    entry = warnings.filters[0]

    def remove() -> None:
        if entry in warnings.filters:
            warnings.filters.remove(entry)

    return remove
