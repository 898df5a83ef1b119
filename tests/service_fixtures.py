"""Helpers for the service tests: a private redis-server, the API on a thread, workers as
subprocesses, and reference images computed with the executor directly."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import redis
import torch
import uvicorn

from stride_diffusion.service import images
from stride_diffusion.service.app import create_app
from stride_diffusion.service.models import analytic_entry
from stride_diffusion.service.settings import Settings
from stride_diffusion.solvers.executor import sample, seeded_noise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GMM = analytic_entry()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_response(s: socket.socket) -> bytes:
    """One HTTP response read off a raw socket: the head, then Content-Length bytes of body (they may
    arrive in separate packets); the connection stays open."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    n = int(next(v for k, _, v in (ln.partition(b":") for ln in head.split(b"\r\n")) if k.lower() == b"content-length"))
    while len(body) < n:
        body += s.recv(65536)
    return head + b"\r\n\r\n" + body


def wait_for(cond, timeout: float, what: str, interval: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            v = cond()
        except Exception:
            v = None
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


class RedisServer:
    """redis-server on a free port. Without `aof_dir` no persistence: a restart loses everything; with
    it, the append-only file fsynced on every write (compose's setting, made strict for the test)."""

    def __init__(self, aof_dir=None, fsync="everysec"):
        if not shutil.which("redis-server"):
            pytest.skip("redis-server is not installed")
        self.port = free_port()
        self.proc = None
        self.aof_dir, self.fsync = aof_dir, fsync
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)

    def start(self):
        persist = (["--appendonly", "yes", "--appendfsync", self.fsync, "--dir", str(self.aof_dir)] if self.aof_dir
                   else ["--appendonly", "no"])
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      *persist, "--protected-mode", "no"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self.client().ping(), 10, "redis-server")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class ApiServer:
    """create_app under uvicorn on a thread (its own event loop), on a free port."""

    def __init__(self, settings: Settings, registry=None, ready=True):
        self.port = free_port()
        self.app = create_app(settings, registry)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.server.serve(),), daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, 20, "the API to start")
        if ready:
            import httpx

            wait_for(lambda: httpx.get(self.url + "/readyz").status_code == 200, 30, "the API to be ready", 0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def service(self):
        return self.app.state.service

    def stop(self):
        self.server.should_exit = True
        self.thread.join(15)
        if self.thread.is_alive():
            import io
            buf = io.StringIO()
            for t in asyncio.all_tasks(self.loop):
                t.print_stack(file=buf)
            raise RuntimeError("API server did not stop; its tasks:\n" + buf.getvalue())


class WorkerProc:
    """`python -m stride_diffusion.service.cli serve --role worker` with the analytic test model."""

    def __init__(self, redis_url: str, worker_id: str, prefix: str = "stride", delay_ms: float = 0, metrics=False,
                 extra=()):
        self.redis_url, self.worker_id, self.prefix = redis_url, worker_id, prefix
        self.metrics_port = free_port() if metrics else None
        spec = "gmm" + (f":delay_ms={delay_ms}" if delay_ms else "")
        cmd = [sys.executable, "-m", "stride_diffusion.service.cli", "serve", "--role", "worker", "--test-model", spec,
               "--redis-url", redis_url, "--worker-id", worker_id, "--key-prefix", prefix, "--log-level", "warning",
               "--threads", "1", "--heartbeat-s", "0.2", *extra]
        if self.metrics_port:
            cmd += ["--metrics-port", str(self.metrics_port)]
        env = {**os.environ, "PYTHONPATH": ROOT}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait_ready(self, timeout=60):
        r = redis.Redis.from_url(self.redis_url)

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited: {self.proc.stderr.read().decode()[-2000:]}")
            v = r.get(f"{self.prefix}:worker:{self.worker_id}")
            return v and json.loads(v)["ready"]

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if ready():
                return self
            time.sleep(0.05)
        raise TimeoutError(f"worker {self.worker_id} not ready")

    def metrics_text(self) -> str:
        import httpx

        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics").text

    def kill(self, sig=signal.SIGKILL, wait=True):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        if wait:
            self.proc.wait(20)

    def stop(self):
        self.kill(signal.SIGTERM)


def stop_all(api: ApiServer, workers) -> None:
    """Stop the API, then SIGTERM every worker at once (they drain in parallel) and wait for each."""
    api.stop()
    for w in workers:
        w.kill(signal.SIGTERM, wait=False)
    for w in workers:
        w.kill(signal.SIGTERM)


class GuidedGMM:
    """The analytic model behind a guidance input trained on [lo, hi], clamped there like a secant
    model's net: a stand-in secant variant (its own network, one evaluation per guided step)."""

    guidance_input = True

    def __init__(self, inner, lo: float, hi: float):
        self.inner, self.guidance_range = inner, (float(lo), float(hi))
        for k in ("schedule", "param", "num_classes", "shape"):
            setattr(self, k, getattr(inner, k))

    def __call__(self, x, t, s, label, w):
        w = w.clamp(*self.guidance_range).to(x.dtype).reshape(-1, *[1] * (x.dim() - 1))
        null = torch.full_like(label, self.num_classes)
        cond, uncond = self.inner(x, t, s, label), self.inner(x, t, s, null)
        return uncond + w * (cond - uncond)

    def table(self, n: int):
        from stride_diffusion.solvers.builders import make_table

        return make_table("euler", self.schedule, self.param, n)


def guided_entry(lo=1.0, hi=3.0, delay_ms=0):
    """The gmm model with a 'secant-test' variant (guidance range [lo, hi]) measured best at 4 steps."""
    from stride_diffusion.service.models import ModelEntry
    from stride_diffusion.solvers.samplers import SamplerSet, load_samplers
    from stride_diffusion.solvers.samplers.secant import SecantSampler

    base = analytic_entry(f"gmm:delay_ms={delay_ms}" if delay_ms else "gmm")
    rows = [{"solver": "secant-test", "nfe": 4, "fd": 0.1}, {"solver": "dpmpp-2m", "nfe": 4, "fd": 0.5}]
    samplers = [*load_samplers(base.model), SecantSampler("secant-test", GuidedGMM(base.model, lo, hi))]
    return ModelEntry("gmm", base.model, base.class_names, dict(base.meta), SamplerSet(base.model, samplers, rows))


def reference(label: int, seed: int, steps: int, solver: str = "auto", guidance: float = 1.0, entry=GMM,
              scale: int = 8) -> np.ndarray:
    """The image the executor makes alone from this seed: what every service path must return."""
    tab = entry.samplers.resolve(steps, solver).table(steps)
    with torch.inference_mode():
        y = sample(entry.model, tab, seeded_noise([seed], entry.shape), torch.tensor([label]), guidance)
    a = images.to_uint8(y[0], entry.data_range)
    return a.repeat(scale, 0).repeat(scale, 1)


def metric_value(text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels` in a Prometheus exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, val = line.rpartition(" ")
        metric, _, lab = head.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in lab for k, v in labels.items()):
            total += float(val)
    return total


def tiny_artifact(directory, eval_rows=None, default_guidance=None, learned=None):
    """A real artifact directory with an untrained tiny U-Net (3 classes, 1x8x8), written with the
    same functions offline uses; `learned` = {name: Table} solver files, `eval_rows` an eval.json."""
    from stride_diffusion.solvers.artifact import EVAL_FORMAT, save_artifact, write_json
    from stride_diffusion.solvers.nets import UNet
    from stride_diffusion.solvers.schedules import FlowSchedule

    cfg = {"in_channels": 1, "image_size": 8, "num_classes": 3, "channels": 8, "channel_mult": [1, 2],
           "num_res_blocks": 1, "emb_dim": 16}
    torch.manual_seed(0)
    out = save_artifact(directory, cfg, UNet(cfg).state_dict(), FlowSchedule(), "flow", (1, 8, 8), ["a", "b", "c"],
                        {"steps": 0})
    if learned:
        (out / "solvers").mkdir()
        for name, tab in learned.items():
            write_json(out / "solvers" / f"{name}.json", tab.to_json())
    if eval_rows is not None:
        sha = json.loads((out / "model.json").read_text())["weights"]["sha256"]
        write_json(out / "eval.json", {"format": EVAL_FORMAT, "model_sha256": sha, "rows": eval_rows,
                                       **({"default_guidance": default_guidance} if default_guidance else {})})
    return out
