"""Learned samplers: the solver files of an artifact (solvers/<name>.json: searched, D-ODE, GITS,
LD3 tables, read and checked by `solvers.artifact.load_solvers`), each fitted for one step count
and run on the base network."""
from __future__ import annotations

from ..table import Table
from .base import Sampler


class LearnedSampler(Sampler):
    family = "learned"
    grid = "fitted"

    def __init__(self, name: str, table: Table, model):
        super().__init__(name, model)
        self.fitted, self.steps = table, (table.nfe,)

    def build(self, n: int) -> Table:
        return self.fitted


def load(model, art=None) -> list[Sampler]:
    return [LearnedSampler(name, tab, model) for name, tab in sorted((art.solvers if art else {}).items())]
