"""Load benchmark of `stride serve`: throughput and latency per step count and concurrency, in the
embedded and the Redis modes, against the ceiling of the same model making the same images with the
worker's engine fed directly (no HTTP, no queue). The result is a ratio: service images/s / ceiling.

Closed loop: `c` clients over loopback (httpx, one HTTP/1.1 keep-alive connection each), each
sending its next request when the last one returns (n = 1, class i mod K, seed i). Every run is bounded in time and in
requests. The servers run as subprocesses; CPU seconds per image of every process are read from
/proc, so the report can say where the time goes.

    python benchmarks/load.py --out benchmarks/results/load_cpu.md        # artifacts/digits if present
    python benchmarks/load.py --test-model gmm --steps 4 --concurrency 1,8 --duration 3   # quick look
    python benchmarks/load.py --steps mixed --concurrency 32     # each request 1, 2, 4 or 8 steps (uniform)

Step count `mixed`: request i asks for steps drawn uniformly from 1, 2, 4, 8 (seeded by i), so requests of
different lengths share the worker's batches; its ceiling is the engine kept at the same occupancy.
Guidance (`--guidance`, one run per spec): `1` (off) or scales joined by `/`, e.g. `1.5/4`: request i
asks for one of them, drawn by i (as DiT users run it: guided, PNG). Every row also gives the latency
percentiles of each step count separately (`by_steps`), the mixed rows' table in the report.

Timing on CUDA: the ceiling's split (network, update, decode) is CUDA events around those launches
(`Clock`), summed once the run has finished, not wall time around asynchronous launches. The
service's split comes from its Prometheus metrics, which the worker takes with perf_counter: on CUDA
that is the host's launch time, not the GPU's (the report says so).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import random
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

import httpx
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from report import publish  # benchmarks/report.py

from stride_diffusion.service.engine import Engine
from stride_diffusion.service.jobs import Job
from stride_diffusion.service.models import ModelEntry, Registry, analytic_entry
from stride_diffusion.solvers.contracts import guidance_input, guidance_range

TICK = os.sysconf("SC_CLK_TCK")
MIXED = (1, 2, 4, 8)
SPLIT_TIMING = {
    False: "CPU: wall time (perf_counter) of each part, synchronous on the CPU",
    True: ("CUDA: the ceiling's network, update and decode are CUDA events around their launches (device "
           "time); the service's step and decode are the worker's perf_counter around asynchronous launches "
           "(host launch time, not GPU time: stride_diffusion/service/engine.py times them so)")}


def steps_of(s, i: int) -> int:
    """The step count of request i: `s`, or for 'mixed' uniform over MIXED (seeded by i)."""
    return random.Random(i).choice(MIXED) if s == "mixed" else int(s)


def guidance_scales(spec: str) -> list[float]:
    """'1' -> [1.0]; '1.5/4' -> [1.5, 4.0]."""
    return [float(v) for v in str(spec).split("/") if v.strip()]


def guidance_of(spec: str, i: int) -> float:
    """The guidance scale of request i: one of the spec's scales, drawn by i (independently of its steps)."""
    ws = guidance_scales(spec)
    return ws[0] if len(ws) == 1 else random.Random(f"w{i}").choice(ws)


