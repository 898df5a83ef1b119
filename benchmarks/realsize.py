"""Real-size benchmark: random-weight networks of real architectures, the executor's ceiling and the
service against it.

Speed does not depend on weight values, so the networks are diffusers' own classes with real
configurations and random weights: DiT S/2, B/2, XL/2 (DiTTransformer2DModel, 256 px: 32x32x4
latents, 256 tokens, 1000 classes) and the Stable Diffusion VAE decoder (AutoencoderKL, 4 blocks
128-256-512-512, 2 layers each). Parts (`--parts`):

- network: FLOPs per image (torch.utils.flop_counter, forward only, a multiply-add = 2 FLOPs), time
  per call by batch size, images/s, utilisation = achieved FLOP/s / the device's peak (CUDA: the
  datasheet's dense peak for the dtype; CPU: a float32 matmul measured here, the practical peak),
  by dtype and, on CUDA, eager against CUDA graphs (`solvers.network.Network`);
- decode: the SD VAE decoder from 32x32x4 latents to 256x256x3 images;
- encode: ms per image for png, jpeg, webp and json of a 256x256 RGB image (`service.encode`);
- ceiling: the executor (the worker's engine) at 1, 2, 4, 8 steps, with its time split into
  network, update, decode and the rest;
- service: `benchmarks/load.py` on the service configuration (embedded and Redis, concurrency
  1/8/32/64, step counts uniform over 1, 2, 4, 8; unguided, and guided as DiT users run it: w 1.5
  or 4 per request, PNG), as service / ceiling with the time split and p50/p99 per step count.

Timing: wall time (perf_counter) on the CPU; on CUDA, CUDA events around back-to-back calls (network,
decode) and around the ceiling's launches (`load.Clock`), never wall time around asynchronous launches.

The service configuration must be one where the network dominates (>= 80 % of the ceiling's time
per image). On a GPU: DiT-XL/2 + SD VAE in bfloat16. On the CPU (2 shared cores here) a DiT-XL/2
image costs seconds, so the CPU configuration is a DiT of the S/2 family made smaller to give
enough requests in a run: `--cpu-service` (default: 6 layers, width 256, 3x16x16 pixels, 64
tokens, identity decoder, images shown 8x as 128x128 RGB).

    python benchmarks/realsize.py --out benchmarks/results/realsize_cpu.md
    python benchmarks/realsize.py --device cuda --dtype bfloat16 --out benchmarks/results/realsize_cuda.md
    python benchmarks/realsize.py --tiny --parts network,decode,encode,ceiling   # smoke test sizes
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import sys
import tempfile
import time
from functools import partial

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import load  # benchmarks/load.py: the load generator and the ceiling
from report import publish  # benchmarks/report.py

from stride_diffusion.service.encode import encode
from stride_diffusion.solvers.adapters import DiscreteIndex, dtype_name
from stride_diffusion.solvers.network import Network, dtype_of, enable_tf32
from stride_diffusion.solvers.schedules import VPSchedule

# name -> (layers, heads, head dim); patch 2, 256 px (32x32x4 latents), 1000 classes
DIT = {"S/2": (12, 6, 64), "B/2": (12, 12, 64), "L/2": (24, 16, 64), "XL/2": (28, 16, 72)}
SD_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 4,
          "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
          "norm_num_groups": 32, "sample_size": 256}
TINY_DIT = (2, 2, 16)
TINY_VAE = {**SD_VAE, "block_out_channels": (8, 16), "layers_per_block": 1, "norm_num_groups": 4,
            "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2}
# RMS(compiled - eager) / RMS(eager) allowed: fusion reorders sums, within the dtype's rounding
COMPILE_TOL = {"float32": 1e-3, "bfloat16": 2e-2, "float16": 5e-3}
# AutoencoderTiny: diffusers' defaults are TAESD's layout (4 blocks of 64 channels, 8x); the tiny one 2x
TINY_TAESD = {"encoder_block_out_channels": (8, 8), "decoder_block_out_channels": (8, 8), "num_encoder_blocks": (1, 1),
              "num_decoder_blocks": (1, 1)}
# datasheet dense peaks, TFLOP/s (SXM parts; tf32 is what float32 matmuls use with TF32 on)
PEAKS = {"H100": {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7},
         "H200": {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7},
         "A100": {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0}}


def diffusers():
    import diffusers as d
    return d


def dit(layers, heads, head_dim, channels=4, size=32, classes=1000):
    return diffusers().DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=channels, out_channels=2 * channels,
        num_layers=layers, sample_size=size, patch_size=2, num_embeds_ada_norm=classes).eval().requires_grad_(False)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, min_s: float, min_reps: int = 2) -> float:
    """Seconds per call: one warm call, then repeats until `min_s` passed (at least `min_reps`).
    CPU: wall time (perf_counter). CUDA: the calls run back to back (no host sync between them, as in
    the serving loop) between two CUDA events, whose elapsed time is the device's: a launch-bound call
    counts its idle gaps, and nothing counts the host's wait for a sync."""
    fn()
    sync(device)
    if device.type == "cuda":
        t0 = time.perf_counter()
        fn()
        sync(device)
        reps = max(min_reps, min(10_000, math.ceil(min_s / max(time.perf_counter() - t0, 1e-6))))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / reps
    n, t0 = 0, time.perf_counter()
    while n < min_reps or time.perf_counter() - t0 < min_s:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def flops_of(fn) -> float:
    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


