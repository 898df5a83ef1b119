"""POST /v1/images/generations through the real `openai` client: images of the asked class and size,
the documented errors as the client's own exception types, the /generate path underneath."""
import base64
import os

import httpx
import numpy as np
import pytest
import torch
from service_fixtures import ROOT, ApiServer, metric_value

from stride_diffusion.service import images
from stride_diffusion.service.openai_api import OpenAIError, match_class
from stride_diffusion.service.settings import Settings
from stride_diffusion.solvers.artifact import load_artifact

openai = pytest.importorskip("openai")
DIGITS = os.path.join(ROOT, "artifacts", "digits")


@pytest.fixture(scope="module")
def api():
    srv = ApiServer(Settings(artifacts=[DIGITS], steps=[1, 2, 4, 8], threads=1, max_wait_ms=2, max_images=8))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(api):
    return openai.OpenAI(base_url=api.url + "/v1", api_key="unused", max_retries=0)


def classify(pngs: list[bytes]) -> list[int]:
    """The artifact's own classifier on the served PNGs, taken back to 16x16 in [-1, 1]."""
    net = load_artifact(DIGITS).classifier
    a = np.stack([images.decode(p)[::8, ::8] for p in pngs]).astype(np.float32)
    with torch.no_grad():
        return net(torch.from_numpy(a / 127.5 - 1.0)[:, None]).argmax(1).tolist()


def test_images_of_the_asked_class_and_size(client):
    pngs, want = [], []
    for digit in range(10):
        r = client.images.generate(prompt=str(digit), n=2, size="128x128", response_format="b64_json",
                                   extra_body={"steps": 4, "seed": 100 * digit})
        assert isinstance(r.created, int) and len(r.data) == 2
        pngs += [base64.b64decode(d.b64_json) for d in r.data]
        want += [digit, digit]
    assert all(images.decode(p).shape == (128, 128) for p in pngs)
    got = classify(pngs)
    assert sum(g == w for g, w in zip(got, want)) >= 18, (got, want)  # eval: 98% accuracy at 4 steps


def test_same_path_as_generate(api, client):
    """The extras mean what they mean on /generate: byte-identical images, shared metrics."""
    before = metric_value(httpx.get(api.url + "/metrics").text, "stride_images_total", model="digits", steps="2")
    raw = client.images.with_raw_response.generate(prompt="3", n=2, extra_body={"steps": 2, "seed": 9,
                                                                                "guidance": 2.0, "solver": "heun"})
    assert raw.headers["x-stride-solver"] == "heun" and raw.headers["x-stride-seed"] == "9"
    got = [base64.b64decode(d.b64_json) for d in raw.parse().data]
    ref = httpx.post(api.url + "/generate", json={"class_label": 3, "n": 2, "steps": 2, "seed": 9, "guidance": 2.0,
                                                  "solver": "heun", "format": "json"}).json()
    assert got == [base64.b64decode(b) for b in ref["images"]]
    after = metric_value(httpx.get(api.url + "/metrics").text, "stride_images_total", model="digits", steps="2")
    assert after - before == 4


def test_documented_errors_through_the_client(api, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="70")
    assert e.value.code == "unknown_class" and e.value.param == "prompt" and "closest: ['7', '0'" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="7", size="1024x1024")
    assert e.value.param == "size" and "its images are 128x128" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="7", response_format="url")
    assert e.value.param == "response_format" and "use 'b64_json'" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="7", extra_body={"steps": 3})
    assert e.value.param == "steps" and "steps must be one of [1, 2, 4, 8]" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="7", quality="hd")
    assert "unsupported field(s) ['quality']" in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        client.images.generate(prompt="7", model="dall-e-3")
    assert e.value.code == "model_not_found" and "available: ['digits']" in e.value.message
    text = httpx.get(api.url + "/metrics").text
    assert metric_value(text, "stride_rejected_total", reason="invalid") >= 5
    assert metric_value(text, "stride_rejected_total", reason="unknown_model") >= 1


def test_api_key_is_the_same_bearer_key():
    srv = ApiServer(Settings(test_model="gmm", steps=[1, 2], threads=1, api_key="s3cret"))
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).images.generate(prompt="one")
        assert e.value.code == "invalid_api_key"
        ok = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        r = ok.images.generate(prompt="One", size="64x64", extra_body={"steps": 1})  # case-insensitive match
        assert images.decode(base64.b64decode(r.data[0].b64_json)).shape == (64, 64)
    finally:
        srv.stop()


@pytest.mark.parametrize("prompt,index", [("One", 1), ("one", 1), (" ONE ", 1), ("Tabby", 2), ("tabby", 3)])
def test_prompt_matching_exact_then_case_insensitive(prompt, index):
    assert match_class(prompt, ["zero", "One", "Tabby", "tabby"]) == index


def test_unknown_prompt_lists_the_closest_names():
    with pytest.raises(OpenAIError) as e:
        match_class("sevn", ["zero", "one", "seven", "eleven"])
    assert e.value.status == 400 and "closest: ['seven', 'eleven'" in e.value.detail
    assert e.value.body()["error"]["param"] == "prompt"
