"""Numeric command-line options checked where argparse reads them: `type=int_in(1)`, `type=number_in(0, 1)`. A
value out of range, not finite (nan, inf) or not a number is refused with argparse's one line naming the option
(usercli.OneLineParser), before any work; so `--port 70000` is never handed to a socket that would take it modulo
65536, nor `--gpu-mem-gib nan` to arithmetic that compares false with everything."""
from __future__ import annotations

import argparse
import math
from typing import Callable

PORT = (0, 65535)  # 0: any free port (the command prints the one it got)
# Without an upper bound of its own, a whole number must still fit 64 bits (numpy, torch and file formats take no
# more) and a number must stay within float32's range (beyond it a tensor holds inf).
INT_LIMIT = 2**63
FLOAT_LIMIT = 3.4028234663852886e38


def _range_text(low: float | None, high: float | None, low_open: bool = False) -> str:
    if high is None:
        return f"> {low:g}" if low_open else f">= {low:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}]"


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number in [low, high] (when high is None, below INT_LIMIT)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number {_range_text(low, high)}, "
                                             f"got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {_range_text(low, high)}, got {value}")
        if value >= INT_LIMIT:
            raise argparse.ArgumentTypeError(f"must be {_range_text(low, high)} and below 2**63, got {value}")
        return value
    return parse


def number_in(low: float, high: float | None = None, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high] ((low, high] when low_open; when high is None, at most
    FLOAT_LIMIT)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {_range_text(low, high, low_open)}, got "
                                             f"{text!r}") from None
        too_low = value <= low if low_open else value < low
        if not math.isfinite(value) or too_low or value > (FLOAT_LIMIT if high is None else high):
            raise argparse.ArgumentTypeError(f"must be a finite number {_range_text(low, high, low_open)}, got "
                                             f"{text}")
        return value
    return parse
