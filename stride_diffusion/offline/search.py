"""`stride offline search`: differentiable solver search (Wang et al. 2025, arXiv 2505.21114).

Per NFE the learned parameters are step logits r (steps = softmax(r) * (t_max - t_min)) and the
strictly-lower part of a coefficient matrix whose rows sum to one (solvers.learned). Each iteration
reads a batch of noise and classes with a fine teacher's trajectories on it (run once per batch,
shared by every start and NFE), unrolls each student through the frozen network and
back-propagates into r and M:

    loss = sum_i mean |x_i - X(t_i)|^2  +  w * huber_delta(x_N - X(t_min)) / delta

X is the teacher trajectory interpolated at the student's own (learned) times, not rounded to a
teacher index, so the target moves with the time grid. Huber / delta with a small delta is an L1
term on the final sample, as the paper's 1000 * Huber(1e-3). CFG is off while searching (the
paper; `--guidance` searches at a CFG scale instead, the per-scale fit of the paper's guided
tables); metrics are also reported with CFG on. The iterate kept is the one with the lowest
held-out trajectory error: RMSE of the final sample to a converged reference, on the selection
seeds (offline/seeds.py: disjoint from evaluation and from every fitting stream).

The NFEs are searched in increasing order on one training stream of `--pool` batches read in turn,
whose teacher trajectories are computed once. NFE n has two starts, `--init` and the next smaller
NFE's result extended to n steps (`extended`: the step whose log-SNR midpoint cut helps most,
repeatedly); they race on the same batches to their first plateau and the better goes on. The
result is held to that smaller result padded to n steps (`padded`: the same samples), so the
selection-set RMSE never rises with NFE. The plateau rule: once the selection RMSE has not improved
by `--min-delta` (relative) for `--patience` iterations, the NFE restarts from its best iterate at
`--lr-decay` x the learning rate, `--decays` times, and the next plateau stops it (not before
`--min-iters`); `--iters` caps it. Each file records how it ran.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from stride_diffusion.solvers import SOLVERS, make_table, sample
from stride_diffusion.solvers.grids import GRIDS
from stride_diffusion.solvers.learned import (
    FORMS,
    coef_matrix,
    default_form,
    grid_from_logits,
    logits_from_grid,
    restriction_mask,
    searched_coeffs,
    searched_from_table,
    searched_spec,
    searched_table,
    solver_to_json,
    table_from_coeffs,
    write_solver,
)
from stride_diffusion.solvers.schedules import F64

from .argtypes import ints
from .fitting import (
    cfg_scale,
    cpu_s,
    device_of,
    heldout,
    interp,
    load_model,
    metrics_for,
    reference,
    references,
    rmse,
    trajectory,
    unroll,
)
from .progress import Progress
from .seeds import stream_seed

# --- the learnable solver, the teacher and the loss ---------------------------------------------------


class Lion:
    """Lion (Chen et al. 2023), the paper's optimiser: the sign of an interpolated momentum. A plain
    class: torch.optim.Optimizer imports torch._dynamo (seconds) for a handful of scalars."""

    def __init__(self, params, lr=1e-2, betas=(0.9, 0.99)):
        self.params, self.lr, self.betas = list(params), lr, betas
        self.m = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        b1, b2 = self.betas
        for p, m in zip(self.params, self.m):
            if p.grad is not None:
                p.add_(torch.sign(b1 * m + (1 - b1) * p.grad), alpha=-self.lr)
                m.mul_(b2).add_(p.grad, alpha=1 - b2)


class Student:
    """One NFE's learnable solver: step logits and the free strictly-lower coefficients."""

    def __init__(self, model, n, form, grid, M, restrict=False, init="", lr=1e-2, m_of_grid=None, race=None):
        """m_of_grid: grid -> M (differentiable) fixes the coefficients to a classic solver's on the
        learned grid, so only the grid is searched (the LD3-style baseline, offline/grid_search.py).
        race: a key shared by the starts of one NFE that race to their first plateau (`optimise`)."""
        self.model, self.n, self.form, self.init, self.sch = model, n, form, init, model.schedule
        self.m_of_grid = m_of_grid
        self.t_max, self.t_min = float(grid[0]), float(grid[-1])
        self.logits = logits_from_grid(grid).clone().requires_grad_(True)
        self.mask = restriction_mask(n, restrict)
        self.lower = (torch.tril(torch.as_tensor(M, dtype=F64), -1) * self.mask).clone().requires_grad_(True)
        self.opt = Lion([self.logits] if m_of_grid else [self.logits, self.lower], lr=lr)
        self.best = (math.inf, None, -1)  # (held-out rmse, (grid, M), iteration)
        self.best_raw = None  # (logits, lower) of the best iterate: where a learning-rate decay restarts
        self.progress = 0  # last iteration that improved by min_delta, or restarted
        self.decays = 0
        self.curve, self.cpu, self.init_rmse = [], 0.0, math.nan
        self.iters_run, self.stopped = 0, False  # training steps taken
        self.race, self.racing, self.parked, self.lost = race, race is not None, False, False

    def params(self):
        grid = grid_from_logits(self.logits, self.t_max, self.t_min)
        return grid, (self.m_of_grid(grid) if self.m_of_grid else coef_matrix(self.lower, self.mask))

    def coeffs(self):
        grid, M = self.params()
        return searched_coeffs(self.sch, self.model.param, self.form, grid, M)

    def table(self, name="searched"):
        with torch.no_grad():
            return table_from_coeffs(self.coeffs(), name)

    def snapshot(self):
        with torch.no_grad():
            g, M = self.params()
        self.best_raw = (self.logits.detach().clone(), self.lower.detach().clone())
        return g.detach().clone(), M.detach().clone()

    @torch.no_grad()
    def restart(self, decay, it):
        """Back to the best iterate with the learning rate times `decay` and a fresh momentum: a sign
        optimiser's constant step is what sets the floor the error plateaus on."""
        self.logits.copy_(self.best_raw[0])
        self.lower.copy_(self.best_raw[1])
        self.opt.lr *= decay
        self.opt.m = [torch.zeros_like(p) for p in self.opt.params]
        self.decays += 1
        self.progress = it