class Clock:
    """Time spent in regions of the executor's loop. CPU: perf_counter around each region. CUDA: a
    pair of CUDA events around each region's launches, read once at `seconds()` (after a sync), so
    the number is the device's time from the region's first launch to its last kernel's end, not
    the host's time to launch it."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.s, self.pairs = 0.0, []

    def start(self):
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def stop(self, t0):
        if not self.cuda:
            self.s += time.perf_counter() - t0
            return
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        self.pairs.append((t0, ev))

    def wrap(self, fn):
        def timed(*args, **kw):
            t0 = self.start()
            out = fn(*args, **kw)
            self.stop(t0)
            return out
        return timed

    def seconds(self) -> float:
        if self.pairs:
            torch.cuda.synchronize()
            self.s += sum(a.elapsed_time(b) for a, b in self.pairs) / 1e3
            self.pairs = []
        return self.s

    def reset(self):
        self.seconds()
        self.s = 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """user + system CPU of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def main_thread_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/task/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def machine_busy_seconds() -> float:
    """CPU seconds all processes have used (non-idle jiffies in /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / TICK  # minus idle and iowait


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def wait_ready(url: str, procs, timeout=180):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args} exited with {p.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("server not ready")


# -- the ceiling -------------------------------------------------------------------------------------

class _Timed:
    """A model whose calls are timed by `clock` (a Clock)."""

    def __init__(self, inner, clock: Clock):
        self.inner, self.clock = inner, clock
        self.schedule, self.param, self.num_classes, self.shape = inner.schedule, inner.param, inner.num_classes, inner.shape
        self.guidance_input, self.guidance_range = guidance_input(inner), guidance_range(inner)

    def __call__(self, *args):
        t0 = self.clock.start()
        out = self.inner(*args)
        self.clock.stop(t0)
        return out


def ceiling(entry: ModelEntry, steps, occupancy: int, seconds: float, split: bool = False, device: str = "cpu",
            dtype: str | None = None, graphs: bool = True, guidance: str = "1"):
    """The executor's ceiling: the service's engine (Stepper, fused update, quantisation to uint8) fed
    directly, kept at `occupancy` images (the most a closed loop of that many clients keeps in flight),
    each a request of n = 1 with the step count of `steps_of(steps, i)` and the guidance scale of
    `guidance_of(guidance, i)`, the sampler the service picks. Returns (images/s, CPU ms per image,
    {network, update, decode, rest} seconds per image when split: perf_counter on the CPU, CUDA
    events on CUDA (see Clock); rest = wall time less the three). The images/s and CPU time are the
    engine's as the worker runs it (the whole step as one graph per bucket where it has one); the
    split comes from a second run of half the time with the step's launches separate (a graph's
    inside cannot be timed), so its parts add up to that run's time per image, not to 1 / images/s."""
    from stride_diffusion.service.worker import buckets

    eng = Engine(Registry([entry]), sorted(set(MIXED) | ({int(steps)} if steps != "mixed" else set())), device,
                 dtype=dtype, graphs=graphs, buckets=buckets(max(2, occupancy * 2)))
    with torch.inference_mode():
        for net in eng.networks():
            net.capture()
        eng.capture_steps()
    K = entry.num_classes
    clocks = {k: Clock(device) for k in ("network", "update", "decode")}
    tables = {}
    for n in (MIXED if steps == "mixed" else [int(steps)]):  # outside inference mode: tables may use autograd
        for w in guidance_scales(guidance):
            solver = entry.samplers.resolve(n, "auto", w).name
            if (solver, n) not in tables:
                tables[solver, n] = entry.samplers[solver].table(n)

    def admit(i):
        n, w = steps_of(steps, i), guidance_of(guidance, i)
        sampler = entry.samplers.resolve(n, "auto", w)
        if (sampler.name, n) not in tables:
            tables[sampler.name, n] = sampler.table(n)
        job = Job(f"c{i}", entry.name, n, sampler.name, i % K, 1, i, w, "png", 1e18, 0.0)
        eng.add(job, tables[sampler.name, n], 0, 1, sampler.rows_per_image(w))

    i = 0
    for i in range(occupancy):
        admit(i)

    def run(seconds):
        """Warm, then step for `seconds`: (images, wall seconds, CPU seconds)."""
        nonlocal i
        done = 0
        with torch.inference_mode():
            warm_end = time.perf_counter() + min(1.0, seconds / 3)
            while True:
                out = eng.step()
                eng.release(out)
                for _ in out:
                    i += 1
                    admit(i)
                if time.perf_counter() >= warm_end:
                    break
            for c in clocks.values():
                c.reset()
            t0, c0 = time.perf_counter(), self_cpu()
            while time.perf_counter() - t0 < seconds or done < 3 * occupancy:
                out = eng.step()
                eng.release(out)
                for _ in out:
                    i += 1
                    admit(i)
                done += len(out)
        return done, time.perf_counter() - t0, self_cpu() - c0

    done, wall, cpu = run(seconds)
    parts = None
    if split:
        for st in eng.steppers.values():
            st.graph = None  # the plain step: network and update launched (and timed) one by one
            st.model = _Timed(st.model, clocks["network"])
            st.update = clocks["update"].wrap(st.update)
        eng.pixels = clocks["decode"].wrap(eng.pixels)
        n, w, _ = run(seconds / 2)
        parts = {k: c.seconds() / n for k, c in clocks.items()}
        parts["rest"] = w / n - sum(parts.values())
    return done / wall, 1e3 * cpu / done, parts


