"""The executor: one loop for every table and every model.

A model is any callable `model(x, t, s, label) -> out` with attributes `schedule`, `param`,
`num_classes` (label == num_classes is the null class of classifier-free guidance) and `shape`.
A model with `guidance_input = True` takes the scale as a fifth argument and costs one evaluation
per step; for the others both CFG branches go into one model call.

`Stepper` holds samples that may each run a different table and sit at a different step, so a
server can let requests join and leave between steps; `sample` is the one-shot loop over it.
"""
from __future__ import annotations

import math

import torch

from .table import Table
from .update import fused_update

# per-sample coefficient row layout: tau, s, hx, hd, c, b[0..W)
_TAU, _S, _HX, _HD, _C, _B = range(6)


def seeded_noise(seeds, shape, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """One standard normal draw per seed, generated on the CPU so that it is the same on every
    device and whatever the batch."""
    out = []
    for sd in seeds:
        g = torch.Generator().manual_seed(int(sd))
        out.append(torch.randn(tuple(shape), generator=g, dtype=torch.float32))
    return torch.stack(out).to(device=device, dtype=dtype)


class Stepper:
    def __init__(self, model, window: int, device="cpu", dtype=torch.float32, update=fused_update,
                 guidance_interval: tuple[float, float] | None = None):
        self.model, self.window, self.update = model, int(window), update
        self.device, self.dtype = torch.device(device), dtype
        self.cdtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.guidance_interval = guidance_interval
        self.dim = math.prod(model.shape)
        self.ids: list = []
        self.y = torch.zeros(0, self.dim, device=self.device, dtype=dtype)
        self.hist = torch.zeros(0, self.window, self.dim, device=self.device, dtype=dtype)
        self.k = torch.zeros(0, dtype=torch.long, device=self.device)
        self.n = torch.zeros(0, dtype=torch.long, device=self.device)
        self.coef = torch.zeros(0, 1, 5 + self.window, device=self.device, dtype=self.cdtype)
        self.labels = torch.zeros(0, dtype=torch.long, device=self.device)
        self.w = torch.zeros(0, device=self.device, dtype=self.cdtype)
        self.evaluations = 0  # model rows evaluated, CFG rows included

    def __len__(self):
        return len(self.ids)

    def add(self, tables, noise, labels, guidance, ids=None):
        """Start len(tables) samples from `noise` [B, *shape] (the table scales it by its init)."""
        B = len(tables)
        ids = list(range(len(self.ids), len(self.ids) + B)) if ids is None else list(ids)
        for t in tables:
            if t.window > self.window:
                raise ValueError(f"table {t.name!r} has window {t.window} > the stepper's {self.window}")
        nmax = max(max(t.nfe for t in tables), self.coef.shape[1])
        coef = torch.zeros(B, nmax, 5 + self.window, dtype=torch.float64)
        for i, t in enumerate(tables):
            n = t.nfe
            coef[i, :n, _TAU], coef[i, :n, _S] = t.tau, t.s
            coef[i, :n, _HX], coef[i, :n, _HD], coef[i, :n, _C] = t.hx, t.hd, t.c
            coef[i, :n, _B:_B + t.window] = t.b
        old = self.coef
        if old.shape[1] < nmax:
            old = torch.cat([old, old.new_zeros(old.shape[0], nmax - old.shape[1], old.shape[2])], 1)
        init = torch.tensor([t.init for t in tables], dtype=self.cdtype, device=self.device)
        y0 = noise.reshape(B, self.dim).to(device=self.device, dtype=self.cdtype) * init[:, None]
        self.coef = torch.cat([old, coef.to(self.device, self.cdtype)])
        self.y = torch.cat([self.y, y0.to(self.dtype)])
        self.hist = torch.cat([self.hist, self.hist.new_zeros(B, self.window, self.dim)])
        self.k = torch.cat([self.k, torch.zeros(B, dtype=torch.long, device=self.device)])
        self.n = torch.cat([self.n, torch.tensor([t.nfe for t in tables], device=self.device)])
        self.labels = torch.cat([self.labels, torch.as_tensor(labels, dtype=torch.long).reshape(B).to(self.device)])
        w = torch.as_tensor(guidance, dtype=self.cdtype).expand(B) if not torch.is_tensor(guidance) or guidance.ndim == 0 \
            else guidance.to(self.cdtype)
        self.w = torch.cat([self.w, w.reshape(B).to(self.device)])
        self.ids += ids

    def step(self):
        """One model evaluation for every unfinished sample, then the fused update."""
        act = (self.k < self.n).nonzero().flatten()
        if len(act) == 0:
            return
        full = len(act) == len(self.ids)
        rows = self.coef[act, self.k[act]]  # [A, 5 + W]
        tau, s = rows[:, _TAU], rows[:, _S]
        w = self.w[act]
        if self.guidance_interval is not None:
            lo, hi = self.guidance_interval
            w = torch.where((tau >= lo) & (tau <= hi), w, torch.ones_like(w))
        y = self.y if full else self.y[act]
        hist = self.hist if full else self.hist[act]
        labels = self.labels[act]
        A = len(act)
        shape = (-1, *self.model.shape)
        tdt = self.cdtype
        if getattr(self.model, "guidance_input", False):
            out = self.model(y.reshape(shape), tau.to(tdt), s.to(tdt), labels, w.to(tdt))
            uncond = torch.full((A,), -1, dtype=torch.long, device=self.device)
        else:
            g = (w != 1).nonzero().flatten()
            null = torch.full((len(g),), self.model.num_classes, dtype=torch.long, device=self.device)
            x_in = torch.cat([y, y[g]]).reshape(shape)
            out = self.model(x_in, torch.cat([tau, tau[g]]).to(tdt), torch.cat([s, s[g]]).to(tdt),
                             torch.cat([labels, null]))
            uncond = torch.full((A,), -1, dtype=torch.long, device=self.device)
            uncond[g] = A + torch.arange(len(g), device=self.device)
        self.evaluations += out.shape[0]
        slot = self.k[act] % self.window
        f32 = lambda v: v.to(self.cdtype).contiguous()  # noqa: E731
        self.update(y, out.reshape(out.shape[0], -1), uncond, f32(w), f32(rows[:, _HX]), f32(rows[:, _HD]),
                    f32(rows[:, _C]), f32(rows[:, _B:]), hist, slot)
        if not full:
            self.y[act], self.hist[act] = y, hist
        self.k[act] += 1

    def pop_done(self):
        """Remove finished samples; returns [(id, sample [*shape])]."""
        done = (self.k >= self.n).nonzero().flatten().tolist()
        if not done:
            return []
        out = [(self.ids[i], self.y[i].reshape(self.model.shape)) for i in done]
        keep = (self.k < self.n).nonzero().flatten()
        for name in ("y", "hist", "k", "n", "coef", "labels", "w"):
            setattr(self, name, getattr(self, name)[keep])
        self.ids = [self.ids[i] for i in keep.tolist()]
        if len(self.ids) == 0:
            self.coef = self.coef[:, :1]
        return out

    def remove(self, ids):
        """Drop samples before they finish (an expired request)."""
        drop = set(ids)
        keep = torch.tensor([i for i, x in enumerate(self.ids) if x not in drop], dtype=torch.long, device=self.device)
        for name in ("y", "hist", "k", "n", "coef", "labels", "w"):
            setattr(self, name, getattr(self, name)[keep])
        self.ids = [self.ids[i] for i in keep.tolist()]


@torch.no_grad()
def sample(model, tables, noise, labels, guidance=1.0, update=fused_update, guidance_interval=None) -> torch.Tensor:
    """Run `tables` (one Table for all, or one per sample) from `noise` [B, *shape]."""
    B = noise.shape[0]
    if isinstance(tables, Table):
        tables = [tables] * B
    if len(tables) != B:
        raise ValueError(f"{len(tables)} tables for {B} samples")
    st = Stepper(model, max(t.window for t in tables), noise.device, noise.dtype, update, guidance_interval)
    st.add(tables, noise, labels, guidance)
    while (st.k < st.n).any():
        st.step()
    return st.y.reshape(B, *model.shape)
