"""A sampler is a time grid plus a coefficient table.

Evaluation k = 0..N-1 calls the model at (y_k, tau_k, s_k) -> d_k, forms the history entry
h_k = hx_k * y_k + hd_k * d_k (the solver's basis quantity: x0, eps or dx/dt, a linear function of
state and output), and steps

    y_{k+1} = c_k * y_k + sum_{j < W} b[k, j] * h_{k-j},        y_0 = init * noise.

`s_k` is the time the step lands on; ordinary models ignore it, secant models need it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

FORMAT = "stride.table/1"
F64 = torch.float64


@dataclass
class Table:
    tau: torch.Tensor  # [N] evaluation times
    s: torch.Tensor  # [N] the time each evaluation's step lands on
    hx: torch.Tensor  # [N]
    hd: torch.Tensor  # [N]
    c: torch.Tensor  # [N]
    b: torch.Tensor  # [N, W]; b[k, j] multiplies h_{k-j}
    init: float  # y_0 = init * noise
    name: str = "table"
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        for k in ("tau", "s", "hx", "hd", "c", "b"):
            setattr(self, k, torch.as_tensor(getattr(self, k), dtype=F64))
        if self.b.ndim == 1:
            self.b = self.b[:, None]
        self.init = float(self.init)
        self.validate()

    @property
    def nfe(self) -> int:
        return len(self.tau)

    @property
    def window(self) -> int:
        return self.b.shape[1]

    def validate(self):
        n = len(self.tau)
        if n < 1:
            raise ValueError(f"table {self.name!r} has no evaluations")
        for k in ("s", "hx", "hd", "c"):
            if getattr(self, k).shape != (n,):
                raise ValueError(f"table {self.name!r}: {k} has shape {tuple(getattr(self, k).shape)}, expected ({n},)")
        if self.b.ndim != 2 or self.b.shape[0] != n:
            raise ValueError(f"table {self.name!r}: b has shape {tuple(self.b.shape)}, expected ({n}, W)")
        for k in ("tau", "s", "hx", "hd", "c", "b"):
            if not torch.isfinite(getattr(self, k)).all():
                raise ValueError(f"table {self.name!r}: {k} has non-finite entries")
        if not (n == 1 or bool((self.tau[1:] <= self.tau[:-1]).all())):
            raise ValueError(f"table {self.name!r}: evaluation times must not increase")
        j = torch.arange(self.window)[None, :]
        k = torch.arange(n)[:, None]
        if (self.b[j > k] != 0).any():
            raise ValueError(f"table {self.name!r}: b[k, j] must be 0 for j > k (no history before the start)")

    def trimmed(self) -> Table:
        """The same table with trailing all-zero window columns removed."""
        nz = (self.b != 0).any(0).nonzero()
        w = int(nz.max()) + 1 if len(nz) else 1
        return Table(self.tau, self.s, self.hx, self.hd, self.c, self.b[:, :w], self.init, self.name, dict(self.meta))

    def to_json(self) -> dict:
        return {
            "format": FORMAT, "name": self.name, "nfe": self.nfe, "init": self.init,
            "tau": self.tau.tolist(), "s": self.s.tolist(), "hx": self.hx.tolist(), "hd": self.hd.tolist(),
            "c": self.c.tolist(), "b": self.b.tolist(), "meta": self.meta,
        }

    @classmethod
    def from_json(cls, d: dict) -> Table:
        if d.get("format") != FORMAT:
            raise ValueError(f"table format {d.get('format')!r} is not supported; expected {FORMAT!r}")
        return cls(d["tau"], d["s"], d["hx"], d["hd"], d["c"], d["b"], d["init"], d.get("name", "table"), d.get("meta", {}))
