"""The whole step as one graph per batch bucket: gather, network, CFG combine and update.

A Stepper step does, after its host-side bookkeeping, one upload of two packed tensors and then a
handful of launches: the gather of the model input (the CFG rows repeat guided samples' states),
the copies into the Network's bucket, the network, the fused update. `StepGraph` makes those one
CUDA graph per bucket of R rows, so a step is two small copies and one `replay()`:

- the state lives in a fixed store, y [cap, D] and hist [cap, W, D] (cap: the largest bucket), the
  Stepper's `y` and `hist` being views of its first N rows; samples joining or leaving are copied
  into it (`place`), between steps;
- a step fills one padded packed layout per bucket Rb >= R (floats: tau, s, w, hx, hd, c [Rb] each,
  b [Rb, W]; longs: label, uncond, slot, src [Rb] each). Rows R..Rb of the network are padding (the
  state of row 0 at row 0's time, the null label) whose outputs are never read; rows A..Rb of the
  update get zero coefficients and write zeros into store rows no sample holds;
- the body (`_body`) reads only those buffers, the store and the Network's bucket buffers, so its
  replay sees each step's inputs.

Each row's arithmetic is the same as in the plain step (same kernels on the same bucket shapes), so
the result is bit for bit the plain step's through the same static Network. Off CUDA, or without
graphs, the body runs eagerly on the same buffers (what the CPU tests run). The plain step remains
for what the store cannot hold: a step on a subset of the samples, or more rows than any bucket.
"""
from __future__ import annotations

import time

import torch

from .network import Network


class StepGraph:
    def __init__(self, stepper, graphs: bool = True):
        """`stepper.model` must be a Network with static buckets; graphs: capture CUDA graphs (CUDA only)."""
        net = stepper.model
        if not isinstance(net, Network) or not net.buckets:
            raise ValueError("the step graph needs a Network with batch buckets (static=True, graphs or compile)")
        self.st, self.net = stepper, net
        self.graphs = graphs and stepper.device.type == "cuda"
        self.cap = max(net.buckets)
        W, dev = stepper.window, stepper.device
        self.y = torch.zeros(self.cap, stepper.dim, device=dev, dtype=stepper.dtype)
        self.hist = torch.zeros(self.cap, W, stepper.dim, device=dev, dtype=stepper.dtype)
        self.f, self.ix, self.graph = {}, {}, {}
        for b in net.buckets:  # valid inputs for warm-up and capture: tau = t_max, zero coefficients
            f = torch.zeros((6 + W) * b, device=dev, dtype=stepper.cdtype)
            f[:b] = float(net.schedule.t_max)
            f[2 * b:3 * b] = 1.0
            ix = torch.zeros(4 * b, device=dev, dtype=torch.long)
            ix[b:2 * b] = -1
            self.f[b], self.ix[b] = f, ix
        self.capture_seconds: float | None = None

    def place(self, y: torch.Tensor, hist: torch.Tensor):
        """The state [N, D], [N, W, D] as views of the store (copied in), or as given when N > cap."""
        n = y.shape[0]
        if n > self.cap:
            return y, hist
        if not self.holds(y):
            self.y[:n].copy_(y)
        if not self.holds(hist):
            self.hist[:n].copy_(hist)
        return self.y[:n], self.hist[:n]

    def holds(self, t: torch.Tensor) -> bool:
        """Whether `t` is a view of the store (its first rows: the only views `place` makes)."""
        return t.untyped_storage().data_ptr() in (self.y.untyped_storage().data_ptr(),
                                                  self.hist.untyped_storage().data_ptr())

    def bucket(self, rows: int, y: torch.Tensor) -> int | None:
        """The bucket a step of `rows` rows on state `y` runs in; None: the plain step (the state is
        not the store's, or no bucket holds the rows)."""
        if not self.holds(y):
            return None
        k = self.net.bucket(rows)
        return k.rows if k is not None else None

    def step(self, b: int, rows, w, labels, uncond, slots, g):
        """One step in bucket b: the plain step's per-sample lists, padded; one upload each, one replay.
        `rows` are table rows [tau, s, hx, hd, c, b_0..b_{W-1}] (executor.table_rows)."""
        A, G, W = len(rows), len(g), self.st.window
        pad = b - A - G
        r0 = rows[0]
        tau = [r[0] for r in rows] + [rows[j][0] for j in g] + [r0[0]] * pad
        s = [r[1] for r in rows] + [rows[j][1] for j in g] + [r0[1]] * pad
        zero = [0.0] * (b - A)
        floats = (tau + s + w + [1.0] * (b - len(w)) + [r[2] for r in rows] + zero + [r[3] for r in rows] + zero
                  + [r[4] for r in rows] + zero + [v for r in rows for v in r[5:]] + [0.0] * (W * (b - A)))
        longs = (labels + [self.net.num_classes] * (b - A) + uncond + [-1] * (b - A) + slots + [0] * (b - A)
                 + list(range(A)) + g + [0] * pad)
        pin = self.st.pin  # straight from pinned host memory into the static buffers
        self.f[b].copy_(torch.tensor(floats, dtype=self.st.cdtype, pin_memory=pin), non_blocking=True)
        self.ix[b].copy_(torch.tensor(longs, dtype=torch.long, pin_memory=pin), non_blocking=True)
        if b in self.graph:
            self.graph[b].replay()
        else:
            self._body(b)

    def _body(self, b: int, capturing: bool = False):
        """The step on bucket b's buffers: what the graph captures. Uncaptured, the network runs as
        the Network's own graph where it has one (a graph cannot be replayed inside a capture)."""
        st, k, W = self.st, self.net.buckets[b], self.st.window
        f, ix = self.f[b], self.ix[b]
        tau, s, w = f[:b], f[b:2 * b], f[2 * b:3 * b]
        hx, hd, c = f[3 * b:4 * b], f[4 * b:5 * b], f[5 * b:6 * b]
        label, uncond, slot, src = ix[:b], ix[b:2 * b], ix[2 * b:3 * b], ix[3 * b:]
        k.x.copy_(self.y.index_select(0, src).view(b, *self.net.shape))
        k.t.copy_(tau)
        k.s.copy_(s)
        k.label.copy_(label)
        if k.w is not None:
            k.w.copy_(w)
        if k.graph is not None and not capturing:
            k.graph.replay()
            out = k.out
        else:
            out = self.net.run(*k.args())
        st.update(self.y[:b], out.reshape(b, -1), uncond, w, hx, hd, c, f[6 * b:].view(b, W), self.hist[:b], slot)

    def capture(self):
        """Capture one graph per bucket, largest first, in the Network's memory pool (CUDA with
        graphs; a no-op otherwise). At warm-up, before any sample joins: the warm-up runs write the
        store. The Network's own capture (attention check, compile) comes first."""
        if not self.graphs:
            return
        if len(self.st):
            raise RuntimeError("capture the step graphs before samples join (the warm-up writes the state store)")
        t0 = time.perf_counter()
        pool = self.net.pool if self.net.pool is not None else torch.cuda.graph_pool_handle()
        for b in sorted(self.net.buckets, reverse=True):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # allocations and kernel choices outside the capture
                for _ in range(2):
                    self._body(b, capturing=True)
            torch.cuda.current_stream().wait_stream(side)
            self.graph[b] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph[b], pool=pool):
                self._body(b, capturing=True)
        self.capture_seconds = time.perf_counter() - t0
