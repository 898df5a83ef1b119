"""Correctness on the device, before any timing: what only a GPU can show (docs/gpu.md), checked
first by benchmarks/gpu.sh. Prints PASS/FAIL per check with its numbers; --out writes markdown and
a .json beside it. Exit status 1 when any check fails.

Checks (`--checks`, default all):

- kernel: the Triton update (`solvers.update.update_fn('triton')`) against `fused_update_torch` on
  the device: batch 1 to 64, model output d in float32 and bfloat16, contiguous and row-strided d
  (a learned-sigma network's first C of 2C channels, as the executor hands it over), mixed CFG
  rows (guided and unguided samples in one launch, several scales), every slot of the history
  window; max |difference| over the reference's RMS within 1e-5.
- graphs: CUDA graphs against eager calls of a DiT in padded batch buckets (`Network(graphs=True)`),
  float32 (TF32) and bfloat16: the replay against the eager call of the same padded batch (RMS
  error over RMS within 1e-3), and the padded bucket's rows against an unpadded eager call (other
  kernels may run: within 2e-3 in float32, 2e-2 in bfloat16). Off CUDA the same static-bucket path
  runs eagerly (`Network(static=True)`).
- served: a DiT with random weights and learned sigma (DiT-S/2-like: 6 layers, width 384, 32x32x4
  latents; `--tiny`: 2 layers, width 32, 4x8x8) imported through `stride offline import`'s code and
  sampled by the worker's engine on the device (batch buckets, CUDA graphs, the fused update of
  `--update`, the pinned asynchronous copy of finished images), requests of 1, 2, 4 and 8 steps at
  guidance 1, 1.5 and 4 joining between steps, against the float32 CPU reference (`sample` with
  the torch update) on the same seeds. The error of a request is the RMS of device - reference over
  the reference's RMS (the sample's scale), divided by 2w - 1 (a guided output u + w (c - u) carries
  the network's rounding about |1 - w| + |w| times); the worst request must be within 1.4e-2 in
  bfloat16 and 5e-3 in float32 (TF32 on CUDA). The uint8 images the engine returns (decoded by the
  VAE on the device) are reported against the reference's. Then the same requests with the whole
  step as one graph per bucket (the default) against the network's graphs alone: within 1e-6.
- service: one request per adapter kind through the service (the API with its embedded worker on
  the device, in this process, over HTTP): stride flow (artifacts/digits), stride VP
  (artifacts/digits-vp), a diffusers DiT with learned sigma and a VAE, a diffusers UNet with
  v-prediction, and SiT (a DiT-layout checkpoint on the reversed flow), tiny random networks
  imported with `stride offline import`'s code; each PNG against the CPU float32 reference image
  of the same request (mean |difference| within 1.5 levels of 255).

On the CPU (`--device cpu`, what the test suite runs) every check runs, with update 'triton' by
default: the kernel in Triton's interpreter, through the executor, the engine and the service.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.md        # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --tiny                           # CI's version
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import inspect
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import traceback

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from load import machine

from stride_diffusion.solvers.network import Network, dtype_of, enable_tf32
from stride_diffusion.solvers.update import fused_update_torch, update_fn

CHECKS = ("kernel", "graphs", "served", "service")
STEPS = (1, 2, 4, 8)
SERVED_TOL = {"bfloat16": 1.4e-2, "float32": 5e-3}
STEP_GRAPH_TOL = 1e-6  # the same kernels on the same bucket shapes: equal but for a cuBLAS choice
KERNEL_TOL = 1e-5  # both compute in float32 from the same inputs: rounding order only
SERVICE_TOL = 1.5  # mean |difference| of the PNG against the reference, levels of 255


class Report:
    def __init__(self):
        self.rows = []

    def add(self, check, name, ok, value=None, limit=None, detail=""):
        r = {"check": check, "name": name, "status": "PASS" if ok else "FAIL", "value": value, "limit": limit,
             "detail": detail}
        self.rows.append(r)
        v = "" if value is None else f" {value:.3g}" + ("" if limit is None else f" (limit {limit:g})")
        print(f"{r['status']} {check}: {name}{v}{'  ' + detail if detail else ''}", flush=True)
        return ok


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| over the RMS of ref (the sample's scale)."""
    got, ref = got.double().cpu(), ref.double().cpu()
    scale = ref.pow(2).mean().sqrt().item()
    return (got - ref).abs().max().item() / max(scale, 1e-12)


