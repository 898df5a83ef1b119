"""The HTTP API (FastAPI): /generate, /models, /solvers, health, metrics, OpenAPI at /docs.

`create_app` wires the queue to the settings: the in-process queue and an in-process worker
(embedded mode, no REDIS_URL), or Redis with a worker in this process too (role 'all') or not
(role 'api'). A request's `Outcome` becomes an HTTP status and a metric reason here, through the one
table in http_status.py.
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

from . import openai_api, openapi, playground, stream
from .encode import MEDIA, Encoder
from .http_limits import BodyDeadline
from .http_status import FAILURES, REJECTED_STATUS
from .jobs import Job, Outcome, Result
from .limits import Guard, clip, request_id
from .metrics import Metrics
from .models import Registry, load_registry
from .params import ApiError, GenerateParams, merge, parse
from .queue import LocalQueue
from .settings import Settings
from .transport import Queue, Rejected, Transport
from .worker import Worker

log = logging.getLogger("stride.api")
CANCEL_WAIT_S = 1.0  # how long a cancelled wait may take to unwind (redis-py can sit in a command)

class Service:
    def __init__(self, settings: Settings, registry: Registry | None = None):
        self.settings = settings
        api_only = settings.role == "api"  # the API needs metadata, not weights or a GPU
        self.registry = registry or load_registry(settings, "cpu" if api_only else settings.device, weights=not api_only)
        self.encoder = Encoder(settings.encode_threads, settings.png_level)
        self.metrics = Metrics()
        self.metrics.init_labels(self.registry, settings.steps)
        self.queue: Queue | None = None
        self.worker: Worker | None = None
        self.transport: Transport | None = None
        self._worker_task: asyncio.Task | None = None
        self.id_prefix, self.counter = uuid.uuid4().hex[:16] + "-", itertools.count()  # unique across API processes

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        s, names = self.settings, self.registry.names()
        if s.embedded:
            self.queue = LocalQueue(s, names, cost=self.work)
            self.worker = Worker(self.registry, s, self.queue, self.metrics, name="embedded")
        else:
            from .redis_queue import RedisQueue, RedisWorkerTransport

            self.queue = RedisQueue(s, names, cost=self.work)
            await self.queue.start()
            if s.role == "all":
                self.transport = RedisWorkerTransport(s, names, self.metrics)
                self.worker = Worker(self.registry, s, self.transport, self.metrics, name=s.worker_id)
                await self.transport.start()
        if self.worker:
            self.metrics.worker_ready.set_function(lambda: float(self.worker.ready))
            self._worker_task = asyncio.create_task(self.worker.run())
            self._worker_task.add_done_callback(_log_failure)
        announce = asyncio.create_task(self._announce())
        try:
            yield
        finally:
            announce.cancel()
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

    async def run(self, request: Request, p: GenerateParams, t0: float, encode: bool = False) -> tuple[Job, Result]:
        """Queue validated parameters, wait for the images (cancelled if the client goes away),
        record the metrics: the one path that /generate and /v1/images/generations share. encode:
        the worker encodes the body (Job.encode; a worker of the previous version sends pixels).
        Failures raise ApiError."""
        job = self.new_job(request, p)
        job.encode = encode
        retry = {"Retry-After": str(self.settings.retry_after_s)}
        try:
            await self.queue.submit(job)
        except Rejected as e:
            self.metrics.rejected.labels(e.reason).inc()
            raise ApiError(REJECTED_STATUS, e.detail, headers=retry) from None
        res = await self._wait_or_cancel(request, job)
        if not res.ok:
            status, reason = FAILURES[res.outcome]
            self.metrics.rejected.labels(reason).inc()
            raise ApiError(status, res.detail, headers=retry if res.outcome is Outcome.LOST else None)

        labels = (job.model, res.solver, str(job.steps))
        self.metrics.request_seconds.labels(*labels).observe(time.perf_counter() - t0)
        self.metrics.queue_seconds.labels(*labels).observe(max(0.0, res.queue_ms / 1e3))
        self.metrics.compute_seconds.labels(*labels).observe(max(0.0, res.compute_ms / 1e3))
        self.metrics.responses.labels("200").inc()
        return job, res

    def work(self, job: Job) -> int:
        """Row-steps of a job (images x rows per image x steps): what admission by work counts."""
        return job.n * job.steps * self.registry[job.model].samplers[job.solver].rows_per_image(job.guidance)

    def new_job(self, request: Request, p: GenerateParams) -> Job:
        now = time.time()
        return Job(request_id(request.scope), p.entry.name, p.steps, p.solver, p.label, p.n, p.seed, p.guidance,
                   p.format, now + self.settings.deadline_s, now, quality=p.quality, decoder=p.decoder)

    @staticmethod
    def stride_headers(job: Job, res: Result) -> dict:
        return {"X-Stride-Solver": res.solver, "X-Stride-NFE": str(res.nfe), "X-Stride-Queue-Ms": f"{res.queue_ms:.1f}",
                "X-Stride-Compute-Ms": f"{res.compute_ms:.1f}", "X-Stride-Seed": str(job.seed),
                "X-Stride-Model": job.model, "X-Stride-Request-Id": job.id, "X-Stride-Guidance": f"{job.guidance:g}"}

    async def parse_request(self, request: Request):
        """The key, then the query or JSON body as GenerateParams; an ApiError is counted and re-raised."""
        self.check_key(request)
        try:
            raw = merge(request.query_params.multi_items(), await request.body(), request.headers.get("content-type"))
            return parse(raw, self.registry, self.settings)
        except ApiError as e:
            self.count_invalid(e)
            raise

    async def generate(self, request: Request) -> Response:
        if stream.wants_stream(request):  # Accept: text/event-stream: the streamed answer (service/stream.py)
            return await stream.generate(self, request)
        t0 = time.perf_counter()
        p = await self.parse_request(request)
        job, res = await self.run(request, p, t0, encode=p.format != "json")  # json: the meta is the API's
        headers = self.stride_headers(job, res)
        e = self.registry[job.model]
        meta = None
        if job.format == "json":
            meta = {"id": job.id, "model": job.model, "class_label": job.label, "class_name": e.class_names[job.label],
                    "n": job.n, "steps": job.steps, "solver": res.solver, "nfe": res.nfe, "guidance": job.guidance,
                    "seed": job.seed, "seeds": job.seeds, "queue_ms": round(res.queue_ms, 2),
                    "compute_ms": round(res.compute_ms, 2)}
        if res.encoded == job.format:  # encoded by the worker, in its own pool
            return Response(res.pixels, media_type=MEDIA[job.format], headers=headers)
        t1 = time.perf_counter()
        body = await self.encoder(res.images(), job.format, job.quality, e.display_scale, meta)
        self.metrics.encode_seconds.labels(job.format).observe(time.perf_counter() - t1)
        return Response(body, media_type=MEDIA[job.format], headers=headers)

    async def _wait_or_cancel(self, request: Request, job: Job):
        """The result, or, when the client goes away first, a cancel: the worker drops the request's
        rows before its next step (in-process, or through a marker in Redis)."""
        wait = asyncio.ensure_future(self.queue.wait(job))
        gone = asyncio.ensure_future(_disconnected(request.receive))
        try:
            await asyncio.wait((wait, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if wait.done():
            return wait.result()
        await self.queue.cancel(job)
        wait.cancel()
        await asyncio.wait((wait,), timeout=CANCEL_WAIT_S)
        self.metrics.rejected.labels("cancelled").inc()
        raise ApiError(499, "the client closed the connection; the request was cancelled")

    def new_id(self) -> str:
        return f"{self.id_prefix}{next(self.counter):x}"

    def count_invalid(self, e: ApiError):
        self.metrics.rejected.labels({404: "unknown_model", 408: "slow_client", 413: "too_large"}.get(e.status, "invalid")).inc()

    def count_error(self):
        self.metrics.responses.labels("500").inc()
        self.metrics.rejected.labels("error").inc()

    # -- status ---------------------------------------------------------------------------------
    async def ready(self) -> tuple[bool, dict]:
        st = await self.queue.status() if self.queue else {"redis": None, "workers": {}, "depth": {}}
        missing = [m for m in self.registry.names() if not st["workers"].get(m)]
        ok = not missing and st["redis"] is not False
        why = "" if ok else ("Redis unreachable" if st["redis"] is False else f"no ready worker for {missing}")
        return ok, {"ready": ok, "reason": why, **st}

    async def _announce(self):
        """One line on stdout once /readyz would answer 200: the moment a user may send requests."""
        while not (await self.ready())[0]:
            await asyncio.sleep(0.2)
        s = self.settings
        print(f"stride: ready on http://{s.host}:{s.port} (POST /generate, docs at /docs)", flush=True)

    async def metrics_text(self) -> bytes:
        if self.queue:
            st = await self.queue.status()
            for m in self.registry.names():
                self.metrics.queue_depth.labels(m).set(st["depth"].get(m, 0))
                self.metrics.workers_live.labels(m).set(st["workers"].get(m, 0))
        return generate_latest(self.metrics.registry)


async def _disconnected(receive):
    """Returns once the client has gone (the body is read: the next message is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _log_failure(task: asyncio.Task):
    if not task.cancelled() and task.exception():
        log.error("the worker stopped", exc_info=task.exception())


def create_app(settings: Settings | None = None, registry: Registry | None = None) -> FastAPI:
    settings = settings or Settings()
    svc = Service(settings, registry)
    app = FastAPI(title="stride", version="0.1.0", lifespan=svc.lifespan, docs_url=None, redoc_url=None,
                  description="Few-step class-conditional diffusion sampling. Latency is about NFE x one model call.")
    app.state.service = svc
    app.add_middleware(Guard, on_error=svc.count_error, new_id=svc.new_id)
    app.add_middleware(BodyDeadline, timeout_s=settings.body_timeout_s, min_rate=settings.body_min_rate)
    openapi.install(app, svc, operations={"/v1/images/generations": openai_api.operation})

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        svc.metrics.responses.labels(str(e.status)).inc()
        rid = request_id(request.scope)  # every error names the request, as the logs do
        e.detail, e.field = clip(e.detail), clip(e.field, 200)  # a message may quote the input: bounded
        return JSONResponse({**e.body(), "request_id": rid}, status_code=e.status,
                            headers={**(e.headers or {}), "X-Stride-Request-Id": rid})

    @app.post("/generate", summary="Generate images", response_class=Response)
    async def generate(request: Request):
        return await svc.generate(request)

    @app.post("/generate/stream", include_in_schema=False)  # Server-Sent Events: service/stream.py
    async def generate_stream(request: Request):
        return await stream.generate(svc, request)

    @app.get("/models", summary="Served models: classes, shape, schedule, step counts")
    async def models(request: Request):
        svc.check_key(request)
        return {"default": svc.registry.default, "models": [e.describe(settings) for e in svc.registry]}

    @app.get("/solvers", summary="Per model: the sampler chosen for each offered step count, its measured quality")
    async def solvers(request: Request):
        svc.check_key(request)
        return {"models": {e.name: {"steps": e.samplers.choices(settings.steps), "available": ["auto", *e.samplers.names()],
                                    "grids": {s.name: s.grid for s in e.samplers if s.listed},
                                    "eval": e.samplers.rows} for e in svc.registry}}

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

    @app.post("/v1/images/generations", summary="Generate images (OpenAI images API; prompt = class name)",
              response_class=JSONResponse)
    async def images_generations(request: Request):
        return await openai_api.generations(svc, request)

    playground.mount(app)

    return app
