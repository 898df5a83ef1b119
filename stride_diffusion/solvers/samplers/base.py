"""The sampler contract every family implements, and the two rules the service and offline share:
what a guided image costs (`rows_per_image`) and which measured row the auto-pick takes (`best_row`)."""
from __future__ import annotations

import math

from ..contracts import guidance_input, guidance_range
from ..table import Table


class SolverError(ValueError):
    """A (steps, solver, guidance) a model cannot run; the message names what it can. `field` is the
    request field at fault ('solver' or 'guidance'), `allowed` what that field accepts (None: the
    caller knows)."""

    def __init__(self, message: str, field: str = "solver", allowed=None):
        super().__init__(message)
        self.field, self.allowed = field, allowed


def rows_per_image(model, guidance: float) -> int:
    """Batch rows one image takes per step: 2 for a CFG-guided image (conditional and null-class
    rows), 1 unguided or on a model that takes the scale as an input."""
    return 1 if guidance == 1 or guidance_input(model) else 2


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _num(v) -> float:
    return float(v) if _finite(v) else math.inf


def best_row(rows) -> dict | None:
    """The auto-pick among measured rows (eval.json): the lowest FD, then the lowest RMSE. Each is
    the selection set's (`selection_fd`, `selection_rmse`) where the row has it, so the evaluation
    sets stay for reporting; rows with no finite FD (imported models) go by RMSE after every row
    with one. None when no row has a finite FD or RMSE."""
    fd = lambda r: r.get("selection_fd", r.get("fd"))
    rmse = lambda r: r.get("selection_rmse", r.get("rmse"))
    rows = [r for r in rows if _finite(fd(r)) or _finite(rmse(r))]
    return min(rows, key=lambda r: (not _finite(fd(r)), _num(fd(r)), _num(rmse(r))), default=None)


class Sampler:
    """One way to sample a model: a name a request can ask for, a coefficient table per step count,
    and the network the tables run on.

    A family subclasses it and writes `build(n)`; everything else has a default:

      name      what `solver` in a request says
      family    'classic' | 'learned' | 'secant' | ... (the key in `samplers.FAMILIES`)
      model     the network it runs (solvers.contracts.Denoiser): the base model, or its own
      network   '' when it runs the base model; else the key of its own network (one Stepper per
                network in the service). Such a sampler's `model` may stay None until `load`.
      steps     the step counts it serves (None: every n >= 1); `serves(n)` asks
      listed    named in /models and /solvers (False: accepted, not advertised; a classic grid)
      grid      its time grid in words (/solvers shows it): a grid name, 'fitted', or a scheduler's
      quality   its measured rows (eval.json and its own file's), filled in by the SamplerSet
    """

    family = ""
    network = ""
    steps: tuple[int, ...] | None = None
    listed = True
    grid = ""

    def __init__(self, name: str, model=None):
        self.name, self.model = name, model
        self.quality: list[dict] = []
        self._tables: dict[int, Table] = {}

    def build(self, n: int) -> Table:
        """The table that spends exactly n model evaluations (the family's rule)."""
        raise NotImplementedError

    def load(self, device="cpu", weights: bool = True) -> None:
        """Load the own network (families with one; weights=False: metadata only, meta device)."""

    def serves(self, n: int) -> bool:
        return n >= 1 and (self.steps is None or n in self.steps)

    def table(self, n: int) -> Table:
        """`build(n)` with its trailing zero window columns trimmed, built once per n."""
        tab = self._tables.get(n)
        if tab is None:
            tab = self.build(n)
            if tab.nfe != n:
                raise SolverError(f"solver {self.name!r} gives {tab.nfe} evaluations, not steps={n}")
            tab = self._tables[n] = tab.trimmed()
        return tab

    def window(self, n: int) -> int:
        """The history its table at n steps needs (what its network's Stepper must hold)."""
        return self.table(n).window

    @property
    def guidance_range(self) -> tuple[float, float] | None:
        """The scales it honours: a network with a guidance input was trained on a range (it clamps
        outside); None: any scale, by classifier-free guidance."""
        return guidance_range(self.model)

    def supports(self, guidance: float) -> bool:
        r = self.guidance_range
        return r is None or r[0] <= guidance <= r[1]

    def rows_per_image(self, guidance: float) -> int:
        return rows_per_image(self.model, guidance)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
