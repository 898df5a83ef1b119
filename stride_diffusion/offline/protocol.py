"""The measurement every quality row shares (`Protocol`): seed sets, balanced classes, the
classifier's scores, the teacher's converged reference and the sample cache. `stride offline eval`,
`eval-guidance` and `secant` all measure through it, so their rows agree and reuse each other's
cached solves (offline/evaluate.py describes the metrics)."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from stride_diffusion.solvers.builders import make_table
from stride_diffusion.solvers.contracts import device_of
from stride_diffusion.solvers.executor import sample, seeded_noise
from stride_diffusion.solvers.samplers import rows_per_image
from stride_diffusion.solvers.secant import load_secant, secant_names, secant_table

from .data import classifier_judge_split, data_from_source
from .metrics import fd_features, features, kid, predict
from .seeds import evaluation_sets, selection_set

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


def sample_in_batches(model, table, noise, labels, guidance, batch) -> torch.Tensor:
    """Samples in batches on the model's device; returned on the CPU."""
    dev = device_of(model, noise.device)
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


def mean_std(v):
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
        return mean_std([s[1] if self.clf is not None else s[0] for s in per_set])[0]

    def fd_of(self, x) -> float:
        """Mean FD over the sets of samples x (no reference needed)."""
        return mean_std([s[1] for s in self.score(x)])[0]

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
            lambda: sample_in_batches(self.model, tab, self.noise, self.lab, g, self.batch)))

    def reference(self, solver: str, nfe: int, g: float, first_set_only: bool = False) -> torch.Tensor:
        """The teacher's converged solve; on all sets it also fixes `ref_fd`, the fd_ratio denominators."""
        sets = self.sets[:1] if first_set_only else self.sets
        m = len(sets) * self.n
        tab = make_table(solver, self.model.schedule, self.model.param, nfe)
        solver = solver if "/" in solver else f"{solver}/{tab.meta['grid']}"  # a default grid can change
        x = cached_run(self.cache, self._key(sets, solver=solver, nfe=nfe, guidance=g),
                       lambda: sample_in_batches(self.model, tab, self.noise[:m], self.lab[:m], g, self.batch))
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
        (out["fd"], out["fd_std"]), (out["kid"], out["kid_std"]) = mean_std(fd), mean_std(kd)
        out["fd_ratio"], out["fd_ratio_std"] = mean_std([a / b for a, b in zip(fd, self.ref_fd)])
        return out

    def row(self, name, nfe, sc, extra=None) -> dict:
        r = {"solver": name, "nfe": nfe}
        for i, k in enumerate(("rmse", "fd", "acc", "kid")):
            vals = [s[i] for s in sc]
            r[k], r[k + "_std"] = (None, None) if vals[0] is None else mean_std(vals)
        r["fd_ratio"], r["fd_ratio_std"] = (None, None) if r["fd"] is None or not self.ref_fd else \
            mean_std([s[1] / f for s, f in zip(sc, self.ref_fd)])
        return {**r, **(extra or {})}


def nfe_of(model, steps: int, guidance: float, interval=None) -> int:
    """Network evaluations per sample: each step's rows (`rows_per_image`), unguided outside `interval`."""
    inside = lambda t: interval is None or interval[0] <= float(t) <= interval[1]
    return sum(rows_per_image(model, guidance if inside(t) else 1.0) for t in secant_table(steps).tau)


def secant_rows(p: Protocol, g: float, x_ref, steps=(1, 2, 4, 8), names=None, interval=None,
                log=None) -> list:
    """(row, samples) for N uniform Euler steps on each secant file of the artifact (all by default)."""
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
