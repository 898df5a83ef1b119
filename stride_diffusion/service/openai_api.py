"""POST /v1/images/generations: the OpenAI images API over the /generate path.

The prompt names a class (exact match, then case-insensitive); `size` must be the served image
size; images come back as `b64_json` only (stride keeps no image store to serve URLs from).
stride's own knobs ride along as extra body fields (`steps`, `seed`, `guidance`, `solver`), which
the `openai` client sends with `extra_body=`. Errors use OpenAI's body
`{"error": {"message", "type", "param", "code"}}` so that clients raise their usual exceptions.
"""
from __future__ import annotations

import json
import time
from typing import ClassVar

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from .labels import class_index, closest
from .openapi import RESULT_HEADERS, RETRY_AFTER, sampler_branches
from .params import JSON_TYPES, SEED_MAX, ApiError, parse, quoted

EXTRA_FIELDS = ("steps", "seed", "guidance", "solver")  # stride's, beside OpenAI's

DOC = """Generate images of one class, following the OpenAI images API (`client.images.generate`).

`prompt` is a class name (GET /models). `size` is optional and must equal the model's served size;
`response_format` is `b64_json` (the default; `url` is refused). stride's extras `steps`, `seed`,
`guidance` and `solver` are accepted as further body fields; image i uses seed + i. The same
queue, limits, API key and metrics as /generate; the X-Stride-* response headers are the same too.

Errors: 400 invalid value (unknown prompt: the closest class names), 404 unknown model, 401 missing
or wrong API key, 503 + Retry-After, 504, 500; bodies are `{"error": {"message", "type", "param", "code"}}`.
"""


class ImagesBody(BaseModel):
    """The JSON body of POST /v1/images/generations (documentation; the handler checks every field)."""

    prompt: str = Field(..., description="a class name (GET /models): exact, else case-insensitive")
    model: str | None = Field(None, description="model name (GET /models); default the first")
    n: int = Field(1, description="number of images; image i uses seed + i")
    size: str | None = Field(None, description="'WxH', the model's served size (GET /models: size), or 'auto'")
    response_format: str = Field("b64_json", description="b64_json only")
    user: str | None = Field(None, description="accepted and ignored")
    steps: int | None = Field(None, description="stride: model evaluations, one of the offered step counts")
    seed: int | None = Field(None, description="stride: random when absent (returned in X-Stride-Seed)")
    guidance: float | None = Field(None, description="stride: classifier-free guidance scale; 1 = off")
    solver: str = Field("auto", description="stride: 'auto' or a name from GET /solvers")


OPENAI_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
        "code": {"type": ["string", "null"]}}}, "request_id": {"type": "string"}}}


def operation(registry, settings, auth: bool) -> dict:
    """The OpenAPI operation, generated from what is served as /generate's is: class names, sizes,
    step counts, samplers and their guidance ranges. Every optional field may be null (= its default),
    as OpenAI's clients send it. The case-insensitive prompt match is a
    leniency stated in words; the schema lists the exact names."""
    props = {k: {kk: vv for kk, vv in v.items() if kk != "title"}
             for k, v in ImagesBody.model_json_schema()["properties"].items()}
    names = sorted({c for e in registry for c in e.class_names})
    sizes = sorted({e.image_size() for e in registry})
    exact = {"prompt": {"type": "string", "enum": names},
             "model": {"anyOf": [{"type": "string", "enum": registry.names()}, {"type": "null"}]},
             "n": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": settings.max_images}, {"type": "null"}],
                   "default": 1},
             "size": {"anyOf": [{"type": "string", "enum": [*sizes, "auto"]}, {"type": "null"}]},
             "response_format": {"anyOf": [{"type": "string", "enum": ["b64_json"]}, {"type": "null"}],
                                 "default": "b64_json"},
             "user": {"anyOf": [{"type": "string"}, {"type": "null"}]},
             "steps": {"anyOf": [{"type": "integer", "enum": list(settings.steps)}, {"type": "null"}]},
             "seed": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": SEED_MAX}, {"type": "null"}]},
             "guidance": {"anyOf": [{"type": "number", "minimum": 0, "maximum": settings.guidance_max},
                                    {"type": "null"}]},
             "solver": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": "auto"}}
    for k, sch in exact.items():
        props[k] = {**sch, "description": props[k].get("description", "")}
    branches = sampler_branches(registry, settings, "prompt", lambda e: {"enum": list(e.class_names)},
                                lambda e: {"size": {"enum": [e.image_size(), "auto", None]}})
    for b in branches:  # null means the default, as for every optional OpenAI field
        if b["properties"]["solver"]["enum"] == ["auto"]:
            b["properties"]["solver"]["enum"] = ["auto", None]
    body = {"type": "object", "properties": props, "required": ["prompt"], "additionalProperties": False,
            "anyOf": branches}

    def err(desc, headers=None):
        out = {"description": desc, "content": {"application/json": {"schema": OPENAI_ERROR}}}
        return {**out, "headers": headers} if headers else out

    image = {"type": "object", "required": ["b64_json"], "properties": {"b64_json": {"type": "string"}}}
    responses = {
        "200": {"description": "the images, base64 PNGs", "headers": RESULT_HEADERS, "content": {"application/json": {
            "schema": {"type": "object", "required": ["created", "data"], "properties": {
                "created": {"type": "integer"}, "data": {"type": "array", "items": image}}}}}},
        "400": err("invalid value (an unknown prompt: the closest class names; a size: the one served)"),
        "404": err("unknown model"),
        "413": {"description": "body larger than the limit (checked while it streams; stride's error body)",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
        "500": {"description": "failed or an internal error", "content": {"application/json": {"schema": {
            "anyOf": [OPENAI_ERROR, {"$ref": "#/components/schemas/Error"}]}}}},
        "503": err("queue full (in requests, or in work that would not finish before the deadline), no live "
                   "worker, or the queue unreachable", RETRY_AFTER),
        "504": err("the deadline passed before the images were done"),
    }
    if auth:
        responses["401"] = err("missing or wrong API key")
    return {"description": DOC, "responses": responses,
            "requestBody": {"required": True, "content": {"application/json": {"schema": body}}}}


class OpenAIError(ApiError):
    """An ApiError whose body has OpenAI's shape; invalid values are 400 there, not 422."""

    CODES: ClassVar[dict[int, str]] = {401: "invalid_api_key", 404: "model_not_found", 408: "request_timeout", 413: "request_too_large", 415: "unsupported_media_type", 503: "unavailable",
             504: "timeout"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
        super().__init__(400 if status == 422 else status, message, param, headers=headers)
        self.code = code or self.CODES.get(self.status, "invalid_value" if self.status == 400 else None)

    @classmethod
    def of(cls, e: ApiError) -> OpenAIError:
        return e if isinstance(e, OpenAIError) else cls(e.status, e.detail, e.field, headers=e.headers)

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.detail, "type": kind, "param": self.field, "code": self.code}}