def rms_rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    """RMS of got - ref over the RMS of ref."""
    got, ref = got.double().cpu(), ref.double().cpu()
    return (got - ref).pow(2).mean().sqrt().item() / max(ref.pow(2).mean().sqrt().item(), 1e-12)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# -- kernel -----------------------------------------------------------------------------------------

def kernel_inputs(B, D, ddtype, strided, dev, seed):
    """One update's inputs: samples j % 3 != 2 guided (their unconditional rows after the B
    conditional ones) at scales 1.5, 4 and 7.5, d [R, D] contiguous or the first half of [R, 2D]."""
    g = torch.Generator().manual_seed(seed)
    W = 3
    guided = [j for j in range(B) if j % 3 != 2]
    R = B + len(guided)
    uncond = torch.full((B,), -1, dtype=torch.long)
    for m, j in enumerate(guided):
        uncond[j] = B + m
    full = torch.randn(R, 2 * D if strided else D, generator=g)
    d = full.to(dev, ddtype)[:, :D]
    r = lambda *s: torch.randn(*s, generator=g)
    return dict(y=r(B, D).to(dev), d=d, uncond=uncond.to(dev),
                w=torch.tensor([(1.5, 4.0, 7.5)[j % 3] for j in range(B)]).to(dev),
                hx=r(B).to(dev), hd=r(B).to(dev), c=r(B).to(dev), b=(0.3 * r(B, W)).to(dev),
                hist=r(B, W, D).to(dev), slot=((torch.arange(B) * 5 + 1) % W).to(dev))


def check_kernel(a, dev, rep):
    kern = update_fn("triton")
    Bs = (1, 3, 17) if a.tiny else (1, 2, 7, 16, 64)
    Ds = (4 * 8 * 8, 3 * 5 * 5) if a.tiny else (4 * 32 * 32, 3 * 17 * 19)
    worst, n, fails = 0.0, 0, []
    for B in Bs:
        for D in Ds:
            for ddtype in (torch.float32, torch.bfloat16):
                for strided in (False, True):
                    x = kernel_inputs(B, D, ddtype, strided, dev, seed=B * 1000 + D)
                    ref = {k: (v.clone() if k != "d" else v) for k, v in x.items()}
                    got = {k: (v.clone() if k != "d" else v) for k, v in x.items()}
                    fused_update_torch(**ref)
                    kern(**got)
                    sync(dev)
                    e = max(rel(got["y"], ref["y"]), rel(got["hist"], ref["hist"]))
                    n += 1
                    worst = max(worst, e)
                    if not e <= KERNEL_TOL:
                        fails.append(f"B={B} D={D} d={str(ddtype)[6:]} {'strided' if strided else 'contiguous'}: {e:.2e}")
    rep.add("kernel", f"Triton vs torch update, {n} cases (B {Bs}, D {Ds}, d fp32/bf16, contiguous/row-strided, "
                      "mixed CFG rows)", not fails, worst, KERNEL_TOL, "; ".join(fails[:4]))


# -- graphs -----------------------------------------------------------------------------------------

def dit(layers, heads, head_dim, channels, size, classes, seed=0):
    import diffusers

    torch.manual_seed(seed)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=channels, out_channels=2 * channels,
        num_layers=layers, sample_size=size, patch_size=2, num_embeds_ada_norm=classes,
        norm_num_groups=min(32, heads * head_dim)).eval().requires_grad_(False)


def dit_config(a):
    """(layers, heads, head dim, latent size) of the served / graphs DiT."""
    return (2, 2, 16, 8) if a.tiny else (6, 6, 64, 32)


