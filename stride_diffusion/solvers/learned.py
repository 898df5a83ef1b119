"""Learned solvers as tables, and the solver files that carry them from offline to the service.

Two kinds, both ordinary `Table`s once built (so the executor and the fused update need nothing new):

searched (differentiable solver search, Wang et al. 2025, arXiv 2505.21114): a time grid
t_0 = t_max > ... > t_N = t_min and a lower-triangular N x N matrix M whose rows sum to one
(diagonal = 1 - sum of the rest; a constant derivative is then integrated exactly). Two forms:
    velocity (flow models; Euler-like in t):  y_{k+1} = y_k + (t_{k+1} - t_k) sum_j M[k,j] v_j
    x0 (VP / eps models; DDIM-like):          y_{k+1} = s_{k+1}/s_k y_k
                                                       + (a_{k+1} - s_{k+1} a_k / s_k) sum_j M[k,j] x0_j
With M = I these are exactly Euler and DDIM on the grid. `searched_coeffs` is differentiable in the
grid and M (the search back-propagates through it); `searched_table` is the float64 Table.

dode (D-ODE, Kim et al. 2024, arXiv 2309.16421): a base table plus one scalar per evaluation,
D~_k = D_k + lam_k (D_k - D_{k-1}), lam_0 = 0, substituted where the base consumes D_k, in the base's
own basis quantity (x0: ddim/dpmpp, velocity: euler/heun, eps: ipndm) and with the base's own
coefficient on D_k kept explicit (the paper's form, so lam is dimensionless). "D_k" is
  raw        the k-th output itself (single-step and multistage bases: ddim, euler, heun; as D-EDM,
             whose corrector uses D(x', s_{i+1}) - D(x, s_i))
  effective  the affine combination of raw outputs the multistep base uses in step k, i.e. row k of
             its coefficient matrix over its row sum (dpmpp-2m, ipndm; as D-iPNDM / D-DEIS).
In both the base's history keeps the raw outputs (the released code's semantics); only the state
is corrected, and the corrected state is what the next evaluation sees. The correction is linear in
the history, so it folds into extra b coefficients:
    B'[k] = B[k] + lam_k beta_k (e_k - e_{k-1}),  beta_k = the base's coefficient on D_k,
where e_k is the unit vector at k (raw) or B[k] / sum(B[k]) (effective). A Heun predictor's correction
moves only where its corrector evaluates; the corrector's output starts from the step's start (D-EDM).

A solver file (`FORMAT`) holds the learned parameters, the table they build (checked on load), the
sha256 of the model weights it was fitted on, fit settings and held-out metrics.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .builders import default_grid, make_table
from .param import check_param, convert
from .schedules import F64, Schedule, schedule_from_json
from .table import Table

FORMAT = "stride.solver/1"
KINDS = ("searched", "dode")
FORMS = ("velocity", "x0")
DODE_BASES = ("ddim", "euler", "heun", "dpmpp-2m", "ipndm")
MULTISTEP = ("dpmpp-2m", "dpmpp-3m", "unipc", "ipndm")


def default_form(schedule: Schedule) -> str:
    return "velocity" if schedule.name == "flow" else "x0"


# --- table algebra shared by search, D-ODE and the loader ------------------------------------------


def absolute(table: Table) -> torch.Tensor:
    """The windowed b [N, W] as absolute-index B [N, N]: y_{k+1} = c_k y_k + sum_j B[k, j] h_j."""
    n, W = table.nfe, table.window
    B = torch.zeros(n, n, dtype=F64)
    for k in range(n):
        for j in range(min(W, k + 1)):
            B[k, k - j] = table.b[k, j]
    return B


def windowed(B: torch.Tensor) -> torch.Tensor:
    """Absolute B [N, N] -> windowed b [N, W], W the widest row span (at least 1)."""
    n = B.shape[0]
    w = 1
    for k in range(n):
        nz = (B[k, : k + 1] != 0).nonzero()
        if len(nz):
            w = max(w, k - int(nz.min()) + 1)
    b = torch.zeros(n, w, dtype=F64)
    for k in range(n):
        for j in range(min(w, k + 1)):
            b[k, j] = B[k, k - j]
    return b


def basis(schedule: Schedule, param: str, target: str, t: torch.Tensor):
    """(hx, hd) with target = hx x + hd out at times t; differentiable in t when t requires grad."""
    a, s = schedule.alpha(t), schedule.sigma(t)
    da = ds = None
    if target == "velocity":
        if t.requires_grad and torch.is_grad_enabled():
            da, = torch.autograd.grad(a.sum(), t, create_graph=True)
            ds, = torch.autograd.grad(s.sum(), t, create_graph=True)
        else:
            with torch.enable_grad():  # derivatives() differentiates even when called under no_grad
                da, ds = schedule.derivatives(t.detach())
    return convert(param, target, a, s, da, ds)


def grid_from_logits(logits: torch.Tensor, t_max: float, t_min: float) -> torch.Tensor:
    """Steps softmax(logits) * (t_max - t_min): positive, summing to the interval; ends pinned."""
    T = torch.as_tensor(t_max - t_min, dtype=F64)
    inner = t_max - T * torch.cumsum(torch.softmax(logits.to(F64), 0), 0)[:-1]
    one = torch.ones(1, dtype=F64)
    return torch.cat([one * t_max, inner, one * t_min])


def logits_from_grid(grid) -> torch.Tensor:
    g = torch.as_tensor(grid, dtype=F64)
    return torch.log(g[:-1] - g[1:])  # softmax of these is the relative step sizes


def coef_matrix(lower: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """M from free strictly-lower entries: diagonal = 1 - sum of the rest, so rows sum to one."""
    L = torch.tril(lower.to(F64), -1)
    if mask is not None:
        L = L * mask
    return L + torch.diag(1 - L.sum(1))


def restriction_mask(n: int, restrict: bool) -> torch.Tensor:
    """The paper's rule for N <= 6: the last two steps may only use the previous output."""
    m = torch.tril(torch.ones(n, n, dtype=F64), -1)
    if restrict and n <= 6:
        for i in range(max(n - 2, 0), n):
            m[i, : max(i - 1, 0)] = 0
    return m


