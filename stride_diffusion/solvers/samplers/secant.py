"""Secant samplers (solvers.secant): each secant file of an artifact (<artifact>/secant*.json) is
its own network, run with n uniform Euler steps for any n. Discovery reads only the json (its
measured rows); the network is loaded when the sampler is served (`load`)."""
from __future__ import annotations

from ..artifact import read_json
from ..secant import load_secant, secant_names
from .base import Sampler


class SecantSampler(Sampler):
    family = "secant"
    grid = "uniform"

    def __init__(self, name: str, model=None, path=None, teacher_sha256: str | None = None):
        super().__init__(name, model)
        self.network, self.path, self.teacher_sha256 = name, path, teacher_sha256

    def build(self, n: int):
        return self.model.table(n)

    def load(self, device="cpu", weights: bool = True) -> None:
        self.model = load_secant(self.path, self.teacher_sha256, device, self.name, weights=weights)


def load(model, art=None) -> list[Sampler]:
    out = []
    for name in secant_names(art.path) if art else []:
        s = SecantSampler(name, path=art.path, teacher_sha256=art.sha256)
        try:  # its measurements, served or not; a broken file is refused when loaded
            s.quality = list((read_json(art.path / f"{name}.json").get("eval") or {}).get("rows", []))
        except ValueError:
            pass
        out.append(s)
    return out
