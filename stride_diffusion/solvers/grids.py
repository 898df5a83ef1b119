"""Time grids: n + 1 decreasing times from t_max to t_min (float64)."""
from __future__ import annotations

import torch

from .schedules import F64, Schedule

GRIDS = ("uniform", "karras", "logsnr")


def _ends(schedule: Schedule, t_max, t_min):
    return (schedule.t_max if t_max is None else float(t_max)), (schedule.t_min if t_min is None else float(t_min))


def uniform(schedule: Schedule, n: int, t_max=None, t_min=None) -> torch.Tensor:
    hi, lo = _ends(schedule, t_max, t_min)
    return torch.linspace(hi, lo, n + 1, dtype=F64)


def logsnr(schedule: Schedule, n: int, t_max=None, t_min=None) -> torch.Tensor:
    hi, lo = _ends(schedule, t_max, t_min)
    lam = torch.linspace(float(schedule.lam(hi)), float(schedule.lam(lo)), n + 1, dtype=F64)
    return _pin(schedule.t_of_lam(lam), hi, lo)


def karras(schedule: Schedule, n: int, rho: float = 7.0, t_max=None, t_min=None) -> torch.Tensor:
    """EDM's rho-spacing in sigma/alpha (= exp(-lambda), EDM's sigma for any schedule)."""
    hi, lo = _ends(schedule, t_max, t_min)
    s_hi, s_lo = float(torch.exp(-schedule.lam(hi))), float(torch.exp(-schedule.lam(lo)))
    u = torch.linspace(0, 1, n + 1, dtype=F64)
    s = (s_hi ** (1 / rho) + u * (s_lo ** (1 / rho) - s_hi ** (1 / rho))) ** rho
    return _pin(schedule.t_of_lam(-torch.log(s)), hi, lo)


def explicit(times) -> torch.Tensor:
    t = torch.as_tensor(times, dtype=F64).flatten()
    if len(t) < 2 or not bool((t[1:] < t[:-1]).all()):
        raise ValueError("an explicit grid needs at least two strictly decreasing times")
    return t


def _pin(t, hi, lo):
    t = t.clone()
    t[0], t[-1] = hi, lo  # exact ends despite the round trip through lambda
    return t


def make_grid(kind: str, schedule: Schedule, n: int, **kw) -> torch.Tensor:
    if n < 1:
        raise ValueError(f"a grid needs n >= 1 intervals, got {n}")
    if kind == "uniform":
        return uniform(schedule, n, **kw)
    if kind == "karras":
        return karras(schedule, n, **kw)
    if kind == "logsnr":
        return logsnr(schedule, n, **kw)
    raise ValueError(f"unknown grid {kind!r}; allowed: {list(GRIDS)}")