_PEAKS: dict = {}


def peak_flops(device, dt: str, min_s: float) -> tuple[float, str]:
    """(FLOP/s, where the number comes from); measured once per (device, dtype), the best of three."""
    key = (str(device), dt)
    if key not in _PEAKS:
        _PEAKS[key] = _peak(device, dt, min_s)
    return _PEAKS[key]


def _peak(device, dt: str, min_s: float) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for k, v in PEAKS.items():
            if k in name:
                return v[dt] * 1e12, f"{name} datasheet dense {dt}"
    n = 2048 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype_of(dt))
    s = min(timed(partial(torch.matmul, a, a), device, min_s) for _ in range(3))
    return 2 * n ** 3 / s, (f"the best of three {n}x{n} {dt} matmuls measured on {device.type} with "
                            f"{torch.get_num_threads()} thread(s), a practical reference (convolutions may beat it: "
                            "Winograd does fewer multiplications than counted)")


def dit_model(net, channels, size, classes):
    return DiscreteIndex(net, VPSchedule(), "eps", (channels, size, size), classes)


# -- parts -----------------------------------------------------------------------------------------------

def part_network(a, device, report):
    rows = []
    configs = {"tiny": TINY_DIT} if a.tiny else {k: DIT[k] for k in a.dits.split(",")}
    for name, (L, H, hd) in configs.items():
        for dt in a.dtypes.split(","):
            dt = dtype_name(dt)
            peak, peak_src = peak_flops(device, dt, a.min_seconds)
            torch.manual_seed(0)
            with torch.device(device):  # initialised where it runs: DiT-XL/2's random init takes seconds on a CPU
                model = dit_model(dit(L, H, hd), 4, 32, 1000)
            x1 = torch.randn(1, 4, 32, 32, device=device)
            t1, l1 = torch.full((1,), 0.5, device=device), torch.zeros(1, dtype=torch.long, device=device)
            modes = ["eager", "graphs"] if device.type == "cuda" and not a.no_graphs else ["eager"]
            batches = [int(b) for b in (a.batches_cuda if device.type == "cuda" else a.batches).split(",")]
            if name == "XL/2" and device.type == "cpu":
                batches = batches[:1]  # seconds per image here
            net = Network(model, dtype_of(dt), buckets=batches, graphs="graphs" in modes)
            with torch.inference_mode():
                f = flops_of(partial(net.eager, x1, t1, t1, l1))
                if "graphs" in modes:
                    net.capture()
                attention = net.check_attention()
                inputs = {}
                for B in batches:
                    x = torch.randn(B, 4, 32, 32, device=device)
                    t, lab = torch.full((B,), 0.5, device=device), torch.arange(B, device=device) % 1000
                    inputs[B] = (x, t, t, lab)
                    for mode in modes:
                        call = partial(net.eager if mode == "eager" else net, x, t, t, lab)
                        rows.append(net_row(name, dt, mode, B, timed(call, device, a.min_seconds), f, peak, peak_src,
                                            attention))
                if a.compile:  # the same network compiled per bucket (+ CUDA graphs on CUDA), checked against eager
                    rows += compiled_rows(a, device, name, model, dt, batches, inputs, f, peak, peak_src)
    report["network"] = rows


