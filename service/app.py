"""The HTTP API (FastAPI): /generate, /models, /solvers, health, metrics, OpenAPI at /docs.

`create_app` wires the queue to the settings: the in-process queue and an in-process worker
(embedded mode, no REDIS_URL), or Redis with a worker in this process too (role 'all') or not
(role 'api').
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .encode import MEDIA, Encoder
from .jobs import Job
from .metrics import Metrics
from .models import Registry, load_registry
from .params import FIELDS, ApiError, GenerateBody, merge, parse
from .queue import LocalQueue, Rejected
from .settings import Settings
from .worker import Worker

log = logging.getLogger("stride.api")
MAX_BODY = 64 * 1024

GENERATE_DOC = """Generate images of one class.

Parameters come as query parameters, a JSON body, or both (a field may appear once). Returns
`image/png` (the image, or a grid for n > 1), `image/jpeg` / `image/webp` with `format=jpeg|webp`
(`quality` 1..100), or, with `format=json`, base64 PNGs with their seeds. The API process encodes
(workers return raw pixels), in a pool of `--encode-threads`.
Image i of a request with seed S uses seed S + i; the same seed, class, steps, solver and guidance
give the same image whatever else is batched with it.

Headers: X-Stride-Solver (the sampler used), X-Stride-NFE, X-Stride-Queue-Ms, X-Stride-Compute-Ms,
X-Stride-Seed, X-Stride-Request-Id.

