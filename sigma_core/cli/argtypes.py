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


def out_folder(text: str):
    """A folder a command can write into: an existing writable directory, or a new one whose
    nearest existing parent is a writable directory; not a file, a dangling link or a read-only
    folder, and not ``''`` (the current directory)."""
    import os  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    if not text.strip():
        raise argparse.ArgumentTypeError("an empty folder name would write into the current directory")
    path = Path(text)
    if path.is_symlink() and not path.exists():
        raise argparse.ArgumentTypeError(f"{text} is a symbolic link to {os.readlink(path)}, which does not exist")
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    probe = path
    while not probe.exists():
        if probe.is_symlink():
            raise argparse.ArgumentTypeError(f"{probe} is a symbolic link to {os.readlink(probe)}, which does not exist")
        probe = probe.parent
    if not probe.is_dir():
        raise argparse.ArgumentTypeError(f"{probe} is not a directory, so {text} cannot be created")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{probe} is not writable (read-only or no permission)")
    return path


def finite_float(text: str) -> float:
    """Any finite number."""
    value = _float(text, "a number")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value