def net_row(name, dt, mode, B, s, f, peak, peak_src, attention, **extra) -> dict:
    r = {"net": f"DiT-{name}", "dtype": dt, "mode": mode, "batch": B, "ms": 1e3 * s, "images_per_s": B / s,
         "gflop_per_image": f / 1e9, "tflops": B * f / s / 1e12, "utilisation": B * f / s / peak,
         "peak_tflops": peak / 1e12, "peak_source": peak_src, "attention": attention, **extra}
    print(f"network {r['net']} {dt} {mode} B={B}: {r['ms']:.1f} ms  {r['images_per_s']:.1f} img/s  "
          f"{r['gflop_per_image']:.1f} GFLOP/img  util {100 * r['utilisation']:.1f}%", flush=True)
    return r


def compiled_rows(a, device, name, model, dt, batches, inputs, f, peak, peak_src) -> list:
    """`Network(compile=True)` (+ graphs on CUDA, + --sdpa / --fuse-qkv): compile time at capture, time
    per call, and the largest difference from the eager call on the same inputs."""
    cuda = device.type == "cuda"
    with torch.inference_mode():
        want = {B: Network(model, dtype_of(dt)).eager(*args).float() for B, args in inputs.items()}
        net = Network(model, dtype_of(dt), buckets=batches, graphs=cuda and not a.no_graphs, compile=True,
                      compile_mode=a.compile_mode, sdpa=a.sdpa, fuse_qkv=a.fuse_qkv)
        net.capture()
        mode = "compiled" + (" + graphs" if net.graphs else "") + (" + fused qkv" if net.fused else "") + \
            (f" + sdpa {a.sdpa}" if a.sdpa != "auto" else "")
        rows = []
        for B, args in inputs.items():
            d = net(*args).float() - want[B]
            rel = float(d.pow(2).mean().sqrt() / want[B].pow(2).mean().sqrt())
            rows.append(net_row(name, dt, mode, B, timed(partial(net, *args), device, a.min_seconds), f,
                                peak, peak_src, net.attention, compile_s=net.compile_seconds,
                                max_abs_diff=float(d.abs().max()), rel_rms_diff=rel, compile_mode=a.compile_mode,
                                compile_ok=rel <= COMPILE_TOL[dt]))
    return rows


def part_decode(a, device, report):
    d = diffusers()
    cfg = TINY_VAE if a.tiny else SD_VAE
    torch.manual_seed(0)
    with torch.device(device):
        vae = d.AutoencoderKL(**cfg).eval().requires_grad_(False)
    rows = []
    for dt in a.dtypes.split(","):
        dt = dtype_name(dt)
        vae.to(dtype_of(dt))
        for B in [int(b) for b in a.decode_batches.split(",")]:
            z = torch.randn(B, 4, 32, 32, device=device, dtype=dtype_of(dt))
            with torch.inference_mode():
                f = flops_of(partial(vae.decode, z[:1]))
                s = timed(partial(vae.decode, z), device, a.min_seconds, 1)
                shape = tuple(vae.decode(z[:1]).sample.shape[1:])
            peak, _ = peak_flops(device, dt, a.min_seconds)
            r = {"decoder": "vae", "dtype": dt, "batch": B, "ms": 1e3 * s, "ms_per_image": 1e3 * s / B,
                 "gflop_per_image": f / 1e9, "utilisation": B * f / s / peak, "image_shape": list(shape)}
            rows.append(r)
            print(f"decode {dt} B={B}: {r['ms_per_image']:.1f} ms/img  {r['gflop_per_image']:.0f} GFLOP/img "
                  f"-> {shape}", flush=True)
    del vae
    for variant in [v for v in a.decoders.split(",") if v != "vae"]:
        rows += decoder_rows(a, device, variant)
    report["decode"] = rows


