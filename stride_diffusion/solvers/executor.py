"""The executor: one loop for every table and every model.

A model is a `solvers.contracts.Denoiser`, `model(x, t, s, label[, w]) -> out` (the contract is
written there). A model with `guidance_input = True` takes the scale as a fifth argument and costs
one evaluation per step; for the others both CFG branches go into one model call.

`Stepper` holds samples that may each run a different table and sit at a different step, so a
server can let requests join and leave between steps; `sample` is the one-shot loop over it.

The host never waits for the device inside a step: every sample's table, step index, label and
guidance live in host-side lists, so which rows are active, which are guided, their coefficients
and when each sample finishes are known without reading device memory. A step uploads two small
packed tensors (floats, indices), calls the model, and launches the update.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .contracts import Denoiser, check_model, guidance_input
from .step_graph import StepGraph
from .table import Table
from .update import update_fn

# per-step coefficient row layout: tau, s, hx, hd, c, b[0..W)
_TAU, _S, _HX, _HD, _C, _B = range(6)


def seeded_noise(seeds, shape, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """One standard normal draw per seed, generated on the CPU so that it is the same on every
    device and whatever the batch."""
    out = []
    for sd in seeds:
        g = torch.Generator().manual_seed(int(sd))
        out.append(torch.randn(tuple(shape), generator=g, dtype=torch.float32))
    x = torch.stack(out)
    device = torch.device(device)
    if device.type == "cuda":  # pinned: the copy does not stall the host
        x = x.pin_memory()
    return x.to(device=device, dtype=dtype, non_blocking=True)


def table_rows(t: Table, window: int) -> list[list[float]]:
    """A table as host rows [tau, s, hx, hd, c, b_0..b_{window-1}] per evaluation (float64 values)."""
    b = torch.zeros(t.nfe, window, dtype=torch.float64)
    b[:, :t.window] = t.b
    return torch.cat([torch.stack([t.tau, t.s, t.hx, t.hd, t.c], 1), b], 1).tolist()


class StepOutput(NamedTuple):
    """The samples a step finished: their ids, and their states [F, *shape] on the device."""

    ids: list
    states: torch.Tensor


class Stepper:
    def __init__(self, model: Denoiser, window: int, device="cpu", dtype=torch.float32, update=None,
                 guidance_interval: tuple[float, float] | None = None, step_graph: bool = False):
        """update: the fused update, a callable or a name for `solvers.update.update_fn` ('auto',
        'torch', 'triton'; None reads STRIDE_UPDATE); step_graph: the whole step as one graph per
        batch bucket (`solvers.step_graph`; the model must be a Network with buckets; captured by
        `self.graph.capture()` on CUDA with graphs, eager on the same buffers otherwise)."""
        check_model(model)
        self.model, self.window = model, int(window)
        self.update = update if callable(update) else update_fn(update)
        self.device, self.dtype = torch.device(device), dtype
        self.cdtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.guidance_interval = guidance_interval
        self.dim = math.prod(model.shape)
        self.guidance_input = guidance_input(model)
        self.pin = self.device.type == "cuda"
        # device state, one row per sample
        self.y = torch.zeros(0, self.dim, device=self.device, dtype=dtype)
        self.hist = torch.zeros(0, self.window, self.dim, device=self.device, dtype=dtype)
        # host tables, one entry per sample
        self.ids: list = []
        self.rows: list[list[list[float]]] = []  # the sample's table (shared list per table)
        self.k: list[int] = []  # evaluations done
        self.n: list[int] = []  # evaluations in its table
        self.labels: list[int] = []
        self.w: list[float] = []
        self._tables: dict[int, tuple[Table, list]] = {}
        self.evaluations = 0  # model rows evaluated, CFG rows included
        self.graph = StepGraph(self, graphs=getattr(model, "graphs", False)) if step_graph else None
        if self.graph is not None:
            self.y, self.hist = self.graph.place(self.y, self.hist)

    def __len__(self):
        return len(self.ids)

    def _rows(self, t: Table) -> list:
        hit = self._tables.get(id(t))
        if hit is None or hit[0] is not t:
            hit = self._tables[id(t)] = (t, table_rows(t, self.window))
        return hit[1]

    def _upload(self, values, dtype) -> torch.Tensor:
        x = torch.tensor(values, dtype=dtype, pin_memory=self.pin)
        return x.to(self.device, non_blocking=True)

    def add(self, tables, noise, labels, guidance, ids=None):
        """Start len(tables) samples from `noise` [B, *shape] (the table scales it by its init).
        `labels` and `guidance` are host values (ints/floats or CPU tensors), one per sample or one for all."""
        B = len(tables)
        ids = list(range(len(self.ids), len(self.ids) + B)) if ids is None else list(ids)
        for t in tables:
            if t.window > self.window:
                raise ValueError(f"table {t.name!r} has window {t.window} > the stepper's {self.window}")
        labels = _host_list(labels, B, int)
        w = _host_list(guidance, B, float)
        init = torch.tensor([t.init for t in tables], dtype=self.cdtype)
        y0 = noise.reshape(B, self.dim).to(device=self.device, dtype=self.cdtype) * init.to(self.device)[:, None]
        self.y = torch.cat([self.y, y0.to(self.dtype)])
        self.hist = torch.cat([self.hist, self.hist.new_zeros(B, self.window, self.dim)])
        if self.graph is not None:
            self.y, self.hist = self.graph.place(self.y, self.hist)
        self.ids += ids
        self.rows += [self._rows(t) for t in tables]
        self.k += [0] * B
        self.n += [t.nfe for t in tables]
        self.labels += labels
        self.w += w

    def step(self):
        """One model evaluation for every unfinished sample, then the fused update. Reads nothing
        back from the device."""
        act = [i for i, (k, n) in enumerate(zip(self.k, self.n)) if k < n]
        A = len(act)
        if A == 0:
            return
        full = A == len(self.ids)
        W = self.window
        rows = [self.rows[i][self.k[i]] for i in act]
        w = [self.w[i] for i in act]
        if self.guidance_interval is not None:
            lo, hi = self.guidance_interval
            w = [wi if lo <= r[_TAU] <= hi else 1.0 for wi, r in zip(w, rows)]
        g = [] if self.guidance_input else [j for j, wi in enumerate(w) if wi != 1]
        G = len(g)
        R = A + G
        uncond = [-1] * A
        for m, j in enumerate(g):
            uncond[j] = A + m
        labels = [self.labels[i] for i in act]
        slots = [self.k[i] % W for i in act]
        bucket = self.graph.bucket(R, self.y) if self.graph is not None and full else None
        if bucket is not None:  # the same step as one graph launch (solvers/step_graph.py)
            self.graph.step(bucket, rows, w, labels, uncond, slots, g)
            self.evaluations += R
            for i in act:
                self.k[i] += 1
            return
        tau = [r[_TAU] for r in rows] + [rows[j][_TAU] for j in g]
        s = [r[_S] for r in rows] + [rows[j][_S] for j in g]
        floats = (tau + s + w + [r[_HX] for r in rows] + [r[_HD] for r in rows] + [r[_C] for r in rows]
                  + [v for r in rows for v in r[_B:]])
        null = self.model.num_classes
        longs = (labels + [null] * G + uncond + slots + g + ([] if full else act))
        f = self._upload(floats, self.cdtype)
        ix = self._upload(longs, torch.long)
        tau_d, s_d, w_d = f[:R], f[R:2 * R], f[2 * R:2 * R + A]
        hx, hd, c = (f[2 * R + A * (1 + m): 2 * R + A * (2 + m)] for m in range(3))
        b = f[2 * R + 4 * A:].view(A, W)
        lab_d, unc_d, slot_d = ix[:R], ix[R:R + A], ix[R + A:R + 2 * A]
        g_d, act_d = ix[R + 2 * A:R + 2 * A + G], ix[R + 2 * A + G:]
        y = self.y if full else self.y.index_select(0, act_d)
        hist = self.hist if full else self.hist.index_select(0, act_d)
        x_in = torch.cat([y, y.index_select(0, g_d)]) if G else y
        x_in = x_in.reshape(R, *self.model.shape)
        if self.guidance_input:
            out = self.model(x_in, tau_d, s_d, lab_d, w_d)
        else:
            out = self.model(x_in, tau_d, s_d, lab_d)
        self.evaluations += R
        self.update(y, out.reshape(R, -1), unc_d, w_d, hx, hd, c, b, hist, slot_d)
        if not full:
            self.y.index_copy_(0, act_d, y)
            self.hist.index_copy_(0, act_d, hist)
        for i in act:
            self.k[i] += 1

    def _keep(self, keep: list[int]):
        idx = self._upload(keep, torch.long)
        self.y, self.hist = self.y.index_select(0, idx), self.hist.index_select(0, idx)
        if self.graph is not None:
            self.y, self.hist = self.graph.place(self.y, self.hist)
        for name in ("ids", "rows", "k", "n", "labels", "w"):
            v = getattr(self, name)
            setattr(self, name, [v[i] for i in keep])

    def pop_done_batch(self) -> StepOutput:
        """Remove finished samples; returns their ids and their states [F, *shape] on the device."""
        done = [i for i, (k, n) in enumerate(zip(self.k, self.n)) if k >= n]
        if not done:
            return StepOutput([], self.y.new_zeros(0, *self.model.shape))
        ids = [self.ids[i] for i in done]
        out = self.y.index_select(0, self._upload(done, torch.long)).reshape(len(done), *self.model.shape)
        self._keep([i for i, (k, n) in enumerate(zip(self.k, self.n)) if k < n])
        return StepOutput(ids, out)

    def pop_done(self):
        """Remove finished samples; returns [(id, sample [*shape])]."""
        done = self.pop_done_batch()
        return list(zip(done.ids, done.states))

    def remove(self, ids):
        """Drop samples before they finish (an expired request)."""
        drop = set(ids)
        self._keep([i for i, x in enumerate(self.ids) if x not in drop])


def _host_list(v, B: int, kind) -> list:
    """Per-sample host values from a scalar, a sequence or a CPU tensor (one value or B)."""
    if torch.is_tensor(v):  # read once when samples join, never inside a step
        v = v.reshape(-1).tolist()
    elif isinstance(v, (int, float)):
        v = [v]
    else:
        v = list(v)
    if len(v) == 1:
        v = v * B
    if len(v) != B:
        raise ValueError(f"{len(v)} values for {B} samples")
    return [kind(x) for x in v]


@torch.no_grad()
def sample(model: Denoiser, tables, noise, labels, guidance=1.0, update=None, guidance_interval=None) -> torch.Tensor:
    """Run `tables` (one Table for all, or one per sample) from `noise` [B, *shape]."""
    B = noise.shape[0]
    if isinstance(tables, Table):
        tables = [tables] * B
    if len(tables) != B:
        raise ValueError(f"{len(tables)} tables for {B} samples")
    st = Stepper(model, max(t.window for t in tables), noise.device, noise.dtype, update, guidance_interval)
    st.add(tables, noise, labels, guidance)
    for _ in range(max(st.n)):
        st.step()
    return st.y.reshape(B, *model.shape)
