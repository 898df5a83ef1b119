"""The cost of streamed previews: images/s of the worker's engine with and without them, and where
the preview time goes.

The engine is fed directly (no HTTP, no queue): `--batch` images at `--steps` steps, admitted
together, stepped until done. Modes, interleaved round by round (the machine may be shared, so each
mode's figure is the median of `--rounds`):

- off: no request asks for previews (`Engine.step` pays one dict check);
- every k (`--every`, default 1 and 4): every image asks for a preview every k steps.

The split (per previewed step, summed over the batch): `before` (choose the rows, the table
coefficients, copy y_k), `after` (x0 from the history entry, the cheapest decoder, pool, quantise,
to the host) and `encode` (PNG + base64 of each preview: what the worker does on its event loop,
outside the step thread, so it is not in the images/s).

    python benchmarks/previews.py --out benchmarks/results/previews_cpu.md
    python benchmarks/previews.py --test-model gmm --rounds 3      # the analytic model: a quick look
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from report import publish  # benchmarks/report.py

from stride_diffusion.service import previews as pv_mod
from stride_diffusion.service.engine import Engine
from stride_diffusion.service.jobs import Job
from stride_diffusion.service.models import load_registry
from stride_diffusion.service.settings import Settings


class Split:
    """Wall time of Previews.before / after, and of encoding what they made."""

    def __init__(self, previews):
        self.before = self.after = self.encode = 0.0
        self.frames = 0
        previews.before, previews.after = self.timed(previews.before, "before"), self.timed(previews.after, "after")

    def timed(self, fn, field: str):
        def call(*args):
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                setattr(self, field, getattr(self, field) + time.perf_counter() - t0)
        return call


def run(engine: Engine, entry, steps: int, batch: int, every: int, round_: int) -> dict:
    """One batch through the engine; images/s and the preview split."""
    split = Split(engine.previews) if every else None
    sampler = entry.samplers.resolve(steps)
    table = sampler.table(steps)
    jobs = [Job(f"r{round_}-{i}", entry.name, steps, sampler.name, i % entry.num_classes, 1, i, 1.0, "png", 1e12, 0.0,
                preview=every) for i in range(batch)]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    for job in jobs:
        engine.add(job, table, 0, 1, 1)
    done = 0
    while engine.busy:
        out = engine.step()
        engine.release(out)
        done += len(out)
        if split is not None:
            shots = engine.previews.take()
            t1 = time.perf_counter()
            for s in shots:
                pv_mod.event(*s)
            split.encode += time.perf_counter() - t1
            split.frames += len(shots)
    wall = time.perf_counter() - t0 - (split.encode if split else 0.0)  # encoding is off the step thread
    assert done == batch
    r = {"images_per_s": batch / wall, "wall_s": wall}
    if split is not None:
        r.update(before_ms=1e3 * split.before, after_ms=1e3 * split.after, encode_ms=1e3 * split.encode,
                 frames=split.frames)
    return r


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (torch threads "
            f"{torch.get_num_threads()}), {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", default=os.path.join(ROOT, "artifacts", "digits"))
    ap.add_argument("--test-model", default=None, help="the analytic model instead of an artifact (e.g. gmm)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--every", default="1,4", help="preview intervals to measure, comma-separated")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="markdown report; a .json beside it")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    s = Settings(test_model=a.test_model, artifacts=[] if a.test_model else [a.artifact], steps=[a.steps])
    registry = load_registry(s)
    entry = next(iter(registry))
    engine = Engine(registry, [a.steps], "cpu")
    modes = [0] + [int(k) for k in a.every.split(",")]
    rows: dict[int, list] = {m: [] for m in modes}
    with torch.inference_mode():
        run(engine, entry, a.steps, a.batch, 0, -1)  # warm-up
        run(engine, entry, a.steps, a.batch, 1, -2)
        for r in range(a.rounds):
            for m in modes:
                rows[m].append(run(engine, entry, a.steps, a.batch, m, r))
    med = {m: {k: statistics.median(x[k] for x in rows[m]) for k in rows[m][0]} for m in modes}
    base = med[0]["images_per_s"]
    when = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}"
    cmd = "python benchmarks/previews.py " + " ".join(argv if argv is not None else sys.argv[1:])
    dec, lin = pv_mod.cheapest_decoder(entry)
    decoder = "identity (pixel model)" if dec is None and lin is None else "linear map" if lin else dec.kind
    lines = [f"# Preview cost: images/s with and without previews ({entry.name}, {a.steps} steps, batch {a.batch})", "",
             f"- date: {when}", f"- machine: {machine()}",
             f"- command: `{cmd.strip()}`",
             f"- preview decoder: {decoder}; median of {a.rounds} interleaved rounds", "",
             "| previews | images/s | vs off | frames | before ms | after ms | encode ms | ms per frame (before+after) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in modes:
        x = med[m]
        if m == 0:
            lines.append(f"| off | {x['images_per_s']:.1f} | 1.00 | 0 | | | | |")
            continue
        per = (x["before_ms"] + x["after_ms"]) / max(x["frames"], 1)
        lines.append(f"| every {m} | {x['images_per_s']:.1f} | {x['images_per_s'] / base:.2f} | {x['frames']:.0f} | "
                     f"{x['before_ms']:.1f} | {x['after_ms']:.1f} | {x['encode_ms']:.1f} | {per:.3f} |")
    lines += ["", "`before`, `after`: time inside the step thread for the whole batch (in images/s); `encode`: PNG + "
              "base64 of the frames, on the worker's event loop (not in images/s). `off` is the engine as every plain "
              "request runs it."]
    text = "\n".join(lines) + "\n"
    publish(text, {"date": when, "machine": machine(), "command": cmd.strip(), "model": entry.name,
                   "steps": a.steps, "batch": a.batch, "rounds": rows, "median": med}, a.out)


if __name__ == "__main__":
    main()
