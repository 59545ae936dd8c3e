"""One progress display for long loops (latent caching, evaluation sampling, feature extraction).

``progress(iterable_or_total, desc, unit="img")`` is a ``tqdm`` bar (tqdm is a Lightning
dependency) that shows ``done/total``, seconds per ``unit`` and the time left, only on rank 0::

    for batch in progress(loader, "features"):           # counts items of the iterable
        ...
    with progress(len(dataset), "cache train") as bar:   # counts what you add
        for images, labels in loader:
            ...
            bar.update(len(labels))

On other ranks (or with ``enabled=False``) it is a silent pass-through with the same interface.
Written to stderr; when stderr is not a terminal (log files, CI) it redraws at most every
``log_interval`` seconds so that logs stay short.
"""
from __future__ import annotations

import os
import sys
from typing import Iterable

from tqdm import tqdm

# done/total, elapsed<left, mean seconds per unit (3 significant digits, "s/img", even when fast).
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {s_per_unit}s/{unit}]"


class _Bar(tqdm):
    """tqdm with ``s_per_unit`` (elapsed / done, e.g. ``0.0123``) for the bar format: tqdm's own
    inverse rate has two decimals, which reads 0.00 s/img for fast work."""

    @property
    def format_dict(self):
        d = super().format_dict
        d["s_per_unit"] = f"{d['elapsed'] / d['n']:.3g}" if d["n"] else "?"
        return d


def global_rank() -> int:
    """This process's rank: torch.distributed's when initialised, else the launcher's environment
    (``RANK`` from torchrun / Lightning, ``SLURM_PROCID``), else 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def progress(iterable_or_total: Iterable | int | None = None, desc: str = "", unit: str = "img",
             enabled: bool | None = None, log_interval: float = 30.0, **kwargs) -> tqdm:
    """A tqdm bar over ``iterable_or_total`` (an iterable, or the total count as an int).

    Args:
        iterable_or_total: what to iterate (``len`` gives the total when it has one), or the
            total number of ``unit`` as an int (then call ``.update(n)``).
        desc: label shown before the bar.
        unit: what is counted ("img", "batch" ...): the rate reads "s/<unit>".
        enabled: show it; default: on rank 0 only.
        log_interval: minimum seconds between redraws when stderr is not a terminal.
        kwargs: passed to ``tqdm`` (e.g. ``total=`` for an iterable without ``len``).
    """
    if enabled is None:
        enabled = global_rank() == 0
    if isinstance(iterable_or_total, int):
        kwargs.setdefault("total", iterable_or_total)
        iterable = None
    else:
        iterable = iterable_or_total
    out = kwargs.setdefault("file", sys.stderr)
    tty = hasattr(out, "isatty") and out.isatty()
    kwargs.setdefault("mininterval", 0.5 if tty else log_interval)
    return _Bar(iterable, desc=desc, unit=unit, disable=not enabled, bar_format=BAR_FORMAT,
                dynamic_ncols=True, **kwargs)
