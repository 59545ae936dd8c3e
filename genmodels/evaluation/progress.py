"""Progress lines for long evaluation work (sampling, feature extraction), rank 0 only.

``samples done / total, seconds per image, time left``, printed to stderr at most every
``every`` seconds and once at the end. Minimal on purpose: ``genmodels/utils/progress.py``
(training-side progress) may replace it.
"""
from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    seconds = int(round(max(0.0, seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """``update(n)`` after each piece of work; ``done`` counts all ranks' work when the caller
    scales its own count by the world size (every rank does the same share)."""

    def __init__(self, what: str, total: int, enabled: bool = True, every: float = 10.0, stream=None) -> None:
        self.what, self.total, self.enabled, self.every = what, int(total), enabled, every
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.t0 = time.perf_counter()
        self._last = self.t0

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        rate = elapsed / self.done if self.done else 0.0
        left = rate * max(0, self.total - self.done)
        return (f"genmodels eval: {self.what} {min(self.done, self.total)}/{self.total} "
                f"({100.0 * min(self.done, self.total) / max(1, self.total):.0f}%), {rate:.4f} s/img, "
                f"{_clock(left)} left")

    def update(self, n: int) -> None:
        self.done += int(n)
        now = time.perf_counter()
        if self.enabled and (now - self._last >= self.every or self.done >= self.total):
            self._last = now
            print(self.line(), file=self.stream, flush=True)
