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
of it), so a sampler can score below real images (README, "the judge and the floor").

FD and accuracy need the artifact's classifier (classifier.json) and the data split model.json
records, so they exist only for models stride trained. An imported network has neither: its rows
carry RMSE alone (fd, acc None), and the best sampler per NFE is the lowest RMSE.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from stride_diffusion.offline.data import classifier_judge_split, data_from_source
from stride_diffusion.offline.eval_report import family, figures, markdown, shown
from stride_diffusion.offline.metrics import fd_features, features, kid, predict
from stride_diffusion.offline.seeds import evaluation_sets, selection_set
from stride_diffusion.solvers.artifact import EVAL_FORMAT, default_guidance, load_artifact, read_json, write_json
from stride_diffusion.solvers.builders import make_table
from stride_diffusion.solvers.executor import sample, seeded_noise

F64 = torch.float64
SAMPLING_CODE = ("solvers/executor.py", "solvers/update.py", "solvers/table.py", "solvers/schedules.py",
                 "solvers/param.py", "solvers/secant.py", "solvers/nets")


def sampling_code_version() -> str:
    """sha256 (12 hex) of the source that turns (model, table, noise) into samples: a cached sample
    made by other code is never reused."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for rel in SAMPLING_CODE:
        p = root / rel
        for f in sorted(p.rglob("*.py")) if p.is_dir() else [p]:
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


# -- sampling ------------------------------------------------------------------------------------

def make_seed_sets(n: int, sets: int, firsts=None) -> list:
    return evaluation_sets(n, sets, firsts or None)


def run(model, table, noise, labels, guidance, batch) -> torch.Tensor:
    """Samples in batches on the model's device; returned on the CPU."""
    dev = getattr(model, "device", noise.device)
    return torch.cat([sample(model, table, noise[i:i + batch].to(dev), labels[i:i + batch].to(dev), guidance).cpu()
                      for i in range(0, len(noise), batch)])


def _key(**kw) -> str:
    return hashlib.sha256(json.dumps(kw, sort_keys=True).encode()).hexdigest()[:24]


def cached_run(cache: Path | None, key: dict, fn) -> torch.Tensor:
    """Reference solves are the expensive part; keyed by model sha256, solver, seeds and guidance."""
    if cache is None:
        return fn()
    f = Path(cache) / f"{_key(**key)}.safetensors"
    if f.exists():
        return load_file(str(f))["x"]
    x = fn()
    f.parent.mkdir(parents=True, exist_ok=True)
    save_file({"x": x.contiguous()}, str(f), metadata={"key": json.dumps(key, sort_keys=True)})
    return x


def _ms(v):
    t = torch.tensor(v, dtype=F64)
    return float(t.mean()), float(t.std(unbiased=True)) if len(v) > 1 else 0.0


# -- the protocol ----------------------------------------------------------------------------------

