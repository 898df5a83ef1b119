"""`stride offline dode`: D-ODE distillation (Kim et al. 2024, arXiv 2309.16421).

One scalar per model evaluation, lam_0 = 0, in the base solver's own basis (solvers.learned states
the exact update and the raw / effective semantics). Fitted as the paper's code does, greedily and in
closed form: at evaluation k, with the base's uncorrected next state y_b and the correction
direction g_k,

    lam_k = clip(<g_k, r_k> / (<g_k, g_k> + n eps^2), -L, L),     r_k = X(s_k) - y_b     (float64)

and the corrected state y_b + lam_k g_k feeds the next evaluation. Unlike the released code, the
teacher's grid *refines* the student's (C - 1 points inside each student interval, uniform in
log-SNR), so every target X(s_k) sits at the student's own noise level (the released code's index
alignment puts them at other noise levels). The n eps^2 ridge (eps in data units) keeps a
vanishing D_k - D_{k-1} near t_min from blowing lam up; the clip is a last guard. Fitting seeds are the
`dode` stream of offline/seeds.py, disjoint from evaluation, selection and every other fit.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from stride_diffusion.solvers import make_table, sample, seeded_noise
from stride_diffusion.solvers.builders import default_grid
from stride_diffusion.solvers.learned import (
    DODE_BASES,
    dode_correction,
    dode_directions,
    dode_matrix,
    dode_semantics,
    dode_spec,
    dode_table,
    grid_of,
    solver_to_json,
    write_solver,
)
from stride_diffusion.solvers.schedules import F64

from .argtypes import ints, names
from .fitting import (
    cfg_scale,
    cpu_s,
    device_of,
    heldout,
    load_model,
    metrics_for,
    model_call,
    reference,
    references,
    rmse,
    targets_at,
    teacher_trajectory,
)
from .progress import Progress
from .seeds import STREAMS, stream_range

FIT_SEED = STREAMS["dode"][0]


@torch.no_grad()
def fit_lambdas(model, base, semantics, noise, labels, targets, guidance=1.0, eps=1e-3, clip=5.0, joint=True):
    """Closed-form lam_k on the folded table itself (so fit and served table agree by construction),
    greedily in k. A predictor whose corrector lands at the same time (Heun) is fitted jointly with
    it (`joint`): its lam is chosen by a 1-D search to minimise the *corrector's* landing error,
    the corrector's lam in closed form inside it; the predictor's own landing state is never
    served, so fitting it to the teacher (the greedy rule) only pushed the corrector's lam to its
    clip. Returns (lam [N], per-step rmse to the targets with lam_k = 0, with the fitted lam_k;
    both on the trajectory corrected up to k - 1)."""
    n = base.nfe
    G = dode_correction(*dode_directions(base, semantics))
    B = noise.shape[0]

    def closed(g, r):
        return float(((g * r).sum() / ((g * g).sum() + g.numel() * eps ** 2)).clamp(-clip, clip))  # g may sit on a GPU

    def penalised(r, g, lam_):
        """What `closed` minimises, per element: the landing error plus the ridge eps^2 lam^2."""
        return float((r - lam_ * g).pow(2).mean()) + eps ** 2 * lam_ ** 2

    def stage(k, y, hs, lam):
        """(h_k, base state y_b after evaluation k with lam_k = 0, direction g_k, residual r_k)."""
        d = model_call(model, y, base.tau[k], base.s[k], labels, guidance)
        h = base.hx[k] * y.to(F64) + base.hd[k] * d.to(F64)
        H = [*hs, h]
        row = dode_matrix(base, lam, semantics)[k]  # lam_k is still 0 here
        yb = base.c[k] * y.to(F64) + sum(row[j] * H[j] for j in range(k + 1) if row[j] != 0)
        g = sum((G[k, j] * H[j] for j in range(k + 1) if G[k, j] != 0), torch.zeros_like(yb))
        return h, yb, g, targets[k].reshape(B, -1).to(F64) - yb

    def corrector_error(k, lp, hs, lam, yb, g):
        """The pair's objective at predictor scalar lp: the corrector's penalised landing error
        (its scalar in closed form) plus the same ridge on lp. Without lp's ridge the predictor, whose
        only lever is where the corrector evaluates (a second-order effect), drifts along a nearly
        flat error to the clip; with it lp moves only as far as the landing error pays for."""
        trial = lam.clone()
        trial[k] = lp
        _, _, g1, r1 = stage(k + 1, (yb + lp * g).to(noise.dtype), hs, trial)
        return penalised(r1, g1, closed(g1, r1)) + eps ** 2 * lp ** 2

    y = base.init * noise.reshape(B, -1)
    hs, lam = [], torch.zeros(n, dtype=F64)
    before, after = [], []
    for k in range(n):
        h, yb, g, r = stage(k, y, hs, lam)
        hs.append(h)
        if k > 0 and joint and k + 1 < n and base.s[k] == base.s[k + 1]:
            lam[k] = _argmin_1d(lambda lp, k=k, yb=yb, g=g: corrector_error(k, lp, hs, lam, yb, g), -clip, clip)
        elif k > 0:
            lam[k] = closed(g, r)
        y = (yb + lam[k] * g).to(noise.dtype)
        before.append(float(r.pow(2).mean().sqrt()))
        after.append(float((r - lam[k] * g).pow(2).mean().sqrt()))
    return lam, before, after


def _argmin_1d(f, lo, hi, coarse=11, iters=20) -> float:
    """A coarse scan, then golden-section search in the bracket around its best point."""
    xs = torch.linspace(lo, hi, coarse, dtype=F64).tolist()
    fs = [f(x) for x in xs]
    i = min(range(coarse), key=fs.__getitem__)
    a, b = xs[max(i - 1, 0)], xs[min(i + 1, coarse - 1)]
    gr = (5 ** 0.5 - 1) / 2
    c, d = b - gr * (b - a), a + gr * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - gr * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + gr * (b - a)
            fd = f(d)
    best = min([(fs[i], xs[i]), (fc, c), (fd, d)])
    return best[1]


def fit(model, bases, nfes, *, grid=None, C=8, teacher="dpmpp-2m", batch=64, guidance=1.0, eps=1e-3, clip=5.0,
        val=64, cfg=2.0, ref=None, ref_cfg=None, log=None, sha="", fit_seed=FIT_SEED):
    """Fit every (base, nfe); teachers are shared between bases on the same grid (ddim, dpmpp-2m)."""
    log = log or Progress("dode", len(bases) * len(nfes))
    sch = model.schedule
    noise = seeded_noise(stream_range("dode", fit_seed, batch), model.shape, device=device_of(model))
    labels = (torch.arange(batch) % model.num_classes).to(noise.device)
    vn, vl = heldout(model, val)
    ref = reference(model, vn, vl) if ref is None else ref
    ref_cfg = reference(model, vn, vl, cfg) if ref_cfg is None else ref_cfg
    cache, out = {}, {}
    for base_name in bases:
        if base_name not in DODE_BASES:
            raise ValueError(f"unknown D-ODE base {base_name!r}; allowed: {list(DODE_BASES)}")
        for n in nfes:
            t0, w0 = cpu_s(), time.time()
            g = grid or default_grid(sch, base_name)
            base = make_table(f"{base_name}/{g}", sch, model.param, n)
            key = tuple(grid_of(base).tolist())
            shared = key in cache
            if not shared:
                cache[key] = teacher_trajectory(model, grid_of(base), noise, labels, C, teacher, guidance)
            tgt = targets_at(*cache[key], base.s.tolist())
            sem = dode_semantics(base_name)
            lam, before, after = fit_lambdas(model, base, sem, noise, labels, tgt, guidance, eps, clip)
            name = f"dode-{base_name}-nfe{n}"
            spec = dode_spec(sch, model.param, base_name, n, lam, g, sem)
            tab = dode_table(base, lam, sem, name)
            met = metrics_for(model, tab, vn, vl, ref, ref_cfg, cfg)
            met.update(base_heldout_rmse=rmse(sample(model, base, vn, vl), ref),
                       **{f"base_heldout_rmse_cfg{cfg:g}": rmse(sample(model, base, vn, vl, cfg), ref_cfg)},
                       fit_step_rmse_base=before, fit_step_rmse_dode=after)
            fitd = {"method": "D-ODE (arXiv 2309.16421), greedy closed-form least squares", "semantics": sem,
                    "teacher": f"{teacher} on the student grid refined x{C} (log-SNR)", "guidance": guidance,
                    "fit_seeds": f"{fit_seed}..{fit_seed + batch - 1}", "ridge_eps": eps, "clip": clip,
                    "teacher_shared_with_previous_fit": shared,
                    "predictor_corrector": "joint (predictor lam by 1-D search on the corrector's error)"
                    if base_name == "heun" else "n/a",
                    "cpu_minutes": round((cpu_s() - t0) / 60, 3), "wall_seconds": round(time.time() - w0, 1),
                    "torch_threads": torch.get_num_threads()}
            out[name] = solver_to_json(spec, sha, name, fitd, met)
            at = "" if guidance == 1 else f"_cfg{cfg:g}"  # the error at the guidance it was fitted for
            log(f"{name}: rmse{at} {met['heldout_rmse' + at]:.4f} (base {met['base_heldout_rmse' + at]:.4f}) "
                f"lam {[round(v, 3) for v in lam.tolist()]}", final=True)
    return out


def add_parser(subparsers):
    p = subparsers.add_parser("dode", help="D-ODE: one learned scalar per evaluation on a classic solver",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", help="artifact directory (writes ARTIFACT/solvers/dode-BASE-nfeN.json)")
    p.add_argument("--base", type=names,
                   default=["ddim", "heun", "dpmpp-2m"],
                   help=f"comma list from {','.join(DODE_BASES)} (default ddim,heun,dpmpp-2m)")
    p.add_argument("--nfe", type=ints, default=[3, 4, 5, 6, 8, 10])
    p.add_argument("--grid", default=None, help="base grid (default: the base's default grid)")
    p.add_argument("--scale", type=int, default=8, help="teacher steps per student interval (C)")
    p.add_argument("--teacher", default="dpmpp-2m", help="teacher solver on the refined grid")
    p.add_argument("--batch", type=int, default=64, help="fitting samples (seeds 30_000_000 + i)")
    p.add_argument("--guidance", type=float, default=1.0, help="guidance while fitting (default off)")
    p.add_argument("--eps", type=float, default=1e-3,
                   help="ridge: corrections below ~eps RMS (data units) shrink to 0")
    p.add_argument("--clip", type=float, default=5.0, help="|lambda| bound")
    p.add_argument("--ref", default="dpmpp-3m/logsnr", help="converged reference solver (as offline eval's)")
    p.add_argument("--ref-nfe", type=int, default=128)
    p.add_argument("--val", type=int, default=64, help="held-out samples (seeds 20_000_000 + i)")
    p.add_argument("--cfg", type=float, default=None,
                   help="guidance for the CFG-on metrics (default: the artifact's, else 2)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="torch device of the model, e.g. cuda")
    p.add_argument("--out", default=None, help="solver directory (default ARTIFACT/solvers)")
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args, command=None) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, sha, art = load_model(args.artifact, args.device)
    args.cfg = args.guidance if args.guidance != 1 else cfg_scale(art, args.cfg)  # a per-w fit is measured at w
    t_wall, t_cpu = time.time(), cpu_s()
    _, _, ref, ref_cfg, conv = references(model, args)
    ref_cpu = (cpu_s() - t_cpu) / (len(args.base) * len(args.nfe))
    res = fit(model, args.base, args.nfe, grid=args.grid, C=args.scale, teacher=args.teacher,
              batch=args.batch, guidance=args.guidance, eps=args.eps, clip=args.clip, val=args.val,
              cfg=args.cfg, ref=ref, ref_cfg=ref_cfg, log=Progress(f"dode {Path(args.artifact).name}"),
              sha=sha)
    for name, d in res.items():
        d["fit"].update(reference=f"{args.ref} x{args.ref_nfe}", reference_vs_half_nfe_rmse=conv,
                        cpu_minutes=round(d["fit"]["cpu_minutes"] + ref_cpu / 60, 3))
        if not args.dry_run:
            write_solver(Path(args.out or Path(args.artifact) / "solvers") / f"{name}.json", d)
    print(json.dumps({"cpu_minutes_total": round((cpu_s() - t_cpu) / 60, 2),
                      "wall_seconds": round(time.time() - t_wall, 1),
                      "written": [] if args.dry_run else sorted(res)}))
    return 0