# -- one load run ------------------------------------------------------------------------------------

async def load(url: str, steps, c: int, warmup: float, duration: float, max_requests: int, K: int,
               guidance: str = "1"):
    """`c` users, each its own client with one keep-alive connection (httpx's shared pool costs
    O(connections) CPU per request: 4 ms a request at 32 connections here, more than the server)."""
    recs = []
    clients = [httpx.AsyncClient(limits=httpx.Limits(max_connections=1, max_keepalive_connections=1), timeout=120)
               for _ in range(c)]
    start = time.perf_counter()
    stop_at = start + warmup + duration

    async def user(u, client):
        i = u
        while time.perf_counter() < stop_at and len(recs) < max_requests:
            n, w = steps_of(steps, i), guidance_of(guidance, i)
            t0 = time.perf_counter()
            r = await client.post(f"{url}/generate?class_label={i % K}&seed={i}&steps={n}&guidance={w:g}&format=png")
            t1 = time.perf_counter()
            h = r.headers
            recs.append((t0, t1, r.status_code, float(h.get("x-stride-queue-ms", "nan")),
                         float(h.get("x-stride-compute-ms", "nan")), h.get("x-stride-solver", ""), n, w))
            i += c

    try:
        await asyncio.gather(*(user(u, cl) for u, cl in enumerate(clients)))
    finally:
        for cl in clients:
            await cl.aclose()
    lo, hi = start + warmup, stop_at
    win = [r for r in recs if lo <= r[1] <= hi]
    return win, hi - lo, len(recs)


def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


def scrape(url: str, name: str) -> float:
    try:
        text = httpx.get(url, timeout=5).text
    except httpx.HTTPError:
        return float("nan")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith((name + "{", name + " ")))


