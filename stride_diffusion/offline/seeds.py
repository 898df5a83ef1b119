"""Every seed the offline tools use, derived here so that no two streams can share a noise draw.

A seed s gives one noise draw, `seeded_noise([s])`; a generator stream seeded with s starts with that
same draw. Each stream owns a half-open range of seeds and only draws inside it:

    train       model and classifier training generators (their --seed)
    evaluation  the reported rows: set j is EVAL_BASE + SET_STRIDE * j + i, i < n
    selection   everything that *chooses*: the auto-pick, the guidance default, the search's kept
                iterate, the secant recipe probes, the grid baselines' held-out check
    search      the solver search's training generator (--seed is an offset in this range)
    dode        D-ODE's fitting samples
    grid        the GITS grid fit's teacher samples
    secant      the secant conversion's training generator (--seed is an offset in this range)

Anything that would leave its range (too many sets, too large an n, a seed outside) is refused with
ValueError, which the CLI turns into exit status 2 and the message.
"""
from __future__ import annotations

import itertools

SET_STRIDE = 1_000_000
MAX_SETS = 10

STREAMS = {  # name: (first seed, number of seeds)
    "train": (0, 1_000_000),
    "evaluation": (10_000_000, SET_STRIDE * MAX_SETS),
    "selection": (20_000_000, SET_STRIDE),
    "dode": (30_000_000, SET_STRIDE),
    "search": (40_000_000, SET_STRIDE),
    "grid": (50_000_000, SET_STRIDE),
    "secant": (60_000_000, SET_STRIDE),
}
EVAL_BASE = STREAMS["evaluation"][0]
SELECTION_BASE = STREAMS["selection"][0]


def stream_range(name: str, first: int, count: int) -> range:
    """Seeds first .. first + count - 1, checked to lie inside stream `name`."""
    if name not in STREAMS:
        raise ValueError(f"unknown seed stream {name!r}; allowed: {list(STREAMS)}")
    lo, size = STREAMS[name]
    if count < 1:
        raise ValueError(f"{name} seeds: need at least one sample, got {count}")
    if not (lo <= first and first + count <= lo + size):
        raise ValueError(f"{name} seeds {first}..{first + count - 1} leave the {name} range "
                         f"{lo}..{lo + size - 1}; they would collide with another stream")
    return range(first, first + count)


def seeds(name: str, count: int, offset: int = 0) -> range:
    """`count` seeds of stream `name`, starting `offset` into it."""
    if offset < 0:
        raise ValueError(f"{name} seed offset must be >= 0, got {offset}")
    return stream_range(name, STREAMS.get(name, (0, 0))[0] + offset, count)


def stream_seed(name: str, offset: int = 0) -> int:
    """The generator seed of a training stream (its first draw is this seed's draw)."""
    return seeds(name, 1, offset)[0]


def evaluation_sets(n: int, sets: int, firsts=None) -> list:
    """The evaluation seed sets: default set j starts at EVAL_BASE + SET_STRIDE * j. Explicit
    `firsts` must lie in the evaluation range and not overlap each other."""
    if n > SET_STRIDE:
        raise ValueError(f"--n {n} is larger than a seed set's stride {SET_STRIDE}; sets would overlap")
    if firsts is None:
        if not 1 <= sets <= MAX_SETS:
            raise ValueError(f"--seed-sets must be in 1..{MAX_SETS}, got {sets}")
        firsts = [EVAL_BASE + SET_STRIDE * j for j in range(sets)]
    out = [stream_range("evaluation", int(f), n) for f in firsts]
    ordered = sorted(out, key=lambda r: r.start)
    for a, b in itertools.pairwise(ordered):
        if a.stop > b.start:
            raise ValueError(f"evaluation seed sets starting {a.start} and {b.start} overlap at n = {n}")
    return [list(r) for r in out]


def selection_set(n: int) -> list:
    """The one selection set (held out from every fit and from the reported rows)."""
    return list(seeds("selection", n))


def overlaps(a: range, b: range) -> bool:
    return max(a.start, b.start) < min(a.stop, b.stop)
