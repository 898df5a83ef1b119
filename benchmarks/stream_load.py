"""Streams beside plain requests: does serving 64 streamed generations slow the 64 plain ones beside
them? A ratio of the plain clients' throughput, not a timing assertion.

One embedded `stride serve` (a subprocess). Closed loop over loopback: `--plain` clients send
POST /generate one after another (n = 1), and `--other` clients beside them run one of three loads
of the same work:

- plain: more plain POST /generate (the run without streams: the same total work);
- stream: POST /generate/stream, read to `done` (queued, started, each step, the image);
- preview: the same with preview=1 (a preview event every step).

The figure is the plain clients' images/s under each load; its ratio to the `plain` load is the
cost of the streams to everyone else (the goal: >= 0.9). Loads are interleaved round by round and
each mode's figure is the median of `--rounds` (the machine may be shared).

    python benchmarks/stream_load.py --out benchmarks/results/stream_load_cpu.md
    python benchmarks/stream_load.py --test-model gmm --duration 3 --rounds 1     # a quick look
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

import httpx
from report import publish  # benchmarks/report.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("plain", "stream", "preview")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def plain_client(c: httpx.AsyncClient, body: dict, until: float, count: list, i: int):
    while time.monotonic() < until:
        r = await c.post("/generate", json={**body, "seed": i}, timeout=120)
        r.raise_for_status()
        count[0] += time.monotonic() <= until  # what finishes after the window is not counted


async def stream_client(c: httpx.AsyncClient, body: dict, until: float, count: list, i: int):
    while time.monotonic() < until:
        async with c.stream("POST", "/generate/stream", json={**body, "seed": i}, timeout=120) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("event: done"):
                    count[0] += time.monotonic() <= until
                elif line.startswith("event: error"):
                    raise RuntimeError(f"stream error: {await r.aread()}")


async def one_run(url: str, mode: str, a) -> dict:
    body = {"class_label": 3, "steps": a.steps}
    limits = httpx.Limits(max_connections=a.plain + a.other + 8, max_keepalive_connections=a.plain + a.other + 8)
    async with httpx.AsyncClient(base_url=url, limits=limits) as c:
        measured, beside = [0], [0]
        until = time.monotonic() + a.duration
        other = plain_client if mode == "plain" else stream_client
        other_body = {**body, "preview": True} if mode == "preview" else body
        await asyncio.gather(*[plain_client(c, body, until, measured, i) for i in range(a.plain)],
                             *[other(c, other_body, until, beside, 10_000 + i) for i in range(a.other)])
    return {"plain_per_s": measured[0] / a.duration, "other_per_s": beside[0] / a.duration}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", default=os.path.join(ROOT, "artifacts", "digits"))
    ap.add_argument("--test-model", default=None, help="the analytic model instead of an artifact (e.g. gmm)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--plain", type=int, default=64, help="measured plain clients")
    ap.add_argument("--other", type=int, default=64, help="clients of the load beside them")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    ap.add_argument("--out", help="markdown report; a .json beside it")
    a = ap.parse_args(argv)
    port = free_port()
    model = ["--test-model", a.test_model] if a.test_model else ["--artifacts", a.artifact]
    cmd = [sys.executable, "-m", "stride_diffusion.service.cli", "serve", *model, "--port", str(port),
           "--threads", str(a.threads), "--steps", str(a.steps), "--max-batch", "256",
           "--queue-limit", str(4 * (a.plain + a.other)), "--log-level", "warning"]
    srv = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > end or srv.poll() is not None:
                raise SystemExit("the server did not become ready")
            time.sleep(0.3)
        warm = argparse.Namespace(**{**vars(a), "duration": 2.0})
        asyncio.run(one_run(url, "preview", warm))
        rows = {m: [] for m in MODES}
        for _ in range(a.rounds):
            for m in MODES:
                rows[m].append(asyncio.run(one_run(url, m, a)))
                print(m, rows[m][-1], flush=True)
    finally:
        srv.terminate()
        srv.wait(30)
    med = {m: {k: statistics.median(r[k] for r in rows[m]) for k in rows[m][0]} for m in MODES}
    base = med["plain"]["plain_per_s"]
    when = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}"
    command = "python benchmarks/stream_load.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"# {a.plain} plain clients beside {a.other} streamed ones ({a.test_model or os.path.basename(a.artifact)}, "
             f"{a.steps} steps, embedded)", "",
             f"- date: {when}", f"- machine: {machine()}; server torch threads {a.threads}",
             f"- command: `{command.strip()}`",
             f"- {a.duration:g} s per run, median of {a.rounds} interleaved rounds", "",
             f"| load beside the {a.plain} plain clients | plain images/s | vs plain load | the other {a.other}: images/s |",
             "|---|---:|---:|---:|"]
    names = {"plain": f"{a.other} plain (no streams)", "stream": f"{a.other} streamed",
             "preview": f"{a.other} streamed, preview=1"}
    for m in MODES:
        x = med[m]
        lines.append(f"| {names[m]} | {x['plain_per_s']:.1f} | {x['plain_per_s'] / base:.2f} | {x['other_per_s']:.1f} |")
    text = "\n".join(lines) + "\n"
    publish(text, {"date": when, "machine": machine(), "command": command.strip(), "rounds": rows, "median": med}, a.out)


if __name__ == "__main__":
    main()