def decoder_rows(a, device, variant: str) -> list:
    """The service's decoders (solvers.adapters.decoders) as the worker runs them: 'vae' or 'tiny'
    (AutoencoderTiny, TAESD's layout), '-cl' channels_last, '-compiled' channels_last + torch.compile
    (batch dimension dynamic; compile time reported)."""
    from stride_diffusion.solvers.adapters import TinyDecoder, VAEDecoder

    d = diffusers()
    kind, _, how = variant.partition("-")
    if kind not in ("vae", "tiny") or how not in ("", "cl", "compiled"):
        raise SystemExit(f"--decoders {variant!r}: vae or tiny, optionally -cl or -compiled")
    rows = []
    for dt in a.dtypes.split(","):
        dt = dtype_name(dt)
        torch.manual_seed(0)
        with torch.device(device):
            if kind == "vae":
                dec = VAEDecoder(d.AutoencoderKL(**(TINY_VAE if a.tiny else SD_VAE)), (4, 32, 32), 0.18215, None, dt)
            else:
                dec = TinyDecoder(d.AutoencoderTiny(**(TINY_TAESD if a.tiny else {})), (4, 32, 32), 1.0, None, dt)
        z = torch.randn(max(int(b) for b in a.decode_batches.split(",")), 4, 32, 32, device=device)
        with torch.inference_mode():
            f = flops_of(partial(dec.decode, z[:1]))
            t0 = time.perf_counter()
            dec.optimize(channels_last=how in ("cl", "compiled"), compile=how == "compiled", compile_mode=a.compile_mode)
            dec.decode(z[:1]), dec.decode(z[:2])  # compiles: batch 1, then every batch >= 2
            sync(device)
            compile_s = time.perf_counter() - t0 if how == "compiled" else None
            peak, _ = peak_flops(device, dt, a.min_seconds)
            for B in [int(b) for b in a.decode_batches.split(",")]:
                s = timed(partial(dec.decode, z[:B]), device, a.min_seconds, 1)
                r = {"decoder": variant, "dtype": dt, "batch": B, "ms": 1e3 * s, "ms_per_image": 1e3 * s / B,
                     "gflop_per_image": f / 1e9, "utilisation": B * f / s / peak, "image_shape": list(dec.image_shape),
                     "compile_s": compile_s}
                rows.append(r)
                print(f"decode {variant} {dt} B={B}: {r['ms_per_image']:.2f} ms/img  {r['gflop_per_image']:.1f} "
                      f"GFLOP/img", flush=True)
    return rows


def part_encode(a, device, report):
    """Gradients plus Gaussian noise of 4 grey levels: compresses about like a decoded image, unlike pure noise."""
    g = np.random.default_rng(0)
    yy, xx = np.mgrid[0:256, 0:256]
    img = np.stack([(xx + yy) / 2, 255 - xx, yy], -1) + g.normal(0, 4, (256, 256, 3))
    px = np.clip(img, 0, 255).astype(np.uint8)[None]
    rows = []
    for fmt in ("png", "jpeg", "webp", "json"):
        s = timed(lambda fmt=fmt: encode(px, fmt), torch.device("cpu"), a.min_seconds / 2, 3)
        rows.append({"format": fmt, "ms_per_image": 1e3 * s, "bytes": len(encode(px, fmt))})
        print(f"encode {fmt}: {1e3 * s:.2f} ms  {rows[-1]['bytes']} bytes", flush=True)
    report["encode"] = rows


# -- the service configuration ----------------------------------------------------------------------------

def service_artifact(a, device, out_dir) -> tuple[str, str]:
    """Write the service configuration as an artifact (random weights, through `stride offline import`'s
    code) and say what it is."""
    from stride_diffusion.offline.importer import import_diffusers

    d = diffusers()
    src = os.path.join(out_dir, "src")
    torch.manual_seed(0)
    if device.type == "cuda" and not a.tiny:
        with torch.device(device):  # random init on the GPU; saved in the service's dtype (half the bytes)
            net, shape = dit(*DIT[a.cuda_service]).to(dtype_of(a.dtype)), (4, 32, 32)
            vae = d.AutoencoderKL(**SD_VAE).to(dtype_of(a.dtype))
        net.cpu().save_pretrained(os.path.join(src, "transformer"))
        vae.cpu().save_pretrained(os.path.join(src, "vae"))
        del net, vae
        with open(os.path.join(src, "model_index.json"), "w") as f:
            json.dump({"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"],
                       "vae": ["diffusers", "AutoencoderKL"]}, f)
        what = f"DiT-{a.cuda_service} (random weights, 32x32x4 latents) + SD VAE decoder -> 256x256 RGB, {a.dtype}"
    else:
        L, H, hd, size = (2, 2, 16, 8) if a.tiny else tuple(int(v) for v in a.cpu_service.split(","))
        net, shape = dit(L, H, hd, channels=3, size=size, classes=10), (3, size, size)
        net.save_pretrained(src)
        what = (f"DiT of the S/2 family, {L} layers, width {H * hd} ({H} heads x {hd}), patch 2, on {size}x{size}x3 "
                f"pixels ({(size // 2) ** 2} tokens), 10 classes, random weights, identity decoder, images shown "
                f"{a.display_scale}x")
    # stored in the service's dtype: half the bytes to write and read for DiT-XL/2 in bf16
    art = import_diffusers(src, os.path.join(out_dir, "artifact"), dtype=a.dtype)
    meta_path = os.path.join(art, "model.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["display"] = {"scale": 1 if shape[0] == 4 else a.display_scale}
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=2)
    return str(art), what