POOL = 100  # training batches the search cycles through (Teacher); measured in docs/offline.md


class Teacher:
    """The training stream and the fine teacher's trajectories on it: `pool` batches, read in turn
    (iteration it reads batch (it - 1) mod pool). Every start and NFE reads the same batches in the
    same order, so the trajectories are kept (up to `cache_mb`; beyond it they are re-run) and the
    teacher, 64 evaluations a sample against the student's 3 to 10, is paid for `pool` batches once
    rather than for every iteration of the longest search. A few dozen numbers are learned from
    pool x batch samples of the whole trajectory, and the iterate kept is chosen on held-out seeds."""

    def __init__(self, model, solver, nfe, batch, seed, guidance=1.0, cache_mb=1024, pool=None):
        self.model, self.batch, self.guidance, self.pool = model, batch, guidance, pool
        self.table = make_table(solver, model.schedule, model.param, nfe)
        self.gen = torch.Generator().manual_seed(seed)
        self.drawn, self.trajs, self.left = [], {}, cache_mb * 2 ** 20

    def __call__(self, it):
        """(noise, labels, T, X) of iteration `it` (from 1)."""
        model = self.model
        it = (it - 1) % self.pool + 1 if self.pool else it
        while len(self.drawn) < it:
            noise = torch.randn(self.batch, *model.shape, generator=self.gen).to(device_of(model))
            labels = torch.randint(0, model.num_classes, (self.batch,), generator=self.gen).to(device_of(model))
            self.drawn.append((noise, labels))
        noise, labels = self.drawn[it - 1]
        if it not in self.trajs:
            T, X = trajectory(model, self.table, noise, labels, self.guidance)
            if X.numel() * X.element_size() > self.left:
                return noise, labels, T, X
            self.left -= X.numel() * X.element_size()
            self.trajs[it] = (T, X)
        return (noise, labels, *self.trajs[it])


