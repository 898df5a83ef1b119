"""The model call of the hot path: low-precision weights, fixed batch buckets, CUDA graphs.

`Network` wraps a model (`model(x, t, s, label[, w])`, the contract in `solvers.contracts`) and is
one itself:

- precision: weights cast to bfloat16/float16 and the call run under autocast (time embeddings and
  norms stay float32 where autocast keeps them); the output keeps the network's dtype, and the
  fused update reads it as is, so the state and the coefficients stay float32;
- buckets: a call of R rows runs in the smallest bucket >= R; rows R.. are padding whose outputs
  are never read (they hold whatever an earlier call left: finite values, and every row of these
  networks is computed independently of the others);
- CUDA graphs: one graph per bucket, captured by `capture` at warm-up (largest first, one shared
  memory pool). A call copies its rows into the bucket's static inputs, replays, and returns a view
  of the static output, valid until the next call of this Network: the executor consumes it at once.
  A Stepper with `step_graph` captures this call together with the rest of its step, on the same
  bucket buffers (`solvers.step_graph`).

On the CPU the calls are eager; `static=True` runs the same static-buffer path eagerly (what the
tests exercise of the graph path without a GPU).

Options applied when the Network is built (the worker's load) or at warm-up (`capture`):

- compile: `torch.compile` (inductor) of the call, one static-shape graph per bucket, compiled at
  warm-up. Inductor's own CUDA graph modes ('reduce-overhead', 'max-autotune') are not used: the
  buckets already give static shapes and one shared memory pool, and the CUDA graphs captured here
  replay the compiled kernels (inductor's cudagraph trees are per thread, and the worker warms up on
  one thread and steps on another). Modes: COMPILE_MODES. Calls larger than every bucket run the
  uncompiled model (no recompilation while serving). The compiled code is kept on disk
  (`compile_cache`; inductor reads TORCHINDUCTOR_CACHE_DIR), so a restart recompiles in seconds;
- sdpa: the scaled-dot-product-attention backends a call may use ('auto': torch's choice; 'flash',
  'cudnn', 'efficient', 'math': that kernel only, via torch.nn.attention.sdpa_kernel). `capture`
  checks which kernel the network's attention actually runs (`attention_kernels`) and refuses a
  backend that cannot run it on this device;
- fuse_qkv: the q, k, v projections of each self-attention of a diffusers network as one matmul
  (`fuse_attention_qkv`).
"""
from __future__ import annotations

import contextlib
import os
import time

import torch

from .adapters.base import DTYPES, dtype_name
from .contracts import Denoiser, guidance_input, guidance_range, input_dtype, network


def dtype_of(name: str) -> torch.dtype:
    """'fp32' | 'bf16' | 'fp16' or the torch names -> the torch dtype; ValueError naming the allowed."""
    return DTYPES[dtype_name(name)]


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
SDPA_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
# torch's SDPBackend values (what its dispatcher's choice returns) -> the names used here
SDPA_CHOICES = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "other"}


def sdpa_context(backend: str):
    """A context that lets scaled_dot_product_attention use only `backend` ('auto': no restriction)."""
    if backend not in SDPA_BACKENDS:
        raise ValueError(f"unknown sdpa backend {backend!r}; allowed: {list(SDPA_BACKENDS)}")
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    name = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
            "math": "MATH"}[backend]
    return sdpa_kernel([getattr(SDPBackend, name)])


def attention_kernels(fn) -> list[str]:
    """Run `fn()` once and name the attention kernels it used: 'flash', 'cudnn', 'efficient', 'math',
    the backend torch's dispatcher picks (torch._fused_sdp_choice, under the sdpa context in force)
    for each scaled_dot_product_attention call's own inputs; [] when `fn` calls none (attention
    written out as matmuls, or no attention)."""
    from torch.overrides import TorchFunctionMode

    sdpa, seen = torch.nn.functional.scaled_dot_product_attention, set()

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is sdpa:
                seen.add(SDPA_CHOICES.get(int(torch._fused_sdp_choice(*args, **kwargs)), "other"))
            return func(*args, **kwargs)

    with Watch():
        fn()
    return sorted(seen)