class Servers:
    """The service in one mode, as subprocesses."""

    def __init__(self, mode: str, model_args: list, max_batch: int, threads: int | None, steps: list[int]):
        self.mode, self.procs, self.port = mode, [], free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
        common = [*model_args, "--max-batch", str(max_batch), "--steps", ",".join(map(str, steps)),
                  "--log-level", "warning", "--queue-limit", "1024"]
        if threads:
            common += ["--threads", str(threads)]
        cli = [sys.executable, "-m", "stride_diffusion.service.cli", "serve"]
        if mode == "embedded":
            self.procs.append(subprocess.Popen([*cli, *common, "--port", str(self.port)], cwd=ROOT, env=env))
            self.metrics_url, self.compute_pid = self.url + "/metrics", None
        else:
            rport = free_port()
            self.redis = subprocess.Popen(["redis-server", "--port", str(rport), "--save", "", "--appendonly", "no"],
                                          stdout=subprocess.DEVNULL)
            time.sleep(0.3)
            redis_url = f"redis://127.0.0.1:{rport}/0"
            mport = free_port()
            self.procs.append(subprocess.Popen([*cli, *common, "--role", "api", "--port", str(self.port),
                                                "--redis-url", redis_url], cwd=ROOT, env=env))
            self.procs.append(subprocess.Popen([*cli, *common, "--role", "worker", "--redis-url", redis_url,
                                                "--metrics-port", str(mport), "--worker-id", "bench-1"],
                                               cwd=ROOT, env=env))
            self.metrics_url = f"http://127.0.0.1:{mport}/metrics"
        wait_ready(self.url, self.procs)

    def pids(self) -> dict:
        out = {("server" if self.mode == "embedded" else ("api", "worker")[i]): p.pid for i, p in enumerate(self.procs)}
        if self.mode == "redis":
            out["redis"] = self.redis.pid
        return out

    def stop(self):
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        if self.mode == "redis":
            self.redis.terminate()
            self.redis.wait(10)


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", default="artifacts/digits")
    ap.add_argument("--test-model", help="benchmark the analytic model instead (e.g. gmm)")
    ap.add_argument("--modes", default="embedded,redis")
    ap.add_argument("--steps", default="1,4,8")
    ap.add_argument("--guidance", default="1", help="comma-separated runs: 1 (off) or scales joined by '/' drawn "
                                                    "per request, e.g. 1,1.5/4")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--duration", type=float, default=6.0, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=1.5, help="unmeasured seconds at the start of each run")
    ap.add_argument("--max-requests", type=int, default=4000, help="per run")
    ap.add_argument("--ceiling-seconds", type=float, default=3.0)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the service's worker (0: the service's default)")
    ap.add_argument("--ceiling-threads", default="1,all",
                    help="torch thread counts to measure the ceiling with; the ratio uses the best")
    ap.add_argument("--out", help="markdown report (a .json beside it holds the raw numbers)")
    ap.add_argument("--title", default="Load benchmark: `stride serve` on the CPU")
    ap.add_argument("--device", default="cpu", help="the worker's (and the ceiling's) device")
    ap.add_argument("--dtype", help="the worker's network and decoder dtype: fp32 | bf16 | fp16 (default: the "
                                    "artifact's)")
    ap.add_argument("--no-graphs", action="store_true", help="CUDA: eager network calls")
    ap.add_argument("--model-note", help="describe the served model in the report (default: the artifact path)")
    ap.add_argument("--serve-flags", default="", help="more `stride serve` flags for the servers, e.g. '--compile'")
    a = ap.parse_args(argv)
    steps = [s if s == "mixed" else int(s) for s in a.steps.split(",")]
    offered = sorted({int(s) for s in steps if s != "mixed"} | (set(MIXED) if "mixed" in steps else set()))
    concs = [int(c) for c in a.concurrency.split(",")]
    guidances = [g.strip() for g in a.guidance.split(",") if g.strip()]
    for g in guidances:
        if not guidance_scales(g) or min(guidance_scales(g)) < 1:
            sys.exit(f"--guidance {g!r}: scales >= 1 joined by '/'")
    modes = a.modes.split(",")
    if "redis" in modes and not shutil.which("redis-server"):
        sys.exit("redis-server not found")

    have_artifact = not a.test_model and os.path.exists(os.path.join(a.artifact, "model.safetensors"))
    if have_artifact:
        model_args, what = ["--artifacts", a.artifact], a.model_note or f"trained artifact `{a.artifact}`"

        def load_entry():
            return ModelEntry.from_artifact(a.artifact, a.device, a.dtype, steps=offered)
    else:
        spec = a.test_model or "gmm"
        model_args = ["--test-model", spec]
        what = f"analytic Gaussian-mixture test model `{spec}` (10 classes, 1x8x8)" + \
               ("" if a.test_model else f" — `{a.artifact}/model.safetensors` did not exist")

        def load_entry():
            return analytic_entry(spec)
    all_threads = torch.get_num_threads()
    ceiling_threads = sorted({all_threads if t == "all" else int(t) for t in a.ceiling_threads.split(",")})
    threads = (a.threads or "service default", ceiling_threads)
    print(f"model: {what}; torch threads: worker {threads[0]}, ceiling {ceiling_threads}", flush=True)

    load_avg = os.getloadavg()
    ceil_by = {}

    def measure_ceiling(entry, s, g, b):
        """Right before the service run it is compared with: a shared machine's load drifts.
        Returns (best images/s, CPU ms per image of the 1-thread run, network / update / decode / rest
        seconds per image of the best run)."""
        cpu, parts = {}, {}
        for t in ceiling_threads:
            torch.set_num_threads(t)
            ceil_by[(s, g, b, t)], cpu[t], parts[t] = ceiling(entry, s, min(b, a.max_batch), a.ceiling_seconds, True,
                                                              a.device, None, not a.no_graphs, g)
        torch.set_num_threads(all_threads)
        best = max(ceiling_threads, key=lambda t: ceil_by[(s, g, b, t)])
        return ceil_by[(s, g, b, best)], cpu[min(ceiling_threads)], parts[best]

    rows = []
    for mode in modes:
        hot = ["--device", a.device] + (["--dtype", a.dtype] if a.dtype else []) + (["--no-graphs"] if a.no_graphs else []) \
            + shlex.split(a.serve_flags)
        srv = Servers(mode, model_args + hot, a.max_batch, a.threads, offered)
        try:
            entry = load_entry()  # as the servers just loaded it (an artifact may gain files meanwhile)
            for s, g in [(s, g) for g in guidances for s in steps]:
                one = s != "mixed" and len(guidance_scales(g)) == 1  # one sampler for every request
                solver = "auto" if not one else httpx.post(
                    f"{srv.url}/generate?class_label=0&steps={s}&guidance={guidance_of(g, 0):g}",
                    timeout=60).headers["x-stride-solver"]
                for c in concs:
                    ceil_c, ceil_cpu, ceil_parts = measure_ceiling(entry, s, g, c)
                    pids = srv.pids()
                    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
                    main0 = {k: main_thread_seconds(p) for k, p in pids.items() if k in ("server", "api")}
                    busy0, t_run0 = machine_busy_seconds(), time.perf_counter()
                    me0, calls0 = self_cpu(), scrape(srv.metrics_url, "stride_model_calls_total")
                    rows0 = scrape(srv.metrics_url, "stride_batch_rows_sum")
                    timers = {"step": (srv.metrics_url, "stride_step_duration_seconds_sum"),
                              "decode": (srv.metrics_url, "stride_decode_seconds_sum"),
                              "encode": (srv.url + "/metrics", "stride_encode_seconds_sum")}
                    if srv.metrics_url != srv.url + "/metrics":  # Redis: the worker encodes /generate's images
                        timers["encode in the worker"] = (srv.metrics_url, "stride_encode_seconds_sum")
                    t0s = {k: scrape(*v) for k, v in timers.items()}
                    win, span, total = asyncio.run(load(srv.url, s, c, a.warmup, a.duration, a.max_requests,
                                                        entry.num_classes, g))
                    assert not one or all(r[5] == solver for r in win if r[2] == 200), \
                        "the sampler changed during the run"
                    me1 = self_cpu()
                    cpu1 = {k: cpu_seconds(p) for k, p in pids.items()}
                    ours = (me1 - me0) + sum(cpu1[k] - cpu0[k] for k in pids)
                    others = (machine_busy_seconds() - busy0 - ours) / (time.perf_counter() - t_run0)
                    calls = scrape(srv.metrics_url, "stride_model_calls_total") - calls0
                    spent = {k: scrape(*v) - t0s[k] for k, v in timers.items()}
                    brows = scrape(srv.metrics_url, "stride_batch_rows_sum") - rows0
                    ok = [r for r in win if r[2] == 200]
                    lat = [1e3 * (r[1] - r[0]) for r in ok]
                    n_all = max(1, total)  # CPU is over the whole run (warm-up included): per request sent
                    by_steps = {}
                    for n in sorted({r[6] for r in ok}):
                        ln = [1e3 * (r[1] - r[0]) for r in ok if r[6] == n]
                        by_steps[str(n)] = {"measured": len(ln), "p50_ms": pct(ln, 50), "p99_ms": pct(ln, 99)}
                    row = {
                        "mode": mode, "steps": s, "guidance": g, "format": "png", "concurrency": c,
                        "solver": ("auto: " + ", ".join(sorted({r[5] for r in ok}))) if not one else
                                  (ok[0][5] if ok else ""),
                        "images_per_s": len(ok) / span, "errors": len(win) - len(ok), "measured": len(ok),
                        "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "p99_ms": pct(lat, 99), "by_steps": by_steps,
                        "queue_ms": statistics.fmean(r[3] for r in ok) if ok else float("nan"),
                        "compute_ms": statistics.fmean(r[4] for r in ok) if ok else float("nan"),
                        "batch_rows": brows / calls if calls else float("nan"),
                        "ceiling": ceil_c, "ceiling_by_threads": {t: ceil_by[(s, g, c, t)] for t in ceiling_threads},
                        "ceiling_cpu_ms_per_image": ceil_cpu,
                        "other_cores": max(0.0, others),
                        "cpu_ms_per_image": {k: 1e3 * (cpu1[k] - cpu0[k]) / n_all for k in pids} |
                                            {"client": 1e3 * (me1 - me0) / n_all},
                    }
                    for k, m0 in main0.items():  # of which its main thread's: the event loop (HTTP, Redis, JSON)
                        row["cpu_ms_per_image"][f"{k}_event_loop"] = 1e3 * (main_thread_seconds(pids[k]) - m0) / n_all
                    row["ratio"] = row["images_per_s"] / row["ceiling"]
                    api_cpu = row["cpu_ms_per_image"].get("api", row["cpu_ms_per_image"].get("server_event_loop"))
                    cp = ceil_parts or {}
                    row["split_ms_per_image"] = {  # time per image (whole run, per request sent)
                        "network (ceiling)": 1e3 * cp["network"] if cp else None,
                        "update (ceiling)": 1e3 * cp["update"] if cp else None,
                        "decode + quantise (ceiling)": 1e3 * cp["decode"] if cp else None,
                        "rest of the ceiling": 1e3 * cp["rest"] if cp else None,
                        "step: network + update": 1e3 * spent["step"] / n_all,
                        "decode + copy": 1e3 * spent["decode"] / n_all,
                        "encode (pool, incl. wait)": 1e3 * sum(v for k, v in spent.items() if k.startswith("encode"))
                                                     / n_all,
                        "HTTP + API CPU": api_cpu, "client CPU": row["cpu_ms_per_image"]["client"]}
                    row["split_timing"] = SPLIT_TIMING[torch.device(a.device).type == "cuda"]
                    rows.append(row)
                    print(f"{mode:>8} steps {s:>2} w {g} c {c:>2}: {row['images_per_s']:7.1f} img/s  "
                          f"p50 {row['p50_ms']:7.1f}  "
                          f"p95 {row['p95_ms']:7.1f}  p99 {row['p99_ms']:7.1f} ms  rows/call {row['batch_rows']:5.1f}  "
                          f"ratio {row['ratio']:.2f} (ceiling {ceil_c:.1f})  errors {row['errors']}  others {others:.2f} "
                          f"cores  cpu/img "
                          + " ".join(f"{k} {v:.2f}" for k, v in row["cpu_ms_per_image"].items()), flush=True)
        finally:
            srv.stop()

    report = render(rows, what, threads, load_avg, a)
    publish(report, {"model": what, "machine": machine(), "threads": threads, "rows": rows,
                   "ceiling": {f"steps {s} guidance {g} batch {b} threads {t}": v
                               for (s, g, b, t), v in ceil_by.items()},
                   "args": vars(a)}, a.out)
    return rows