def check_graphs(a, dev, rep):
    from stride_diffusion.solvers.adapters import DiscreteIndex
    from stride_diffusion.solvers.schedules import VPSchedule

    L, H, hd, S = dit_config(a)
    cuda = dev.type == "cuda"
    buckets = [4, 16]
    for dt, tol_pad in (("float32", 2e-3), ("bfloat16", 2e-2)):
        model = DiscreteIndex(dit(L, H, hd, 4, S, 10).to(dev), VPSchedule(), "eps", (4, S, S), 10)
        net = Network(model, dtype_of(dt), buckets=buckets, graphs=cuda, static=not cuda)
        same, pad = [], []
        with torch.inference_mode():
            net.capture()
            g = torch.Generator().manual_seed(1)
            for R in (3, 16, 11, 1, 4):
                x = torch.randn(R, 4, S, S, generator=g).to(dev)
                t = torch.rand(R, generator=g).to(dev) * 0.98 + 0.01
                lab = torch.randint(0, 11, (R,), generator=g).to(dev)  # 10 = the null class
                got = net(x, t, t, lab).float().clone()
                k = net.bucket(R)
                # the same padded batch, eager: what the replay must reproduce
                px, pt, pl = k.x.clone(), k.t.clone(), k.label.clone()
                ref_same = net.eager(px, pt, pt, pl)[:R].float()
                ref_plain = net.eager(x, t, t, lab).float()  # R rows: other kernels may run, other roundings
                same.append((rms_rel(got, ref_same), rel(got, ref_same)))
                pad.append((rms_rel(got, ref_plain), rel(got, ref_plain)))
        mode = "CUDA graph replay" if cuda else "static bucket (no graphs off CUDA)"
        worst = max(e for e, _ in same)
        rep.add("graphs", f"{dt}: {mode} vs eager on the same padded batch ({len(same)} calls of 3, 16, 11, 1, 4 "
                          f"rows, buckets {buckets}), RMS error / RMS", worst <= 1e-3, worst, 1e-3,
                f"max |diff| / RMS {max(m for _, m in same):.1e}")
        worst = max(e for e, _ in pad)
        rep.add("graphs", f"{dt}: padded bucket rows vs an unpadded eager call, RMS error / RMS", worst <= tol_pad,
                worst, tol_pad, f"max |diff| / RMS {max(m for _, m in pad):.1e}")
        del net, model
        if cuda:
            torch.cuda.empty_cache()


def vae(seed=1):
    """A tiny AutoencoderKL (2 blocks of 8 and 16 channels): latents 4xHxW -> images 3x2Hx2W."""
    import diffusers

    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
        layers_per_block=1).eval()


def ddim(**kw):
    import diffusers

    return diffusers.DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False,
                                   set_alpha_to_one=False, steps_offset=1, **kw)


# -- served DiT -------------------------------------------------------------------------------------

def served_artifact(a, tmp):
    """The served DiT with a tiny VAE (the decoder is not what this check is about) as an artifact."""
    from stride_diffusion.offline.importer import import_diffusers

    L, H, hd, S = dit_config(a)
    src = os.path.join(tmp, "served-src")
    dit(L, H, hd, 4, S, 10).save_pretrained(os.path.join(src, "transformer"))
    vae().save_pretrained(os.path.join(src, "vae"))
    return str(import_diffusers(os.path.join(src, "transformer"), os.path.join(tmp, "served"), name="served",
                                vae=os.path.join(src, "vae"), dtype="float32"))


def requests(n):
    """(id, steps, guidance, label, seed): every step count at every scale, in an interleaved order."""
    return [(f"r{i}", STEPS[i % 4], (1.0, 1.5, 4.0)[i % 3], i % 10, 100 + i) for i in range(n)]


def cpu_reference(entry, reqs):
    """Final states [N, *shape] from the float32 CPU model with the torch update, one batch."""
    from stride_diffusion.solvers.executor import sample, seeded_noise

    tables = [entry.samplers.resolve(s, "auto", w).table(s) for _, s, w, _, _ in reqs]
    noise = seeded_noise([sd for *_, sd in reqs], entry.shape)
    with torch.inference_mode():
        return sample(entry.model, tables, noise, torch.tensor([lab for *_, lab, _ in reqs]),
                      [w for _, _, w, _, _ in reqs], update=fused_update_torch)


def engine_kw(**kw):
    from stride_diffusion.service.engine import Engine

    params = inspect.signature(Engine.__init__).parameters
    return {k: v for k, v in kw.items() if k in params}