def loss_fn(ys, co, T, X, final_weight, delta):
    """MSE to the teacher at every student state (the teacher read at the student's times) plus
    Huber / delta on the final sample (~L1 for small delta, the paper's 1000 x Huber(1e-3))."""
    traj = sum(((ys[i + 1] - interp(T, X, co["s"][i])) ** 2).mean() for i in range(len(ys) - 1))
    return traj + final_weight * torch.nn.functional.huber_loss(ys[-1], X[-1], delta=delta) / delta


def candidate_tables(model, n, form):
    """Classic tables expressible in `form` (for --init best): x0-based multistep solvers or Euler."""
    names = ["euler"] if form == "velocity" else ["ddim", "dpmpp-2m", "dpmpp-3m", "unipc"]
    out = {}
    for s in names:
        for g in GRIDS:
            tab = make_table(f"{s}/{g}", model.schedule, model.param, n)
            try:
                out[f"{s}/{g}"] = (tab, searched_from_table(tab, model.schedule, model.param, form))
            except ValueError:
                pass
    return out


def classic_names() -> list:
    """Every classic solver on every grid: a learned solver is compared with the best of them."""
    return [f"{s}/{g}" for s in SOLVERS for g in GRIDS]


def classic_rmse(model, n, noise, labels, ref, names=None, guidance=1.0):
    names = names or classic_names()
    tabs = {s: make_table(s, model.schedule, model.param, n) for s in names}
    return {s: rmse(sample(model, t, noise, labels, guidance), ref) for s, t in tabs.items()}


# --- warm start: a table of n - 1 steps as the start of n ---------------------------------------------


PAD = 1e-6  # the inserted step of a padded table, relative to the step it is cut from


def split(grid, M, k, t_new):
    """(grid, M) with n + 1 steps: step k cut at t_new. Its first part keeps row k; its second keeps
    row k's history and puts the diagonal weight (rows sum to one) on the new evaluation; later rows
    read the evaluation at t_k where they did and give the new one weight 0."""
    grid, M = torch.as_tensor(grid, dtype=F64), torch.as_tensor(M, dtype=F64)
    n = len(M)
    new = [j if j <= k else j + 1 for j in range(n)]  # old step/evaluation index -> new
    L, old = torch.zeros(n + 1, n + 1, dtype=F64), torch.tril(M, -1)
    L[torch.tensor(new)[:, None], torch.tensor(new)[None]] = old
    L[k + 1, :k] = old[k, :k]
    g = torch.cat([grid[: k + 1], torch.as_tensor([float(t_new)], dtype=F64), grid[k + 1:]])
    return g, coef_matrix(L)


def lam_mid(schedule, a, b) -> float:
    """The midpoint of [a, b] in log-SNR (in t where log-SNR is not finite)."""
    lam = schedule.lam(torch.tensor([a, b], dtype=F64))
    t = float(schedule.t_of_lam(lam.mean())) if bool(torch.isfinite(lam).all()) else (a + b) / 2
    return t if b < t < a else (a + b) / 2


def extended(grid, M, n, err):
    """Cut the step whose midpoint split (in log-SNR) gives the lowest error `err(grid, M)`, until
    there are n steps: the warm start from a smaller NFE's solution."""
    while len(M) < n:
        cands = [split(grid, M, k, lam_mid(err.schedule, float(grid[k]), float(grid[k + 1])))
                 for k in range(len(M))]
        grid, M = min(cands, key=lambda c: err(*c))
    return grid, M


def padded(grid, M, n):
    """A table of n steps that samples as the smaller one: steps of PAD x their length inserted
    after its first nodes, each evaluation repeated at (nearly) the same point. The floor a
    search at n is held to, so the error never rises with NFE."""
    grid, M = torch.as_tensor(grid, dtype=F64), torch.as_tensor(M, dtype=F64)
    for k in range(n - len(M)):
        grid, M = split(grid, M, k, float(grid[k] - PAD * (grid[k] - grid[k + 1])))
    return grid, M


