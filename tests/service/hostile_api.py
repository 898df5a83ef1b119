"""Shared by the hostile-input tests: the analytic model's settings, a POST helper, /metrics."""

import httpx
from service_fixtures import (
    ApiServer,
    guided_entry,
)

from stride_diffusion.service.models import Registry
from stride_diffusion.service.settings import Settings

STEPS = [1, 2, 4, 8, 16]


def settings(**kw):
    base = {"test_model": "gmm", "steps": STEPS, "max_batch": 32, "max_wait_ms": 5, "max_images": 8, "threads": 1}
    return Settings(**{**base, **kw})


def api_server():
    """An ApiServer on the gmm model with a guidance-input variant (the `api` fixture)."""
    srv = ApiServer(settings(), Registry([guided_entry()]))
    yield srv
    srv.stop()


def post(api, params=None, json=None, content=None, headers=None):
    return httpx.post(api.url + "/generate", params=params, json=json, content=content, headers=headers, timeout=30)


def metrics(api) -> str:
    return httpx.get(api.url + "/metrics").text


