"""A client that disconnects cancels its rows at the next step, in embedded and Redis mode."""
import json
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from hostile_api import STEPS, metrics, post, settings  # noqa: F401
from service_fixtures import (
    ApiServer,
    RedisServer,
    WorkerProc,
    metric_value,
    reference,
    wait_for,
)

from stride_diffusion.service import images
from stride_diffusion.service.models import Registry, analytic_entry
from stride_diffusion.service.settings import Settings


# -- 6. cancel on client disconnect -------------------------------------------------------------------
def _send_generate(port: int, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
              % len(data) + data)
    return s


def _cancel_mid_run(url: str, port: int, rows, evaluations):
    """A (4 images, 16 steps) starts; B (1 image) joins its batch; A's client goes away. Returns B's
    response and the evaluations made, once the batch is empty."""
    a = _send_generate(port, {"class_label": 1, "n": 4, "seed": 10, "steps": 16})
    wait_for(lambda: rows() >= 4, 20, "A's rows in the batch")
    with ThreadPoolExecutor(1) as ex:
        fb = ex.submit(httpx.post, url + "/generate", json={"class_label": 7, "seed": 99, "steps": 16}, timeout=60)
        wait_for(lambda: rows() >= 5, 20, "B's row beside A's")
        a.close()  # the client of A goes away mid-run
        b = fb.result()
    wait_for(lambda: rows() == 0, 20, "the batch to empty")
    return b, evaluations()


def test_client_disconnect_frees_its_rows_and_the_batch_completes_unchanged():
    entry = analytic_entry("gmm:delay_ms=40")
    srv = ApiServer(settings(max_wait_ms=0), Registry([entry]))
    try:
        w = srv.service.worker
        b, ev = _cancel_mid_run(srv.url, srv.port, lambda: w.engine.rows,
                                lambda: srv.service.metrics.evaluations.labels("gmm")._value.get())
        assert b.status_code == 200 and np.array_equal(images.decode(b.content), reference(7, 99, 16))
        assert ev < 16 + 4 * 16, "A's rows were evaluated to the end"
        text = metrics(srv)
        assert metric_value(text, "stride_rejected_total", reason="cancelled") == 1
        assert metric_value(text, "stride_worker_results_total", outcome="cancelled") == 1
        assert not w.tasks and not srv.service.queue.futures
    finally:
        srv.stop()


@pytest.fixture()
def redis_server():
    srv = RedisServer()
    yield srv
    srv.stop()


def test_client_disconnect_in_redis_mode_cancels_through_a_marker(redis_server):
    prefix = "cancel"
    wp = WorkerProc(redis_server.url, "w-cancel", prefix=prefix, delay_ms=40, metrics=True,
                    extra=["--max-wait-ms", "0"]).wait_ready()
    api = ApiServer(Settings(role="api", redis_url=redis_server.url, key_prefix=prefix, test_model="gmm", steps=STEPS,
                             max_images=8, heartbeat_s=0.2))
    try:
        def wm(name, **labels):
            return metric_value(wp.metrics_text(), name, **labels)

        b, ev = _cancel_mid_run(api.url, api.port, lambda: wm("stride_worker_rows"),
                                lambda: wm("stride_model_evaluations_total", model="gmm"))
        assert b.status_code == 200 and np.array_equal(images.decode(b.content), reference(7, 99, 16))
        assert ev < 16 + 4 * 16, "A's rows were evaluated to the end"
        assert wm("stride_worker_results_total", outcome="cancelled") == 1
        assert metric_value(metrics(api), "stride_rejected_total", reason="cancelled") == 1
        r = redis_server.client()
        assert r.xlen(f"{prefix}:requests:gmm") == 0  # the cancelled entry was released, not left to redeliver
        assert len(r.keys(f"{prefix}:cancel:*")) == 1
    finally:
        api.stop()
        wp.stop()


