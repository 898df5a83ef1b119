"""The peer, side by side: diffusers' DiTPipeline against stride's service on the same network.

Both run the same random-weight networks (speed does not depend on weight values): DiT-XL/2 and
the Stable Diffusion VAE as benchmarks/realsize.py builds them (seed 0, 256 px: 32x32x4 latents),
saved once as a diffusers pipeline folder that the peer loads with DiTPipeline.from_pretrained and
stride imports with `stride offline import diffusers` (the same weights, bit for bit). Same work per
image: DPM-Solver++ 2M (DPMSolverMultistepScheduler, solver_order 2; stride's dpmpp-2m, its
auto-pick at these steps without eval.json), `--steps` model evaluations with classifier-free
guidance `--guidance` (two rows per image and evaluation, both sides), one class per image.

Rows:
- diffusers, one request at a time: `pipe(class_labels=[c], ...)` in a loop, batch 1, as its users
  call it (output_type "pil": the decoded image handed over as a PIL image; no PNG encoding);
- diffusers, its best batch: the same with B images per call, for each of `--batches`; the best
  images/s is the row (a request's latency is its call's);
- diffusers compiled, as diffusers' "Accelerate inference" guide shows it: channels_last transformer
  and VAE, `torch.compile(transformer, mode="max-autotune", fullgraph=True)` and the same for
  `vae.decode`, with the guide's inductor flags; at batch 1 and at the best batch (compile time
  reported, not counted);
- stride: `stride serve` (embedded) at `--concurrency` closed-loop clients sending PNG requests
  through benchmarks/load.py, with the same steps and guidance; its images/s over each peer row's is
  the `stride / peer` column.

Timing: wall time around each pipeline call (it returns host images, so every call ends with a
device sync); images/s = images / summed call time; p50/p99 of the per-call latency.

    python benchmarks/peers.py --device cuda --out benchmarks/results/peers_cuda.md
    python benchmarks/peers.py --tiny          # CPU smoke test: tiny networks, compile through dynamo's eager backend
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import load  # benchmarks/load.py: the load generator
import realsize  # the networks (DIT, SD_VAE, dit) of the real-size benchmark
from report import publish  # benchmarks/report.py

from stride_diffusion.solvers.adapters import dtype_name
from stride_diffusion.solvers.adapters.base import DTYPE_ALIASES
from stride_diffusion.solvers.network import dtype_of, enable_tf32

# the inductor settings diffusers' guide ("Accelerate inference", torch.compile) sets for maximum speed
DOCS_INDUCTOR = {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True, "epilogue_fusion": False,
                 "coordinate_descent_check_all_directions": True}
TINY_DIT = dict(layers=2, heads=2, head_dim=16, channels=4, size=8)  # 1000 classes: DiTPipeline's null label is 1000


def pct(xs, q):
    return load.pct(xs, q)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_models(a, device, src):
    """The DiT + VAE as a diffusers pipeline folder (transformer/, vae/, scheduler/, model_index.json)."""
    import diffusers

    torch.manual_seed(0)
    dt = dtype_of(a.dtype)
    with torch.device(device):  # as realsize.service_artifact builds them: initialised where they run
        if a.tiny:
            t = TINY_DIT
            net = realsize.dit(t["layers"], t["heads"], t["head_dim"], channels=t["channels"], size=t["size"]).to(dt)
            vae = diffusers.AutoencoderKL(**{**realsize.TINY_VAE, "sample_size": 2 * t["size"]}).to(dt)
        else:
            net = realsize.dit(*realsize.DIT[a.dit]).to(dt)
            vae = diffusers.AutoencoderKL(**realsize.SD_VAE).to(dt)
    net.cpu().save_pretrained(os.path.join(src, "transformer"))
    vae.cpu().save_pretrained(os.path.join(src, "vae"))
    # DiT's training chain (linear betas 1e-4..0.02, 1000 steps, epsilon) solved by DPM-Solver++ 2M
    diffusers.DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                          num_train_timesteps=1000, algorithm_type="dpmsolver++", solver_order=2,
                                          prediction_type="epsilon").save_pretrained(os.path.join(src, "scheduler"))
    with open(os.path.join(src, "model_index.json"), "w") as f:
        json.dump({"_class_name": "DiTPipeline", "_diffusers_version": diffusers.__version__,
                   "transformer": ["diffusers", "DiTTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
                   "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]}, f)
    what = (f"DiT-{a.dit} + SD VAE" if not a.tiny else "tiny DiT (2 layers, width 32, 8x8x4 latents) + tiny VAE") + \
           f", random weights, {a.dtype}"
    return what


def pipeline(src, device, dtype):
    import diffusers

    pipe = diffusers.DiTPipeline.from_pretrained(src, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_calls(pipe, device, batch: int, a, seconds: float, label0: int = 0) -> dict:
    """Calls of `batch` images until `seconds` passed (at least a.min_calls); per-call latency."""
    lat, i, t_end = [], label0, None
    classes = 1000  # DiT's ImageNet classes, tiny included
    while len(lat) < a.min_calls or time.perf_counter() < t_end:
        labels = [(i + k) % classes for k in range(batch)]
        t0 = time.perf_counter()
        pipe(class_labels=labels, num_inference_steps=a.steps, guidance_scale=a.guidance,
             generator=torch.manual_seed(i), output_type="pil")
        sync(device)
        lat.append(time.perf_counter() - t0)
        t_end = t_end or time.perf_counter() + seconds
        i += batch
    return {"batch": batch, "calls": len(lat), "images_per_s": batch * len(lat) / sum(lat),
            "p50_ms": 1e3 * pct(lat, 50), "p99_ms": 1e3 * pct(lat, 99), "mean_ms": 1e3 * statistics.fmean(lat)}


def peer_rows(a, device, src) -> tuple[list, int]:
    pipe = pipeline(src, device, dtype_of(a.dtype))
    rows = []
    pipe(class_labels=[0], num_inference_steps=a.steps, guidance_scale=a.guidance, output_type="pil")  # first-call costs
    one = run_calls(pipe, device, 1, a, a.seconds)
    rows.append({"peer": "diffusers DiTPipeline, one request at a time", **one})
    print(f"peer batch 1: {one['images_per_s']:.2f} img/s  p50 {one['p50_ms']:.1f} ms", flush=True)
    by_batch = {1: one}
    for b in [int(v) for v in a.batches.split(",")]:
        if b == 1:
            continue
        pipe(class_labels=list(range(b)), num_inference_steps=a.steps, guidance_scale=a.guidance, output_type="pil")
        by_batch[b] = run_calls(pipe, device, b, a, a.seconds)
        print(f"peer batch {b}: {by_batch[b]['images_per_s']:.2f} img/s  p50 {by_batch[b]['p50_ms']:.1f} ms", flush=True)
    best = max(by_batch, key=lambda b: by_batch[b]["images_per_s"])
    rows.append({"peer": f"diffusers DiTPipeline, best batch of {sorted(by_batch)}", **by_batch[best],
                 "by_batch": {str(b): r["images_per_s"] for b, r in by_batch.items()}})
    if a.compile_mode != "none":
        rows += compiled_rows(a, device, pipe, sorted({1, best}) if a.compile_batches == "1,best" else
                              [int(v) for v in a.compile_batches.split(",")])
    del pipe
    return rows, best


def compiled_rows(a, device, pipe, batches) -> list:
    """channels_last + torch.compile of the transformer and vae.decode, fullgraph, as diffusers' guide shows."""
    import torch._inductor.config as inductor

    backend = "eager" if a.tiny else "inductor"  # the CPU smoke test: dynamo's tracing (fullgraph) without codegen
    if backend == "inductor":
        for k, v in DOCS_INDUCTOR.items():
            setattr(inductor, k, v)
    kw = {"fullgraph": True, **({"mode": a.compile_mode} if backend == "inductor" else {"backend": backend})}
    torch.nn.Module.to(pipe.transformer, memory_format=torch.channels_last)
    torch.nn.Module.to(pipe.vae, memory_format=torch.channels_last)
    pipe.transformer = torch.compile(pipe.transformer, **kw)
    pipe.vae.decode = torch.compile(pipe.vae.decode, **kw)
    rows = []
    for b in batches:
        t0 = time.perf_counter()
        for _ in range(2):  # compile, then (max-autotune) the CUDA graph recording on the second call
            pipe(class_labels=list(range(b)), num_inference_steps=a.steps, guidance_scale=a.guidance,
                 output_type="pil")
        sync(device)
        compile_s = time.perf_counter() - t0
        r = run_calls(pipe, device, b, a, a.seconds)
        how = f"torch.compile {a.compile_mode if backend == 'inductor' else 'backend=eager (smoke)'}, fullgraph"
        rows.append({"peer": f"diffusers DiTPipeline compiled ({how}), batch {b}", **r, "compile_s": compile_s})
        print(f"peer compiled batch {b}: {r['images_per_s']:.2f} img/s  p50 {r['p50_ms']:.1f} ms  "
              f"(compile + first calls {compile_s:.0f} s)", flush=True)
    return rows


