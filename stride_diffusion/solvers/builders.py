"""Classic samplers as builders: (schedule, parameterisation, time grid) -> Table.

Each builder writes its solver's own update rule, step by step, as the coefficients of
y_{k+1} = c_k y_k + sum_j B[k, j] h_j over the absolute history index j; `_table` turns that into
the windowed form. The basis quantity h_j is the one the solver is written in:
dx/dt (Euler, Heun), x0 (DDIM, DPM-Solver++, UniPC), eps in x/alpha-vs-sigma/alpha (iPNDM).
"""
from __future__ import annotations

import math

import torch

from .grids import make_grid
from .param import check_param, convert
from .schedules import F64, Schedule
from .table import Table


class Ctx:
    """A grid of n + 1 times and the (alpha, sigma) the solver uses at each: the schedule's, or given
    (`alpha`, `sigma`: a diffusers scheduler's own noise levels at the times it feeds the network,
    sigma = 0 allowed at the end). `land`: (alpha, sigma) of each step's landing point where it is
    not the next evaluation's (DDIM as diffusers steps it); DDIM alone reads it."""

    def __init__(self, schedule: Schedule, param: str, grid: torch.Tensor, alpha=None, sigma=None, land=None):
        self.schedule, self.param = schedule, check_param(param)
        self.t = torch.as_tensor(grid, dtype=F64)
        self.given = alpha is not None
        self.alpha = torch.as_tensor(alpha, dtype=F64) if self.given else schedule.alpha(self.t)
        self.sigma = torch.as_tensor(sigma, dtype=F64) if self.given else schedule.sigma(self.t)
        self.lam = torch.log(self.alpha) - torch.log(self.sigma) if self.given else schedule.lam(self.t)
        self.n = len(self.t) - 1
        la, ls = land if land is not None else (self.alpha[1:], self.sigma[1:])
        self.land_alpha, self.land_sigma = torch.as_tensor(la, dtype=F64), torch.as_tensor(ls, dtype=F64)

    def basis(self, target: str, t, k: int | None = None) -> tuple[float, float]:
        if self.given:  # the given noise level of evaluation k (x0 / eps bases: no derivatives)
            A, B = convert(self.param, target, self.alpha[k], self.sigma[k])
            return float(A), float(B)
        t = torch.as_tensor(t, dtype=F64)
        a, s = self.schedule.alpha(t), self.schedule.sigma(t)
        da, ds = self.schedule.derivatives(t) if target == "velocity" else (None, None)
        A, B = convert(self.param, target, a, s, da, ds)
        return float(A), float(B)


def _table(ctx: Ctx, name, tau, s, basis, c, B, **meta) -> Table:
    """Absolute-index coefficients B[k, j] (j <= k) -> windowed b[k, k - j]."""
    n = len(tau)
    B = torch.as_tensor(B, dtype=F64)
    lo = [int((B[k, : k + 1] != 0).nonzero().min()) if (B[k, : k + 1] != 0).any() else k for k in range(n)]
    w = max(k - lo[k] + 1 for k in range(n))
    b = torch.zeros(n, w, dtype=F64)
    for k in range(n):
        for j in range(lo[k], k + 1):
            b[k, k - j] = B[k, j]
    hx, hd = zip(*[ctx.basis(q, t, k) for k, (q, t) in enumerate(zip(basis, tau))])
    meta = {"solver": name, "schedule": ctx.schedule.to_json(), "param": ctx.param, **meta}
    return Table(tau, s, hx, hd, c, b, float(ctx.sigma[0]), name, meta)


def euler(ctx: Ctx) -> Table:
    n, t = ctx.n, ctx.t
    B = torch.zeros(n, n, dtype=F64)
    for k in range(n):
        B[k, k] = t[k + 1] - t[k]
    return _table(ctx, "euler", t[:-1], t[1:], ["velocity"] * n, [1.0] * n, B)


