"""Classic samplers (solvers.builders): every builder at every step count on the base network, on
its default grid ('dpmpp-2m') or a named one ('dpmpp-2m/logsnr', accepted but not listed)."""
from __future__ import annotations

from ..builders import SOLVERS, default_grid, make_table
from ..grids import grids_for
from .base import Sampler


class ClassicSampler(Sampler):
    family = "classic"

    def __init__(self, name: str, model, plain: ClassicSampler | None = None):
        super().__init__(name, model)
        self.plain = plain  # for a named grid: the same solver on its default grid
        self.listed = plain is None
        self.grid = name.split("/", 1)[1] if plain else default_grid(model.schedule, name)

    def build(self, n: int):
        return make_table(self.name, self.model.schedule, self.model.param, n)

    def window(self, n: int) -> int:
        # the history a solver's update reads is its rule's, whatever the grid
        return self.plain.window(n) if self.plain is not None else super().window(n)


def default_solver(schedule, steps: int) -> str:
    """Without measurements: a second-order multistep solver from 3 steps, first order below
    (DDIM, which is Euler on a flow schedule)."""
    if steps >= 3:
        return "dpmpp-2m"
    return "euler" if schedule.name == "flow" else "ddim"


def load(model, art=None) -> list[Sampler]:
    plain = [ClassicSampler(s, model) for s in SOLVERS]
    return plain + [ClassicSampler(f"{p.name}/{g}", model, p) for p in plain for g in grids_for(model.schedule)]
