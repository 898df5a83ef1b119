"""The OpenAPI document is the contract: every status, limit, enum and content type, fuzzed with
schemathesis (every check)."""
import re
import subprocess
import sys

import httpx
import pytest
from hostile_api import STEPS, metrics, post, settings  # noqa: F401
from service_fixtures import (
    guided_entry,
)

from stride_diffusion.service.params import SEED_MAX


# -- 3. the OpenAPI document is the contract ----------------------------------------------------------
def test_openapi_states_every_status_limit_enum_and_content_type(api):
    doc = httpx.get(api.url + "/openapi.json").json()
    op = doc["paths"]["/generate"]["post"]
    assert {"200", "404", "413", "415", "422", "500", "503", "504"} <= set(op["responses"])
    assert op["responses"]["503"]["headers"]["Retry-After"]["required"] is True
    assert "X-Stride-Guidance" in op["responses"]["200"]["headers"]
    assert "parameters" not in op  # every field in one place: the body (the query form is a stated alternative)
    body = op["requestBody"]["content"]["application/json"]["schema"]
    p = body["properties"]
    assert body["additionalProperties"] is False and body["required"] == ["class_label"]
    assert p["steps"]["anyOf"][0]["enum"] == STEPS
    assert p["n"]["minimum"] == 1 and p["n"]["maximum"] == 8
    assert p["seed"]["anyOf"][0]["maximum"] == SEED_MAX and p["guidance"]["anyOf"][0]["maximum"] == 20
    assert p["format"]["enum"] == ["png", "jpeg", "webp", "json"]
    assert p["quality"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 100}
    assert p["class_label"]["anyOf"][1]["enum"] == sorted(guided_entry().class_names)
    assert {"auto", "euler", "dpmpp-2m/karras", "secant-test"} <= set(p["solver"]["enum"])
    secant = [b for b in body["anyOf"] if b["properties"]["solver"]["enum"] == ["secant-test"]]
    assert secant[0]["properties"]["guidance"]["anyOf"][0] == {"type": "number", "minimum": 1.0, "maximum": 3.0}
    assert doc["paths"]["/readyz"]["get"]["responses"]["503"]
    assert list(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert httpx.get(api.url + "/metrics").headers["content-type"].startswith("text/plain")


def test_schemathesis_every_check_finds_no_failure(api, tmp_path):
    """Property-based, from the OpenAPI document: examples, coverage and fuzzing phases, all checks
    (no 5xx, status codes, content types, headers and bodies as declared, schema-valid data accepted,
    invalid data rejected, unsupported methods refused)."""
    pytest.importorskip("schemathesis")
    cmd = [sys.executable, "-c", "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())",
           "run", api.url + "/openapi.json", "--checks", "all", "--max-examples", "40", "--seed", "16",
           "--request-timeout", "20", "--no-color"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    m = re.search(r"(\d+) generated, (\d+) passed", r.stdout)
    assert m and int(m.group(1)) >= 100 and m.group(1) == m.group(2), r.stdout[-3000:]




def test_with_an_api_key_the_open_document_names_no_class_model_or_sampler():
    """/models and /solvers need the key; /openapi.json stays open (Swagger UI reads it), so it keeps
    each field's type and bounds but none of the served names."""
    from fastapi.testclient import TestClient

    from stride_diffusion.service.app import create_app
    from stride_diffusion.service.models import Registry
    from stride_diffusion.service.openapi import served_names

    registry = Registry([guided_entry()])
    app = create_app(settings(api_key="k3y", warmup=False), registry)
    with TestClient(app) as c:
        text = c.get("/openapi.json").text
        assert c.get("/models").status_code == 401
    names = served_names(registry)
    assert {"secant-test", "euler", "gmm"} <= names and len(names) > 20
    assert [n for n in sorted(names) if f'"{n}"' in text] == []
    body = app.openapi()["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["n"]["maximum"] == 8 and "anyOf" not in body
    assert "enum" not in body["properties"]["solver"] and body["properties"]["steps"]["anyOf"][0]["enum"] == STEPS