def heun(ctx: Ctx, n_heun: int | None = None) -> Table:
    """EDM's Heun: two evaluations per interval for the first n_heun intervals (default all but the
    last), Euler after; NFE = n + n_heun."""
    n, t = ctx.n, ctx.t
    n_heun = n - 1 if n_heun is None else n_heun
    tau, s, c, rows = [], [], [], []
    for k in range(n):
        dt = float(t[k + 1] - t[k])
        tau.append(t[k]), s.append(t[k + 1]), c.append(1.0)
        rows.append({len(tau) - 1: dt})  # predictor: y' = y + dt * v(y, t_k)
        if k < n_heun:  # corrector from the predictor state: y_next = y' - dt/2 v_k + dt/2 v'
            tau.append(t[k + 1]), s.append(t[k + 1]), c.append(1.0)
            i = len(tau) - 1
            rows.append({i: dt / 2, i - 1: -dt / 2})
    m = len(tau)
    B = torch.zeros(m, m, dtype=F64)
    for k, r in enumerate(rows):
        for j, v in r.items():
            B[k, j] = v
    return _table(ctx, "heun", tau, s, ["velocity"] * m, c, B)


def ddim(ctx: Ctx) -> Table:
    n, a, sg, la, ls = ctx.n, ctx.alpha, ctx.sigma, ctx.land_alpha, ctx.land_sigma
    B = torch.zeros(n, n, dtype=F64)
    c = []
    for k in range(n):
        r = ls[k] / sg[k]
        c.append(float(r))
        B[k, k] = la[k] - r * a[k]
    return _table(ctx, "ddim", ctx.t[:-1], ctx.t[1:], ["x0"] * n, c, B)


def _lower_order_final(n: int) -> bool:
    return n < 15  # diffusers' rule: below 15 steps a first-order last step is more stable


def _final_order(q: int, k: int, n: int, first_order_final: bool) -> int:
    return 1 if first_order_final and k == n - 1 else q


def dpmpp(ctx: Ctx, order: int = 2, lower_order_final: bool | None = None, published_d2: bool = False,
          first_order_final: bool = False) -> Table:
    """DPM-Solver++ multistep (data prediction), orders 1-3, as in Lu et al. 2022.

    Third order: the reference code's D2 = (D1_0 - D1_1) / (r0 + r1) estimates h^2 x0''/2, while the
    phi_3 term of the exponential integrator multiplies h^2 x0''; as published the method measures
    second order (tests/solvers/test_convergence.py). We use 2 * D2, which measures third order;
    published_d2 keeps the reference's (a diffusers scheduler reproduced as it steps).
    first_order_final: the last step first order whatever the step count (diffusers' rule when the
    last step lands on sigma = 0, or with euler_at_final).
    """
    n, a, sg, lam = ctx.n, ctx.alpha, ctx.sigma, ctx.lam
    lof = _lower_order_final(n) if lower_order_final is None else lower_order_final
    B = torch.zeros(n, n, dtype=F64)
    c = []
    for k in range(n):
        q = _final_order(min(order, k + 1, n - k if lof else order), k, n, first_order_final)
        h = float(lam[k + 1] - lam[k])
        r_ = float(sg[k + 1] / sg[k])
        ak = float(a[k + 1])
        phi1 = math.expm1(-h)
        c.append(r_)
        B[k, k] += -ak * phi1
        if q == 2:
            r0 = float(lam[k] - lam[k - 1]) / h
            B[k, k] += -0.5 * ak * phi1 / r0
            B[k, k - 1] += 0.5 * ak * phi1 / r0
        elif q == 3:
            r0 = float(lam[k] - lam[k - 1]) / h
            r1 = float(lam[k - 1] - lam[k - 2]) / h
            e = torch.eye(n, dtype=F64)
            d10 = (e[k] - e[k - 1]) / r0
            d11 = (e[k - 1] - e[k - 2]) / r1
            d1 = d10 + r0 / (r0 + r1) * (d10 - d11)
            d2 = (1 if published_d2 else 2) * (d10 - d11) / (r0 + r1)
            phi2 = phi1 / h + 1
            phi3 = phi2 / h - 0.5
            B[k] += ak * phi2 * d1 - ak * phi3 * d2
    name = {1: "dpmpp-1", 2: "dpmpp-2m", 3: "dpmpp-3m"}[order]
    return _table(ctx, name, ctx.t[:-1], ctx.t[1:], ["x0"] * n, c, B, order=order, lower_order_final=lof)