def part_ceiling(a, device, report, art, what):
    from stride_diffusion.service.models import ModelEntry

    entry = ModelEntry.from_artifact(art, str(device), a.dtype, steps=list(load.MIXED))
    rows = []
    for s in (1, 2, 4, 8):
        for occ in [int(c) for c in a.ceiling_occupancy.split(",")]:
            ips, cpu_ms, parts = load.ceiling(entry, s, occ, a.ceiling_seconds, split=True, device=str(device),
                                              graphs=not a.no_graphs)
            r = {"steps": s, "occupancy": occ, "images_per_s": ips, "cpu_ms_per_image": cpu_ms}
            for k in ("network", "update", "decode", "rest"):
                r[f"{k}_ms_per_image"] = 1e3 * parts[k]
            r["network_share"] = parts["network"] / sum(parts.values())  # of the split run's time
            rows.append(r)
            print(f"ceiling steps {s} occupancy {occ}: {ips:.1f} img/s  network {100 * r['network_share']:.0f}% of "
                  f"the time", flush=True)
    report["ceiling"] = {"model": what, "rows": rows, "timing": load.SPLIT_TIMING[device.type == "cuda"].split(";")[0]}


def part_service(a, device, report, art, what, out):
    argv = ["--artifact", art, "--model-note", what, "--steps", a.service_steps, "--guidance", a.guidance,
            "--concurrency",
            a.concurrency, "--modes", a.modes, "--duration", str(a.duration), "--warmup", str(a.warmup),
            "--ceiling-seconds", str(a.ceiling_seconds), "--max-batch", str(a.max_batch),
            "--threads", str(a.threads), "--ceiling-threads", a.ceiling_threads, "--device", str(device),
            "--dtype", a.dtype, "--title", f"Service vs ceiling, real-size configuration ({device.type})"]
    if a.no_graphs:
        argv.append("--no-graphs")
    if a.serve_flags:
        argv += ["--serve-flags", a.serve_flags]
    if out:
        argv += ["--out", os.path.splitext(out)[0] + "_service.md"]
    report["service"] = load.main(argv)


# -- report -----------------------------------------------------------------------------------------------