def match_class(prompt, names: list[str]) -> int:
    """The class a prompt names (`labels.class_index`); a prompt that names none gets the closest names."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise OpenAIError(400, f"prompt must be a class name, one of {names[:20]}{' ...' if len(names) > 20 else ''} "
                               "(GET /models lists them all)", "prompt", "missing_prompt")
    try:
        return class_index(names, prompt)
    except ValueError:
        raise OpenAIError(400, f"prompt {quoted(prompt)} is no class name of this model; closest: {closest(names, prompt)} "
                               "(GET /models lists them all)", "prompt", "unknown_class") from None


def to_generate(body: dict, registry) -> dict:
    """An images/generations body as /generate fields (format json: one PNG per image)."""
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise OpenAIError(400, f"unsupported field(s) {[u[:100] for u in unknown[:5]]}; allowed: {list(FIELDS)}", unknown[0])
    name = registry.default if body.get("model") is None else body["model"]  # null = the default; {} or 0 is no name
    if not isinstance(name, str) or name not in registry:
        raise OpenAIError(404, f"unknown model {quoted(name)}; available: {registry.names()}", "model")
    e = registry[name]
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise OpenAIError(400, "user must be a string (it is accepted and ignored)", "user")
    fmt = "b64_json" if body.get("response_format") is None else body["response_format"]
    if fmt != "b64_json":
        why = "stride keeps no image store to serve URLs from; " if fmt == "url" else ""
        raise OpenAIError(400, f"response_format {quoted(fmt)} is not supported: {why}use 'b64_json'", "response_format")
    size, want = body.get("size"), e.image_size()
    if size not in (None, "auto", want):
        raise OpenAIError(400, f"size {quoted(size)} is not offered by model {name!r}: its images are {want} "
                               f"(allowed: ['{want}', 'auto'])", "size")
    out = {"model": name, "class_label": match_class(body.get("prompt"), e.class_names), "format": "json"}
    for k in ("n", *EXTRA_FIELDS):
        if body.get(k) is not None:
            out[k] = body[k]
    return out


FIELDS = tuple(ImagesBody.model_fields)


async def read_object(request: Request) -> dict:
    raw = await request.body()
    media = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if raw.strip() and media not in JSON_TYPES:
        raise OpenAIError(415, f"the body must be JSON sent as 'Content-Type: application/json' (got "
                               f"{(request.headers.get('content-type') or '')[:80]!r})", "content-type")
    try:
        body = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError) as err:  # RecursionError: nested too deeply
        raise OpenAIError(400, f"body is not valid JSON: {str(err)[:200]}") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, f"body must be a JSON object with fields {list(FIELDS)}")
    return body


async def generations(svc, request: Request) -> JSONResponse:
    """Bodies are bounded for every route by service.limits.Guard (413 before the rest is read)."""
    t0 = time.perf_counter()
    try:
        svc.check_key(request)
        try:
            p = parse(to_generate(await read_object(request), svc.registry), svc.registry, svc.settings)
        except ApiError as err:  # counted as /generate counts them
            svc.count_invalid(err)
            raise
        job, res = await svc.run(request, p, t0)
    except ApiError as err:
        raise OpenAIError.of(err) from None
    data = [{"b64_json": b} for b in await svc.encoder.b64_pngs(res.images(), svc.registry[job.model].display_scale)]
    return JSONResponse({"created": int(time.time()), "data": data}, headers=svc.stride_headers(job, res))
