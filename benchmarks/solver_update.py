"""Per-step solver update: the Triton kernel, the torch reference and naive torch ops.

The update is memory-bound, so besides time per call this reports bytes moved: the minimum any
implementation must move (read y, D, U and the W-1 older history entries once; write h and y once),
and, for the torch variants, what their op sequence moves (every aten op reading its inputs and
writing its outputs once, no cache reuse; gathers and scatters move their rows only). GB/s is the
implementation's own bytes over its time; "vs clone" compares it to a clone moving as many bytes.

    python benchmarks/solver_update.py --device cuda --out benchmarks/results/solver_update_cuda.md
    python benchmarks/solver_update.py --device cpu --tiny --triton     # smoke: every row, the kernel interpreted
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.benchmark import Timer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from report import publish  # benchmarks/report.py

from stride_diffusion.solvers.update import fused_update_torch, update_fn

aten = torch.ops.aten
SHAPES = {"4x32x32": 4 * 32 * 32, "3x256x256": 3 * 256 * 256}
W = 3


def naive_update(y, d, uncond, w, hx, hd, c, b, hist, slot):
    """The update as a user writes it (every sample guided): one op per line."""
    B, W = b.shape
    rows = torch.arange(B, device=y.device)
    cond, unc = d[:B].float(), d[uncond].float()               # conversion
    g = unc + w[:, None] * (cond - unc)                         # guidance
    y32 = y.float()
    h = hx[:, None] * y32 + hd[:, None] * g
    hist[rows, slot] = h.to(hist.dtype)                         # history store
    past = hist[rows[:, None], (slot[:, None] - torch.arange(W, device=y.device)) % W].float()
    y.copy_(c[:, None] * y32 + (b[:, :, None] * past).sum(1))   # weighted sum


def inputs(B, D, dtype, ddtype, device):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)
    f = lambda v: torch.full((B,), v, device=device)
    # CFG on for every sample: d = [cond rows; uncond rows]. Coefficients keep y bounded over repeats.
    return dict(y=r(B, D).to(device, dtype), d=r(2 * B, D).to(device, ddtype),
                uncond=torch.arange(B, 2 * B, device=device), w=f(4.0), hx=f(0.0), hd=f(1.0), c=f(1.0),
                b=torch.tensor([-0.2, 0.1, 0.05], device=device).repeat(B, 1),
                hist=r(B, W, D).to(device, dtype), slot=torch.arange(B, device=device) % W)


def min_bytes(a):
    (B, D), sy, sd = a["y"].shape, a["y"].element_size(), a["d"].element_size()
    guided = int((a["uncond"] >= 0).sum())
    return B * D * sy * (1 + (W - 1) + 2) + (B + guided) * D * sd


def nb(x):
    return sum(t.numel() * t.element_size() for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor))


class Traffic(TorchDispatchMode):
    """Bytes moved by the aten ops run under it, each op reading its inputs and writing its outputs once."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        p = func.overloadpacket
        if func.is_view:
            pass
        elif p is aten.index:  # gather: the rows it reads, the output it writes
            self.bytes += 2 * nb(out) + nb(args[1])
        elif p in (aten.index_put_, aten.index_put):  # scatter: the values it reads and writes
            self.bytes += 2 * nb(args[2]) + nb(args[1])
        elif p is aten.copy_:
            self.bytes += nb(args[0]) + nb(args[1])
        else:
            self.bytes += nb((args, kwargs)) + nb(out)
        return out


def traffic(fn, a):
    a = {k: v.clone() for k, v in a.items()}
    with Traffic() as t:
        fn(**a)
    return t.bytes


def median_s(fn, a, min_run_time):
    a = {k: v.clone() for k, v in a.items()}
    fn(**a)  # warm up (and compile)
    return Timer("fn(**a)", globals={"fn": fn, "a": a}).blocked_autorange(min_run_time=min_run_time).median


