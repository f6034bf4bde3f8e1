"""Progress of a long build: a live bar on a terminal, plain lines in a log file or pipe.

tqdm redraws its bar with carriage returns; in a job log or `| tee` that is one endless line of overwritten
bars. Away from a terminal a `PlainProgress` writes a normal line every `interval` seconds (and one at the end),
which reads well in any log.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 10.0


class PlainProgress:
    """The subset of tqdm the builders use (update, context manager), as periodic lines."""

    def __init__(self, total: int | None, desc: str, unit: str, stream: TextIO, interval: float = LOG_INTERVAL_S):
        self.total, self.desc, self.unit, self.stream, self.interval = total, desc, unit, stream, interval
        self.n = 0
        self._start = self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._write(now)

    def _write(self, now: float, done: str = "") -> None:
        rate = self.n / max(now - self._start, 1e-9)
        of = f"/{self.total}" if self.total else ""
        share = f" ({self.n / self.total:.0%})" if self.total else ""
        print(f"{self.desc}: {self.n}{of} {self.unit}{share}, {rate:.0f} {self.unit}/s{done}", file=self.stream,
              flush=True)

    def close(self) -> None:
        self._write(time.monotonic(), ", done")

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, exc_type, *_exc) -> None:
        if exc_type is None:  # a failed phase is reported by its error, not by a "done" line
            self.close()


def progress(total: int | None, desc: str, unit: str = "img", stream: TextIO | None = None):
    """A tqdm bar on a terminal (stderr by default), else a PlainProgress."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return tqdm(total=total, desc=desc, unit=unit, mininterval=0.1, file=stream)
    return PlainProgress(total, desc, unit, stream)
