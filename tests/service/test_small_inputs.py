"""Small input cases: nested JSON and non-JSON bodies on /v1/images/generations, and seeds past the maximum."""
import httpx
from hostile_api import metrics, post
from service_fixtures import metric_value

from stride_diffusion.service.params import SEED_MAX


def v1(api, content, content_type="application/json"):
    return httpx.post(api.url + "/v1/images/generations", content=content, headers={"content-type": content_type},
                      timeout=30)


def test_deeply_nested_json_to_v1_is_400_not_500(api):
    before = metric_value(metrics(api), "stride_responses_total", code="500")
    r = v1(api, b"[" * 3000 + b"]" * 3000)
    assert r.status_code == 400, r.text[:300]
    assert "not valid JSON" in r.json()["error"]["message"] and len(r.text) < 2000
    assert metric_value(metrics(api), "stride_responses_total", code="500") == before


def test_text_plain_body_to_v1_is_415_like_generate(api):
    r = v1(api, b'{"prompt": "3"}', "text/plain")
    assert r.status_code == 415, r.text
    assert r.json()["error"]["param"] == "content-type"
    assert post(api, None, content=b'{"class_label": 3}', headers={"content-type": "text/plain"}).status_code == 415


def test_seed_plus_n_past_the_maximum_is_refused_naming_the_range(api):
    r = post(api, {"class_label": 3, "n": 8, "seed": SEED_MAX, "steps": 1})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "seed" and r.json()["allowed"] == [0, SEED_MAX - 7]
    ok = post(api, {"class_label": 3, "n": 8, "seed": SEED_MAX - 7, "steps": 1, "format": "json"})
    assert ok.status_code == 200, ok.text
