"""Every sampler a model offers, from one loader: `load_samplers(artifact)` -> a `SamplerSet`.

A family is one file here, samplers/<family>.py with a `load(model, art) -> list[Sampler]` (art:
the `Artifact`, or None for a bare model), and its name in FAMILIES. The set holds the samplers by
name with the model's measured rows, and makes the choices: which sampler a request's (steps,
solver, guidance) runs (`resolve`), the auto-pick (`best`), the default without measurements, the
networks and their history windows. docs/samplers.md has the contract and a worked example.
"""
from __future__ import annotations

import logging
import os
from importlib import import_module

from ..artifact import Artifact, load_artifact
from ..grids import grids_for
from .base import Sampler, SolverError, best_row, rows_per_image
from .classic import default_solver

__all__ = ["FAMILIES", "Sampler", "SamplerSet", "SolverError", "best_row", "load_samplers", "rows_per_image"]

log = logging.getLogger("stride.samplers")

# family -> its loader, in load order (a later family's sampler replaces an earlier one of the same name)
FAMILIES = {name: import_module(f".{name}", __name__).load for name in (
    "classic",
    "learned",
    "secant",
    "pipeline",
)}


class SamplerSet:
    """A model's samplers by name (`set[name]`, iteration in load order), its measured rows, and
    the choices among them. `model` is the base network (its schedule decides the default)."""

    def __init__(self, model, samplers, rows=()):
        self.model, self.rows, self._by_name = model, list(rows), {}
        for s in samplers:  # eval.json's rows first, then each sampler's own file's not already there
            seen = {(r.get("solver"), r.get("nfe")) for r in self.rows}
            self.rows += [r for r in s.quality if (r.get("solver"), r.get("nfe")) not in seen]
            self._by_name[s.name] = s
        for s in self._by_name.values():
            s.quality = [r for r in self.rows if r.get("solver") == s.name]

    def __iter__(self):
        return iter(list(self._by_name.values()))

    def __contains__(self, name) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> Sampler:
        s = self._by_name.get(name)
        if s is None:
            raise SolverError(f"unknown solver {name!r}; allowed: 'auto', {self.names()} "
                              f"(classic ones may add a grid: name/{'|'.join(grids_for(self.model.schedule))})")
        return s

    def get(self, name: str) -> Sampler | None:
        return self._by_name.get(name)

    def names(self) -> list[str]:
        """The listed samplers' names (what /models and /solvers show)."""
        return [s.name for s in self._by_name.values() if s.listed]

    def drop(self, name: str) -> None:
        """Stop serving a sampler (its rows stay in `rows`)."""
        self._by_name.pop(name, None)

    def default(self, steps: int) -> Sampler:
        return self[default_solver(self.model.schedule, steps)]

    def best(self, steps: int, guidance: float | None = None) -> tuple[Sampler, dict | None]:
        """The auto-pick: among the served samplers that run `steps` and honour `guidance` (any when
        None), the one whose measured row at exactly `steps` evaluations `best_row` takes; the
        default, with no row, when none was measured."""
        def ok(r):
            s = self._by_name.get(str(r.get("solver")))
            return s is not None and s.serves(steps) and (guidance is None or s.supports(guidance))

        row = best_row([r for r in self.rows if int(r.get("nfe", -1)) == steps and ok(r)])
        return (self[str(row["solver"])], row) if row else (self.default(steps), None)

    def resolve(self, steps: int, solver: str | None = "auto", guidance: float | None = None) -> Sampler:
        """A request's (steps, solver) -> the sampler to run; SolverError names what this model can.
        'auto' picks only a sampler that honours `guidance`; an explicit one that cannot is refused."""
        if solver in (None, "", "auto"):
            return self.best(steps, guidance)[0]
        s = self[solver]
        if guidance is not None and not s.supports(guidance):
            lo, hi = s.guidance_range
            raise SolverError(f"solver {solver!r} was trained for guidance in [{lo:g}, {hi:g}] (got {guidance:g}); "
                              f"pick a scale in that range or solver='auto'", "guidance", [lo, hi])
        if not s.serves(steps):
            fitted = ", ".join(map(str, s.steps))
            raise SolverError(f"solver {solver!r} is fitted for steps={fitted} only (got steps={steps})")
        return s

    def steps_for(self, solver: str, default: int) -> int:
        """The step count a request for `solver` without `steps` runs at: `default` where it serves it,
        else the first it serves."""
        s = self._by_name.get(solver)
        return default if s is None or s.steps is None or s.serves(default) else s.steps[0]

    def choices(self, steps_offered) -> dict:
        """Per offered step count: the auto-pick and the measurement it went by (GET /solvers)."""
        out = {}
        for n in steps_offered:
            s, row = self.best(n)
            q = {k: row.get(k) for k in ("fd", "rmse", "acc")} if row else None
            out[str(n)] = {"solver": s.name, "nfe": n, "source": "eval.json" if row else "default", "quality": q}
        return out

    def networks(self, steps_offered) -> dict[str, tuple[object, int]]:
        """network ('' the base one) -> (the model, the history window every table it may run needs:
        its samplers' at each offered step count they serve, and at their own)."""
        out = {}
        for s in self:
            w = max((s.window(n) for n in {*steps_offered, *(s.steps or ())} if s.serves(n)), default=1)
            m, w0 = out.get(s.network, (s.model, 1))
            out[s.network] = (m, max(w0, w))
        return out


def load_samplers(source, rows=None, *, steps=None, variants=None, device="cpu", weights: bool = True) -> SamplerSet:
    """Every family's samplers of `source`: an `Artifact`, an artifact directory, or a bare model
    (then the classic ones). `rows`: the measured rows (default: the artifact's eval.json).

    Samplers with their own network are discovered without it; `variants` names those to load
    (None: those the auto-pick serves at `steps`, every one without `steps`), the others are not
    served. weights=False loads metadata only (nets on the meta device: an API process). A network
    that fails to load is logged and not served; it does not take the model down."""
    art = source if isinstance(source, Artifact) else \
        load_artifact(source, device, weights=weights) if isinstance(source, (str, os.PathLike)) else None
    model = art.model if art else source
    if rows is None:
        rows = (art.eval or {}).get("rows", []) if art else []
    ss = SamplerSet(model, [s for load in FAMILIES.values() for s in load(model, art)], rows)
    own = [s for s in ss if s.network]
    found = [s.name for s in own]
    if variants is None:
        variants = found if not steps else sorted({ss.best(n)[0].name for n in steps} & set(found))
    unknown = sorted(set(variants) - set(found))
    where = art.path if art else type(model).__name__
    if unknown:
        raise ValueError(f"{where}: no secant network {unknown}; available: {found}")
    for s in own:
        if s.name not in variants:
            ss.drop(s.name)
            continue
        try:
            s.load(device, weights)
        except ValueError as e:  # a stale or broken file must not take the model down
            log.error("not serving %s/%s: %s", where, s.name, e)
            ss.drop(s.name)
    return ss
