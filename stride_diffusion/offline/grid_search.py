"""`stride offline grids`: optimised time grids for classic solvers, the baselines a learned solver
has to beat (GITS, Chen et al. ICML 2024; LD3, Tong et al. ICLR 2025).

gits   dynamic programming over a fine candidate grid (the union of a uniform-in-t and a
       uniform-in-log-SNR grid, `--fine` intervals each). The cost of a step t_i -> t_j is the
       teacher's local truncation error: the solver's one step from the teacher's state at t_i,
       against the teacher's state at t_j (mean square over the fitting samples). For a first-order
       solver the cost depends on (i, j); for DPM-Solver++ 2M also on the previous node h, so the DP
       runs over (h, i) pairs; its first and (lower-order-final, as the builder) last steps are
       first order. The path of exactly N steps with the least total cost is the grid.
ld3    only the grid is learned, by the solver search's loss and optimiser (offline/search.py),
       with the classic solver's own coefficients on the learned grid (M = I for Euler / DDIM, the
       2M combination as a differentiable function of the grid). Started from the classic
       solver's best standard grid on the selection set; keeps the selection-set-best iterate.

Both write ordinary searched-form solver files (`gits-SOLVER-nfeN.json`, `ld3-SOLVER-nfeN.json`):
a grid and the solver's coefficient matrix on it, which build exactly `builders.build(solver,
grid)` (tests/offline/test_learned.py checks it). Fitting samples come from the `grid` seed stream.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from stride_diffusion.solvers import make_table, sample, seeded_noise
from stride_diffusion.solvers.grids import GRIDS, make_grid
from stride_diffusion.solvers.learned import (
    basis,
    searched_spec,
    searched_table,
    solver_to_json,
    write_solver,
)
from stride_diffusion.solvers.schedules import F64

from .argtypes import ints
from .fitting import cpu_s, heldout, load_model, model_call, reference, rmse, targets_at, teacher_trajectory
from .progress import Progress
from .search import Student, optimise
from .seeds import SELECTION_BASE, seeds

GRID_SOLVERS = ("euler", "ddim", "dpmpp-2m")


def form_of(solver: str) -> str:
    if solver not in GRID_SOLVERS:
        raise ValueError(f"grid baselines exist for {list(GRID_SOLVERS)}, not {solver!r}")
    return "velocity" if solver == "euler" else "x0"


def coef_of_grid(schedule, solver: str, grid: torch.Tensor) -> torch.Tensor:
    """The solver's searched-form M on `grid` (differentiable in the grid): I for Euler / DDIM;
    for DPM-Solver++ 2M, D~_k = (1 + 1/2r_k) D_k - 1/2r_k D_{k-1}, r_k = h_{k-1} / h_k in
    log-SNR, first order at the first and (n < 15, as the builder) the last step."""
    n = len(grid) - 1
    eye = torch.eye(n, dtype=F64)
    if solver in ("euler", "ddim") or n < 3:
        return eye
    lam = schedule.lam(grid.to(F64))
    h = lam[1:] - lam[:-1]
    rows = [eye[0]]
    for k in range(1, n):
        if k == n - 1 and n < 15:
            rows.append(eye[k])
            continue
        q = 0.5 * h[k] / h[k - 1]  # 1 / (2 r_k)
        rows.append(eye[k] * (1 + q) - eye[k - 1] * q)
    return torch.stack(rows)


def candidates(schedule, fine: int) -> torch.Tensor:
    """Union of a uniform and a log-SNR grid of `fine` intervals, strictly decreasing."""
    g = torch.cat([make_grid("uniform", schedule, fine), make_grid("logsnr", schedule, fine)])
    g = torch.unique(g).flip(0)
    keep = torch.cat([torch.tensor([True]), (g[:-1] - g[1:]) > 1e-9 * (g[0] - g[-1])])
    return g[keep]


@torch.no_grad()
def local_costs(model, solver, cand, X, labels, guidance=1.0):
    """Cost tensors of one step on the teacher trajectory X [M, B, D] at the candidates:
    c1[i, j] first-order step i -> j (Euler in t, or DDIM); for 2M also c2[h, i, j]."""
    sch, M = model.schedule, len(cand)
    form = form_of(solver)
    target = "velocity" if form == "velocity" else "x0"
    hx, hd = basis(sch, model.param, target, cand)
    D = torch.stack([(hx[i] * X[i].to(F64) + hd[i] * model_call(model, X[i], cand[i], cand[i], labels,
                                                                  guidance).to(F64)) for i in range(M - 1)])
    Xd = X.to(F64)
    a, s, lam = sch.alpha(cand), sch.sigma(cand), sch.lam(cand)
    c1 = torch.full((M, M), float("inf"), dtype=F64)
    c2 = torch.full((M, M, M), float("inf"), dtype=F64) if solver == "dpmpp-2m" else None
    for i in range(M - 1):
        j = torch.arange(i + 1, M)
        if form == "velocity":
            y = Xd[i][None] + (cand[j] - cand[i])[:, None, None] * D[i][None]
        else:
            c = (s[j] / s[i])[:, None, None]
            y = c * Xd[i][None] + (a[j][:, None, None] - c * a[i]) * D[i][None]
        c1[i, j] = (y - Xd[j]).pow(2).mean((1, 2))
        if c2 is not None:
            for hh in range(i):
                q = (0.5 * (lam[j] - lam[i]) / (lam[i] - lam[hh]))[:, None, None]
                Dt = (1 + q) * D[i][None] - q * D[hh][None]
                c = (s[j] / s[i])[:, None, None]
                y = c * Xd[i][None] + (a[j][:, None, None] - c * a[i]) * Dt
                c2[hh, i, j] = (y - Xd[j]).pow(2).mean((1, 2))
    return c1, c2


def dp_path(c1, c2, n: int) -> list:
    """Indices 0 = i_0 < ... < i_n = M - 1 minimising the summed step costs (see the module doc)."""
    M = c1.shape[0]
    if c2 is None or n < 3:  # first order everywhere (2M with n < 3 is first order too)
        cost = torch.full((n + 1, M), float("inf"), dtype=F64)
        arg = torch.zeros((n + 1, M), dtype=torch.long)
        cost[0, 0] = 0
        for k in range(1, n + 1):
            tot = cost[k - 1][:, None] + c1  # [i, j]
            cost[k], arg[k] = tot.min(0)
        path = [M - 1]
        for k in range(n, 0, -1):
            path.append(int(arg[k, path[-1]]))
        return path[::-1]
    # states (h, i): the last two nodes; step 1 is first order from node 0
    cost = torch.full((M, M), float("inf"), dtype=F64)
    cost[0, 1:] = c1[0, 1:]
    back = []
    for _ in range(2, n):  # second-order steps 2 .. n-1
        tot = cost[:, :, None] + c2  # [h, i, j]
        best, h_arg = tot.min(0)  # over h -> [i, j]
        back.append(h_arg)
        cost = best  # now indexed (i, j): the new (previous, current)
    final = cost + c1[:, M - 1][None, :]  # last step first order, from i to M - 1
    final[:, M - 1] = float("inf")
    flat = int(torch.argmin(final))
    h, i = divmod(flat, M)
    path = [M - 1, i, h]
    for h_arg in reversed(back):
        h, i = int(h_arg[h, i]), h
        path.append(h)
    return path[::-1]


def gits(model, solver, nfes, *, fine=40, C=4, batch=256, guidance=1.0, teacher="dpmpp-2m", log=None):
    """{n: grid} by GITS's DP; the teacher trajectory and the step costs are shared by every NFE."""
    sch = model.schedule
    noise = seeded_noise(seeds("grid", batch), model.shape)
    labels = torch.arange(batch) % model.num_classes
    cand = candidates(sch, fine)
    T, X = teacher_trajectory(model, cand, noise, labels, C, teacher, guidance)
    Xc = targets_at(T, X, cand[1:].tolist())
    Xc = torch.cat([X[:1], Xc])
    c1, c2 = local_costs(model, solver, cand, Xc, labels, guidance)
    out = {}
    for n in nfes:
        path = dp_path(c1, c2, n)
        out[n] = cand[path]
        if log:
            log(f"gits {solver} nfe {n}: {[round(float(t), 4) for t in out[n]]}")
    return out, len(cand)