def searched_coeffs(schedule: Schedule, param: str, form: str, grid: torch.Tensor, M: torch.Tensor) -> dict:
    """tau, s, hx, hd, c [N] and absolute B [N, N] of a searched solver, as torch ops (differentiable)."""
    if form not in FORMS:
        raise ValueError(f"unknown searched form {form!r}; allowed: {list(FORMS)}")
    t = grid.to(F64)
    tau, s = t[:-1], t[1:]
    if form == "velocity":
        hx, hd = basis(schedule, param, "velocity", tau)
        c = torch.ones_like(tau)
        B = (s - tau)[:, None] * M
    else:
        hx, hd = basis(schedule, param, "x0", tau)
        a, sg = schedule.alpha(t), schedule.sigma(t)
        c = sg[1:] / sg[:-1]
        B = (a[1:] - c * a[:-1])[:, None] * M
    n = len(tau)
    return {"tau": tau, "s": s, "hx": hx * torch.ones(n, dtype=F64), "hd": hd * torch.ones(n, dtype=F64),
            "c": c, "B": torch.tril(B), "init": schedule.sigma(t[:1])[0]}


def table_from_coeffs(co: dict, name: str, meta: dict | None = None) -> Table:
    f = lambda v: v.detach().to(F64).clone()
    return Table(f(co["tau"]), f(co["s"]), f(co["hx"]), f(co["hd"]), f(co["c"]), windowed(f(co["B"])),
                 float(torch.as_tensor(co["init"]).detach()), name, dict(meta or {}))


def searched_table(schedule, param, form, grid, M, name="searched", meta=None) -> Table:
    co = searched_coeffs(schedule, check_param(param), form, torch.as_tensor(grid, dtype=F64),
                         torch.as_tensor(M, dtype=F64))
    return table_from_coeffs(co, name, meta)


def searched_from_table(table: Table, schedule: Schedule, param: str, form: str):
    """(grid, M) of a classic table written in the searched form (initialisation from the best
    classic solver); raises ValueError when the table is not expressible in that form."""
    tau, s = table.tau, table.s
    if table.nfe > 1 and not torch.equal(s[:-1], tau[1:]):
        raise ValueError(f"{table.name!r} evaluates between grid points; not a searched-form solver")
    grid = torch.cat([tau, s[-1:]])
    B = absolute(table)
    if form == "velocity":
        M = B / (s - tau)[:, None]
    else:
        a, sg = schedule.alpha(grid), schedule.sigma(grid)
        M = B / (a[1:] - sg[1:] / sg[:-1] * a[:-1])[:, None]
    ref = searched_table(schedule, param, form, grid, M)
    for k in ("tau", "hx", "hd", "c"):
        if not torch.allclose(getattr(ref, k), getattr(table, k), rtol=1e-9, atol=1e-12):
            raise ValueError(f"{table.name!r} is not in the searched {form} form ({k} differs)")
    if not torch.allclose(M.sum(1), torch.ones(len(M), dtype=F64), atol=1e-8):
        raise ValueError(f"{table.name!r}: rows do not sum to the first-order step; not in the {form} form")
    return grid, M


