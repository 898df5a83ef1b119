"""Prometheus metrics, one registry per process role.

Labels come only from bounded sets: model (the served models), solver (the samplers' names),
steps (the offered list), reason/code (fixed strings). Never the seed, class or request id.
The API owns request-level series (it sees every outcome); the worker owns the compute series.
In embedded mode one process holds both.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

# 1 ms resolution at the bottom (a few-step sample of a small model), tens of seconds at the top.
LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5,
           5.0, 10.0, 30.0, 60.0)
STEP = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
ROWS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512)

REQ = ("model", "solver", "steps")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, process: bool = True):
        r = self.registry = registry or CollectorRegistry()
        if process:
            ProcessCollector(registry=r)
        # API side
        self.request_seconds = Histogram("stride_request_duration_seconds", "End-to-end latency of successful "
                                         "/generate requests", REQ, buckets=LATENCY, registry=r)
        self.queue_seconds = Histogram("stride_queue_wait_seconds", "Accepted to first step (queue wait)", REQ,
                                       buckets=LATENCY, registry=r)
        self.compute_seconds = Histogram("stride_compute_seconds", "First step to last image sampled", REQ,
                                         buckets=LATENCY, registry=r)
        self.responses = Counter("stride_responses_total", "API responses by status code (/generate, and 401s anywhere)", ["code"], registry=r)
        self.rejected = Counter("stride_rejected_total", "Requests refused or failed, by reason", ["reason"],
                                registry=r)
        self.queue_depth = Gauge("stride_queue_depth", "Requests queued or running", ["model"], registry=r)
        self.streams = Counter("stride_stream_requests", "Streamed /generate requests admitted", registry=r)
        self.stream_first_event_seconds = Histogram("stride_stream_first_event_seconds", "Streamed requests: "
                                                    "arrival to the first event (queued)", buckets=LATENCY, registry=r)
        self.preview_frames = Counter("stride_stream_preview_frames", "Streamed requests: preview events sent",
                                      registry=r)
        self.stream_first_preview_seconds = Histogram("stride_stream_first_preview_seconds", "Streamed requests "
                                                      "with previews: arrival to the first preview event",
                                                      buckets=LATENCY, registry=r)
        self.workers_live = Gauge("stride_workers_live", "Workers with a live heartbeat (ready ones)", ["model"],
                                  registry=r)
        # worker side
        self.images = Counter("stride_images_total", "Images generated", REQ, registry=r)
        self.evaluations = Counter("stride_model_evaluations_total", "Model rows evaluated (CFG rows count twice)",
                                   ["model"], registry=r)
        self.model_calls = Counter("stride_model_calls_total", "Batched model calls (steps)", ["model"], registry=r)
        self.batch_rows = Histogram("stride_batch_rows", "Rows per model call", ["model"], buckets=ROWS, registry=r)
        self.step_seconds = Histogram("stride_step_duration_seconds", "One model call + fused update (CUDA: the "
                                      "host's launch time; the device runs behind it)", ["model"], buckets=STEP,
                                      registry=r)
        self.decode_seconds = Histogram("stride_decode_seconds", "Finished samples -> uint8 pixels on the host "
                                        "(decoder, quantisation, copy), per step that finished some", ["model"],
                                        buckets=STEP, registry=r)
        self.encode_seconds = Histogram("stride_encode_seconds", "pixels -> response body, in an encoder pool: "
                                        "the worker's for /generate's images, the API's for the rest", ["format"],
                                        buckets=STEP, registry=r)
        self.worker_ready = Gauge("stride_worker_ready", "1 once this process's worker has warmed up", registry=r)
        self.worker_draining = Gauge("stride_worker_draining", "1 once this worker was told to stop: it takes no "
                                     "new work and finishes what it holds", registry=r)
        self.rows_in_flight = Gauge("stride_worker_rows", "Rows running in this worker's batch", registry=r)
        self.redelivered = Counter("stride_redelivered_total", "Queue entries re-claimed from a dead worker",
                                   registry=r)
        self.dead_letters = Counter("stride_dead_letters_total", "Entries moved to the dead-letter stream",
                                    registry=r)
        self.worker_results = Counter("stride_worker_results_total", "Results written by this worker, by outcome "
                                      "(ok, cancelled, expired, failed, refused)", ["outcome"], registry=r)

    def init_labels(self, registry, steps):
        """Create every bounded series up front so dashboards show zeros, not gaps."""
        for e in registry:
            for n in steps:  # the auto-picked sampler per offered step count: rate() sees the first request
                try:
                    labels = (e.name, e.samplers.resolve(n).name, str(n))
                except ValueError:
                    continue
                for m in (self.request_seconds, self.queue_seconds, self.compute_seconds, self.images):
                    m.labels(*labels)
            self.queue_depth.labels(e.name).set(0)
            self.workers_live.labels(e.name).set(0)
            self.evaluations.labels(e.name)
            self.model_calls.labels(e.name)
        for reason in REASONS:
            self.rejected.labels(reason)


REASONS = ("invalid", "slow_client", "too_large", "unknown_model", "unauthorized", "queue_full", "no_worker", "queue_unavailable", "deadline",
           "lost", "dead_letter", "cancelled", "error")
