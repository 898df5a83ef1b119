"""`--dtype fp8` against bf16 on the same random-weight DiT (stride_diffusion/solvers/fp8.py): the
network call per batch (CUDA graphs per bucket, as served) and the final latents of the same seeds
(DPM-Solver++ 2M, 4 steps, CFG 4, through the Network wrapper and the executor), as RMS(fp8 - bf16)
over RMS(bf16), beside bf16's own distance from fp32 for scale.

Where fp8 is refused (no sm_89+ GPU, no torchao) the report says why and has the bf16 and fp32
rows only; the exit status is then 1 unless --allow-refusal (the CPU smoke run).

    python benchmarks/fp8.py --out benchmarks/results/fp8_cuda.md          # on an H100/H200
    python benchmarks/fp8.py --device cpu --tiny --allow-refusal            # the smoke test
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import load
import realsize
from report import publish  # benchmarks/report.py

from stride_diffusion.solvers import make_table, sample, seeded_noise
from stride_diffusion.solvers.fp8 import fp8_refusal, to_fp8
from stride_diffusion.solvers.network import Network, enable_tf32


def build(a, device, dt: str):
    """The DiT of `a` with the same random weights whatever dt ('fp32', 'bf16', 'fp8'), as a Network
    with graphs per bucket on CUDA; (network, fp8 layers converted)."""
    L, H, hd = realsize.TINY_DIT if a.tiny else realsize.DIT[a.dit]
    torch.manual_seed(0)
    with torch.device(device):
        net = realsize.dit(L, H, hd)
    torch.nn.Module.to(net, torch.float32 if dt == "fp32" else torch.bfloat16)  # diffusers' own .to() warns
    n = to_fp8(net, device) if dt == "fp8" else 0
    cuda = device.type == "cuda"
    buckets = sorted({int(b) for b in a.batches.split(",")} | {2 * a.samples})  # the sampled CFG rows too
    model = Network(realsize.dit_model(net, 4, 32, 1000), buckets=buckets, graphs=cuda, static=not cuda)
    with torch.inference_mode():
        model.capture()
    return model, n


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="a tiny DiT (the CPU smoke test)")
    ap.add_argument("--dit", default="XL/2", help=f"DiT size, of {list(realsize.DIT)}")
    ap.add_argument("--batches", default="8,64,128", help="network call batches timed")
    ap.add_argument("--samples", type=int, default=16, help="images sampled on the same seeds (2 rows each: CFG)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--min-seconds", type=float, default=0.3)
    ap.add_argument("--allow-refusal", action="store_true", help="exit 0 where fp8 cannot run here")
    ap.add_argument("--out", help="markdown report; a .json beside it")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda":
        enable_tf32()
    refusal = fp8_refusal(device)
    dtypes = ["fp32", "bf16"] + ([] if refusal else ["fp8"])
    x1 = torch.randn(1, 4, 32, 32, device=device)
    t1, l1 = torch.full((1,), 0.5, device=device), torch.zeros(1, dtype=torch.long, device=device)
    rows, final, layers, flops = [], {}, 0, None
    for dt in dtypes:
        net, n = build(a, device, dt)
        layers = max(layers, n)
        with torch.inference_mode():
            if flops is None:
                flops = realsize.flops_of(partial(net.eager, x1, t1, t1, l1))
            if dt != "fp32":  # fp32 is the reference of the latents only
                for B in [int(b) for b in a.batches.split(",")]:
                    x = torch.randn(B, 4, 32, 32, device=device)
                    t, lab = torch.full((B,), 0.5, device=device), torch.arange(B, device=device) % 1000
                    s = realsize.timed(partial(net, x, t, t, lab), device, a.min_seconds)
                    rows.append({"dtype": dt, "batch": B, "ms": 1e3 * s, "images_per_s": B / s,
                                 "tflops": B * flops / s / 1e12})
                    print(f"{dt} B={B}: {1e3 * s:.2f} ms  {B / s:.1f} img/s  {B * flops / s / 1e12:.1f} TFLOP/s",
                          flush=True)
            table = make_table("dpmpp-2m", net.schedule, net.param, a.steps)
            noise = seeded_noise(range(a.samples), net.shape, device=device)
            final[dt] = sample(net, table, noise, torch.arange(a.samples) % 1000, a.guidance).float().cpu()
        del net
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bf16 = {r["batch"]: r["ms"] for r in rows if r["dtype"] == "bf16"}
    for r in rows:
        r["speedup_over_bf16"] = bf16[r["batch"]] / r["ms"]
    latents = {"bf16 vs fp32": rel_rms(final["bf16"], final["fp32"])}
    if "fp8" in final:
        latents["fp8 vs bf16"] = rel_rms(final["fp8"], final["bf16"])
        latents["fp8 vs fp32"] = rel_rms(final["fp8"], final["fp32"])
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "machine": load.machine(), "date": datetime.datetime.now(datetime.timezone.utc).strftime(
                  "%Y-%m-%d %H:%M UTC"), "argv": sys.argv[1:] if argv is None else list(argv),
              "net": "DiT-tiny" if a.tiny else f"DiT-{a.dit}", "fp8_layers": layers, "refusal": refusal,
              "gflop_per_image": flops / 1e9, "samples": a.samples, "steps": a.steps, "guidance": a.guidance,
              "network": rows, "latents_rel_rms": latents}
    text = render(report)
    publish(text, report, a.out)
    return 1 if refusal and not a.allow_refusal else 0


def render(r) -> str:
    out = [f"# FP8 vs bf16: {r['net']}, {r['device']}", "",
           f"{r['date']}; {r['machine']}; {r['gflop_per_image']:.1f} GFLOP per image and call; "
           f"{r['fp8_layers']} linear layers in float8", ""]
    if r["refusal"]:
        out += [f"fp8 not run here: {r['refusal']}", ""]
    out += ["| dtype | batch | ms per call | images/s per call | TFLOP/s | speed-up over bf16 |", "|---|---|---|---|---|---|"]
    out += [f"| {x['dtype']} | {x['batch']} | {x['ms']:.2f} | {x['images_per_s']:.1f} | {x['tflops']:.1f} | "
            f"{x['speedup_over_bf16']:.2f} |" for x in r["network"]]
    out += ["", f"Final latents, {r['samples']} seeds, DPM-Solver++ 2M {r['steps']} steps, CFG {r['guidance']:g}: "
                "RMS(difference) / RMS(reference)", "", "| pair | relative RMS |", "|---|---|"]
    out += [f"| {k} | {v:.2e} |" for k, v in r["latents_rel_rms"].items()]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