def machine(device):
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    m = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
         "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
         "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        m["gpu"] = torch.cuda.get_device_name(device)
        import triton
        m["triton"] = triton.__version__
    return m


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="markdown path (a .json is written beside it)")
    ap.add_argument("--dtype", default="float32", help="state (y, hist) dtype")
    ap.add_argument("--ddtype", default="float32", help="model output (d) dtype")
    ap.add_argument("--quick", action="store_true", help="batches 1 and 64 only, shorter timing")
    ap.add_argument("--tiny", action="store_true", help="one small latent, batches 1 and 8, the shortest timing "
                                                        "(the smoke test)")
    ap.add_argument("--triton", action="store_true", help="off CUDA too: the kernel in Triton's interpreter (its "
                                                          "timing says nothing; the row exercises the code)")
    ap.add_argument("--note", action="append", default=[], help="a line added to the markdown header")
    args = ap.parse_args(argv)
    device, dtype, ddtype = torch.device(args.device), getattr(torch, args.dtype), getattr(torch, args.ddtype)
    batches, min_run_time = ((1, 64), 0.1) if args.quick else ((1, 4, 16, 64), 0.3)
    shapes = SHAPES
    if args.tiny:
        batches, min_run_time, shapes = (1, 8), 0.01, {"4x8x8": 4 * 8 * 8}

    impls = {"torch reference (fused_update_torch)": fused_update_torch, "naive torch ops": naive_update}
    if device.type == "cuda" or args.triton:
        impls = {"triton kernel": update_fn("triton"), **impls}

    a = inputs(3, 1000, dtype, ddtype, device)  # all compute the same thing
    ref = {k: v.clone() for k, v in a.items()}
    fused_update_torch(**ref)
    for name, fn in impls.items():
        t = {k: v.clone() for k, v in a.items()}
        fn(**t)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype in (torch.float32, torch.float64) else {}
        torch.testing.assert_close(t["y"], ref["y"], **tol, msg=lambda m, name=name: f"{name}: {m}")

    rows = []
    for shape, D in shapes.items():
        for B in batches:
            a = inputs(B, D, dtype, ddtype, device)
            mb = min_bytes(a)
            src, dst = (torch.empty(mb // 2, dtype=torch.uint8, device=device) for _ in range(2))
            t_copy = Timer("dst.copy_(src)", globals={"src": src, "dst": dst}).blocked_autorange(
                min_run_time=min_run_time).median
            del src, dst
            out = [dict(impl="copy (same bytes)", bytes=mb, s=t_copy)]
            for name, fn in impls.items():  # the kernel moves the minimum: each element once
                nb = mb if name == "triton kernel" else traffic(fn, a)
                out.append(dict(impl=name, bytes=nb, s=median_s(fn, a, min_run_time)))
            for r in out:
                r.update(shape=shape, batch=B, min_bytes=mb, GBps=r["bytes"] / r["s"] / 1e9)
                r["vs_copy"] = r["GBps"] / (mb / t_copy / 1e9)
                print(f"{shape:>9} B={B:<3} {r['impl']:<38} {r['s'] * 1e6:10.1f} us "
                      f"{r['bytes'] / 1e6:9.1f} MB {r['GBps']:7.1f} GB/s", flush=True)
            rows += out
            del a

    m = machine(device)
    cmd = " ".join(["python benchmarks/solver_update.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [
        f"# Solver update benchmark ({device.type})", "",
        f"- date: {m['date_utc']}",
        f"- machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads)"
        + (f", GPU {m['gpu']}" if "gpu" in m else ""),
        f"- torch {m['torch']}" + (f", triton {m['triton']}" if "triton" in m else "")
        + f", python {m['python']}",
        f"- command: `{cmd}`",
        f"- state (y, hist) {args.dtype}, model output d {args.ddtype}, W={W}, "
        "CFG on for every sample (d has 2B rows)",
        "- time: median of torch.utils.benchmark `blocked_autorange`, in place on the same tensors",
        "- MB moved: for the kernel and the copy, the minimum (read y, D, U and the W-1 older history "
        "entries once; write h and y once); for the torch variants, summed over their aten ops, each "
        "reading its inputs and writing its outputs once. `x minimum` is their ratio",
        "- GB/s: the row's own bytes over its time; `vs copy`: that over a `copy_` between preallocated "
        "buffers moving the minimum bytes",
    ]
    lines += [f"- {n}" for n in args.note]
    if device.type != "cuda":
        lines.append("- off CUDA the kernel runs in Triton's interpreter (numpy, one program at a time): "
                     + ("its row's timing says nothing about the kernel" if args.triton else "no Triton row"))
    lines += ["", "| latent | batch | implementation | time (us) | MB moved | x minimum | GB/s | vs copy |",
              "|---|---:|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['shape']} | {r['batch']} | {r['impl']} | {r['s'] * 1e6:.1f} | {r['bytes'] / 1e6:.2f} | "
              f"{r['bytes'] / r['min_bytes']:.2f} | {r['GBps']:.1f} | {r['vs_copy']:.2f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    publish(text, {"machine": m, "args": vars(args), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
