"""argparse `type=` helpers with ranges: a bad number is refused while the command line is parsed, before any slow
loading, as one line that names the option (argparse adds "argument --steps: ")."""

from __future__ import annotations

import argparse
import math


def _parse(text: str, kind: type, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def int_range(low: int | None = None, high: int | None = None, below: int | None = None):
    """An int type: low <= n <= high (or n < below); None leaves that side open."""
    def parse(text: str) -> int:
        n = _parse(text, int, "a whole number")
        if (low is not None and n < low) or (high is not None and n > high) or (below is not None and n >= below):
            raise argparse.ArgumentTypeError(f"give a whole number {_span(low, high, below)}, not {text}")
        return n

    parse.__name__ = "int"  # argparse names the type in its own messages
    return parse


def float_range(low: float | None = None, high: float | None = None, low_open: bool = False):
    """A finite float type: low <= x <= high (low < x with `low_open`); None leaves that side open."""
    def parse(text: str) -> float:
        x = _parse(text, float, "a number")
        too_low = low is not None and (x <= low if low_open else x < low)
        if not math.isfinite(x) or too_low or (high is not None and x > high):
            side = f"above {low:g}" if low_open and high is None else _span(low, high, None)
            raise argparse.ArgumentTypeError(f"give a finite number {side}, not {text}".replace("  ", " "))
        return x

    parse.__name__ = "float"
    return parse


def _span(low, high, below) -> str:
    if below is not None:
        return f"from {low} to {below - 1}" if low is not None else f"below {below}"
    if low is not None and high is not None:
        return f"from {low:g} to {high:g}"
    if low is not None:
        return f"of at least {low:g}"
    return f"of at most {high:g}" if high is not None else ""


SEED = int_range(0, below=2**64)  # what torch.Generator.manual_seed takes (it would read -1 as 2**64 - 1)