def render(rows, what, threads, load_avg, a) -> str:
    out = [f"# {a.title}", "",
           f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
           f"- machine: {machine()}; load average before the run {load_avg[0]:.2f}",
           f"- model: {what}",
           f"- torch threads: worker {threads[0]}, ceiling the best of {threads[1]}; max batch {a.max_batch} rows; {a.duration:g} s measured "
           f"per run after {a.warmup:g} s warm-up; closed loop, n = 1 per request, PNG, solver auto; "
           "steps `mixed`: uniform over 1, 2, 4, 8 per request; guidance `1`: off, `1.5/4`: one of the scales per "
           "request (both CFG branches in the same model call)",
           f"- command: `python benchmarks/load.py {' '.join(sys.argv[1:])}`", "",
           "Ceiling = the executor alone: the worker's engine (Stepper, fused update, uint8 quantisation) fed "
           "directly with the same requests (steps and guidance), kept at `concurrency` images in flight (the most a "
           "closed loop of that many clients can keep), with the faster of the torch thread counts listed, measured "
           "right before each service run. ratio = service "
           "images/s / ceiling. others' cores: CPU used by processes outside the benchmark during the run "
           "(this machine is shared).", "",
           "| mode | steps | guidance | solver | conc. | img/s | p50 ms | p95 ms | p99 ms | queue ms | compute ms | "
           "rows/call | " + " | ".join(f"ceiling {t} thr." for t in threads[1]) + " | ratio | errors | others' cores |",
           "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(threads[1]) + "---:|---:|---:|"]
    for r in rows:
        cb = r["ceiling_by_threads"]
        out.append(f"| {r['mode']} | {r['steps']} | {r['guidance']} | {r['solver']} | {r['concurrency']} | "
                   f"{r['images_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | "
                   f"{r['queue_ms']:.1f} | {r['compute_ms']:.1f} | {r['batch_rows']:.1f} | "
                   + " | ".join(f"{cb[t]:.1f}" for t in threads[1])
                   + f" | {r['ratio']:.2f} | {r['errors']} | {r['other_cores']:.2f} |")
    mixed = [r for r in rows if r["steps"] == "mixed"]
    if mixed:
        ns = sorted({int(n) for r in mixed for n in r["by_steps"]})
        out += ["", "Latency by step count within the mixed runs (each request's own steps; requests of every "
                "length share the batches), p50 / p99 ms and requests measured:", "",
                "| mode | guidance | conc. | " + " | ".join(f"{n} step{'s' * (n > 1)}" for n in ns) + " |",
                "|---|---|---:|" + "---:|" * len(ns)]
        for r in mixed:
            cells = []
            for n in ns:
                b = r["by_steps"].get(str(n))
                cells.append(f"{b['p50_ms']:.1f} / {b['p99_ms']:.1f} ({b['measured']})" if b else "")
            out.append(f"| {r['mode']} | {r['guidance']} | {r['concurrency']} | " + " | ".join(cells) + " |")
    keys = sorted({k for r in rows for k in r["cpu_ms_per_image"]})
    out += ["", "CPU milliseconds per image, by process (whole run, warm-up included), beside the ceiling's "
            "(1 thread). `service / ceiling` = CPU the service processes (not the client) spend per image over "
            "what the executor alone spends: the machine-independent part of the overhead. `api_event_loop`, "
            "`server_event_loop`: the part of that process's CPU spent in its main thread (the event loop: HTTP, "
            "Redis, JSON); the rest of it is its pool threads (encoding, the embedded worker).", "",
            "| mode | steps | guidance | conc. | " + " | ".join(keys) + " | ceiling | service / ceiling |",
            "|---|---:|---|---:|" + "---:|" * (len(keys) + 2)]
    for r in rows:
        c = r["cpu_ms_per_image"]
        service = sum(v for k, v in c.items() if k in ("api", "redis", "server", "worker"))  # parts: once
        out.append(f"| {r['mode']} | {r['steps']} | {r['guidance']} | {r['concurrency']} | " +
                   " | ".join(f"{c[k]:.2f}" if k in c else "" for k in keys) +
                   f" | {r['ceiling_cpu_ms_per_image']:.2f} | {service / r['ceiling_cpu_ms_per_image']:.2f} |")
    keys = list(rows[0]["split_ms_per_image"]) if rows else []
    out += ["", ("Where the time goes, milliseconds per image: the ceiling's network calls, fused updates, decoding "
                  "with quantisation, and the rest of the ceiling (bookkeeping, uploads, the copy to the host, "
                  "waiting), then the service's step time (network + update, summed over the steps an image takes "
                  "part in, divided by images), decoding and the copy to the host, encoding in the API's pool "
                  "(queueing included), and the CPU of the API process (embedded: its event loop thread) and of the "
                  "load generator."), "",
            f"Timing: {rows[0]['split_timing'] if rows else ''}.", "",
            "| mode | steps | guidance | conc. | " + " | ".join(keys) + " |",
            "|---|---:|---|---:|" + "---:|" * len(keys)]
    for r in rows:
        sp = r["split_ms_per_image"]
        out.append(f"| {r['mode']} | {r['steps']} | {r['guidance']} | {r['concurrency']} | " +
                   " | ".join("" if sp[k] is None else f"{sp[k]:.2f}" for k in keys) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