Errors: 422 invalid value (names the allowed range or set), 404 unknown model, 401 missing or
wrong API key (when one is set), 503 + Retry-After queue full / no live worker / queue unreachable,
504 deadline passed, 500 failed (e.g. moved to the dead-letter stream after repeated worker deaths).
"""


def _openapi_generate() -> dict:
    schema = GenerateBody.model_json_schema()
    params = [{"name": k, "in": "query", "required": False, "description": v.get("description", ""),
               "schema": {k2: v[k2] for k2 in ("type", "anyOf", "default") if k2 in v}}
              for k, v in schema["properties"].items()]
    return {
        "parameters": params,
        "requestBody": {"required": False, "content": {"application/json": {"schema": schema}}},
        "responses": {"200": {"description": "the image(s)", "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/webp": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": {"type": "object"}}}}},
    }


class Service:
    def __init__(self, settings: Settings, registry: Registry | None = None):
        self.settings = settings
        api_only = settings.role == "api"  # the API needs metadata, not weights or a GPU
        self.registry = registry or load_registry(settings, "cpu" if api_only else settings.device, weights=not api_only)
        self.encoder = Encoder(settings.encode_threads)
        self.metrics = Metrics()
        self.metrics.init_labels(self.registry, settings.steps)
        self.queue = None
        self.worker: Worker | None = None
        self.transport = None
        self._worker_task: asyncio.Task | None = None
        self.id_prefix, self.counter = uuid.uuid4().hex[:16] + "-", itertools.count()  # unique across API processes

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        s, names = self.settings, self.registry.names()
        if s.embedded:
            self.queue = LocalQueue(s)
            self.worker = Worker(self.registry, s, self.queue, self.metrics, name="embedded")
            self.queue.worker = self.worker
        else:
            from .redis_queue import RedisQueue, RedisWorkerTransport

            self.queue = RedisQueue(s, names)
            await self.queue.start()
            if s.role == "all":
                self.transport = RedisWorkerTransport(s, names, self.metrics)
                self.worker = Worker(self.registry, s, self.transport, self.metrics, name=s.worker_id)
                self.transport.worker = self.worker
                await self.transport.start()
        if self.worker:
            self.metrics.worker_ready.set_function(lambda: float(self.worker.ready))
            self._worker_task = asyncio.create_task(self.worker.run())
            self._worker_task.add_done_callback(_log_failure)
        try:
            yield
        finally:
            if self.worker:
                self.worker.stop()
                try:
                    await asyncio.wait_for(asyncio.shield(self._worker_task), 10)
                except (asyncio.TimeoutError, Exception):
                    self._worker_task.cancel()
            if self.transport:
                await self.transport.close()
            if self.queue is not None:
                await self.queue.close()
            self.encoder.close()

    # -- /generate ------------------------------------------------------------------------------
    def check_key(self, request: Request):
        key = self.settings.api_key_value()
        if not key:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            self.metrics.rejected.labels("unauthorized").inc()
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})

    async def generate(self, request: Request) -> Response:
        t0 = time.perf_counter()
        self.check_key(request)
        size = request.headers.get("content-length", "0")
        if not size.isdigit() or int(size) > MAX_BODY:
            raise ApiError(413, f"body larger than {MAX_BODY} bytes; /generate takes a few small fields")
        try:
            p = parse(merge(request.query_params.multi_items(), await request.body()), self.registry, self.settings)
        except ApiError as e:
            self.metrics.rejected.labels("unknown_model" if e.status == 404 else "invalid").inc()
            raise
        now = time.time()
        job = Job(f"{self.id_prefix}{next(self.counter):x}", p.entry.name, p.steps, p.solver, p.label, p.n, p.seed, p.guidance, p.format,
                  now + self.settings.deadline_s, now, quality=p.quality)
        retry = {"Retry-After": str(self.settings.retry_after_s)}
        try:
            await self.queue.submit(job)
        except Rejected as e:
            self.metrics.rejected.labels(e.reason).inc()
            raise ApiError(e.status, e.detail, headers=retry) from None
        res = await self.queue.wait(job)
        if res.status != 200:
            reason = {504: "deadline", 503: "lost"}.get(res.status, "dead_letter" if "dead-letter" in res.detail else "error")
            self.metrics.rejected.labels(reason).inc()
            raise ApiError(res.status, res.detail, headers=retry if res.status == 503 else None)

        labels = (job.model, res.solver, str(job.steps))
        self.metrics.request_seconds.labels(*labels).observe(time.perf_counter() - t0)
        self.metrics.queue_seconds.labels(*labels).observe(max(0.0, res.queue_ms / 1e3))
        self.metrics.compute_seconds.labels(*labels).observe(max(0.0, res.compute_ms / 1e3))
        self.metrics.responses.labels("200").inc()
        headers = {"X-Stride-Solver": res.solver, "X-Stride-NFE": str(res.nfe), "X-Stride-Queue-Ms": f"{res.queue_ms:.1f}",
                   "X-Stride-Compute-Ms": f"{res.compute_ms:.1f}", "X-Stride-Seed": str(job.seed),
                   "X-Stride-Model": job.model, "X-Stride-Request-Id": job.id}
        e = self.registry[job.model]
        meta = None
        if job.format == "json":
            meta = {"id": job.id, "model": job.model, "class_label": job.label, "class_name": e.class_names[job.label],
                    "n": job.n, "steps": job.steps, "solver": res.solver, "nfe": res.nfe, "guidance": job.guidance,
                    "seed": job.seed, "seeds": job.seeds, "queue_ms": round(res.queue_ms, 2),
                    "compute_ms": round(res.compute_ms, 2)}
        t1 = time.perf_counter()
        body = await self.encoder(res.images(), job.format, job.quality, e.display_scale, meta)
        self.metrics.encode_seconds.labels(job.format).observe(time.perf_counter() - t1)
        return Response(body, media_type=MEDIA[job.format], headers=headers)

    # -- status ---------------------------------------------------------------------------------
    async def ready(self) -> tuple[bool, dict]:
        st = await self.queue.status() if self.queue else {"redis": None, "workers": {}, "depth": {}}
        missing = [m for m in self.registry.names() if not st["workers"].get(m)]
        ok = not missing and st["redis"] is not False
        why = "" if ok else ("Redis unreachable" if st["redis"] is False else f"no ready worker for {missing}")
        return ok, {"ready": ok, "reason": why, **st}

    async def metrics_text(self) -> bytes:
        if self.queue:
            st = await self.queue.status()
            for m in self.registry.names():
                self.metrics.queue_depth.labels(m).set(st["depth"].get(m, 0))
                self.metrics.workers_live.labels(m).set(st["workers"].get(m, 0))
        return generate_latest(self.metrics.registry)


def _log_failure(task: asyncio.Task):
    if not task.cancelled() and task.exception():
        log.error("the worker stopped", exc_info=task.exception())


def create_app(settings: Settings | None = None, registry: Registry | None = None) -> FastAPI:
    settings = settings or Settings()
    svc = Service(settings, registry)
    app = FastAPI(title="stride", version="0.1.0", lifespan=svc.lifespan,
                  description="Few-step class-conditional diffusion sampling. Latency is about NFE x one model call.")
    app.state.service = svc

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        svc.metrics.responses.labels(str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.post("/generate", summary="Generate images", description=GENERATE_DOC, openapi_extra=_openapi_generate(),
              response_class=Response)
    async def generate(request: Request):
        return await svc.generate(request)

    @app.get("/models", summary="Served models: classes, shape, schedule, step counts")
    async def models(request: Request):
        svc.check_key(request)
        return {"default": svc.registry.default, "models": [e.describe(settings) for e in svc.registry]}

    @app.get("/solvers", summary="Per model: the sampler chosen for each offered step count, its measured quality")
    async def solvers(request: Request):
        svc.check_key(request)
        return {"models": {e.name: {"steps": e.choices(settings.steps), "available": ["auto", *e.solver_names()],
                                    "eval": e.eval_rows} for e in svc.registry}}

    @app.get("/healthz", summary="Liveness: the API process answers")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: a warmed-up worker serves every model and the queue is reachable")
    async def readyz():
        ok, body = await svc.ready()
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics():
        return Response(await svc.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def root():
        return {"name": "stride", "docs": "/docs", "generate": "POST /generate", "fields": list(FIELDS)}

    return app
