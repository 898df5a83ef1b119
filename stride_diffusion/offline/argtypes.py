"""argparse `type=` converters shared by the `stride offline` subcommands."""
from __future__ import annotations


def ints(s) -> list:
    """'3,4,5' -> [3, 4, 5] (empty items skipped)."""
    return [int(v) for v in str(s).split(",") if v.strip()]


def floats(s) -> list:
    """'1.5,2' -> [1.5, 2.0] (empty items skipped)."""
    return [float(v) for v in str(s).split(",") if v.strip()]


def names(s) -> list:
    """'ddim,heun' -> ['ddim', 'heun'] (empty items skipped)."""
    return [v for v in str(s).split(",") if v]


def float_pair(s) -> tuple:
    """'lo,hi' -> (lo, hi) as floats."""
    lo, hi = (float(v) for v in s.split(","))
    return (lo, hi)