class SelectionError:
    """Selection-set RMSE of a searched-form (grid, M)."""

    def __init__(self, model, form, mask_of, vn, vl, ref, guidance):
        self.model, self.form, self.mask_of, self.schedule = model, form, mask_of, model.schedule
        self.vn, self.vl, self.ref, self.guidance = vn, vl, ref, guidance

    def masked(self, M):
        return coef_matrix(torch.tril(M, -1), self.mask_of(len(M)))

    def __call__(self, grid, M) -> float:
        tab = searched_table(self.schedule, self.model.param, self.form, grid, self.masked(M))
        return rmse(sample(self.model, tab, self.vn, self.vl, self.guidance), self.ref)


def starts(model, n, form, init, err, prev=None) -> dict:
    """{name: (grid, M)}, NFE n's candidate starts: Euler/DDIM on a uniform grid in t (the paper) or
    the classic table of this form with the lowest selection error (`best`), and with `prev` (a
    smaller NFE's result) its extension to n steps."""
    sch = model.schedule
    if init == "euler":  # the paper: M = I on a uniform grid in t (Euler / DDIM)
        grid = torch.linspace(sch.t_max, sch.t_min, n + 1, dtype=F64)
        out = {("euler" if form == "velocity" else "ddim") + "/uniform": (grid, torch.eye(n, dtype=F64))}
    elif init == "best":  # the classic table of this form with the lowest selection error
        cands = {k: gm for k, (_, gm) in candidate_tables(model, n, form).items()}
        errs = {k: err(*gm) for k, gm in cands.items()}
        name = min(errs, key=errs.get)
        out = {name: cands[name]}
    else:
        raise ValueError(f"unknown init {init!r}; allowed: 'euler', 'best'")
    if prev is not None:
        out[f"searched-nfe{len(prev[1])} extended"] = extended(*prev, n, err)
    return out


# --- the search -------------------------------------------------------------------------------------


