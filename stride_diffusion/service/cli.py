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
from types import UnionType
from typing import Annotated, Literal, Union, get_args, get_origin

from pydantic import AliasChoices, ValidationError

from .settings import Settings


def env_names(name: str) -> list[str]:
    """The environment variables a setting reads: STRIDE_<NAME>, or its upper-case aliases (REDIS_URL)."""
    alias = Settings.model_fields[name].validation_alias
    if isinstance(alias, AliasChoices):
        return sorted((c for c in alias.choices if isinstance(c, str) and c.isupper()), key=len)
    return [f"{Settings.model_config['env_prefix']}{name.upper()}"]


def _flag(name: str, field) -> tuple[str, dict]:
    """(flag, add_argument keywords) of one Settings field; service/settings.py documents the rules."""
    extra = field.json_schema_extra or {}
    flag = "--" + name.replace("_", "-")
    if extra.get("hidden"):
        return flag, {"help": argparse.SUPPRESS}
    kind = field.annotation
    args = [a for a in get_args(kind) if a is not type(None)] if get_origin(kind) in (Union, UnionType) else [kind]
    kind = args[0] if len(args) == 1 else kind
    while get_origin(kind) is Annotated:
        kind = get_args(kind)[0]
    shown = extra.get("shown_default", field.default)
    if isinstance(shown, list):
        shown = ",".join(map(str, shown))
    elif isinstance(shown, bool):
        shown = str(shown).lower()
    kw = {"help": f"{field.description} [env {', '.join(env_names(name))}; default {shown}]"}
    if kind is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif get_origin(kind) is Literal:
        kw["choices"] = list(get_args(kind))
    elif kind in (int, float):
        kw.update(type=kind, metavar="N")
    else:  # strings, lists (the settings split a comma list), secrets: validated by Settings
        kw["metavar"] = extra.get("metavar")
    if "nargs" in extra:
        kw["nargs"] = extra["nargs"]
    return flag, kw


def parser() -> argparse.ArgumentParser:
    """Every Settings field as a flag (no default here: an unset flag leaves the env / default)."""
    p = argparse.ArgumentParser(
        prog="stride serve", argument_default=argparse.SUPPRESS, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve few-step diffusion sampling over HTTP. Flags override environment variables.",
        epilog="Endpoints: POST /generate, GET /models /solvers /healthz /readyz /metrics, OpenAPI at /docs.\n"
               "Workers in Redis mode serve their own /metrics on --metrics-port (gauge stride_worker_ready = 1 "
               "once warmed up).")
    for name, field in Settings.model_fields.items():
        flag, kw = _flag(name, field)
        p.add_argument(flag, dest=name, **kw)
    p.add_argument("--log-level", dest="log_level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    given = {k: v for k, v in vars(args).items() if k != "log_level"}
    return Settings(**given)


def run_api(settings: Settings, log_level: str):
    import uvicorn

    from .app import create_app
    from .http_limits import raise_open_files, server_options

    raise_open_files(settings.max_connections)
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level, **server_options(settings))


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
    worker = Worker(registry, settings, transport, metrics, name=settings.worker_id)  # attaches its hooks
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
    except (FileNotFoundError, ValueError) as e:  # a missing artifact, a setting this machine cannot run
        print(f"stride serve: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