def stride_rows(a, device, src, tmp, what) -> list:
    from stride_diffusion.offline.importer import import_diffusers

    art = import_diffusers(src, os.path.join(tmp, "artifact"), dtype=a.dtype)
    argv = ["--artifact", str(art), "--model-note", what, "--modes", a.modes, "--steps", str(a.steps),
            "--guidance", f"{a.guidance:g}", "--concurrency", a.concurrency, "--duration", str(a.duration),
            "--warmup", str(a.warmup), "--ceiling-seconds", str(a.ceiling_seconds), "--max-batch", str(a.max_batch),
            "--threads", str(a.threads), "--ceiling-threads", "all", "--device", str(device), "--dtype", a.dtype,
            "--title", "stride beside diffusers"]
    if a.serve_flags:
        argv += ["--serve-flags", a.serve_flags]
    return load.main(argv)


def render(report) -> str:
    out = [f"# diffusers' DiTPipeline and stride's service, side by side ({report['device']})", "",
           f"- date: {report['date']}", f"- machine: {report['machine']}",
           f"- model: {report['model']}; {report['steps']} steps of DPM-Solver++ 2M with guidance "
           f"{report['guidance']:g} (2 rows per image and step, both sides)",
           f"- command: `python benchmarks/peers.py {' '.join(report['argv'])}`", "",
           "| who | batch / concurrency | img/s | p50 ms | p99 ms | stride / this |", "|---|---:|---:|---:|---:|---:|"]
    stride = report["stride"]
    best_stride = max((r["images_per_s"] for r in stride), default=float("nan"))
    for r in report["peers"]:
        ratio = best_stride / r["images_per_s"] if r["images_per_s"] else float("nan")
        extra = f" (compile {r['compile_s']:.0f} s)" if "compile_s" in r else ""
        out.append(f"| {r['peer']}{extra} | {r['batch']} | {r['images_per_s']:.2f} | {r['p50_ms']:.0f} | "
                   f"{r['p99_ms']:.0f} | {ratio:.2f} |")
    for r in stride:
        out.append(f"| stride serve ({r['mode']}, PNG{', ' + report['serve_flags'] if report['serve_flags'] else ''}) "
                   f"| c={r['concurrency']} | {r['images_per_s']:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | 1.00 |")
    out += ["", "`stride / this`: stride's best service images/s over the row's. diffusers' rows include no PNG "
            "encoding (stride's do) and no HTTP.", ""]
    if any("by_batch" in r for r in report["peers"]):
        bb = next(r["by_batch"] for r in report["peers"] if "by_batch" in r)
        out += ["diffusers images/s by batch: " + ", ".join(f"{b}: {v:.2f}" for b, v in bb.items()), ""]
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny networks on the CPU: the smoke test")
    ap.add_argument("--dit", default="XL/2", help=f"DiT size, of {list(realsize.DIT)}")
    ap.add_argument("--dtype", default=None, help="both sides (default: bf16 on CUDA, fp32 on the CPU)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--batches", default="1,8,32,64", help="the peer's batch sizes (images per call)")
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds per peer row")
    ap.add_argument("--min-calls", type=int, default=3)
    ap.add_argument("--compile-mode", default="max-autotune",
                    help="the compiled peer's torch.compile mode (diffusers' guide: max-autotune); none: no compiled rows")
    ap.add_argument("--compile-batches", default="1,best", help="batches of the compiled peer ('1,best' or a list)")
    ap.add_argument("--no-stride", action="store_true", help="the peer only")
    ap.add_argument("--modes", default="embedded", help="stride's modes (benchmarks/load.py)")
    ap.add_argument("--concurrency", default="64")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--ceiling-seconds", type=float, default=2.0)
    ap.add_argument("--max-batch", type=int, default=128, help="stride's rows per call (64 guided images)")
    ap.add_argument("--threads", type=int, default=1, help="stride worker's torch threads (0: its default)")
    ap.add_argument("--serve-flags", default="", help="more `stride serve` flags, e.g. '--compile'")
    ap.add_argument("--out", help="markdown report; a .json beside it")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    a.dtype = a.dtype or ("bf16" if device.type == "cuda" else "fp32")
    a.dtype = {v: k for k, v in DTYPE_ALIASES.items()}[dtype_name(a.dtype)]  # the short name `stride serve` takes
    if device.type == "cuda":
        enable_tf32()
    if a.tiny:
        a.batches = a.batches if a.batches != "1,8,32,64" else "1,2"
    tmp = tempfile.mkdtemp(prefix="stride-peers-")
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "machine": load.machine(), "argv": sys.argv[1:] if argv is None else list(argv),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "steps": a.steps, "guidance": a.guidance, "serve_flags": a.serve_flags}
    try:
        src = os.path.join(tmp, "pipe")
        report["model"] = write_models(a, device, src)
        report["peers"], report["best_batch"] = peer_rows(a, device, src)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        report["stride"] = [] if a.no_stride else stride_rows(a, device, src, tmp, report["model"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    best = max((r["images_per_s"] for r in report["stride"]), default=math.nan)
    for r in report["peers"]:
        r["stride_over_peer"] = best / r["images_per_s"] if r["images_per_s"] else math.nan
    text = render(report)
    publish(text, report, a.out)
    return report


if __name__ == "__main__":
    main()