def optimise(model, students: dict, vn, vl, ref, *, iters=300, patience=40, min_delta=1e-3, min_iters=0,
             lr_decay=0.3, decays=0, batch=12, final_weight=1.0, delta=1e-3, teacher="dpmpp-2m/logsnr",
             teacher_nfe=64, val_every=10, guidance=1.0, seed=None, pool=None, teach=None, log=None) -> dict:
    """Lion on every student at once (one teacher run per iteration serves all), keeping each
    student's iterate with the lowest selection-set RMSE. The plateau rule: once that RMSE has not
    fallen by a relative `min_delta` for `patience` iterations, a student restarts from its best
    iterate with the learning rate times `lr_decay` (at most `decays` times), and the next plateau
    stops it, never before `min_iters` of its own steps; `iters` caps the run. Students that share
    a `race` key (the starts of one NFE) each run to their first plateau and wait there; when the
    last one arrives, the one with the lowest error goes on with the decays and the others stop.
    `teach` (a Teacher) shares the training stream's teacher trajectories between calls."""
    seed = stream_seed("search") if seed is None else seed
    log = log or Progress("search", iters)
    teach = teach or Teacher(model, teacher, teacher_nfe, batch, seed, guidance, pool=pool)

    def plateau(st, it):
        if st.racing:  # its first plateau: wait for the other starts of its NFE
            st.racing, st.parked = False, True
            rivals = [r for r in students.values() if r.race == st.race]
            if any(r.racing for r in rivals):
                return
            win = min(rivals, key=lambda r: r.best[0])
            for r in rivals:
                r.parked, r.lost, r.stopped = False, r is not win, r is not win
            st = win
        if st.decays < decays:
            st.restart(lr_decay, it)
        elif st.iters_run >= min_iters:
            st.stopped = True

    def validate(it):
        msg = []
        for n, st in students.items():
            if st.stopped or st.parked:
                continue
            t0 = cpu_s()
            e = rmse(sample(model, st.table(), vn, vl, guidance), ref)
            if e < st.best[0] * (1 - min_delta):
                st.progress = it
            if e < st.best[0]:  # lower but not by min_delta: kept, but it does not reset the clock
                st.best = (e, st.snapshot(), it)
            st.curve.append((it, e))
            st.cpu += cpu_s() - t0
            msg.append(f"{n}:{e:.4f}")
            if it - st.progress >= patience:
                plateau(st, it)
        return " ".join(msg)

    vmsg = validate(0)
    for st in students.values():
        st.init_rmse = st.best[0]
    lmsg = ""
    for it in range(1, iters + 1):
        active = {n: st for n, st in students.items() if not (st.stopped or st.parked)}
        if not active:
            break
        t0 = cpu_s()
        noise, labels, T, X = teach(it)
        t_share = (cpu_s() - t0) / len(active)
        losses = []
        for n, st in active.items():
            t0 = cpu_s()
            co = st.coeffs()
            ys = unroll(model, co, noise, labels, guidance, states=True)
            loss = loss_fn(ys, co, T, X, final_weight, delta)
            st.opt.zero_grad()
            loss.backward()
            st.opt.step()
            st.iters_run += 1
            st.cpu += cpu_s() - t0 + t_share
            losses.append(f"{n}:{loss.item():.3g}")
        lmsg = " ".join(losses)
        if it % val_every == 0 or it == iters:
            vmsg = validate(it)
        log(f"loss {lmsg} | held-out rmse {vmsg}")
    log(f"done: loss {lmsg} | held-out rmse {vmsg}", final=True)
    out = {}
    for n, st in students.items():
        e, (grid, M), it = st.best
        out[n] = {"grid": grid, "M": M, "form": st.form, "init": st.init, "best_rmse": e, "best_iter": it,
                  "iters_run": st.iters_run, "stopped_on_plateau": st.stopped and not st.lost,
                  "lost_race": st.lost, "init_rmse": st.init_rmse, "lr_decays": st.decays,
                  "lr_final": st.opt.lr, "curve": st.curve, "cpu_s": st.cpu}
    return out


def search(model, nfes, *, form=None, init="euler", warm=True, restrict=False, iters=600, patience=40,
           min_delta=1e-3, min_iters=0, lr_decay=0.3, decays=3, batch=12, lr=1e-2, final_weight=1.0,
           delta=1e-3, teacher="dpmpp-2m/logsnr", teacher_nfe=64, val=64, val_every=10, pool=POOL, ref=None,
           guidance=1.0, seed=None, log=None):
    """Search the NFEs in increasing order. With `warm`, NFE n has two starts, `init` and the smaller
    NFE's result extended to n steps (`starts`), which race on the same batches to their first
    plateau; the better goes on (`optimise`). A result worse than that smaller table padded to n
    steps (`padded`, the same samples) is replaced by the padded table, so the selection-set RMSE
    never rises with NFE. Returns {n: dict(grid, M, form, init, best_rmse, best_iter, iters_run,
    init_rmse, lr_decays, starts, race, padded_from, curve, cpu_s, wall_s)}."""
    form = form or default_form(model.schedule)
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; allowed: {list(FORMS)}")
    vn, vl = heldout(model, val)
    ref = reference(model, vn, vl, guidance) if ref is None else ref
    err = SelectionError(model, form, lambda k: restriction_mask(k, restrict), vn, vl, ref, guidance)
    teach = Teacher(model, teacher, teacher_nfe, batch, stream_seed("search") if seed is None else seed,
                    guidance, pool=pool)
    out, prev = {}, None
    for n in sorted(nfes):
        t0, w0 = cpu_s(), time.time()
        cands = starts(model, n, form, init, err, prev if warm else None)
        race = n if len(cands) > 1 else None
        sts = {k: Student(model, n, form, *gm, restrict, k, lr, race=race) for k, gm in cands.items()}
        setup = cpu_s() - t0
        res = optimise(model, sts, vn, vl, ref, iters=iters, patience=patience, min_delta=min_delta,
                       min_iters=min_iters, lr_decay=lr_decay, decays=decays, final_weight=final_weight,
                       delta=delta, val_every=val_every, guidance=guidance, teach=teach, log=log)
        r = min(res.values(), key=lambda x: x["best_rmse"])
        r["starts"] = {k: x["init_rmse"] for k, x in res.items()}
        r["race"] = {k: {"start_rmse": x["init_rmse"], "best_rmse": x["best_rmse"], "iters_run": x["iters_run"],
                         "won": x is r} for k, x in res.items()}
        r["cpu_s"] = setup + sum(x["cpu_s"] for x in res.values())
        r["iters_total"] = sum(x["iters_run"] for x in res.values())
        r["padded_from"] = None
        if warm and prev is not None:
            t0 = cpu_s()
            pg, pM = padded(*prev, n)
            pM = err.masked(pM)
            pe = err(pg, pM)
            if pe < r["best_rmse"]:
                r.update(grid=pg, M=pM, best_rmse=pe, padded_from=len(prev[1]))
            r["cpu_s"] += cpu_s() - t0
        r["wall_s"] = time.time() - w0
        out[n] = r
        prev = (r["grid"], r["M"])
    return out


