"""Argument types shared by the CLI's commands: a bad value is a usage error naming the
flag (argparse adds it), with exit code 2."""

from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    """A whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_floats(text: str) -> tuple[float, ...]:
    """Comma-separated numbers above 0: ``0.8,1.0,1.2``."""
    values = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item.strip()!r} is not a number") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"values must be finite and above 0, got {value}")
        values.append(value)
    return tuple(values)


def probability(text: str) -> float:
    """A number in [0, 1] (a score threshold): NaN, infinities and values outside are errors."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:  # also false for NaN
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text}")
    return value
