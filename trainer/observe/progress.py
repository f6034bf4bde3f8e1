"""Progress bars (tqdm) for training and evaluation: samples/s and time left, on rank 0 at a terminal only.

Other ranks would draw the same bar again, and a bar written to a file or a job log is a stream of carriage
returns; there the plain log lines that train.py writes every `train.log_every` steps remain the record.
While a bar is open, log records are written through tqdm so that they do not tear the bar apart.

    bar = ProgressBar(total=1000, desc="train", unit="sample", enabled=progress_enabled(rank))
    bar.update(128, step="10/100", loss=0.52)
    bar.close()
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm


def progress_enabled(rank: int, stream: TextIO | None = None) -> bool:
    """Draw bars only on rank 0 and only when `stream` (stderr by default) is a terminal."""
    stream = sys.stderr if stream is None else stream
    if rank != 0:
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def _terminal_size(stream: TextIO) -> bool:
    """Whether `stream` is a terminal that knows its columns and lines."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return False
    return size.columns > 0 and size.lines > 0


class ProgressBar:
    """A tqdm bar that is a no-op when disabled; counts samples so the rate reads samples/s."""

    def __init__(self, total: int | None, desc: str, unit: str = "sample", initial: int = 0,
                 enabled: bool = True, leave: bool = True, stream: TextIO | None = None):
        self.enabled = enabled
        self._bar = None
        self._redirect = contextlib.ExitStack()
        self._postfix: dict = {}
        if not enabled:
            return
        stream = sys.stderr if stream is None else stream
        # A terminal that reports no size (a pty opened by `script` or a job runner) reads as 0 x 0, in which
        # tqdm draws nothing: the bar gets a fixed size there.
        size = {"dynamic_ncols": True} if _terminal_size(stream) else {"ncols": 100, "nrows": 20}
        self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, initial=initial, leave=leave,
                         file=stream, smoothing=0.1, **size)
        self._redirect.enter_context(logging_redirect_tqdm(tqdm_class=tqdm))

    @property
    def count(self) -> float:
        return self._bar.n if self._bar is not None else 0

    def update(self, n: int, **postfix) -> None:
        if self._bar is None:
            return
        if postfix:
            self._postfix.update(postfix)  # a value given once stays shown until given again
            self._bar.set_postfix(self._postfix, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        if self._bar is None:
            return
        self._redirect.close()
        self._bar.close()
        self._bar = None