def render(report) -> str:
    out = [f"# Real-size benchmark ({report['device']})", "",
           f"- date: {report['date']}", f"- machine: {report['machine']}",
           (f"- load average before the run: {report['load_avg']:.2f} (this machine is shared: other people's "
            "processes take cores during the runs)"),
           f"- command: `python benchmarks/realsize.py {' '.join(report['argv'])}`",
           f"- torch threads (network, decode, ceiling parts): {report['torch_threads']}", ""]
    if report.get("network"):
        out += ["## Network: time per call by batch size", "",
                "| net | dtype | mode | batch | ms/call | img/s | GFLOP/img | TFLOP/s | utilisation | peak TFLOP/s |",
                "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in report["network"]:
            out.append(f"| {r['net']} | {r['dtype']} | {r['mode']} | {r['batch']} | {r['ms']:.1f} | "
                       f"{r['images_per_s']:.1f} | {r['gflop_per_image']:.1f} | {r['tflops']:.3f} | "
                       f"{100 * r['utilisation']:.1f}% | {r['peak_tflops']:.2f} |")
        out += ["", f"Peak: {report['network'][0]['peak_source']}. Attention kernels (checked): "
                f"{sorted({', '.join(r.get('attention') or ['none']) for r in report['network']})}.", ""]
        comp = [r for r in report["network"] if "compile_s" in r]
        if comp:
            out += ["Compiled rows: " + "; ".join(sorted({f"{r['net']} {r['dtype']} compiled ({r['compile_mode']}) in "
                                                          f"{r['compile_s']:.0f} s" for r in comp})) +
                    f"; largest difference from the eager output: {max(r['max_abs_diff'] for r in comp):.2e} (RMS relative "
                    f"{max(r['rel_rms_diff'] for r in comp):.1e}, allowed {COMPILE_TOL}).", ""]
    if report.get("decode"):
        out += ["## Decode: SD VAE decoder (vae) and AutoencoderTiny (tiny, TAESD), 32x32x4 latents", "",
                "`-cl`: channels_last; `-compiled`: channels_last + torch.compile (the service's --compile).", "",
                "| decoder | dtype | batch | ms/image | GFLOP/image | utilisation | image | compile s |",
                "|---|---|---:|---:|---:|---:|---|---:|"]
        for r in report["decode"]:
            cs = f"{r['compile_s']:.0f}" if r.get("compile_s") is not None else ""
            out.append(f"| {r.get('decoder', 'vae')} | {r['dtype']} | {r['batch']} | {r['ms_per_image']:.2f} | "
                       f"{r['gflop_per_image']:.1f} | {100 * r['utilisation']:.1f}% | "
                       f"{'x'.join(map(str, r['image_shape']))} | {cs} |")
        out.append("")
    if report.get("encode"):
        out += ["## Encode: one 256x256 RGB image (API process, one thread)", "",
                "| format | ms/image | bytes |", "|---|---:|---:|"]
        out += [f"| {r['format']} | {r['ms_per_image']:.2f} | {r['bytes']} |" for r in report["encode"]]
        out.append("")
    if report.get("ceiling"):
        c = report["ceiling"]
        out += ["## Executor ceiling", "", f"Model: {c['model']}. Split timing: {c.get('timing', '')}.", "",
                "| steps | images in flight | img/s | CPU ms/img | network ms/img | update ms/img | decode ms/img | "
                "rest ms/img | network share |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in c["rows"]:
            out.append(f"| {r['steps']} | {r['occupancy']} | {r['images_per_s']:.1f} | {r['cpu_ms_per_image']:.1f} | "
                       f"{r['network_ms_per_image']:.2f} | {r['update_ms_per_image']:.3f} | "
                       f"{r['decode_ms_per_image']:.2f} | {r['rest_ms_per_image']:.2f} | "
                       f"{100 * r['network_share']:.0f}% |")
        out.append("")
    if report.get("service"):
        out += ["## Service / ceiling", "", f"Model: {report['service_model']}. PNG responses; guidance `1` is off, "
                "`1.5/4` one of the two scales per request.", "",
                "| mode | steps | guidance | conc. | img/s | ceiling img/s | ratio | p50 ms | p99 ms | rows/call |",
                "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in report["service"]:
            out.append(f"| {r['mode']} | {r['steps']} | {r['guidance']} | {r['concurrency']} | "
                       f"{r['images_per_s']:.1f} | {r['ceiling']:.1f} | {r['ratio']:.2f} | {r['p50_ms']:.0f} | "
                       f"{r['p99_ms']:.0f} | {r['batch_rows']:.1f} |")
        mixed = [r for r in report["service"] if r["steps"] == "mixed"]
        if mixed:
            ns = sorted({int(n) for r in mixed for n in r["by_steps"]})
            out += ["", "Latency of the mixed runs by each request's step count, p50 / p99 ms:", "",
                    "| mode | guidance | conc. | " + " | ".join(f"{n} step{'s' * (n > 1)}" for n in ns) + " |",
                    "|---|---|---:|" + "---:|" * len(ns)]
            for r in mixed:
                cells = [f"{r['by_steps'][str(n)]['p50_ms']:.0f} / {r['by_steps'][str(n)]['p99_ms']:.0f}"
                         if str(n) in r["by_steps"] else "" for n in ns]
                out.append(f"| {r['mode']} | {r['guidance']} | {r['concurrency']} | " + " | ".join(cells) + " |")
        out += ["", "Time split and CPU per process: the `_service.md` report beside this one.", ""]
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--parts", default="network,decode,encode,ceiling,service")
    ap.add_argument("--tiny", action="store_true", help="tiny networks: the smoke test of every part")
    ap.add_argument("--dits", default="S/2,B/2,XL/2", help=f"network part: DiT sizes, of {list(DIT)}")
    ap.add_argument("--dtypes", default=None, help="network/decode dtypes (default: fp32 on CPU, "
                                                   "fp32,bf16 on CUDA)")
    ap.add_argument("--dtype", default=None, help="ceiling/service network and decoder dtype (default: fp32 on CPU, "
                                                  "bf16 on CUDA)")
    ap.add_argument("--batches", default="1,2,4,8", help="network part, CPU")
    ap.add_argument("--batches-cuda", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--decode-batches", default="1")
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--compile", action="store_true", help="network part: also the network compiled per bucket "
                                                          "(Network(compile=True), + graphs on CUDA), checked against eager")
    ap.add_argument("--compile-mode", default="default", help="inductor mode of --compile and the -compiled decoders")
    ap.add_argument("--sdpa", default="auto", help="--compile rows: the attention backend (auto, flash, cudnn, ...)")
    ap.add_argument("--fuse-qkv", action="store_true", help="--compile rows: fused q/k/v projections")
    ap.add_argument("--decoders", default="vae", help="decode part: vae, vae-cl, vae-compiled, tiny, tiny-cl, "
                                                      "tiny-compiled (comma-separated)")
    ap.add_argument("--serve-flags", default="", help="service part: more `stride serve` flags, e.g. '--compile'")
    ap.add_argument("--min-seconds", type=float, default=1.0, help="timing per measurement")
    ap.add_argument("--cpu-service", default="6,4,64,16", help="layers,heads,head dim,pixels of the CPU service DiT")
    ap.add_argument("--cuda-service", default="XL/2")
    ap.add_argument("--display-scale", type=int, default=8)
    ap.add_argument("--ceiling-occupancy", default="8,32")
    ap.add_argument("--ceiling-seconds", type=float, default=6.0)
    ap.add_argument("--service-steps", default="mixed")
    ap.add_argument("--guidance", default="1,1.5/4", help="service runs: 1 (off) and/or scales drawn per request, "
                                                          "joined by '/' (benchmarks/load.py --guidance)")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--modes", default="embedded,redis")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=4.0)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="the service worker's torch threads (0: its default)")
    ap.add_argument("--ceiling-threads", default=None, help="the service's ceiling: the best of these (default "
                                                            "1,all on the CPU, all on CUDA)")
    ap.add_argument("--cpu-threads", type=int, default=1,
                    help="CPU: torch threads of the network, decode and ceiling parts (on a shared machine one "
                         "thread is steadier: a parallel region waits for its slowest, preempted thread)")
    ap.add_argument("--out", help="markdown report; a .json beside it")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    a.dtypes = a.dtypes or ("fp32,bf16" if cuda else "fp32")
    a.dtype = a.dtype or ("bf16" if cuda else "fp32")
    a.ceiling_threads = a.ceiling_threads or ("all" if cuda else "1,all")
    if cuda:
        enable_tf32()
    else:
        torch.set_num_threads(a.cpu_threads)
    parts = a.parts.split(",")
    report = {"device": str(device) if not cuda else torch.cuda.get_device_name(device), "machine": load.machine(),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "load_avg": os.getloadavg()[0], "argv": sys.argv[1:] if argv is None else list(argv),
              "torch_threads": torch.get_num_threads()}
    for p in ("network", "decode", "encode"):
        if p in parts:
            globals()[f"part_{p}"](a, device, report)
    if "ceiling" in parts or "service" in parts:
        tmp = tempfile.mkdtemp(prefix="stride-realsize-")
        try:
            art, what = service_artifact(a, device, tmp)
            report["service_model"] = what
            if "ceiling" in parts:
                part_ceiling(a, device, report, art, what)
            if "service" in parts:
                part_service(a, device, report, art, what, a.out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    text = render(report)
    publish(text, report, a.out)
    bad = [r for r in report.get("network", []) if r.get("compile_ok") is False]
    if bad:
        sys.exit(f"the compiled network differs from eager beyond {COMPILE_TOL}: "
                 f"{[(r['dtype'], r['batch'], r['rel_rms_diff']) for r in bad]}")
    return report


if __name__ == "__main__":
    main()