# --- CLI --------------------------------------------------------------------------------------------


def add_parser(subparsers):
    p = subparsers.add_parser("search", help="differentiable solver search: learned time grid + coefficients",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", help="artifact directory (writes ARTIFACT/solvers/searched-nfeN.json)")
    p.add_argument("--nfe", type=ints, default=[3, 4, 5, 6, 8, 10], help="comma list (default 3,4,5,6,8,10)")
    p.add_argument("--form", choices=FORMS, default=None,
                   help="velocity (Euler-like, default for flow models) or x0 (DDIM-like, default otherwise)")
    p.add_argument("--init", choices=("euler", "best"), default="euler",
                   help="euler: M = I on a uniform grid (the paper); best: the classic table of this form "
                        "with the lowest held-out error")
    p.add_argument("--restrict", action="store_true",
                   help="the paper's rule for NFE <= 6: the last two steps only use the previous output")
    p.add_argument("--cold", action="store_true",
                   help="start every NFE from --init (default: a larger NFE also starts from the next "
                        "smaller one's result, extended; the two race to their first plateau, and the "
                        "result is never worse than the smaller one padded)")
    p.add_argument("--iters", type=int, default=600, help="cap on iterations per NFE (the search stops on a plateau)")
    p.add_argument("--patience", type=int, default=40,
                   help="a plateau: the selection-set RMSE has not improved for this many iterations")
    p.add_argument("--decays", type=int, default=3,
                   help="on a plateau, restart from the best iterate at --lr-decay x the learning rate, this "
                        "many times; the next plateau stops the NFE")
    p.add_argument("--lr-decay", type=float, default=0.3, help="learning-rate factor of each restart")
    p.add_argument("--min-iters", type=int, default=0,
                   help="no plateau stops an NFE before this many iterations (the decays alone make the "
                        "earliest stop (decays + 1) x patience)")
    p.add_argument("--min-delta", type=float, default=1e-3, help="relative improvement that counts")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="CFG scale to search at (default 1: CFG off, the paper); >1 fits a per-scale solver")
    p.add_argument("--out", default=None, help="solver directory (default ARTIFACT/solvers)")
    p.add_argument("--batch", type=int, default=12, help="noise samples per iteration")
    p.add_argument("--pool", type=int, default=POOL,
                   help=f"training batches cycled through (default {POOL}; 0: a fresh batch every iteration); "
                        "the teacher runs once per batch")
    p.add_argument("--lr", type=float, default=None,
                   help="Lion learning rate (default 1e-2 as the paper; 2e-3 with --init best, whose tuned "
                        "start 1e-2 sign steps were measured to throw away)")
    p.add_argument("--final-weight", type=float, default=1.0, help="weight of the Huber (~L1) final term")
    p.add_argument("--delta", type=float, default=1e-3, help="Huber delta (paper: 1e-3)")
    p.add_argument("--teacher", default="dpmpp-2m/logsnr")
    p.add_argument("--teacher-nfe", type=int, default=64)
    p.add_argument("--ref", default="dpmpp-3m/logsnr", help="converged reference solver (as offline eval's)")
    p.add_argument("--ref-nfe", type=int, default=128)
    p.add_argument("--val", type=int, default=64,
                   help="selection seeds every choice is made on (the kept iterate, the race, the padding)")
    p.add_argument("--val-every", type=int, default=10, help="iterations between validations")
    p.add_argument("--cfg", type=float, default=None,
                   help="guidance of the CFG-on metrics (default: the artifact's, else 2); search: CFG off")
    p.add_argument("--seed", type=int, default=0, help="training noise stream: offset into the search range")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="torch device of the model, e.g. cuda")
    p.add_argument("--dry-run", action="store_true", help="do not write solver files")
    p.add_argument("--keep-better", action="store_true",
                   help="keep an existing file whose held-out error (same seeds, same reference) is lower, "
                        "where keeping it leaves the error non-increasing in NFE")
    p.set_defaults(func=run)
    return p


