"""Time grids: n + 1 decreasing times from t_max to t_min (float64).

Besides stride's own grids, diffusers' timestep spacings for a discrete VP chain (`linspace`,
`leading`, `trailing`), computed as its schedulers compute them: integer timesteps by numpy's
rounding, `steps_offset`, and EDM's rho-spacing in the chain's sigmas mapped back to (rounded)
timesteps. Timestep i sits at t = (i + 1) / n_train (schedules.VPSchedule).
"""
from __future__ import annotations

import numpy as np
import torch

from .schedules import F64, Schedule, ddpm_betas

GRIDS = ("uniform", "karras", "logsnr")
SPACINGS = ("linspace", "leading", "trailing")  # diffusers' timestep_spacing, discrete VP chains only


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


def spaced_timesteps(spacing: str, n: int, n_train: int = 1000, steps_offset: int = 0, rule: str = "multistep"):
    """The n descending timesteps of a diffusers scheduler (numpy float64; integers except Euler's
    linspace). `rule` is the scheduler family's own formula: 'multistep' (DPM-Solver, UniPC: n + 1
    points, the last dropped), 'ddim' (n points, linspace ending on 0), 'euler' (as DDIM, but linspace
    unrounded)."""
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; allowed: {list(SPACINGS)}")
    if rule not in ("multistep", "ddim", "euler"):
        raise ValueError(f"unknown spacing rule {rule!r}")
    m = n + 1 if rule == "multistep" else n
    if spacing == "linspace":
        t = np.linspace(0, n_train - 1, m, dtype=np.float32 if rule == "euler" else np.float64)
        t = (t if rule == "euler" else t.round())[::-1]
    elif spacing == "leading":
        t = (np.arange(0, m) * (n_train // m)).round()[::-1] + steps_offset
    else:
        t = np.arange(n_train, 0, -n_train / n).round() - 1
    return np.ascontiguousarray(t[:n], dtype=np.float64)


def train_abar(schedule: Schedule) -> np.ndarray:
    """A discrete VP chain's alphas_cumprod as diffusers holds them (float32 betas and product)."""
    kind, n = schedule.betas_kind, schedule.n
    b0, b1 = schedule.beta_range or (1e-4, 0.02)
    if kind == "linear":
        betas = torch.linspace(b0, b1, n, dtype=torch.float32)
    elif kind == "scaled_linear":
        betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=torch.float32) ** 2
    else:
        betas = ddpm_betas(kind, n).float()
    return torch.cumprod(1.0 - betas, 0).double().numpy()


def sigma_to_t(sigma, log_sigmas: np.ndarray) -> np.ndarray:
    """A sigma's (fractional) timestep: linear interpolation in log sigma between the chain's steps."""
    log_sigma = np.log(np.maximum(np.asarray(sigma, dtype=np.float64), 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    lo = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    w = np.clip((log_sigmas[lo] - log_sigma) / (log_sigmas[lo] - log_sigmas[lo + 1]), 0, 1)
    return ((1 - w) * lo + w * (lo + 1)).reshape(np.shape(sigma))


def karras_sigmas(sigma_max: float, sigma_min: float, n: int, rho: float = 7.0) -> np.ndarray:
    """EDM's rho-spacing of n sigmas from sigma_max to sigma_min, as diffusers' _convert_to_karras."""
    ramp = np.linspace(0, 1, n)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def grids_for(schedule: Schedule) -> tuple[str, ...]:
    """The grid names a schedule accepts: diffusers' spacings only on a discrete VP chain."""
    return GRIDS + (SPACINGS if schedule.name == "vp" else ())


def make_grid(kind: str, schedule: Schedule, n: int, **kw) -> torch.Tensor:
    if n < 1:
        raise ValueError(f"a grid needs n >= 1 intervals, got {n}")
    if kind in SPACINGS:  # DPM-Solver's and UniPC's timesteps, landing on the chain's first step
        if schedule.name != "vp":
            raise ValueError(f"grid {kind!r} spaces a discrete VP chain's timesteps; allowed here: {list(GRIDS)}")
        ts = spaced_timesteps(kind, n, schedule.n, **kw)
        return torch.tensor([*(ts + 1) / schedule.n, schedule.t_min], dtype=F64)
    if kind == "uniform":
        return uniform(schedule, n, **kw)
    if kind == "karras":
        return karras(schedule, n, **kw)
    if kind == "logsnr":
        return logsnr(schedule, n, **kw)
    raise ValueError(f"unknown grid {kind!r}; allowed: {list(grids_for(schedule))}")