def run_engine(entry, reqs, dev, update, max_batch, step_graph=True):
    """The worker's engine on `dev`: requests join in two waves between steps; returns
    ({id: final state on the CPU}, {id: uint8 image}, steps run by the whole-step graph).
    step_graph False: the network's graphs only, the rest of the step eager."""
    from stride_diffusion.service.engine import Engine
    from stride_diffusion.service.jobs import Job
    from stride_diffusion.service.models import Registry
    from stride_diffusion.service.worker import buckets

    cuda = dev.type == "cuda"
    eng = Engine(Registry([entry]), list(STEPS), str(dev), None, None, cuda, buckets(max_batch),
                 **engine_kw(update=update, static=not cuda))
    states = {}
    for st in eng.steppers.values():  # keep the final states the engine decodes, to compare with the reference
        pop = st.pop_done_batch

        def wrapped(pop=pop):
            done = pop()
            for (jid, _), v in zip(done.ids, done.states.float().cpu()):
                states[jid] = v
            return done
        st.pop_done_batch = wrapped
    images = {}
    samplers = {jid: entry.samplers.resolve(s, "auto", w) for jid, s, w, _, _ in reqs}
    tables = {jid: samplers[jid].table(s) for jid, s, *_ in reqs}  # outside inference mode (autograd)
    graph_steps = []
    for st in eng.steppers.values():
        if not step_graph or getattr(st, "graph", None) is None:
            st.graph = None
            continue
        step = st.graph.step
        st.graph.step = lambda b, *args, step=step: (graph_steps.append(b), step(b, *args))
    with torch.inference_mode():
        for net in eng.networks():
            net.capture()
        if step_graph and hasattr(eng, "capture_steps"):
            eng.capture_steps()
        waves = [reqs[: len(reqs) // 2], reqs[len(reqs) // 2:]]
        for i in range(200):
            if i in (0, 2) and waves:
                for jid, s, w, lab, seed in waves.pop(0):
                    sampler = samplers[jid]
                    job = Job(jid, entry.name, s, sampler.name, lab, 1, seed, w, "png", 1e18, 0.0)
                    eng.add(job, tables[jid], 0, 1, sampler.rows_per_image(w))
            out = eng.step()
            eng.release(out)
            images.update({jid: img for jid, _, img in out})
            if not waves and not eng.busy:
                break
    return states, images, graph_steps


def pixels(entry, y):
    """Final states -> uint8 images [N, H, W, C], as the engine makes them (decoder, then quantise)."""
    from stride_diffusion.service.images import quantize

    if entry.decoder.kind == "identity":
        return quantize(y.reshape(-1, *entry.decoder.image_shape), entry.data_range)
    return quantize(entry.decoder.decode(y.float()), (-1.0, 1.0))


def check_served(a, dev, rep, tmp):
    from stride_diffusion.service.models import ModelEntry

    art = served_artifact(a, tmp)
    reqs = requests(12)
    ref_entry = ModelEntry.from_artifact(art, "cpu", "fp32", steps=list(STEPS))
    ref = cpu_reference(ref_entry, reqs)
    with torch.inference_mode():
        ref_px = pixels(ref_entry, ref).numpy()
    L, H, hd, S = dit_config(a)
    what = f"DiT {L} layers width {H * hd}, learned sigma, 4x{S}x{S}"
    for dt in ("bfloat16", "float32"):
        entry = ModelEntry.from_artifact(art, str(dev), dt, steps=list(STEPS))
        t0 = time.perf_counter()
        states, images, graph_steps = run_engine(entry, reqs, dev, a.update, 32)  # <= 24 rows: all in buckets
        secs = time.perf_counter() - t0
        missing = [r[0] for r in reqs if r[0] not in states or r[0] not in images]
        if missing:
            rep.add("served", f"{dt}: every request finished", False, detail=f"missing {missing}")
            continue
        # per request: RMS error over the sample's RMS, divided by the guidance's amplification
        errs = [rms_rel(states[jid], ref[i]) / (2 * w - 1) for i, (jid, _, w, *_) in enumerate(reqs)]
        raw = max(rms_rel(states[jid], ref[i]) for i, (jid, *_) in enumerate(reqs))
        worst = max(errs)
        by_steps = {s: max(e for e, r in zip(errs, reqs) if r[1] == s) for s in STEPS}
        by_w = {w: max(e for e, r in zip(errs, reqs) if r[2] == w) for w in (1.0, 1.5, 4.0)}
        px = max(float(np.abs(images[jid].astype(np.int16) - ref_px[i].astype(np.int16)).mean())
                 for i, (jid, *_) in enumerate(reqs))
        tol = SERVED_TOL[dt]
        rep.add("served", f"{dt} ({what}, update {a.update}): engine on {dev.type} vs float32 CPU reference, "
                          f"{len(reqs)} requests, steps 1/2/4/8 x guidance 1/1.5/4",
                worst <= tol, worst, tol,
                "by steps " + ", ".join(f"{s}: {e:.1e}" for s, e in by_steps.items())
                + "; by guidance " + ", ".join(f"{w:g}: {e:.1e}" for w, e in by_w.items())
                + f"; not divided by 2w - 1: {raw:.1e}; images mean |diff| {px:.2f} levels (worst request); "
                  f"{secs:.1f} s")
        # the whole step as one graph (solvers/step_graph.py) against the network's graphs alone
        plain, _, _ = run_engine(entry, reqs, dev, a.update, 32, step_graph=False)
        diff = max(rms_rel(states[jid], plain[jid]) for jid, *_ in reqs)
        mode = "replayed" if dev.type == "cuda" else "eager on its static buffers"
        rep.add("served", f"{dt} whole-step graph ({mode}, {len(graph_steps)} steps) vs the network's graphs "
                          "alone, same requests, RMS error / RMS", bool(graph_steps) and diff <= STEP_GRAPH_TOL,
                diff, STEP_GRAPH_TOL, "bit for bit" if diff == 0 else "")
        del entry
        if dev.type == "cuda":
            torch.cuda.empty_cache()


# -- the service, one request per adapter kind ------------------------------------------------------

def diffusers_to_dit(sd: dict, depth: int) -> dict:
    """A diffusers DiT's weights in the DiT repository's layout (block 0's embedder: DiT has one)."""
    b0 = "transformer_blocks.0.norm1.emb."
    out = {"x_embedder.proj.weight": sd["pos_embed.proj.weight"], "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
           "y_embedder.embedding_table.weight": sd[b0 + "class_embedder.embedding_table.weight"],
           "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
           "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
           "final_layer.linear.weight": sd["proj_out_2.weight"], "final_layer.linear.bias": sd["proj_out_2.bias"]}
    for p in ("weight", "bias"):
        out[f"t_embedder.mlp.0.{p}"] = sd[f"{b0}timestep_embedder.linear_1.{p}"]
        out[f"t_embedder.mlp.2.{p}"] = sd[f"{b0}timestep_embedder.linear_2.{p}"]
    for i in range(depth):
        n, b = f"transformer_blocks.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{b}attn.qkv.{p}"] = torch.cat([sd[f"{n}attn1.to_{c}.{p}"] for c in "qkv"])
            out[f"{b}attn.proj.{p}"] = sd[f"{n}attn1.to_out.0.{p}"]
            out[f"{b}mlp.fc1.{p}"] = sd[f"{n}ff.net.0.proj.{p}"]
            out[f"{b}mlp.fc2.{p}"] = sd[f"{n}ff.net.2.{p}"]
            out[f"{b}adaLN_modulation.1.{p}"] = sd[f"{n}norm1.linear.{p}"]
    return out


def kind_artifacts(tmp) -> dict:
    """{kind: artifact dir}: the two trained stride artifacts and three tiny imported networks."""
    import diffusers

    from stride_diffusion.offline.importer import import_diffusers, import_dit_checkpoint

    out = {"stride flow": os.path.join(ROOT, "artifacts", "digits"),
           "stride VP": os.path.join(ROOT, "artifacts", "digits-vp")}
    src = os.path.join(tmp, "src")
    diffusers.DiTPipeline(transformer=dit(2, 2, 8, 4, 8, 10, seed=3), vae=vae(), scheduler=ddim()).save_pretrained(
        os.path.join(src, "dit"))
    out["diffusers DiT, learned sigma"] = str(import_diffusers(os.path.join(src, "dit"), os.path.join(tmp, "k-dit"),
                                                               name="k-dit"))
    torch.manual_seed(2)
    unet = diffusers.UNet2DModel(
        sample_size=(8, 8), in_channels=3, out_channels=3, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, norm_num_groups=4, attention_head_dim=4, num_class_embeds=11).eval()
    diffusers.DDPMPipeline(unet=unet, scheduler=ddim(prediction_type="v_prediction")).save_pretrained(
        os.path.join(src, "unet"))
    out["diffusers UNet, v-prediction"] = str(import_diffusers(os.path.join(src, "unet"), os.path.join(tmp, "k-unet"),
                                                               name="k-unet"))
    net = dit(2, 2, 8, 4, 8, 10, seed=4)
    sd = diffusers_to_dit(net.state_dict(), 2)
    sd["pos_embed"] = net.pos_embed.pos_embed.clone()  # the fixed sin-cos table, saved as DiT / SiT do
    torch.save(sd, os.path.join(src, "SiT-tiny.pt"))
    vae(5).save_pretrained(os.path.join(src, "sit-vae"))
    out["SiT (reversed flow)"] = str(import_dit_checkpoint(
        os.path.join(src, "SiT-tiny.pt"), os.path.join(tmp, "k-sit"), name="k-sit", schedule="flow", heads=2,
        vae=os.path.join(src, "sit-vae")))
    return out


class InProcessServer:
    """The API with its embedded worker (create_app under uvicorn on a thread), on a free port."""

    def __init__(self, settings):
        import socket

        import uvicorn

        from stride_diffusion.service.app import create_app

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app = create_app(settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.server.serve(),), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout):
        import httpx

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread ended")
            try:
                if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"the service was not ready after {timeout} s")

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