def unipc(ctx: Ctx, order: int = 2, lower_order_final: bool | None = None, variant: str = "bh2",
          disable_corrector=(), first_order_final: bool = False) -> Table:
    """UniPC with B(h) = expm1(h) ('bh2', or h: 'bh1'), data prediction (Zhao et al. 2023).

    The corrector of the step that lands on t_k needs the model output at t_k, which the next
    step computes anyway; it is folded into row k as y^c_k = y_k + alpha_k B(h) (P_k - C_k), so the
    model is always evaluated at the predictor state y_k, as in the reference implementation.
    `disable_corrector`: steps whose landing state is not corrected (diffusers' option of that name).
    """
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unknown UniPC variant {variant!r}; allowed: ['bh1', 'bh2']")
    n, a, sg, lam = ctx.n, ctx.alpha, ctx.sigma, ctx.lam
    lof = _lower_order_final(n) if lower_order_final is None else lower_order_final
    e = torch.eye(n, dtype=F64)
    B = torch.zeros(n, n, dtype=F64)
    c, prev = [], None
    for k in range(n):
        corr = torch.zeros(n, dtype=F64)
        if prev is not None and k - 1 not in disable_corrector:  # correct the state the previous row predicted
            aB, pred, cres, rho = prev
            corr = aB * (pred - cres - rho * (e[k] - e[k - 1]))
        q = _final_order(min(order, k + 1, n - k if lof else order), k, n, first_order_final)
        h = float(lam[k + 1] - lam[k])
        rks, d1s = [], []
        for i in range(1, q):
            rk = float(lam[k - i] - lam[k]) / h
            rks.append(rk)
            d1s.append((e[k - i] - e[k]) / rk)
        rks = torch.tensor(rks + [1.0], dtype=F64)
        hh = -h
        h_phi_1 = math.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        fact, B_h = 1, (math.expm1(hh) if variant == "bh2" else hh)
        R, bb = [], []
        for i in range(1, q + 1):
            R.append(rks ** (i - 1))
            bb.append(h_phi_k * fact / B_h)
            fact *= i + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        R, bb = torch.stack(R), torch.tensor(bb, dtype=F64)
        if q == 1:
            rhos_p, rhos_c = [], torch.tensor([0.5], dtype=F64)
        else:
            rhos_p = torch.tensor([0.5], dtype=F64) if q == 2 else torch.linalg.solve(R[:-1, :-1], bb[:-1])
            rhos_c = torch.linalg.solve(R, bb)
        pred = sum((rhos_p[i] * d1s[i] for i in range(q - 1)), torch.zeros(n, dtype=F64))
        cres = sum((rhos_c[i] * d1s[i] for i in range(q - 1)), torch.zeros(n, dtype=F64))
        r_ = float(sg[k + 1] / sg[k])
        ak = float(a[k + 1])
        c.append(r_)
        B[k] = r_ * corr - ak * h_phi_1 * e[k] - (ak * B_h * pred if q > 1 else 0)  # bh1 at sigma = 0: B_h = -inf
        prev = (ak * B_h, pred, cres, float(rhos_c[-1]))
    return _table(ctx, f"unipc-{order}", ctx.t[:-1], ctx.t[1:], ["x0"] * n, c, B, order=order,
                  variant=variant, lower_order_final=lof)


