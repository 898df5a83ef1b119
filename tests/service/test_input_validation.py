"""No input reaches a 500: huge numbers, digit limits, unexpected errors as a JSON 500 with a
request id, falsy and wrong-typed values, duplicate keys, content types."""

import pytest
from hostile_api import STEPS, metrics, post, settings  # noqa: F401
from service_fixtures import (
    metric_value,
)

# -- 1. no input reaches a 500 ------------------------------------------------------------------------
HUGE = "9" * 5000  # past Python's int-from-string digit limit


@pytest.mark.parametrize("params,json_body,field", [
    ({"class_label": 3, "steps": HUGE}, None, "steps"),
    ({"class_label": 3, "n": HUGE}, None, "n"),
    ({"class_label": 3, "seed": HUGE}, None, "seed"),
    ({"class_label": 3, "seed": "-" + HUGE}, None, "seed"),
    ({"class_label": HUGE}, None, "class_label"),
    ({"class_label": 3, "guidance": HUGE}, None, "guidance"),
    ({"class_label": 3, "guidance": "1e999"}, None, "guidance"),
    (None, {"class_label": 3, "guidance": 10 ** 400}, "guidance"),  # a JSON integer too large for a float
    (None, {"class_label": 3, "seed": 10 ** 400}, "seed"),
    (None, {"class_label": 3, "n": 1e300}, "n"),
    (None, {"class_label": 3, "steps": -(10 ** 30)}, "steps"),
    (None, {"class_label": 10 ** 400}, "class_label"),
])
def test_huge_numbers_are_422_naming_the_field(api, params, json_body, field):
    before = metric_value(metrics(api), "stride_responses_total", code="500")
    r = post(api, params, json=json_body)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and "allowed" in r.json() and len(r.text) < 2000
    assert metric_value(metrics(api), "stride_responses_total", code="500") == before


def test_json_body_with_an_integer_beyond_the_digit_limit(api):
    r = post(api, content=b'{"class_label": 3, "seed": ' + HUGE.encode() + b"}",
             headers={"content-type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["detail"]


def test_unexpected_error_is_a_json_500_with_a_request_id_logged_and_counted(api, monkeypatch, caplog):
    async def broken(job):
        raise RuntimeError("boom")

    text = metrics(api)
    c500, err = (metric_value(text, "stride_responses_total", code="500"),
                 metric_value(text, "stride_rejected_total", reason="error"))
    monkeypatch.setattr(api.service.queue, "submit", broken)
    with caplog.at_level("ERROR", logger="stride.api"):
        r = post(api, {"class_label": 1})
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    rid = r.json()["request_id"]
    assert rid and r.headers["x-stride-request-id"] == rid and "boom" not in r.text  # no internals leak
    assert any(rid in rec.getMessage() and rec.exc_info for rec in caplog.records)
    text = metrics(api)
    assert metric_value(text, "stride_responses_total", code="500") == c500 + 1
    assert metric_value(text, "stride_rejected_total", reason="error") == err + 1


# -- 4. falsy and wrong-typed values, duplicate keys, content type ---------------------------------------
@pytest.mark.parametrize("params,body,status,field", [
    (None, {"class_label": 1, "model": {}}, 422, "model"),
    (None, {"class_label": 1, "model": 0}, 422, "model"),
    (None, {"class_label": 1, "model": ""}, 404, "model"),
    (None, {"class_label": 1, "solver": False}, 422, "solver"),
    (None, {"class_label": 1, "solver": ""}, 422, "solver"),
    (None, {"class_label": 1, "solver": None}, 422, "solver"),
    ({"class_label": 1, "solver": ""}, None, 422, "solver"),
    ({"class_label": 1, "model": ""}, None, 404, "model"),
    (None, {"class_label": 1, "n": None}, 422, "n"),
    (None, {"class_label": 1, "n": "2"}, 422, "n"),  # a JSON string is never a number
    (None, {"class_label": "3"}, 422, "class_label"),
    (None, {"class_label": 1, "format": "PNG"}, 422, "format"),
    (None, {"class_label": 1, "format": 0}, 422, "format"),
    (None, {"class_label": 1, "steps": True}, 422, "steps"),
])
def test_falsy_and_wrong_typed_values_are_refused(api, params, body, status, field):
    r = post(api, params, json=body)
    assert r.status_code == status and r.json()["field"] == field, r.text


def test_duplicate_json_keys_are_refused(api):
    r = post(api, content=b'{"class_label": 1, "steps": 4, "steps": 8}', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["field"] == "steps" and "more than once" in r.json()["detail"]


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_body_that_is_not_json_gets_415(api, ctype):
    r = post(api, content=b'{"class_label": 1}', headers={"content-type": ctype} if ctype else {})
    assert r.status_code == 415 and "application/json" in r.json()["detail"], r.text


def test_json_content_type_with_charset_is_json(api):
    r = post(api, content=b'{"class_label": 1, "seed": 3, "steps": 1}',
             headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200


