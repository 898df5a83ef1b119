"""Noise schedules: x_t = alpha(t) * x0 + sigma(t) * eps.

Every schedule gives alpha, sigma, lambda = log(alpha / sigma) and its inverse, in float64, and a
default sampling interval [t_min, t_max] on which lambda is finite, so that every grid and every
solver is defined at both ends (sampling starts from sigma(t_max) * noise, as EDM and DDPM do).
"""
from __future__ import annotations

import math

import torch

F64 = torch.float64


def _t(t) -> torch.Tensor:
    return torch.as_tensor(t, dtype=F64)


class Schedule:
    name: str
    t_min: float
    t_max: float

    def alpha(self, t) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t) -> torch.Tensor:
        raise NotImplementedError

    def lam(self, t) -> torch.Tensor:
        t = _t(t)
        return torch.log(self.alpha(t)) - torch.log(self.sigma(t))

    def t_of_lam(self, lam) -> torch.Tensor:
        raise NotImplementedError

    def derivatives(self, t):
        """(alpha'(t), sigma'(t)) by autograd, one path for every schedule."""
        t = _t(t).detach().clone().requires_grad_(True)
        da, = torch.autograd.grad(self.alpha(t).sum(), t)
        t2 = t.detach().clone().requires_grad_(True)
        ds, = torch.autograd.grad(self.sigma(t2).sum(), t2)
        return da.detach(), ds.detach()

    def to_json(self) -> dict:
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({self.to_json()})"


class FlowSchedule(Schedule):
    """Rectified flow / SiT: alpha = 1 - t, sigma = t."""

    name = "flow"

    def __init__(self, t_min: float = 1e-3, t_max: float = 1 - 1e-3):
        self.t_min, self.t_max = t_min, t_max

    def alpha(self, t):
        return 1 - _t(t)

    def sigma(self, t):
        return _t(t)

    def t_of_lam(self, lam):
        return torch.sigmoid(-_t(lam))

    def to_json(self):
        return {"name": self.name, "t_min": self.t_min, "t_max": self.t_max}


class EDMSchedule(Schedule):
    """EDM / VE: alpha = 1, sigma = t."""

    name = "edm"

    def __init__(self, t_min: float = 0.002, t_max: float = 80.0):
        self.t_min, self.t_max = t_min, t_max

    def alpha(self, t):
        return 1 + 0 * _t(t)  # keeps the autograd graph for derivatives()

    def sigma(self, t):
        return _t(t)

    def t_of_lam(self, lam):
        return torch.exp(-_t(lam))

    def to_json(self):
        return {"name": self.name, "t_min": self.t_min, "t_max": self.t_max}


BETAS = ("linear", "scaled_linear", "cosine")


def ddpm_betas(kind: str = "linear", n: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    if kind == "linear":  # DDPM / DiT
        return torch.linspace(beta_start, beta_end, n, dtype=F64)
    if kind == "scaled_linear":  # Stable Diffusion: linear in sqrt(beta)
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=F64) ** 2
    if kind == "cosine":  # Nichol & Dhariwal, betas clipped at 0.999
        s = 0.008
        f = lambda u: torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
        u = torch.arange(n + 1, dtype=F64) / n
        abar = f(u) / f(torch.zeros((), dtype=F64))
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {kind!r}; allowed: {list(BETAS)}")


class _VariancePreserving(Schedule):
    """alpha^2 + sigma^2 = 1, given by log alpha(t); expm1 keeps sigma and lambda accurate near t = 0."""

    def _log_alpha(self, t) -> torch.Tensor:
        raise NotImplementedError

    def alpha(self, t):
        return torch.exp(self._log_alpha(t))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(2 * self._log_alpha(t)))

    def lam(self, t):
        la = self._log_alpha(t)
        return la - 0.5 * torch.log(-torch.expm1(2 * la))


class VPSchedule(_VariancePreserving):
    """VP / DDPM with discrete betas, in continuous time.

    Step i (0-based) of the discrete chain sits at t = (i + 1) / n; log alpha is interpolated
    linearly in t between steps, as DPM-Solver's discrete-time wrapper does. A network trained on
    integer steps receives t * n - 1 (DiT's convention) through its own wrapper.
    """

    name = "vp"

    def __init__(self, betas: str = "linear", n: int = 1000, t_min: float | None = None, t_max: float = 1.0,
                 beta_start: float | None = None, beta_end: float | None = None):
        self.betas_kind, self.n = betas, n
        self.beta_range = None if beta_start is None and beta_end is None else (float(beta_start), float(beta_end))
        b = ddpm_betas(betas, n, *(self.beta_range or ()))
        self.log_alpha_k = 0.5 * torch.cumsum(torch.log1p(-b), 0)
        self.t_k = torch.arange(1, n + 1, dtype=F64) / n
        self.t_min = 1.0 / n if t_min is None else t_min
        self.t_max = t_max

    def _log_alpha(self, t):
        t = _t(t)
        x, y = self.t_k, self.log_alpha_k
        i = torch.searchsorted(x, t.detach().clamp(x[0], x[-1]).reshape(-1)).clamp(1, len(x) - 1).reshape(t.shape)
        x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
        return y0 + (t - x0) * (y1 - y0) / (x1 - x0)

    def t_of_lam(self, lam):
        lam = _t(lam)
        la = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2 * lam)
        # log_alpha decreases with t: interpolate on the reversed arrays.
        x, y = self.log_alpha_k.flip(0), self.t_k.flip(0)
        i = torch.searchsorted(x, la.reshape(-1).clamp(x[0], x[-1])).clamp(1, len(x) - 1).reshape(la.shape)
        x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
        return y0 + (la - x0) * (y1 - y0) / (x1 - x0)

    def to_json(self):
        d = {"name": self.name, "betas": self.betas_kind, "n": self.n, "t_min": self.t_min, "t_max": self.t_max}
        if self.beta_range is not None:  # only when not DDPM's (1e-4, 0.02): older files stay as they were
            d["beta_start"], d["beta_end"] = self.beta_range
        return d


class VPLinearSchedule(_VariancePreserving):
    """The continuous-time view of DDPM's linear betas (Song et al. 2021): beta(t) linear in t,
    log alpha = -(b1 - b0) t^2 / 4 - b0 t / 2. Smooth in t, unlike the interpolated discrete chain."""

    name = "vp-linear"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3, t_max: float = 1.0):
        self.b0, self.b1, self.t_min, self.t_max = beta_min, beta_max, t_min, t_max

    def _log_alpha(self, t):
        t = _t(t)
        return -0.25 * t ** 2 * (self.b1 - self.b0) - 0.5 * t * self.b0

    def t_of_lam(self, lam):
        la = -0.5 * torch.logaddexp(torch.zeros_like(_t(lam)), -2 * _t(lam))
        d = self.b1 - self.b0
        return (-0.5 * self.b0 + torch.sqrt(0.25 * self.b0 ** 2 - d * la)) / (0.5 * d)

    def to_json(self):
        return {"name": self.name, "beta_min": self.b0, "beta_max": self.b1, "t_min": self.t_min, "t_max": self.t_max}


SCHEDULES = {"flow": FlowSchedule, "edm": EDMSchedule, "vp": VPSchedule, "vp-linear": VPLinearSchedule}


def schedule_from_json(d: dict) -> Schedule:
    d = dict(d)
    name = d.pop("name", None)
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; allowed: {sorted(SCHEDULES)}")
    return SCHEDULES[name](**d)