def ipndm(ctx: Ctx, order: int = 4) -> Table:
    """iPNDM: Adams-Bashforth with lower-order warm start on d(x/alpha)/d(sigma/alpha) = eps.

    Coefficients come from integrating the Lagrange polynomial through the actual past times
    (the variable-step form); on a uniform grid in sigma/alpha they are iPNDM's fixed ones.
    """
    n, a = ctx.n, ctx.alpha
    sb = ctx.sigma / ctx.alpha
    B = torch.zeros(n, n, dtype=F64)
    c = []
    for k in range(n):
        q = min(order, k + 1)
        dlt = sb[k + 1] - sb[k]
        u = torch.stack([(sb[k - i] - sb[k]) / dlt for i in range(q)])  # nodes, u_0 = 0
        V = u[:, None] ** torch.arange(q, dtype=F64)[None, :]
        mom = 1.0 / torch.arange(1, q + 1, dtype=F64)
        w = dlt * torch.linalg.solve(V.T, mom)
        c.append(float(a[k + 1] / a[k]))
        for i in range(q):
            B[k, k - i] = a[k + 1] * w[i]
    return _table(ctx, "ipndm", ctx.t[:-1], ctx.t[1:], ["eps"] * n, c, B, order=order)


BUILDERS = {
    "euler": (euler, 1),
    "heun": (heun, 2),
    "ddim": (ddim, 1),
    "dpmpp-2m": (lambda ctx: dpmpp(ctx, 2), 2),
    "dpmpp-3m": (lambda ctx: dpmpp(ctx, 3), 3),
    "unipc": (lambda ctx: unipc(ctx, 2), 3),
    "ipndm": (ipndm, 4),
}
SOLVERS = tuple(BUILDERS)


def default_grid(schedule: Schedule, solver: str) -> str:
    """Per schedule family and solver, the grid with the lowest mean FD over NFE 3-10 on the demo
    models' selection seeds (docs/results.md tabulates the mean FD of every grid).
    Flow: uniform in t for every solver. VP: DDIM and DPM-Solver++ 2M uniform in t (their log-SNR
    grids break down at NFE <= 4), UniPC EDM's rho-spacing, 3M log-SNR (the only grid measured);
    Euler, Heun, iPNDM in rho-spacing (not re-measured). Other schedules (EDM, continuous VP),
    unmeasured: log-SNR for the exponential integrators, rho-spacing for the rest."""
    if schedule.name == "flow":
        return "uniform"
    if schedule.name == "vp":
        return VP_GRIDS.get(solver, "karras")
    return "logsnr" if solver in ("ddim", "dpmpp-2m", "dpmpp-3m", "unipc") else "karras"


VP_GRIDS = {"ddim": "uniform", "dpmpp-2m": "uniform", "unipc": "karras", "dpmpp-3m": "logsnr"}


def build(solver: str, schedule: Schedule, param: str, grid) -> Table:
    """A classic solver's table on an explicit grid of n + 1 times (Heun: EDM's 2n - 1 NFE)."""
    if solver not in BUILDERS:
        raise ValueError(f"unknown solver {solver!r}; allowed: {list(SOLVERS)}")
    return BUILDERS[solver][0](Ctx(schedule, param, grid))


def make_table(solver: str, schedule: Schedule, param: str, nfe: int, grid: str | None = None, **grid_kw) -> Table:
    """The table of `solver` that spends exactly `nfe` model evaluations.

    `solver` may carry its grid as 'name/grid' (e.g. 'dpmpp-2m/logsnr'). Heun always ends with an
    Euler step, as EDM does: a corrector there would evaluate the model at t_min, where a velocity
    (or eps) prediction is poorly determined. So nfe // 2 + 1 intervals, the first nfe - that many
    of them Heun steps.
    """
    if "/" in solver:
        solver, grid = solver.split("/", 1)
    if solver not in BUILDERS:
        raise ValueError(f"unknown solver {solver!r}; allowed: {list(SOLVERS)}")
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    grid = grid or default_grid(schedule, solver)
    if solver == "heun":
        n = nfe // 2 + 1
        ctx = Ctx(schedule, param, make_grid(grid, schedule, n, **grid_kw))
        tab = heun(ctx, n_heun=nfe - n)
    else:
        tab = build(solver, schedule, param, make_grid(grid, schedule, nfe, **grid_kw))
    tab.meta["grid"] = grid
    tab.name = f"{tab.name}/{grid}" if grid != default_grid(schedule, solver) else tab.name
    return tab


def theoretical_order(solver: str) -> int:
    return BUILDERS[solver][1]