def reference_image(entry, label, seed, steps, w):
    """The image the executor makes alone on the CPU in float32 (what the engine does, unbatched)."""
    from stride_diffusion.service.images import upscale
    from stride_diffusion.solvers.executor import sample, seeded_noise

    sampler = entry.samplers.resolve(steps, "auto", w)
    table = sampler.table(steps)  # outside inference mode: a schedule's derivatives use autograd
    with torch.inference_mode():
        y = sample(sampler.model, table, seeded_noise([seed], entry.shape), torch.tensor([label]),
                   w, update=fused_update_torch)
        a = pixels(entry, y)[0].numpy()
    return upscale(a[..., 0] if a.shape[-1] == 1 else a, entry.display_scale)


def check_service(a, dev, rep, tmp):
    import httpx

    from stride_diffusion.service import images
    from stride_diffusion.service.models import ModelEntry
    from stride_diffusion.service.settings import Settings

    kinds = kind_artifacts(tmp)
    offered = [1, 2, 4]
    fields = Settings.model_fields
    kw = {"update": a.update} if "update" in fields else {}
    s = Settings(artifacts=list(kinds.values()), device=str(dev), steps=offered, default_steps=4, max_batch=8,
                 **kw)
    t0 = time.perf_counter()
    srv = InProcessServer(s)
    try:
        srv.wait_ready(a.ready_timeout)
        rep.add("service", f"ready on {dev.type} with {len(kinds)} models (update {a.update})", True,
                detail=f"{time.perf_counter() - t0:.1f} s")
        for (kind, path), (steps, w) in zip(kinds.items(), [(4, 2.0), (2, 1.5), (4, 4.0), (2, 2.0), (1, 3.0)]):
            with open(os.path.join(path, "model.json")) as f:
                name = json.load(f)["name"]
            q = {"model": name, "class_label": 3, "seed": 11, "steps": steps, "guidance": w, "format": "png"}
            try:
                r = httpx.post(srv.url + "/generate", params=q, timeout=120)
                if r.status_code != 200 or r.headers.get("content-type") != "image/png":
                    rep.add("service", f"{kind} ({name})", False, detail=f"HTTP {r.status_code}: {r.text[:300]}")
                    continue
                got = images.decode(r.content)
                want = reference_image(ModelEntry.from_artifact(path, "cpu", "fp32", steps=offered), 3, 11, steps, w)
                if got.shape != want.shape:
                    rep.add("service", f"{kind} ({name})", False, detail=f"image {got.shape}, reference {want.shape}")
                    continue
                diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
                rep.add("service", f"{kind} ({name}): PNG {got.shape} at steps {steps}, guidance {w:g}, solver "
                                   f"{r.headers.get('x-stride-solver')} vs the CPU reference", diff.mean() <= SERVICE_TOL,
                        float(diff.mean()), SERVICE_TOL, f"max |diff| {int(diff.max())}")
            except Exception as e:
                rep.add("service", f"{kind} ({name})", False, detail=f"{type(e).__name__}: {e}")
    finally:
        srv.stop()