class Protocol:
    """The measurement every row shares: seed sets, balanced classes, the classifier's scores, the
    teacher's converged reference, and the sample cache. `evaluate` and `offline.secant.evaluate_secant`
    both measure through it, so their rows agree and reuse each other's cached solves."""

    def __init__(self, art, n: int, sets: list, cache=".cache/stride/eval", batch: int = 1000):
        self.art, self.n, self.sets, self.batch = art, n, sets, batch
        self.model, self.clf, self.K = art.model.to_channels_last(), art.classifier, art.model.num_classes
        self.data = self.judge = self.f_real = None  # without a classifier: RMSE only (module docstring)
        if self.clf is not None:
            self.data = data_from_source(art.meta["data"]["source"])
            self.judge = classifier_judge_split(self.data, art.classifier_meta)
            self.f_real = features(self.clf, self.judge.ref_x)
        self.labels = torch.arange(n) % self.K
        self.noise = torch.cat([seeded_noise(s, self.model.shape) for s in sets])
        self.lab = self.labels.repeat(len(sets))
        self.cache = Path(cache) if cache else None
        self.ref_fd = None  # per-set FD of the reference, once `reference` has run
        self.code = sampling_code_version()

    def selection(self) -> Protocol:
        """The same measurement on the selection set (one set of n): what choices are made on."""
        return Protocol(self.art, self.n, [selection_set(self.n)], self.cache, self.batch)

    def choice_score(self, x, ref) -> float:
        """What choices are made by: mean FD, or mean RMSE to `ref` without a classifier."""
        per_set = self.score(x, ref)
        return _ms([s[1] if self.clf is not None else s[0] for s in per_set])[0]

    def fd_of(self, x) -> float:
        """Mean FD over the sets of samples x (no reference needed)."""
        return _ms([s[1] for s in self.score(x)])[0]

    def _key(self, sets=None, **kw) -> dict:
        return {"model": self.art.sha256, **kw, "seeds": [[s[0], len(s)] for s in sets or self.sets],
                "labels": f"i mod {self.K}", "shape": list(self.model.shape), "code": self.code}

    def score(self, x, ref=None) -> list:
        """Per-set (rmse, fd, acc, kid) of samples x [S * n, ...]; rmse None without a reference."""
        n, out = self.n, []
        for j in range(len(self.sets)):
            xs = x[j * n:(j + 1) * n]
            rmse = None if ref is None else float((xs - ref[j * n:(j + 1) * n]).to(F64).pow(2).mean().sqrt())
            if self.clf is None:
                out.append((rmse, None, None, None))
                continue
            acc = float((predict(self.clf, xs) == self.labels).to(F64).mean())
            f = features(self.clf, xs)
            out.append((rmse, fd_features(f, self.f_real), acc, kid(f, self.f_real)))
        return out

    def samples(self, tab, g, sampler=None) -> torch.Tensor:
        """Samples of every seed set by a Table (or, with `sampler`, by what the json `tab` names),
        cached by its content, so an interrupted run resumes."""
        tj = json.dumps(tab.to_json() if sampler is None else tab, sort_keys=True, default=str)
        key = self._key(table=hashlib.sha256(tj.encode()).hexdigest(), guidance=g)
        return cached_run(self.cache, key, sampler or (
            lambda: run(self.model, tab, self.noise, self.lab, g, self.batch)))

    def reference(self, solver: str, nfe: int, g: float, first_set_only: bool = False) -> torch.Tensor:
        """The teacher's converged solve; on all sets it also fixes `ref_fd`, the fd_ratio denominators."""
        sets = self.sets[:1] if first_set_only else self.sets
        m = len(sets) * self.n
        tab = make_table(solver, self.model.schedule, self.model.param, nfe)
        solver = solver if "/" in solver else f"{solver}/{tab.meta['grid']}"  # a default grid can change
        x = cached_run(self.cache, self._key(sets, solver=solver, nfe=nfe, guidance=g),
                       lambda: run(self.model, tab, self.noise[:m], self.lab[:m], g, self.batch))
        if not first_set_only and self.clf is not None:
            self.ref_fd = [s[1] for s in self.score(x)]
        return x

    def real_images(self, j: int) -> torch.Tensor:
        """The floor's n real train images for seed set j (drawn with seed j)."""
        return self.data.train_x[torch.randperm(len(self.data.train_x), generator=torch.Generator().manual_seed(j))[:self.n]]

    def floor(self) -> dict | None:
        """Real train images (unseen by the classifier, as samples are) against the reference: per seed
        set j, n of them drawn with seed j. KID reads 0 for them in expectation; FD does not (module
        docstring). Needs `reference` to have run (the fd_ratio denominators)."""
        if self.clf is None:
            return None
        fd, kd = [], []
        for j in range(len(self.sets)):
            f = features(self.clf, self.real_images(j))
            fd.append(fd_features(f, self.f_real)), kd.append(kid(f, self.f_real))
        out = {"what": f"{self.n} real train images per seed set vs the {len(self.judge.ref_x)} reference images (held "
                       "out from the model and the classifier); acc: the classifier on the reference",
               "acc": float((predict(self.clf, self.judge.ref_x) == self.judge.ref_y).to(F64).mean())}
        (out["fd"], out["fd_std"]), (out["kid"], out["kid_std"]) = _ms(fd), _ms(kd)
        out["fd_ratio"], out["fd_ratio_std"] = _ms([a / b for a, b in zip(fd, self.ref_fd)])
        return out

    def row(self, name, nfe, sc, extra=None) -> dict:
        r = {"solver": name, "nfe": nfe}
        for i, k in enumerate(("rmse", "fd", "acc", "kid")):
            vals = [s[i] for s in sc]
            r[k], r[k + "_std"] = (None, None) if vals[0] is None else _ms(vals)
        r["fd_ratio"], r["fd_ratio_std"] = (None, None) if r["fd"] is None or not self.ref_fd else \
            _ms([s[1] / f for s, f in zip(sc, self.ref_fd)])
        return {**r, **(extra or {})}


