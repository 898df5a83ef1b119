"""`stride offline ...`: train a demo model, train its classifier, evaluate its samplers."""
from __future__ import annotations

import argparse
import shlex
import sys

from stride_diffusion.offline import (
    dode,
    evaluate,
    grid_search,
    guidance_eval,
    importer,
    search,
    secant,
    train,
)

# Every subcommand lives in its module: `add_parser(subparsers)` registers it (a module may register
# more than one, as train.py does) and sets `func(args, command) -> exit code`, where `command` is the
# command line as typed, recorded in what the subcommand writes. In `--help` order:
SUBCOMMANDS = (train, evaluate, importer, search, dode, grid_search, guidance_eval, secant)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stride offline", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parser().parse_args(argv)
    try:
        return _run(a, "stride offline " + shlex.join(argv))
    except ValueError as e:  # bad input (flags, files, artifacts): the message, not a traceback
        print(f"stride offline {a.cmd}: {e}", file=sys.stderr)
        return 2


def check_device(name: str) -> str:
    """--device: a torch device this machine has; ValueError (exit 2) otherwise."""
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown --device {name!r}; e.g. cpu, cuda, cuda:1 ({e})") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return name


def _run(a, command: str) -> int:
    if getattr(a, "device", None) is not None:
        check_device(a.device)
    return a.func(a, command)