# --- D-ODE ------------------------------------------------------------------------------------------


def dode_semantics(base: str) -> str:
    return "effective" if base in MULTISTEP else "raw"


def dode_directions(base: Table, semantics: str):
    """(E [N, N], beta [N]): D_k = E[k] . h (an affine combination of raw outputs) and the base's
    coefficient on it, so that row k of the base is beta_k E[k] plus terms D_k does not enter."""
    B = absolute(base)
    n = base.nfe
    if semantics == "raw":
        return torch.eye(n, dtype=F64), torch.diagonal(B).clone()
    if semantics == "effective":
        beta = B.sum(1)
        if (beta.abs() < 1e-300).any():
            raise ValueError(f"{base.name!r}: a row sums to zero; use semantics 'raw'")
        return B / beta[:, None], beta
    raise ValueError(f"unknown D-ODE semantics {semantics!r}; allowed: 'raw', 'effective'")


def dode_correction(E: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """G [N, N]: the direction lam_k multiplies in row k, G[k] = beta_k (E[k] - E[k-1]); G[0] = 0."""
    G = torch.zeros_like(E)
    G[1:] = beta[1:, None] * (E[1:] - E[:-1])
    return G


def dode_matrix(base: Table, lambdas, semantics: str) -> torch.Tensor:
    """Absolute B' of the D-ODE table. A predictor's correction (an evaluation followed by another
    landing at the same time, Heun's two stages) only moves where the corrector evaluates: the
    corrector's output starts from the step's start state, as in D-EDM, so its row takes it back."""
    lam = torch.as_tensor(lambdas, dtype=F64)
    E, beta = dode_directions(base, semantics)
    G = dode_correction(E, beta)
    B = absolute(base) + lam[:, None] * G
    for k in range(base.nfe - 1):
        if base.s[k] == base.s[k + 1]:
            B[k + 1] -= base.c[k + 1] * lam[k] * G[k]
    return B


def dode_table(base: Table, lambdas, semantics: str, name: str | None = None, meta=None) -> Table:
    lam = torch.as_tensor(lambdas, dtype=F64)
    if lam.shape != (base.nfe,):
        raise ValueError(f"D-ODE on {base.name!r} needs {base.nfe} lambdas, got shape {tuple(lam.shape)}")
    if lam[0] != 0:
        raise ValueError("D-ODE: lambda_0 must be 0 (the first evaluation has no previous output)")
    b = base.b if bool((lam == 0).all()) else windowed(dode_matrix(base, lam, semantics))  # lam = 0: the base
    return Table(base.tau, base.s, base.hx, base.hd, base.c, b, base.init, name or f"d-{base.name}",
                 {**base.meta, **(meta or {})})


# --- solver files -----------------------------------------------------------------------------------


def searched_spec(schedule: Schedule, param: str, form: str, grid, M, init_from: str = "") -> dict:
    return {"kind": "searched", "nfe": len(grid) - 1, "schedule": schedule.to_json(), "param": param,
            "form": form, "grid": torch.as_tensor(grid, dtype=F64).tolist(),
            "coefficients": torch.as_tensor(M, dtype=F64).tolist(), "init_from": init_from}


def dode_spec(schedule: Schedule, param: str, base: str, nfe: int, lambdas, grid: str | None = None,
              semantics: str | None = None) -> dict:
    grid = grid or default_grid(schedule, base)
    tab = make_table(f"{base}/{grid}", schedule, param, nfe)
    return {"kind": "dode", "nfe": nfe, "schedule": schedule.to_json(), "param": param, "base": base,
            "base_grid": grid, "grid": grid_of(tab).tolist(), "semantics": semantics or dode_semantics(base),
            "lambdas": torch.as_tensor(lambdas, dtype=F64).tolist()}


def grid_of(table: Table) -> torch.Tensor:
    """The distinct times a table visits: tau_0, then every landing time once."""
    pts = [float(table.tau[0])]
    for v in table.s.tolist():
        if v != pts[-1]:
            pts.append(v)
    return torch.tensor(pts, dtype=F64)


def spec_table(spec: dict, name: str = "learned") -> Table:
    """Build the Table a spec describes, checking every shape; ValueError on any inconsistency."""
    kind, n = spec.get("kind"), spec.get("nfe")
    if kind not in KINDS:
        raise ValueError(f"solver kind {kind!r} is not supported; allowed: {list(KINDS)}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"solver {name!r}: nfe must be a positive integer, got {n!r}")
    schedule, param = schedule_from_json(spec["schedule"]), check_param(spec["param"])
    grid = torch.as_tensor(spec["grid"], dtype=F64)
    meta = {"kind": kind, "nfe": n, "learned": True}
    if kind == "searched":
        M = torch.as_tensor(spec["coefficients"], dtype=F64)
        if grid.shape != (n + 1,):
            raise ValueError(f"solver {name!r}: grid has {len(grid)} times, expected nfe + 1 = {n + 1}")
        if not bool((grid[1:] < grid[:-1]).all()):
            raise ValueError(f"solver {name!r}: grid must strictly decrease")
        if M.shape != (n, n):
            raise ValueError(f"solver {name!r}: coefficients have shape {tuple(M.shape)}, "
                             f"expected ({n}, {n})")
        if (torch.triu(M, 1) != 0).any():
            raise ValueError(f"solver {name!r}: coefficients must be lower-triangular")
        if not torch.allclose(M.sum(1), torch.ones(n, dtype=F64), atol=1e-9):
            raise ValueError(f"solver {name!r}: coefficient rows must sum to 1, got {M.sum(1).tolist()}")
        return searched_table(schedule, param, spec["form"], grid, M, name, {**meta, "form": spec["form"]})
    base = spec["base"]
    if base not in DODE_BASES:
        raise ValueError(f"solver {name!r}: D-ODE base {base!r} is not supported; "
                         f"allowed: {list(DODE_BASES)}")
    tab = make_table(f"{base}/{spec['base_grid']}", schedule, param, n)
    g = grid_of(tab)
    if g.shape != grid.shape or not torch.allclose(g, grid, rtol=1e-12, atol=1e-12):
        raise ValueError(f"solver {name!r}: the {base}/{spec['base_grid']} grid at nfe {n} no longer matches "
                         "the file's; refit")
    lam = torch.as_tensor(spec["lambdas"], dtype=F64)
    if lam.shape != (tab.nfe,):
        raise ValueError(f"solver {name!r}: {len(lam)} lambdas for {tab.nfe} evaluations")
    return dode_table(tab, lam, spec["semantics"], name, {**meta, "base": base})


def solver_to_json(spec: dict, model_sha256: str, name: str, fit: dict | None = None,
                   metrics: dict | None = None) -> dict:
    """The solver file, one JSON object:

        format "stride.solver/1", name, kind (searched | dode), nfe, schedule, param, grid (the times
        visited, t_max .. t_min), model_sha256 (of model.safetensors), fit (settings, seeds, CPU
        minutes, wall time), metrics (held-out trajectory RMSE, CFG off and on), table (the Table it
        builds, stride.table/1: checked on load, so a changed builder cannot serve silently);
        searched: form (velocity | x0), coefficients (M, N x N, rows sum to 1), init_from;
        dode: base, base_grid, semantics (raw | effective), lambdas (N, lambdas[0] = 0).
    """
    tab = spec_table(spec, name)
    return {"format": FORMAT, "name": name, **spec, "model_sha256": model_sha256,
            "table": tab.to_json(), "fit": fit or {}, "metrics": metrics or {}}


def solver_from_json(d: dict, model_sha256: str, path: str = "") -> Table:
    where = f"solver file {path or d.get('name', '?')!r}"
    if d.get("format") != FORMAT:
        raise ValueError(f"{where}: format {d.get('format')!r} is not supported; expected {FORMAT!r}")
    if d.get("model_sha256") != model_sha256:
        raise ValueError(f"{where} was fitted on model sha256 {str(d.get('model_sha256'))[:12]}..., "
                         f"not on this model ({str(model_sha256)[:12]}...); refit it for this model")
    name = d.get("name") or Path(path).stem or "learned"
    try:
        tab = spec_table(d, name)
        stored = d.get("table")
        ref = None if stored is None else Table.from_json(stored)
    except (KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{where}: malformed ({type(e).__name__}: {e})") from e
    if ref is not None:
        same = all(getattr(ref, k).shape == getattr(tab, k).shape
                   and torch.allclose(getattr(ref, k), getattr(tab, k), rtol=1e-9, atol=1e-12)
                   for k in ("tau", "s", "hx", "hd", "c", "b"))
        if not same:
            raise ValueError(f"{where}: its parameters no longer build the table it was evaluated "
                             "with; refit")
    tab.meta.update(model_sha256=model_sha256, metrics=d.get("metrics", {}))
    return tab


def write_solver(path, d: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(d, indent=1) + "\n")
    tmp.replace(path)  # readers never see a half-written file
