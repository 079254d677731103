"""argparse ``type=`` converters shared by the sub-commands.

Each raises :class:`argparse.ArgumentTypeError` with a plain sentence (what the flag needs and
what it got), which the command line prints as one line naming the flag, exiting with status 2.

>>> positive_int("3"), nonnegative_int("0"), integer("-4"), positive_float("1e-3"), finite_float("-2")
(3, 0, -4, 0.001, -2.0)
>>> positive_int("0")
Traceback (most recent call last):
argparse.ArgumentTypeError: must be a positive integer, got 0
>>> positive_float("abc")
Traceback (most recent call last):
argparse.ArgumentTypeError: must be a positive number, got 'abc'
"""
from __future__ import annotations

import argparse
import math


def _int(text: str, need: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {need}, got {text!r}") from None


def _float(text: str, need: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {need}, got {text!r}") from None


def integer(text: str) -> int:
    """Any integer."""
    return _int(text, "an integer")


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _int(text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    value = _int(text, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _float(text, "a positive number")
    if not value > 0 or value == math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    """A finite number >= 0."""
    value = _float(text, "a number >= 0")
    if not (0 <= value < math.inf):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def finite_float(text: str) -> float:
    """Any finite number."""
    value = _float(text, "a number")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value
