"""`stride serve`: the API and/or a worker.

    stride serve                                   # embedded: API + worker, in-process queue
    REDIS_URL=redis://host:6379/0 stride serve --role api --port 8000
    REDIS_URL=redis://host:6379/0 stride serve --role worker --metrics-port 9100
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from pydantic import ValidationError

from .settings import Settings

# flag -> (settings field, metavar/type, help). The env var is STRIDE_<FIELD> (REDIS_URL also plain).
FLAGS = [
    ("--role", "role", None, ("all: API + worker in one process (over Redis when REDIS_URL is set, else an "
                              "in-process queue); api | worker: separate processes, need REDIS_URL")),
    ("--artifacts", "artifacts", "DIR", "artifact directories to serve (env: comma-separated)"),
    ("--device", "device", "DEV", "torch device of the worker (cpu, cuda, cuda:1)"),
    ("--dtype", "dtype", None, "network and decoder precision (fp32, bf16, fp16); default: the artifact's"),
    ("--threads", "threads", int, "torch intra-op threads (default: all cores; role all on the CPU: all but one)"),
    ("--host", "host", "ADDR", "bind address of the API and of the worker's metrics port"),
    ("--port", "port", int, "API port"),
    ("--max-batch", "max_batch", int, "rows per model call (an image is 2 rows with guidance)"),
    ("--max-wait-ms", "max_wait_ms", float, "an idle worker waits this long from the oldest arrival to fill a batch"),
    ("--queue-limit", "queue_limit", int, "requests queued or running per model before 503 + Retry-After"),
    ("--deadline-s", "deadline_s", float, "per-request deadline; past it the request is answered 504 and dropped"),
    ("--retry-after-s", "retry_after_s", int, "Retry-After on 503"),
    ("--steps", "steps", "LIST", "offered step counts (NFE), e.g. 1,2,4,8"),
    ("--default-steps", "default_steps", int, "steps when a request gives none"),
    ("--max-images", "max_images", int, "largest n per request"),
    ("--guidance-max", "guidance_max", float, "largest guidance scale accepted"),
    ("--encode-threads", "encode_threads", int, "API process: threads encoding images"),
    ("--update", "update", None, ("the fused update: auto (Triton on CUDA, torch elsewhere), torch, or triton "
                                  "(also on the CPU, in Triton's interpreter: slow; for tests)")),
    ("--variants", "variants", "LIST", ("secant networks to load, e.g. secant-pu,secant-tan (default: those the "
                                        "auto-pick serves for the offered steps)")),
    ("--api-key", "api_key", "KEY", ("require 'Authorization: Bearer KEY' (prefer the env var: flags show in "
                                     "ps); /healthz, /readyz, /metrics stay open")),
    ("--redis-url", "redis_url", "URL", "redis://[user:password@]host:port/db, or rediss:// for TLS"),
    ("--redis-ca-cert", "redis_ca_cert", "PEM", "CA bundle to verify a rediss:// server"),
    ("--key-prefix", "key_prefix", "P", "prefix of every Redis key"),
    ("--worker-id", "worker_id", "ID", "consumer name in the group; keep it stable across restarts of one worker"),
    ("--metrics-port", "metrics_port", int, "worker role: serve Prometheus metrics on this port"),
    ("--heartbeat-s", "heartbeat_s", float, "worker heartbeat period (liveness TTL is 3x)"),
    ("--claim-idle-ms", "claim_idle_ms", int, "re-claim entries idle this long (their worker died)"),
    ("--max-deliveries", "max_deliveries", int, "deliveries before an entry goes to the dead-letter stream"),
    ("--result-ttl-s", "result_ttl_s", int, "TTL of stored results"),
    ("--drain-timeout-s", "drain_timeout_s", float, ("worker: on SIGTERM, finish the requests taken for at most "
                                                     "this long, then exit; a second SIGTERM stops at once")),
]


def _env(field: str) -> str:
    return "REDIS_URL, STRIDE_REDIS_URL" if field == "redis_url" else f"STRIDE_{field.upper()}"


def parser() -> argparse.ArgumentParser:
    defaults = Settings.model_fields
    p = argparse.ArgumentParser(
        prog="stride serve", argument_default=argparse.SUPPRESS, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve few-step diffusion sampling over HTTP. Flags override environment variables.",
        epilog="Endpoints: POST /generate, GET /models /solvers /healthz /readyz /metrics, OpenAPI at /docs.\n"
               "Workers in Redis mode serve their own /metrics on --metrics-port (gauge stride_worker_ready = 1 "
               "once warmed up).")
    for flag, field, kind, help_ in FLAGS:
        d = defaults[field]
        shown = d.default if d.default_factory is None else "<hostname>-<pid>"
        if field in ("steps", "artifacts") or field == "variants" and d.default:
            shown = ",".join(map(str, d.default))
        h = f"{help_} [env {_env(field)}; default {shown}]"
        kw = {"help": h}
        if field == "role":
            kw["choices"] = ["all", "api", "worker"]
        elif field == "dtype":
            kw["choices"] = ["fp32", "bf16", "fp16"]
        elif field == "update":
            kw["choices"] = ["auto", "torch", "triton"]
        elif field == "artifacts":
            kw.update(nargs="+", metavar="DIR")
        elif kind in (int, float):
            kw.update(type=kind, metavar="N")
        else:
            kw["metavar"] = kind
        p.add_argument(flag, dest=field, **kw)
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the warm-up of every (batch bucket, step count) before ready [env STRIDE_WARMUP=false]")
    p.add_argument("--no-graphs", dest="graphs", action="store_false",
                   help="CUDA: run the network eagerly instead of replaying CUDA graphs [env STRIDE_GRAPHS=false]")
    p.add_argument("--test-model", dest="test_model", help=argparse.SUPPRESS)  # 'gmm[:delay_ms=N]': tests, benchmarks
    p.add_argument("--log-level", dest="log_level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    given = {k: v for k, v in vars(args).items() if k != "log_level"}
    return Settings(**given)


def run_api(settings: Settings, log_level: str):
    import uvicorn

    from .app import create_app

    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level, timeout_keep_alive=30)


async def run_worker(settings: Settings):
    from prometheus_client import start_http_server

    from .metrics import Metrics
    from .models import load_registry
    from .redis_queue import RedisWorkerTransport
    from .worker import Worker

    registry = load_registry(settings)
    metrics = Metrics()
    metrics.init_labels(registry, settings.steps)
    transport = RedisWorkerTransport(settings, registry.names(), metrics)
    worker = Worker(registry, settings, transport, metrics, name=settings.worker_id)
    transport.worker = worker
    if settings.metrics_port is not None:
        metrics.worker_ready.set_function(lambda: float(worker.ready))
        start_http_server(settings.metrics_port, addr=settings.host, registry=metrics.registry)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    await transport.start()
    drained = False

    async def announce():
        while not worker.ready:
            await asyncio.sleep(0.2)
        print(f"stride: worker {settings.worker_id} ready for {registry.names()}", flush=True)

    announced = asyncio.create_task(announce())
    try:
        drained = await worker.run()
        announced.cancel()
    finally:
        await transport.close()
    if not drained:
        # Cut short (second SIGTERM or drain_timeout_s): a step may still be running on its thread,
        # and interpreter shutdown would wait for it. What this worker held stays pending in Redis.
        logging.shutdown()
        os._exit(1)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # `python -m stride_diffusion.service.cli serve ...` as well as `stride serve ...`
        argv = argv[1:]
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from(args)
    except ValidationError as e:
        print(f"stride serve: invalid settings:\n{e}", file=sys.stderr)
        return 2
    try:
        if settings.role == "worker":
            try:  # uvloop when installed (uvicorn[standard]), as uvicorn does for the API
                from uvloop import run as run_loop
            except ImportError:
                run_loop = asyncio.run
            run_loop(run_worker(settings))
        else:
            run_api(settings, args.log_level)
    except FileNotFoundError as e:
        print(f"stride serve: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