# -- main -------------------------------------------------------------------------------------------

def render(rep, meta) -> str:
    lines = [f"# GPU check ({meta['device_name']})", "",
             f"- date: {meta['date']}", f"- machine: {meta['machine']}", f"- versions: {meta['versions']}",
             f"- update: {meta['update']}; command: `python benchmarks/gpu_check.py {' '.join(meta['argv'])}`",
             f"- result: {meta['passed']} passed, {meta['failed']} failed", "",
             "| check | what | status | value | limit | detail |", "|---|---|---|---:|---:|---|"]
    for r in rep.rows:
        v = "" if r["value"] is None else f"{r['value']:.3g}"
        lim = "" if r["limit"] is None else f"{r['limit']:g}"
        lines.append(f"| {r['check']} | {r['name']} | {r['status']} | {v} | {lim} | {r['detail']} |")
    return "\n".join(lines) + "\n"


def versions() -> str:
    out = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for mod in ("triton", "diffusers"):
        try:
            out.append(f"{mod} {__import__(mod).__version__}")
        except Exception:
            out.append(f"{mod} missing")
    if torch.cuda.is_available():
        out.append(f"CUDA {torch.version.cuda}")
    return ", ".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--update", default=None, help="the service's update: auto | torch | triton (default: auto on "
                                                   "CUDA, triton off it: the kernel in Triton's interpreter)")
    ap.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated, of {list(CHECKS)}")
    ap.add_argument("--tiny", action="store_true", help="tiny networks and batches (the CPU smoke test)")
    ap.add_argument("--ready-timeout", type=float, default=180.0, help="seconds for the service to warm up")
    ap.add_argument("--out", help="markdown report; a .json beside it")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda, but torch sees no CUDA device")
        torch.cuda.set_device(dev)
        enable_tf32()  # as the worker does
    a.update = a.update or ("auto" if dev.type == "cuda" else "triton")
    checks = [c for c in a.checks.split(",") if c]
    unknown = sorted(set(checks) - set(CHECKS))
    if unknown:
        sys.exit(f"unknown checks {unknown}; allowed: {list(CHECKS)}")
    rep = Report()
    tmp = tempfile.mkdtemp(prefix="stride-gpu-check-")
    t_all = time.perf_counter()
    try:
        for c in checks:
            t0 = time.perf_counter()
            try:
                fn = globals()[f"check_{c}"]
                fn(a, dev, rep, tmp) if c in ("served", "service") else fn(a, dev, rep)
            except Exception as e:
                traceback.print_exc()
                rep.add(c, "ran to the end", False, detail=f"{type(e).__name__}: {str(e)[:300]}")
            print(f"-- {c}: {time.perf_counter() - t0:.1f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    failed = sum(r["status"] == "FAIL" for r in rep.rows)
    meta = {"device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(), "versions": versions(), "update": a.update, "tiny": a.tiny,
            "argv": sys.argv[1:] if argv is None else list(argv), "passed": len(rep.rows) - failed, "failed": failed,
            "seconds": time.perf_counter() - t_all}
    text = render(rep, meta)
    print(f"{meta['passed']} passed, {failed} failed ({meta['seconds']:.1f} s)")
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text)
        with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
            json.dump({**meta, "rows": rep.rows}, f, indent=1)
    return 1 if failed or not rep.rows else 0


if __name__ == "__main__":
    sys.exit(main())
