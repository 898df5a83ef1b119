"""Quality of every sampler x NFE on held-out noise.

Two kinds of seeds (offline/seeds.py; disjoint from each other and from every fitting stream):
the *selection* set, on which everything that chooses does so (the guidance default, the per-NFE
`best` the service serves), and the *evaluation* sets, on which the reported rows are measured.
For each evaluation seed set (classes i mod K, so balanced) every sampler is scored by
  rmse   against a converged reference solve of the same ODE from the same noise and class,
  fd     Fréchet distance in the artifact classifier's penultimate features vs the reference images,
  kid    kernel distance (unbiased MMD^2) in the same features vs the same images (offline/metrics.py),
  acc    the fraction classified as the requested class,
and reported as mean ± std over the seed sets, FD also as a ratio to the reference's own FD. The
classifier trained on one part of the held-out images; the reference is the other part
(offline/data.py), so neither the classifier nor the generative model saw it. The floor scores as
many real *train* images (which the classifier never saw either) against the reference, at the
same sample sizes. In KID it reads 0 in expectation, a true floor. In FD it is not a lower bound at
finite n: FD's small-sample bias depends on the distribution measured (a less diverse set gets less
of it), so a sampler can score below real images (docs/results.md, "The judge and the floor").

FD and accuracy need the artifact's classifier (classifier.json) and the data split model.json
records, so they exist only for models stride trained. An imported network has neither: its rows
carry RMSE alone (fd, acc None), and the best sampler per NFE is the lowest RMSE.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from stride_diffusion.solvers.artifact import (
    EVAL_FORMAT,
    default_guidance,
    load_artifact,
    read_json,
    write_json,
)
from stride_diffusion.solvers.builders import make_table
from stride_diffusion.solvers.samplers import best_row

from .argtypes import floats, ints
from .eval_report import family, figures, markdown, shown
from .protocol import F64, Protocol, make_seed_sets, mean_std, scores, secant_rows


def evaluate(artifact, solvers=("euler", "heun", "ddim", "dpmpp-2m", "dpmpp-3m", "unipc", "ipndm"),
             nfes=(1, 2, 3, 4, 5, 6, 8, 10, 16, 32), n=500, seed_sets=3, seeds=None, guidance=None,
             sweep=None, reference="dpmpp-3m/logsnr:128", sweep_with="dpmpp-3m/logsnr:32", cache=".cache/stride/eval",
             batch=1000, threads=None, images=True, learned=True, secant_steps=(1, 2, 4, 8), command=None,
             log=None, device="cpu") -> dict:
    """With no `guidance` and a `sweep`, the sweep runs first and its lowest-FD scale becomes the
    guidance of every row and the artifact's measured default (eval.json's default_guidance)."""
    log = sys.stderr if log is None else log  # per call: a test may swap sys.stderr
    if threads:
        torch.set_num_threads(threads)
    t_start = time.time()
    art = load_artifact(artifact, device)
    p = Protocol(art, n, make_seed_sets(n, seed_sets, seeds), cache, batch)
    sel = p.selection()  # choices (guidance default, `best`) are made here, never on p's sets
    model, clf, K = p.model, p.clf, p.K
    say = lambda *a: print(*a, file=log, flush=True)

    if clf is None:
        say(f"{art.path}: no classifier.json, so RMSE only (FD and accuracy need stride's classifier and data "
            "split); the best per NFE is the lowest RMSE")
    if sweep and clf is None:
        raise ValueError("--sweep picks the guidance by FD, which needs the artifact's classifier and data "
                         "(classifier.json); pass --guidance instead")

    # the guidance sweep, on the selection set; its lowest-FD scale is the default unless one was given
    sweep_rows = []
    sw_solver, sw_nfe = sweep_with.split(":")
    for gs in sweep or []:
        sc = sel.score(sel.samples(make_table(sw_solver, model.schedule, model.param, int(sw_nfe)), gs))
        fd, fd_std = mean_std([s[1] for s in sc])
        acc, acc_std = mean_std([s[2] for s in sc])
        sweep_rows.append({"guidance": gs, "solver": sw_solver, "nfe": int(sw_nfe), "seeds": "selection",
                           "fd": fd, "fd_std": fd_std, "acc": acc, "acc_std": acc_std})
        say(f"sweep g={gs}: fd {fd:.3f}±{fd_std:.3f} acc {acc:.3f}")
    if guidance is not None:
        g = float(guidance)
    elif sweep_rows:
        g = min(sweep_rows, key=lambda r: r["fd"])["guidance"]
    else:
        g = default_guidance(art)
    say(f"guidance {g:g}" + (" (lowest FD of the sweep)" if guidance is None and sweep_rows else ""))

    # the reference, and its convergence check against half its steps on the first set
    ref_solver, ref_nfe = reference.split(":")
    ref_nfe = int(ref_nfe)
    t0 = time.time()
    x_ref = p.reference(ref_solver, ref_nfe, g)
    x_half = p.reference(ref_solver, ref_nfe // 2, g, first_set_only=True)
    say(f"reference {ref_solver}@{ref_nfe} (and @{ref_nfe // 2}) g={g}: {time.time() - t0:.0f}s")
    conv = float((x_half - x_ref[:n]).to(F64).pow(2).mean().sqrt())
    ref_scores = p.score(x_ref)
    sel_ref = sel.reference(ref_solver, ref_nfe, g)
    crit = "fd" if clf is not None else "rmse"  # RMSE when FD cannot be measured (no classifier: imported)
    sel_key = f"selection_{crit}"

    def tables():
        for solver in solvers:
            for nfe in nfes:
                try:
                    yield solver, nfe, make_table(solver, model.schedule, model.param, nfe)
                except ValueError as e:  # a combination the builder cannot make
                    say(f"skip {solver}@{nfe}: {e}")
        for name, tab in sorted(art.solvers.items()) if learned else ():  # learned solvers in the artifact
            yield name, tab.nfe, tab

    rows, grids = [], {}
    for solver, nfe, tab in tables():
        t0 = time.time()
        x = p.samples(tab, g)
        dt = time.time() - t0
        r = p.row(solver, nfe, p.score(x, x_ref), {"grid": tab.meta.get("grid"), "table": tab.name,
                                                   "learned": solver in art.solvers, "seconds": round(dt, 1),
                                                   sel_key: sel.choice_score(sel.samples(tab, g), sel_ref)})
        rows.append(r)
        grids.setdefault(family(solver), []).append((nfe, shown(art, x)))
        say(f"{solver:>9} nfe {nfe:>3}  {scores(r)}  ({dt:.0f}s)")
    sel_secant = {(r["solver"], r["steps"]): r[crit] for r, _ in
                  (secant_rows(sel, g, sel_ref, secant_steps) if secant_steps else ())}
    for r, x in secant_rows(p, g, x_ref, secant_steps, log=log) if secant_steps else ():
        r[sel_key] = sel_secant[(r["solver"], r["steps"])]
        rows.append(r)
        grids.setdefault(r["solver"], []).append((r["nfe"], shown(art, x)))

    best = {}  # the service's auto-pick, on the selection set; reported with the evaluation sets' numbers
    for k in dict.fromkeys(r["nfe"] for r in rows):
        b = best_row([r for r in rows if r["nfe"] == k])
        if b is not None:
            best[str(k)] = {"solver": b["solver"], sel_key: b[sel_key], "fd": b["fd"],
                            "fd_ratio": b.get("fd_ratio"), "kid": b.get("kid"), "rmse": b["rmse"], "acc": b["acc"]}
    ref_row = p.row(ref_solver, ref_nfe, ref_scores)
    floor = p.floor()
    ev = {
        "format": EVAL_FORMAT,
        "model": art.name,
        "model_sha256": art.sha256,
        "classifier_sha256": art.classifier_meta["weights"]["sha256"] if clf is not None else None,
        "guidance": g,
        "default_guidance": g,
        "n": n,
        "seed_sets": [{"first_seed": s[0], "count": len(s)} for s in p.sets],
        "selection_set": {"first_seed": sel.sets[0][0], "count": n,
                          "used_for": "guidance sweep, best (the auto-pick); never a reported row",
                          "teacher_fd": sel.ref_fd[0] if sel.ref_fd else None},
        "sampling_code": p.code,
        "labels": f"seed index i -> class i mod {K} (balanced)",
        "metrics": {"rmse": "RMSE vs the reference solve, pixels in [-1, 1]",
                    "fd": "Fréchet distance, classifier penultimate features, vs held-out real images",
                    "fd_ratio": "fd / the reference's fd on the same seed set",
                    "kid": "kernel distance (unbiased MMD^2, cubic kernel), same features and reference; real "
                           "images score 0 in expectation",
                    "acc": "fraction classified as the requested class", "std": "over seed sets"}
        if clf is not None else {"rmse": "RMSE vs the reference solve, in the model's data units (latents for a "
                                         "latent model)", "fd": "not measured: no classifier.json / data split",
                                 "std": "over seed sets"},
        "reference": {"solver": ref_solver, "nfe": ref_nfe,
                      "grid": make_table(ref_solver, model.schedule, model.param, 2).meta["grid"],
                      "converged_rmse": conv,
                      "converged_check": f"RMSE vs {ref_solver}@{ref_nfe // 2} on the first seed set"},
        "teacher": ref_row,
        "floor": floor,
        "rows": rows,
        "best": best,
        "best_criterion": f"lowest {crit} on the selection set at that NFE (fd, rmse, acc: the evaluation sets')",
        "guidance_sweep": sweep_rows,
        "wall_time_s": round(time.time() - t_start, 1),
        "threads": torch.get_num_threads(),
        "command": command,
    }
    kept = _kept_guidance_tables(art.path / "eval.json", ev)
    if kept:
        ev["guidance_tables"] = kept
        say("kept eval.json's guidance_tables (same model, classifier and sampling code)")
    write_json(art.path / "eval.json", ev)
    (art.path / "eval.md").write_text(markdown(ev))
    if images:
        figures(art.path / "eval", ev, grids, shown(art, x_ref), art.class_names)
    say(f"wrote {art.path / 'eval.json'} ({ev['wall_time_s']:.0f}s)")
    return ev


def _kept_guidance_tables(f: Path, ev: dict) -> dict | None:
    """`stride offline eval-guidance` writes its tables into eval.json; a re-run of the main evaluation
    keeps them while they measure the same model with the same classifier and sampling code."""
    if not f.exists():
        return None
    old = read_json(f)
    gt = old.get("guidance_tables")
    same = gt and old.get("model_sha256") == ev["model_sha256"] and \
        gt.get("classifier_sha256") == ev["classifier_sha256"] and gt.get("sampling_code") == ev["sampling_code"]
    return gt if same else None


# -- CLI ---------------------------------------------------------------------------------------------

def add_parser(subparsers):
    e = subparsers.add_parser("eval", help="quality per sampler x NFE -> eval.json, eval.md, plots")
    e.add_argument("artifact")
    e.add_argument("--solvers", default="euler,heun,ddim,dpmpp-2m,dpmpp-3m,unipc,ipndm")
    e.add_argument("--nfe", type=ints, default=[1, 2, 3, 4, 5, 6, 8, 10, 16, 32])
    e.add_argument("--n", type=int, default=500, help="samples per seed set")
    e.add_argument("--seed-sets", type=int, default=3)
    e.add_argument("--seeds", type=ints, default=None,
                   help="first seed of each set (default 10_000_000 + 1_000_000 j)")
    e.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the artifact's default)")
    e.add_argument("--sweep", type=floats, default=None,
                   help="also measure these guidance scales (with --sweep-with)")
    e.add_argument("--sweep-with", default="dpmpp-3m/logsnr:32", help="solver[/grid]:nfe for the guidance sweep")
    e.add_argument("--reference", default="dpmpp-3m/logsnr:128", help="solver[/grid]:nfe of the converged reference")
    e.add_argument("--cache", default=".cache/stride/eval")
    e.add_argument("--batch", type=int, default=1000)
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--device", default="cpu", help="torch device of the model, e.g. cuda")
    e.add_argument("--no-images", action="store_true", help="skip plots and sample grids")
    e.add_argument("--no-learned", action="store_true", help="skip the learned solvers in <artifact>/solvers")
    e.add_argument("--secant-steps", type=ints, default=[1, 2, 4, 8],
                   help="step counts for the artifact's secant models (0 skips them)")
    e.set_defaults(func=run)
    return e


def run(a, command=None) -> int:
    res = evaluate(a.artifact, solvers=a.solvers.split(","), nfes=a.nfe, n=a.n, seed_sets=a.seed_sets,
                   seeds=a.seeds, guidance=a.guidance, sweep=a.sweep, sweep_with=a.sweep_with,
                   reference=a.reference, cache=a.cache,
                   batch=a.batch, threads=a.threads, images=not a.no_images,
                   learned=not a.no_learned, secant_steps=[k for k in a.secant_steps if k > 0],
                   command=command, device=a.device)
    print(json.dumps({k: res[k] for k in ("guidance", "floor", "reference")}, indent=1))
    return 0