def fuse_attention_qkv(net) -> int:
    """Fuse the q, k, v projections of every self-attention of a diffusers network into one matmul
    (diffusers' `Attention.fuse_projections` + `FusedAttnProcessor2_0`, what its
    `fuse_qkv_projections()` does for the models that have it; DiTTransformer2DModel and
    UNet2DModel do not, their Attention modules do). The separate weights become views of the
    fused one (no second copy). Idempotent; returns how many attentions were fused (0: no diffusers
    attention with the standard SDPA processor, e.g. stride's own nets)."""
    try:
        from diffusers.models.attention_processor import Attention, AttnProcessor2_0, FusedAttnProcessor2_0
    except ImportError:
        return 0
    n = 0
    with torch.no_grad():
        for m in net.modules():
            if not isinstance(m, Attention) or m.is_cross_attention or type(m.processor) is not AttnProcessor2_0:
                continue
            m.fuse_projections(fuse=True)
            i = 0
            for lin in (m.to_q, m.to_k, m.to_v):  # views into to_qkv: the memory is spent once
                j = i + lin.out_features
                lin.weight = torch.nn.Parameter(m.to_qkv.weight[i:j], requires_grad=False)
                if lin.bias is not None:
                    lin.bias = torch.nn.Parameter(m.to_qkv.bias[i:j], requires_grad=False)
                i = j
            m.to_qkv.requires_grad_(False)
            m.set_processor(FusedAttnProcessor2_0())
            n += 1
    return n


def set_compile_cache(path: str | None) -> str | None:
    """Keep inductor's compiled code (FX graphs, kernels, autotuning) in `path` (created), so that a
    restart finds it; None leaves TORCHINDUCTOR_CACHE_DIR (or inductor's default, a folder under /tmp).
    Returns the folder in use. Call before the first compile."""
    if path:
        os.makedirs(path, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(path)
        os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(os.path.abspath(path), "triton"))
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


_compiled_shapes = 0  # buckets compiled in this process: dynamo's recompile limit must exceed it


def compile_fn(fn, mode: str = "default", shapes: int = 1, dynamic: bool | None = False):
    """torch.compile `fn` with inductor (static shapes unless `dynamic`), allowing `shapes` more
    compiled graphs in this process (every Network's call is one code object to dynamo: each bucket
    of each Network is an entry of its cache, which must not overflow into silent eager calls)."""
    global _compiled_shapes
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; allowed: {list(COMPILE_MODES)} (inductor's "
                         "CUDA graph modes are not used: the Network captures its own, see the module docstring)")
    import torch._dynamo

    _compiled_shapes += shapes
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, _compiled_shapes + 8)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 2 * _compiled_shapes + 64)
    return torch.compile(fn, mode=None if mode == "default" else mode, dynamic=dynamic)


