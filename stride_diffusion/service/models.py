"""What the service knows about a model: its denoiser, class names, measured samplers, and how a
request's (steps, solver) becomes a coefficient table.

An entry is built from an artifact directory (`solvers.artifact.load_artifact`) or given directly
(the analytic test model), so the service never depends on how a model was trained.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

from stride_diffusion.solvers.builders import SOLVERS, make_table
from stride_diffusion.solvers.grids import GRIDS
from stride_diffusion.solvers.table import Table

log = logging.getLogger("stride.models")


class SolverError(ValueError):
    """A (steps, solver) pair this model cannot run; the message names what it can."""


@dataclass
class ModelEntry:
    name: str
    model: object  # the executor's model protocol: model(x, t, s, label), schedule, param, num_classes, shape
    class_names: list[str]
    meta: dict = field(default_factory=dict)
    eval_rows: list[dict] = field(default_factory=list)  # eval.json rows: solver, nfe, fd, rmse, acc
    learned: dict[str, Table] = field(default_factory=dict)
    # samplers that are their own network (secant models): name -> model with .table(n)
    variants: dict[str, object] = field(default_factory=dict)
    # finished samples -> images in [-1, 1] (solvers.adapters.decoders); identity over data_range if None
    decoder: object = None
    _tables: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.decoder is None:
            from stride_diffusion.solvers.adapters import IdentityDecoder
            self.decoder = IdentityDecoder(self.shape, self.data_range)

    @classmethod
    def from_artifact(cls, path: str, device: str = "cpu", dtype: str | None = None, steps=None, variants=None,
                      weights: bool = True) -> ModelEntry:
        """`dtype`: the network's and decoder's (None: what the artifact records); `variants`: the secant
        networks to load (None: those the auto-pick serves for `steps`, all of them without `steps`);
        weights=False reads metadata only (an API process)."""
        from stride_diffusion.solvers.artifact import default_guidance, load_artifact, read_json

        art = load_artifact(path, device, dtype, weights=weights)
        meta = dict(art.meta)
        data = meta.get("data", {})
        names = data.get("class_names") or meta.get("class_names") or list(range(art.model.num_classes))
        meta.setdefault("data_range", data.get("range", [-1.0, 1.0]))
        meta.setdefault("default_guidance", default_guidance(art))
        rows = list((art.eval or {}).get("rows", []))
        try:
            from stride_diffusion.solvers.secant import load_secant, secant_names
        except ImportError:
            secant_names = None
        found = secant_names(path) if secant_names else []
        for name in found:  # every secant file's measurements, loaded or not
            try:
                ev = read_json(f"{path}/{name}.json").get("eval") or {}
            except ValueError:
                continue
            seen = {(r.get("solver"), r.get("nfe")) for r in rows}
            rows += [r for r in ev.get("rows", []) if (r.get("solver"), r.get("nfe")) not in seen]
        entry = cls(art.name, art.model, [str(c) for c in names], meta, rows, dict(art.solvers or {}),
                    decoder=art.decoder)
        if variants is None:
            variants = found
            if steps:  # the auto-pick over every secant file, then load only the picked ones
                entry.variants = dict.fromkeys(found)
                variants = sorted({entry.best(n)[0] for n in steps} & set(found))
        unknown = sorted(set(variants) - set(found))
        if unknown:
            raise ValueError(f"{path}: no secant network {unknown}; available: {found}")
        entry.variants = {}
        for name in variants:
            try:
                entry.variants[name] = load_secant(path, art.sha256, device, name, weights=weights)
            except ValueError as e:  # a stale or broken secant file must not take the model down
                log.error("not serving %s/%s: %s", path, name, e)
        return entry

    @property
    def display_scale(self) -> int:
        """Nearest-neighbour upscale of returned images (model.json 'display': {'scale': k}; default 1)."""
        return int((self.meta.get("display") or {}).get("scale", 1))

    # -- shape of the model -------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.model.shape)

    def model_for(self, solver: str):
        """The network a sampler runs: a secant model is its own, every table runs the base model."""
        return self.variants.get(solver, self.model)

    def stepper_key(self, solver: str) -> str:
        return f"{self.name}:{solver}" if solver in self.variants else self.name

    def guidance_range(self, solver: str) -> tuple[float, float] | None:
        """The scales a sampler honours: a secant model with a guidance input was trained on a range
        (its net clamps outside it); every other sampler guides by CFG, any scale (None)."""
        r = getattr(self.model_for(solver), "guidance_range", None)
        return (float(r[0]), float(r[1])) if r is not None and getattr(self.model_for(solver), "guidance_input", False) else None

    def supports_guidance(self, solver: str, w: float) -> bool:
        r = self.guidance_range(solver)
        return r is None or r[0] <= w <= r[1]

    def rows_per_guided_image(self, solver: str) -> int:
        return 1 if getattr(self.model_for(solver), "guidance_input", False) else 2

    @property
    def data_range(self) -> tuple[float, float]:
        lo, hi = self.meta.get("data_range", (-1.0, 1.0))
        return float(lo), float(hi)

    @property
    def default_guidance(self) -> float:
        return float(self.meta.get("default_guidance", self.meta.get("guidance", 1.0)))

    def class_index(self, label) -> int:
        """An int index or a class name -> index; ValueError naming the allowed labels."""
        K = self.num_classes
        if isinstance(label, bool):
            label = None
        elif isinstance(label, str):
            if label in self.class_names:
                return self.class_names.index(label)
            low = [c.lower() for c in self.class_names]
            if label.strip().lower() in low:
                return low.index(label.strip().lower())
            try:
                label = int(label.strip())
            except ValueError:
                label = None
        elif isinstance(label, float) and label.is_integer():
            label = int(label)
        if isinstance(label, int) and 0 <= label < K:
            return label
        raise ValueError(f"class_label must be an integer in 0..{K - 1} or one of the class names {self.class_names}")

    # -- samplers -----------------------------------------------------------------------------
    def solver_names(self) -> list[str]:
        return list(SOLVERS) + sorted(self.learned) + sorted(self.variants)

    def _runnable(self, solver: str, steps: int) -> bool:
        if solver in self.variants:
            return True
        if solver in self.learned:
            return self.learned[solver].nfe == steps
        base, _, grid = solver.partition("/")
        return base in SOLVERS and (not grid or grid in GRIDS)

    def default_solver(self, steps: int) -> str:
        """Without measurements: a second-order multistep solver from 3 steps, first order below
        (DDIM, which is Euler on a flow schedule)."""
        if steps >= 3:
            return "dpmpp-2m"
        return "euler" if self.model.schedule.name == "flow" else "ddim"

    def best(self, steps: int, guidance: float | None = None) -> tuple[str, dict | None]:
        """The sampler with the lowest measured FD at exactly `steps` evaluations (eval.json) among
        those that honour `guidance` (any when None), or the default when none was measured. The FD
        it chooses by is the selection set's (`selection_fd`) where the row has one, so the
        evaluation sets stay for reporting; rows without FD (imported models) go by RMSE."""
        rows = [r for r in self.eval_rows if int(r.get("nfe", -1)) == steps and self._runnable(str(r.get("solver")), steps)
                and (guidance is None or self.supports_guidance(str(r.get("solver")), guidance))]
        fd = lambda r: r.get("selection_fd", r.get("fd"))
        rmse = lambda r: r.get("selection_rmse", r.get("rmse"))
        rows = [r for r in rows if _finite(fd(r)) or _finite(rmse(r))]
        if rows:
            r = min(rows, key=lambda r: (not _finite(fd(r)), _num(fd(r)), _num(rmse(r))))
            return str(r["solver"]), r
        return self.default_solver(steps), None

    def resolve(self, steps: int, solver: str = "auto", guidance: float | None = None) -> str:
        """A request's (steps, solver) -> the sampler to run; SolverError names what this model can.
        `auto` only picks a sampler that honours `guidance`; an explicit one that cannot is refused."""
        if solver in (None, "", "auto"):
            return self.best(steps, guidance)[0]
        if guidance is not None and not self.supports_guidance(solver, guidance):
            lo, hi = self.guidance_range(solver)
            raise SolverError(f"solver {solver!r} was trained for guidance in [{lo:g}, {hi:g}] (got {guidance:g}); "
                              f"pick a scale in that range or solver='auto'")
        if solver in self.variants:
            return solver
        if solver in self.learned:
            nfe = self.learned[solver].nfe
            if nfe != steps:
                raise SolverError(f"solver {solver!r} is fitted for steps={nfe} only (got steps={steps})")
            return solver
        if not self._runnable(solver, steps):
            raise SolverError(f"unknown solver {solver!r}; allowed: 'auto', {self.solver_names()} "
                              f"(classic ones may add a grid: name/{'|'.join(GRIDS)})")
        return solver

    def table(self, solver: str, steps: int) -> Table:
        key = (solver, steps)
        if key not in self._tables:
            if solver in self.variants:
                tab = self.variants[solver].table(steps)
            elif solver in self.learned:
                tab = self.learned[solver]
            else:
                m = self.model
                tab = make_table(solver, m.schedule, m.param, steps)
            if tab.nfe != steps:
                raise SolverError(f"solver {solver!r} gives {tab.nfe} evaluations, not steps={steps}")
            self._tables[key] = tab.trimmed()
        return self._tables[key]

    def steppers(self, steps_offered) -> dict[str, tuple[object, int]]:
        """Stepper key -> (network, the history window every table it may run needs)."""
        w = max((t.window for t in self.learned.values()), default=1)
        for n in steps_offered:
            for s in SOLVERS:
                w = max(w, self.table(s, n).window)
        out = {self.name: (self.model, w)}
        for v, m in self.variants.items():
            out[self.stepper_key(v)] = (m, max(self.table(v, n).window for n in steps_offered))
        return out

    def choices(self, steps_offered) -> dict:
        out = {}
        for n in steps_offered:
            solver, row = self.best(n)
            q = {k: row.get(k) for k in ("fd", "rmse", "acc")} if row else None
            out[str(n)] = {"solver": solver, "nfe": n, "source": "eval.json" if row else "default", "quality": q}
        return out

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.decoder.image_shape)

    def image_size(self) -> str:
        """The served image's 'WxH' in pixels, display upscale included."""
        _, h, w = self.image_shape
        return f"{w * self.display_scale}x{h * self.display_scale}"

    def describe(self, settings) -> dict:
        C, H, W = self.image_shape
        return {
            "name": self.name, "classes": self.class_names, "num_classes": self.num_classes,
            "shape": list(self.shape), "latent_shape": list(self.shape), "size": self.image_size(), "display_scale": self.display_scale,
            "image": {"width": W, "height": H, "channels": C},
            "dtype": getattr(self.model, "dtype", "float32"), "decoder": self.decoder.kind,
            "decoder_dtype": self.decoder.dtype,
            "schedule": self.model.schedule.to_json(), "param": self.model.param,
            "steps": settings.steps, "default_steps": settings.default_steps, "max_images": settings.max_images,
            "default_guidance": self.default_guidance, "solvers": self.solver_names(),
            "guidance_ranges": {s: list(self.guidance_range(s) or (0.0, settings.guidance_max)) for s in self.solver_names()},
        }


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _num(v) -> float:
    return float(v) if _finite(v) else math.inf