def ld3(model, solver, nfes, vn, vl, ref, *, iters=150, patience=30, batch=12, lr=1e-2, guidance=1.0,
        teacher="dpmpp-2m/logsnr", teacher_nfe=64, val_every=10, log=None):
    """{n: result of search.optimise} with only the grid learned, from the solver's best standard grid."""
    form, sch = form_of(solver), model.schedule
    students = {}
    for n in nfes:
        errs = {g: rmse(sample(model, make_table(f"{solver}/{g}", sch, model.param, n), vn, vl, guidance), ref)
                for g in GRIDS}
        g0 = min(errs, key=errs.get)
        grid = make_grid(g0, sch, n)
        students[n] = Student(model, n, form, grid, coef_of_grid(sch, solver, grid), init=f"{solver}/{g0}",
                              lr=lr, m_of_grid=lambda g, s=solver: coef_of_grid(sch, s, g))
    return optimise(model, students, vn, vl, ref, iters=iters, patience=patience, batch=batch,
                    teacher=teacher, teacher_nfe=teacher_nfe, val_every=val_every, guidance=guidance,
                    seed=seeds("search", 1, offset=1000 + GRID_SOLVERS.index(solver))[0], log=log)


def add_parser(subparsers):
    p = subparsers.add_parser("grids", help="GITS / LD3-style optimised grids for classic solvers (baselines)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", help="writes ARTIFACT/solvers/{gits,ld3}-SOLVER-nfeN.json")
    p.add_argument("--method", default="gits,ld3", help="comma list of gits, ld3")
    p.add_argument("--solvers", default=None,
                   help=f"comma list from {','.join(GRID_SOLVERS)} (default: euler,dpmpp-2m for flow "
                        "models, ddim,dpmpp-2m otherwise; DDIM is Euler on a flow schedule)")
    p.add_argument("--nfe", type=ints, default=[3, 4, 5, 6, 8, 10])
    p.add_argument("--fine", type=int, default=40, help="GITS: intervals of each candidate grid")
    p.add_argument("--batch", type=int, default=256, help="GITS: fitting samples (the grid seed stream)")
    p.add_argument("--iters", type=int, default=150, help="LD3: iteration cap (stops on a plateau)")
    p.add_argument("--patience", type=int, default=30)
    p.add_argument("--val", type=int, default=64, help="selection-set samples for LD3's kept iterate")
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--out", default=None, help="solver directory (default ARTIFACT/solvers)")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=run)
    return p