def run(args, command=None) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, sha, art = load_model(args.artifact, args.device)
    args.cfg = args.guidance if args.guidance != 1 else cfg_scale(art, args.cfg)
    args.lr = args.lr or (2e-3 if args.init == "best" else 1e-2)
    seed = stream_seed("search", args.seed)
    t_wall, t_cpu = time.time(), cpu_s()
    vn, vl, ref, ref_cfg, conv = references(model, args)
    ref_cpu = (cpu_s() - t_cpu) / len(args.nfe)
    res = search(model, args.nfe, form=args.form, init=args.init, warm=not args.cold, restrict=args.restrict,
                 iters=args.iters, patience=args.patience, decays=args.decays, lr_decay=args.lr_decay,
                 min_iters=args.min_iters, min_delta=args.min_delta, batch=args.batch, lr=args.lr,
                 final_weight=args.final_weight, delta=args.delta, teacher=args.teacher,
                 teacher_nfe=args.teacher_nfe, val=args.val, val_every=args.val_every, pool=args.pool or None,
                 ref=ref if args.guidance == 1 else ref_cfg, guidance=args.guidance, seed=seed,
                 log=Progress(f"search {Path(args.artifact).name}", args.iters * len(args.nfe)))
    files = {}
    for n, r in res.items():
        t0 = cpu_s()
        name = f"searched-nfe{n}"
        spec = searched_spec(model.schedule, model.param, r["form"], r["grid"], r["M"], r["init"])
        tab = searched_table(model.schedule, model.param, r["form"], r["grid"], r["M"], name)
        classic = classic_rmse(model, n, vn, vl, ref)
        top = sorted(classic, key=classic.get)[:5]  # CFG on: the five best without CFG (CPU budget)
        classic_cfg = classic_rmse(model, n, vn, vl, ref_cfg, top, guidance=args.cfg)
        met = metrics_for(model, tab, vn, vl, ref, ref_cfg, args.cfg, classic, classic_cfg)
        met.update(init_rmse=r["init_rmse"], best_iter=r["best_iter"], iters_run=r["iters_run"],
                   stopped_on_plateau=r["stopped_on_plateau"], lr_decays=r["lr_decays"],
                   padded_from=r["padded_from"], curve=r["curve"])
        fit = {"method": "differentiable solver search (arXiv 2505.21114)", "form": r["form"],
               "init": r["init"],
               "restrict_nfe_le_6": args.restrict, "iters_cap": args.iters, "iters_run": r["iters_run"],
               "patience": args.patience, "min_delta": args.min_delta, "lr_decay": args.lr_decay,
               "decays": args.decays, "min_iters": args.min_iters, "warm_start": not args.cold,
               "batch": args.batch, "pool": args.pool or None, "starts": r["race"],
               "optimizer": f"lion lr {args.lr:g}", "final_weight": args.final_weight,
               "huber_delta": args.delta,
               "teacher": f"{args.teacher} x{args.teacher_nfe}, interpolated at the student's times",
               "reference": f"{args.ref} x{args.ref_nfe}", "reference_vs_half_nfe_rmse": conv,
               "guidance": args.guidance, "train_stream_seed": seed,
               "selection": "lowest selection-set rmse (at the search's guidance)",
               "cpu_minutes": round((r["cpu_s"] + ref_cpu + cpu_s() - t0) / 60, 3),
               "cpu_minutes_note": "this NFE's search, with the teacher runs it made (later NFEs reuse "
                                   "them) and its share of the references",
               "wall_seconds_nfe": round(r["wall_s"], 1),
               "torch_threads": torch.get_num_threads(), "nfes_in_run": list(args.nfe)}
        files[name] = solver_to_json(spec, sha, name, fit, met)
        cf = met[f"classic_cfg{args.cfg:g}"]
        print(f"nfe {n:>2}: searched {met['heldout_rmse']:.4f} (init {r['init']} {r['init_rmse']:.4f}; "
              f"{r['iters_run']} iterations ({r['iters_total']} with the other start), {r['lr_decays']} lr decays, {r['wall_s']:.0f} s; "
              f"best classic {met['best_classic']} {met['best_classic_rmse']:.4f}) | cfg {args.cfg:g}: "
              f"{met[f'heldout_rmse_cfg{args.cfg:g}']:.4f} (best classic {min(cf.values()):.4f})")
    wall = time.time() - t_wall
    out = Path(args.out or Path(args.artifact) / "solvers")
    kept = kept_on_disk({n: (out / f"searched-nfe{n}.json", files[f"searched-nfe{n}"]) for n in res}) \
        if args.keep_better else set()
    written = []
    for n in res:
        name, d = f"searched-nfe{n}", files[f"searched-nfe{n}"]
        d["fit"]["wall_seconds_run"] = round(wall, 1)
        if args.dry_run or n in kept:
            continue
        write_solver(out / f"{name}.json", d)
        written.append(name)
    print(json.dumps({"cpu_minutes_total": round((cpu_s() - t_cpu) / 60, 2), "wall_seconds": round(wall, 1),
                      "written": sorted(written)}))
    return 0