class SlowModel:
    """A model that sleeps per call: makes batches long enough to kill a worker or miss a deadline."""

    def __init__(self, model, delay_s: float):
        self.inner, self.delay_s = model, delay_s
        for k in ("schedule", "param", "num_classes", "shape", "guidance_input"):
            setattr(self, k, getattr(model, k))

    def __call__(self, *args):
        time.sleep(self.delay_s)
        return self.inner(*args)


def analytic_entry(spec: str = "gmm") -> ModelEntry:
    """The analytic model as a served model: 'gmm' or 'gmm:delay_ms=50' (10 classes, 1x8x8)."""
    from stride_diffusion.solvers.analytic import GaussianMixture
    from stride_diffusion.solvers.schedules import FlowSchedule

    kind, _, opts = spec.partition(":")
    if kind != "gmm":
        raise ValueError(f"unknown test model {spec!r}; allowed: 'gmm[:delay_ms=N]'")
    kw = dict(o.split("=", 1) for o in opts.split(",") if o)
    unknown = set(kw) - {"delay_ms"}
    if unknown:
        raise ValueError(f"unknown test model options {sorted(unknown)}; allowed: ['delay_ms']")
    m = GaussianMixture.random(FlowSchedule(), "flow", num_classes=10, per_class=1, dim=64, seed=0,
                               spread=2.0, scale=0.15, shape=(1, 8, 8))
    delay = float(kw.get("delay_ms", 0)) / 1e3
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    return ModelEntry("gmm", SlowModel(m, delay) if delay else m, names, {"data_range": [-1.5, 1.5],
                                                                          "display": {"scale": 8}})


class Registry:
    """The served models by name; the first is the default."""

    def __init__(self, entries: list[ModelEntry]):
        if not entries:
            raise ValueError("no models to serve")
        self.entries = {e.name: e for e in entries}
        if len(self.entries) != len(entries):
            raise ValueError(f"duplicate model names: {[e.name for e in entries]}")
        self.default = entries[0].name

    def __getitem__(self, name: str) -> ModelEntry:
        return self.entries[name]

    def __contains__(self, name) -> bool:
        return name in self.entries

    def __iter__(self):
        return iter(self.entries.values())

    def names(self) -> list[str]:
        return list(self.entries)


def load_registry(settings, device: str | None = None, weights: bool = True) -> Registry:
    import os

    if settings.test_model:
        return Registry([analytic_entry(settings.test_model)])
    dev = device or settings.device
    entries = []
    for path in settings.artifacts:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no artifact directory at {path!r}; train one (`stride offline ...`) or pass "
                                    f"--artifacts DIR")
        entries.append(ModelEntry.from_artifact(path, dev, settings.dtype, settings.steps, settings.variants, weights))
    return Registry(entries)