def run(args, command=None) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, sha, _ = load_model(args.artifact)
    sch = model.schedule
    solvers = args.solvers.split(",") if args.solvers else (
        ["euler", "dpmpp-2m"] if sch.name == "flow" else ["ddim", "dpmpp-2m"])
    methods = [m for m in args.method.split(",") if m]
    for m in methods:
        if m not in ("gits", "ld3"):
            raise ValueError(f"unknown method {m!r}; allowed: gits, ld3")
    for s in solvers:
        form_of(s)
    out_dir = Path(args.out or Path(args.artifact) / "solvers")
    vn, vl = heldout(model, args.val)
    ref = reference(model, vn, vl, args.guidance)
    log = Progress(f"grids {Path(args.artifact).name}", None)
    written = []
    for method in methods:
        for solver in solvers:
            t0, w0 = cpu_s(), time.time()
            if method == "gits":
                grids, m = gits(model, solver, args.nfe, fine=args.fine, batch=args.batch, guidance=args.guidance,
                                log=lambda msg: log(msg, final=True))
                res = {n: {"grid": g} for n, g in grids.items()}
                how = {"method": "GITS-style DP over a candidate grid, teacher's local truncation error",
                       "candidates": m, "fine": args.fine, "teacher": "dpmpp-2m on the candidates refined x4",
                       "fit_seeds": f"{seeds('grid', args.batch)[0]}..{seeds('grid', args.batch)[-1]}"}
            else:
                res = ld3(model, solver, args.nfe, vn, vl, ref, iters=args.iters, patience=args.patience,
                          guidance=args.guidance, log=Progress(f"ld3 {solver}", args.iters))
                how = {"method": "LD3-style: the search's loss and Lion, grid only, classic coefficients",
                       "iters_cap": args.iters, "patience": args.patience,
                       "selection": "lowest selection-set rmse"}
            cpu = (cpu_s() - t0) / len(args.nfe)
            for n, r in res.items():
                grid = torch.as_tensor(r["grid"], dtype=F64)
                M = coef_of_grid(sch, solver, grid)
                name = f"{method}-{solver}-nfe{n}"
                spec = searched_spec(sch, model.param, form_of(solver), grid, M, f"{method} {solver}")
                tab = searched_table(sch, model.param, form_of(solver), grid, M, name)
                met = {"heldout_rmse": rmse(sample(model, tab, vn, vl, args.guidance), ref),
                       "heldout_seeds": f"{SELECTION_BASE}..{SELECTION_BASE + len(vn) - 1}"}
                for g in GRIDS:
                    met[f"{solver}/{g}_heldout_rmse"] = rmse(
                        sample(model, make_table(f"{solver}/{g}", sch, model.param, n), vn, vl, args.guidance), ref)
                if method == "ld3":
                    met.update(init=r["init"], init_rmse=r["init_rmse"], best_iter=r["best_iter"],
                               iters_run=r["iters_run"], curve=r["curve"])
                fit = {**how, "solver": solver, "guidance": args.guidance, "cpu_minutes": round(cpu / 60, 3),
                       "wall_seconds_run": round(time.time() - w0, 1), "torch_threads": torch.get_num_threads()}
                write_solver(out_dir / f"{name}.json", solver_to_json(spec, sha, name, fit, met))
                written.append(name)
                print(f"{name}: held-out rmse {met['heldout_rmse']:.4f} (standard grids: "
                      + ", ".join(f"{g} {met[f'{solver}/{g}_heldout_rmse']:.4f}" for g in GRIDS) + ")", flush=True)
    print(json.dumps({"written": written}))
    return 0