def kept_on_disk(files: dict) -> set:
    """{n: (path, new file dict)} -> the NFEs whose existing file (same model, selection seeds and
    reference) has the lower selection error *and* keeps the error non-increasing in NFE. Largest NFE
    first, an old file is kept only if it is not below what a larger NFE keeps; the new files of a
    warm run fall with NFE, so the set on disk does too."""
    keep, floor = set(), 0.0  # floor: the error kept at the next larger NFE
    for n in sorted(files, reverse=True):
        path, new = files[n]
        e_new, e_old = new["metrics"]["heldout_rmse"], _error_on_disk(path, new)
        if floor <= e_old <= e_new:
            keep.add(n)
            print(f"kept {path} (held-out rmse {e_old:.4f} <= {e_new:.4f})")
        floor = e_old if n in keep else e_new
    return keep


def _error_on_disk(path: Path, new: dict) -> float:
    """The held-out error of an existing file for the same model, held-out seeds and reference (else inf)."""
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return math.inf
    same = (old.get("model_sha256") == new["model_sha256"]
            and old.get("metrics", {}).get("heldout_seeds") == new["metrics"]["heldout_seeds"]
            and old.get("fit", {}).get("reference") == new["fit"]["reference"])
    return old["metrics"].get("heldout_rmse", math.inf) if same else math.inf