def enable_tf32():
    """float32 matmuls and convolutions on tensor cores (TF32) on CUDA."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


class _Bucket:
    def __init__(self, net: Network, rows: int):
        dev = net.device
        self.rows = rows
        self.x = torch.zeros(rows, *net.shape, device=dev, dtype=net.dtype)
        t0 = float(net.schedule.t_max)
        self.t = torch.full((rows,), t0, device=dev)
        self.s = torch.zeros(rows, device=dev)
        self.label = torch.zeros(rows, dtype=torch.long, device=dev)
        self.w = torch.ones(rows, device=dev) if net.guidance_input else None
        self.out: torch.Tensor | None = None
        self.graph = None

    def args(self):
        return (self.x, self.t, self.s, self.label) + ((self.w,) if self.w is not None else ())


class Network:
    def __init__(self, model: Denoiser, dtype: torch.dtype | None = None, buckets=(), graphs: bool = False,
                 static: bool = False, compile: bool = False, compile_mode: str = "default", sdpa: str = "auto",
                 fuse_qkv: bool = False):
        """dtype None keeps the network's own (an artifact may record bf16 weights); compile implies
        static buckets (a compiled shape per bucket); the module docstring has the options."""
        self.inner = model
        self.schedule, self.param = model.schedule, model.param
        self.num_classes, self.shape = model.num_classes, model.shape
        self.guidance_input, self.guidance_range = guidance_input(model), guidance_range(model)
        self.net = net = network(model)
        p = next(net.parameters()) if net is not None else None
        self.device = p.device if p is not None else torch.device("cpu")
        dtype = dtype or (p.dtype if p is not None else torch.float32)
        if net is not None and dtype != p.dtype:
            net.to(dtype)
        if input_dtype(model) is not None:  # an adapter casts its input to its own dtype
            model.dtype = {v: k for k, v in DTYPES.items()}[dtype]
        self.dtype = dtype
        self.fused = fuse_attention_qkv(net) if fuse_qkv and net is not None else 0  # after the cast: views stay
        sdpa_context(sdpa)  # ValueError for an unknown name
        self.sdpa = sdpa
        self.compile = bool(compile) and net is not None  # a model without weights has nothing to compile
        self.graphs = graphs and self.device.type == "cuda"
        self.static = self.graphs or static or self.compile
        self.buckets: dict[int, _Bucket] = {b: _Bucket(self, b) for b in sorted(set(buckets))} if self.static else {}
        self.pool = None
        self.compiled = compile_fn(self.eager, compile_mode, len(self.buckets)) if self.compile else None
        self.compile_mode = compile_mode
        self.compile_seconds: float | None = None  # set by capture
        self.attention: list[str] | None = None  # the attention kernels capture saw the network use

    def eager(self, x, t, s, label, *w):
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32,
                            cache_enabled=False):
            return self.inner(x.to(self.dtype), t, s, label, *w)

    def run(self, *args):
        """One call of the bucket path: compiled when compile is on, under the sdpa backend."""
        with sdpa_context(self.sdpa):
            return (self.compiled or self.eager)(*args)

    def check_attention(self) -> list[str]:
        """The attention kernels one call runs (`attention_kernels`); ValueError when the sdpa backend
        asked for has no kernel for this network on this device."""
        k = self.buckets[min(self.buckets)] if self.buckets else _Bucket(self, 1)
        try:
            with sdpa_context(self.sdpa):
                self.attention = attention_kernels(lambda: self.eager(*k.args()))
        except RuntimeError as e:
            if self.sdpa == "auto":
                raise
            raise ValueError(f"sdpa={self.sdpa}: scaled_dot_product_attention has no {self.sdpa} kernel for this "
                             f"network on {self.device} in {self.dtype} ({str(e).splitlines()[0][:200]}); allowed "
                             f"here: 'auto' or a backend that runs, of {list(SDPA_BACKENDS)}") from None
        if self.sdpa != "auto" and self.attention and self.attention != [self.sdpa]:
            raise ValueError(f"sdpa={self.sdpa}, but the attention ran {self.attention}")
        return self.attention

    def capture(self):
        """At warm-up, once, in the mode (inference) the calls will run in: check the attention
        kernels (no-op for a model without weights), compile every bucket (compile), and capture one
        CUDA graph per bucket (CUDA with graphs)."""
        if self.net is not None:
            self.check_attention()
        if self.compile and not self.graphs:
            t0 = time.perf_counter()
            for b in sorted(self.buckets, reverse=True):
                self.run(*self.buckets[b].args())
            self.compile_seconds = time.perf_counter() - t0
        if not self.graphs:
            return
        t0 = time.perf_counter()
        self.pool = torch.cuda.graph_pool_handle()
        for b in sorted(self.buckets, reverse=True):  # largest first: the smaller ones reuse its pool
            k = self.buckets[b]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm (and compile): cuDNN/cuBLAS choose and allocate outside the capture
                for _ in range(2):
                    self.run(*k.args())
            torch.cuda.current_stream().wait_stream(side)
            k.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(k.graph, pool=self.pool), sdpa_context(self.sdpa):
                k.out = (self.compiled or self.eager)(*k.args())
        if self.compile:
            self.compile_seconds = time.perf_counter() - t0

    def bucket(self, rows: int) -> _Bucket | None:
        for b, k in self.buckets.items():  # ascending
            if b >= rows:
                return k
        return None

    def __call__(self, x, t, s, label, *w):
        R = x.shape[0]
        k = self.bucket(R) if self.static else None
        if k is None:
            with sdpa_context(self.sdpa):
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
            k.out = self.run(*k.args())
        return k.out[:R]