def secant_rows(p: Protocol, g: float, x_ref, steps=(1, 2, 4, 8), names=None, interval=None,
                log=None) -> list:
    """(row, samples) for N uniform Euler steps on each secant file of the artifact (all by default)."""
    from stride_diffusion.offline.secant import nfe_of
    from stride_diffusion.solvers.secant import load_secant, secant_names, secant_table

    out, dev = [], p.model.device
    for name in secant_names(p.art.path) if names is None else names:
        sm = load_secant(p.art.path, p.art.sha256, dev, name=name)
        for n in steps:
            t0, tab = time.time(), secant_table(n)
            spec = {"secant": sm.sha256, "steps": n} | ({"interval": list(interval)} if interval else {})
            x = p.samples(spec, g, lambda sm=sm, tab=tab: torch.cat([
                sample(sm, tab, p.noise[i:i + p.batch].to(dev), p.lab[i:i + p.batch].to(dev), g,
                       guidance_interval=interval).cpu()
                for i in range(0, len(p.noise), p.batch)]))
            e = nfe_of(sm, n, g, interval)
            r = p.row(name, e, p.score(x, x_ref), {
                "grid": "uniform", "table": "secant", "steps": n, "secant": True, "evaluations": e,
                "loss": sm.meta.get("loss"), "trained_steps": sm.steps, "guidance_input": sm.guidance_input,
                "guidance_interval": interval, "seconds": round(time.time() - t0, 1)})
            out.append((r, x))
            if log:
                print(f"{name:>9} steps {n:>2} nfe {e:>3}  {scores(r)}  ({r['seconds']:.0f}s)", file=log, flush=True)
    return out


def scores(r: dict) -> str:
    """A row's numbers for the log; FD and accuracy only where measured."""
    out = f"rmse {r['rmse']:.4f}"
    if r.get("fd") is not None:
        out += f"  fd {r['fd']:.3f}±{r['fd_std']:.3f}  ratio {r['fd_ratio']:.2f}  kid {r['kid']:.4f}  acc {r['acc']:.3f}"
    return out


# -- the evaluation --------------------------------------------------------------------------------

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
        fd, fd_std = _ms([s[1] for s in sc])
        acc, acc_std = _ms([s[2] for s in sc])
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

    best = {}  # chosen on the selection set; reported with the evaluation sets' numbers
    for r in rows:
        b = best.get(str(r["nfe"]))
        if b is None or r[sel_key] < b[sel_key]:
            best[str(r["nfe"])] = {"solver": r["solver"], sel_key: r[sel_key], "fd": r["fd"],
                                   "fd_ratio": r.get("fd_ratio"), "kid": r.get("kid"), "rmse": r["rmse"],
                                   "acc": r["acc"]}
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
