"""Progress of the steps that take more than a few seconds: one mechanism, tqdm.

A bar is drawn on standard error when it is a terminal and the ``covidxray`` logger lets
INFO through (the CLI's ``--quiet`` raises it to WARNING); in a log file or a pipe there is
no bar, so captured output stays readable.
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("covidxray")


def shown() -> bool:
    """Whether progress bars are drawn now."""
    return sys.stderr.isatty() and log.isEnabledFor(logging.INFO)


def progress(iterable=None, *, desc: str | None, total: int | None = None, unit: str = "image",
             enabled: bool = True):
    """``iterable`` wrapped in a bar (or a bar to ``update`` by hand when ``iterable`` is
    None), disabled when bars are not shown or not ``enabled``."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not (enabled and shown()),
                leave=False, dynamic_ncols=True, file=sys.stderr)


class Steps:
    """One log line per step of a long job: 'fold 2 of 5 (ieee): 3.1 min elapsed, about
    4.6 min left' (the estimate: the mean time of the steps done so far)."""

    def __init__(self, total: int, what: str):
        self.total, self.what, self.done, self.started = total, what, 0, time.monotonic()

    def start(self, name: str) -> None:
        elapsed = (time.monotonic() - self.started) / 60
        left = (f", about {elapsed / self.done * (self.total - self.done):.1f} min left"
                if self.done else "")
        log.info("%s %d of %d (%s): %.1f min elapsed%s", self.what, self.done + 1, self.total,
                 name, elapsed, left)

    def finish(self) -> None:
        self.done += 1
