"""The model call of the hot path: low-precision weights, fixed batch buckets, CUDA graphs.

`Network` wraps an executor model (`model(x, t, s, label[, w])`, see `solvers.executor`):

- precision: weights cast to bfloat16/float16 and the call run under autocast (time embeddings and
  norms stay float32 where autocast keeps them); the output keeps the network's dtype, and the
  fused update reads it as is, so the state and the coefficients stay float32;
- buckets: a call of R rows runs in the smallest bucket >= R; rows R.. are padding whose outputs
  are never read (they hold whatever an earlier call left: finite values, and every row of these
  networks is computed independently of the others);
- CUDA graphs: one graph per bucket, captured by `capture` at warm-up (largest first, one shared
  memory pool). A call copies its rows into the bucket's static inputs, replays, and returns a view
  of the static output, valid until the next call of this Network: the executor consumes it at once.

On the CPU the calls are eager; `static=True` runs the same static-buffer path eagerly (what the
tests exercise of the graph path without a GPU).
"""
from __future__ import annotations

import torch

from .adapters.base import DTYPES, dtype_name


def dtype_of(name: str) -> torch.dtype:
    """'fp32' | 'bf16' | 'fp16' or the torch names -> the torch dtype; ValueError naming the allowed."""
    return DTYPES[dtype_name(name)]


def enable_tf32():
    """float32 matmuls and convolutions on tensor cores (TF32) on CUDA."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


class _Bucket:
    def __init__(self, net: Network, rows: int):
        dev = net.device
        self.rows = rows
        self.x = torch.zeros(rows, *net.shape, device=dev, dtype=net.dtype)
        t0 = float(getattr(net.schedule, "t_max", 1.0))
        self.t = torch.full((rows,), t0, device=dev)
        self.s = torch.zeros(rows, device=dev)
        self.label = torch.zeros(rows, dtype=torch.long, device=dev)
        self.w = torch.ones(rows, device=dev) if net.guidance_input else None
        self.out: torch.Tensor | None = None
        self.graph = None

    def args(self):
        return (self.x, self.t, self.s, self.label) + ((self.w,) if self.w is not None else ())


class Network:
    def __init__(self, model, dtype: torch.dtype | None = None, buckets=(), graphs: bool = False,
                 static: bool = False):
        """dtype None keeps the network's own (an artifact may record bf16 weights)."""
        self.inner = model
        for k in ("schedule", "param", "num_classes", "shape"):
            setattr(self, k, getattr(model, k))
        self.guidance_input = bool(getattr(model, "guidance_input", False))
        net = getattr(model, "net", None)
        p = next(net.parameters()) if net is not None else None
        self.device = p.device if p is not None else torch.device("cpu")
        dtype = dtype or (p.dtype if p is not None else torch.float32)
        if net is not None and dtype != p.dtype:
            net.to(dtype)
        if isinstance(getattr(model, "dtype", None), str):  # an adapter casts its input to its own dtype
            model.dtype = {v: k for k, v in DTYPES.items()}[dtype]
        self.dtype = dtype
        self.graphs = graphs and self.device.type == "cuda"
        self.static = self.graphs or static
        self.buckets: dict[int, _Bucket] = {b: _Bucket(self, b) for b in sorted(set(buckets))} if self.static else {}
        self.pool = None

    def eager(self, x, t, s, label, *w):
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32,
                            cache_enabled=False):
            return self.inner(x.to(self.dtype), t, s, label, *w)

    def capture(self):
        """Capture one CUDA graph per bucket (no-op off CUDA). Call once, at warm-up, in the mode
        (inference) the calls will run in."""
        if not self.graphs:
            return
        self.pool = torch.cuda.graph_pool_handle()
        for b in sorted(self.buckets, reverse=True):  # largest first: the smaller ones reuse its pool
            k = self.buckets[b]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm: cuDNN/cuBLAS choose and allocate outside the capture
                for _ in range(2):
                    self.eager(*k.args())
            torch.cuda.current_stream().wait_stream(side)
            k.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(k.graph, pool=self.pool):
                k.out = self.eager(*k.args())

    def bucket(self, rows: int) -> _Bucket | None:
        for b, k in self.buckets.items():  # ascending
            if b >= rows:
                return k
        return None

    def __call__(self, x, t, s, label, *w):
        R = x.shape[0]
        k = self.bucket(R) if self.static else None
        if k is None:
            return self.eager(x, t, s, label, *w)
        k.x[:R].copy_(x.reshape(R, *self.shape))
        k.t[:R].copy_(t)
        k.s[:R].copy_(s)
        k.label[:R].copy_(label)
        if w:
            k.w[:R].copy_(w[0])
        if k.graph is not None:
            k.graph.replay()
        else:
            k.out = self.eager(*k.args())
        return k.out[:R]
