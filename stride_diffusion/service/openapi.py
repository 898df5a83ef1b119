"""The OpenAPI document as the contract the server enforces, and Swagger UI from package files.

Everything a request may hold comes from what is served: class names and counts, offered step
counts, each model's samplers (a learned one only at its fitted step count, a secant model with a
guidance input only on its trained range), `n` and guidance bounds from the settings, formats from
`params.FORMATS`. A field of `GenerateBody` that this module does not constrain keeps the schema
pydantic gives it, so a new field shows up without a change here. The body is the one documented
place of every field; the query form is stated in the description (the same names, string values,
a field in one place only), because OpenAPI cannot say "here or there, not both".
"""
from __future__ import annotations

from pathlib import Path

from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse

from .params import FORMATS, NULLABLE, SEED_MAX, GenerateBody

STATIC = Path(__file__).parent / "static" / "swagger-ui"
DOC_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")

GENERATE_DOC = """Generate images of one class.

The fields come as a JSON object body (`Content-Type: application/json`; any other body gets 415,
a key given twice 422). Each field may instead be given as a query parameter of the same name
(e.g. `POST /generate?class_label=3&steps=4`); a field given both ways is refused (422).
Returns `image/png` (the image, or a grid for n > 1) or, with `format=json`, base64 PNGs with their
seeds. Image i of a request with seed S uses seed S + i; the same seed, class, steps, solver and
guidance give the same image whatever else is batched with it.

`solver=auto` picks the best measured sampler for the step count among those that honour the
requested guidance (a secant model with a guidance input only serves its trained range); naming a
sampler that cannot honour it is refused (422 naming its range). X-Stride-Guidance is the scale
applied.

When the client disconnects, the request is cancelled: its rows leave the batch before the next step.
"""

ERROR = {"type": "object", "required": ["detail"], "properties": {
    "detail": {"type": "string", "description": "what was wrong and what is allowed"},
    "field": {"type": "string", "description": "the field at fault"},
    "allowed": {"description": "the allowed values or [min, max]"},
    "request_id": {"type": "string", "description": "the id of the request (a 500 is logged under it)"}}}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "required": True,
                               "schema": {"type": "string", "pattern": "^[0-9]+$"}}}
RESULT_HEADERS = {h: {"description": d, "required": True, "schema": {"type": "string"}} for h, d in [
    ("X-Stride-Solver", "the sampler used"), ("X-Stride-NFE", "model evaluations per image"),
    ("X-Stride-Guidance", "the guidance scale applied"), ("X-Stride-Seed", "seed of image 0"),
    ("X-Stride-Model", "the model"), ("X-Stride-Queue-Ms", "accepted to first step"),
    ("X-Stride-Compute-Ms", "first step to last image"), ("X-Stride-Request-Id", "id of this request")]}


def _err(desc: str, headers: dict | None = None) -> dict:
    out = {"description": desc, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    return {**out, "headers": headers} if headers else out


def _nullable(field: str, schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]} if field in NULLABLE else schema


def _label(e) -> dict:
    return {"anyOf": [{"type": "integer", "minimum": 0, "maximum": e.num_classes - 1},
                      {"type": "string", "enum": list(e.class_names)}]}


def sampler_families(e, offered) -> list[tuple[list[str], list[int], tuple[float, float] | None]]:
    """(solver names, the step counts they run at, their guidance range or None for any) of one model:
    'auto'; then one for the samplers of a network that serve every step count with the same guidance
    range, and one for each sampler with step counts of its own (those offered)."""
    groups = {}
    for s in e.samplers:  # listed or not: a classic name with a grid is accepted too
        steps = [n for n in offered if s.serves(n)]
        if steps:
            key = (s.network, s.guidance_range) if s.steps is None else (s.name,)
            groups.setdefault(key, ([], steps, s.guidance_range))[0].append(s.name)
    return [(["auto"], list(offered), None), *groups.values()]


def sampler_branches(registry, settings, label_field: str, label_schema, extra=None) -> list[dict]:
    """One `anyOf` branch per (model, sampler family): what depends on both (the class field,
    step counts, guidance range); `extra(entry)` adds per-model properties. Shared by /generate and
    /v1/images/generations, whose bodies differ only in names."""
    g_any = {"type": "number", "minimum": 0, "maximum": settings.guidance_max}
    branches = []
    for e in registry:
        default = e.name == registry.default
        for solver_names, steps, rng in sampler_families(e, settings.steps):
            g = g_any if rng is None else {"type": "number", "minimum": rng[0], "maximum": rng[1]}
            g_null = rng is None or rng[0] <= e.default_guidance <= rng[1]  # absent = the model's default
            b = {"model": {"enum": [e.name, None] if default else [e.name]}, label_field: label_schema(e),
                 "solver": {"enum": solver_names}, "steps": {"enum": steps + [None]},
                 "guidance": {"anyOf": [g, {"type": "null"}]} if g_null else g, **(extra(e) if extra else {})}
            required = [] if default else ["model"]
            if solver_names != ["auto"]:
                required.append("solver")
            if not g_null:
                required.append("guidance")
            branches.append({"properties": b, **({"required": required} if required else {})})
    return branches


def body_schema(registry, settings) -> dict:
    """The JSON body of POST /generate: each field's bounds, and one `anyOf` branch per (model,
    sampler family) for what depends on both (classes, step counts, guidance range)."""
    g_any = {"type": "number", "minimum": 0, "maximum": settings.guidance_max}
    entries = list(registry)
    props = {k: {kk: vv for kk, vv in v.items() if kk != "title"}
             for k, v in GenerateBody.model_json_schema()["properties"].items()}
    names = sorted({c for e in entries for c in e.class_names})
    solvers = sorted({s for e in entries for fam in sampler_families(e, settings.steps) for s in fam[0]})
    exact = {
        "class_label": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": max(e.num_classes for e in entries) - 1},
                                  {"type": "string", "enum": names}]},
        "n": {"type": "integer", "minimum": 1, "maximum": settings.max_images, "default": 1},
        "seed": {"type": "integer", "minimum": 0, "maximum": SEED_MAX},
        "guidance": g_any,
        "steps": {"type": "integer", "enum": list(settings.steps)},
        "solver": {"type": "string", "enum": solvers, "default": "auto"},
        "format": {"type": "string", "enum": list(FORMATS), "default": FORMATS[0]},
        "quality": {"type": "integer", "minimum": 1, "maximum": 100},
        "model": {"type": "string", "enum": registry.names()},
    }
    for k, s in exact.items():
        props[k] = {**_nullable(k, s), "description": props[k].get("description", "")}
    decoders = {"type": "string", "enum": sorted({d for e in entries for d in e.decoders})}
    props["decoder"] = {**_nullable("decoder", decoders), "description": props["decoder"].get("description", "")}
    branches = sampler_branches(registry, settings, "class_label", _label,
                                lambda e: {"decoder": {"enum": [*e.decoders, None]}})
    return {"type": "object", "properties": props, "required": ["class_label"], "additionalProperties": False,
            "anyOf": branches}


def generate_operation(registry, settings, auth: bool) -> dict:
    result = {"type": "object", "properties": {
        "id": {"type": "string"}, "model": {"type": "string"}, "class_label": {"type": "integer"},
        "class_name": {"type": "string"}, "n": {"type": "integer"}, "steps": {"type": "integer"},
        "solver": {"type": "string"}, "nfe": {"type": "integer"}, "guidance": {"type": "number"},
        "seed": {"type": "integer"}, "seeds": {"type": "array", "items": {"type": "integer"}},
        "queue_ms": {"type": "number"}, "compute_ms": {"type": "number"},
        "images": {"type": "array", "items": {"type": "string", "contentEncoding": "base64"}}},
        "required": ["id", "model", "class_label", "n", "steps", "solver", "nfe", "guidance", "seed", "seeds",
                     "images"]}
    responses = {
        "200": {"description": "the image in the requested format (a grid for n > 1), or with format=json the "
                               "images base64-encoded",
                "headers": RESULT_HEADERS,
                "content": {("application/json" if f == "json" else f"image/{f}"):
                            {"schema": result if f == "json" else {"type": "string", "format": "binary"}}
                            for f in FORMATS}},
        "404": _err("unknown model"),
        "413": _err("body larger than the limit (checked while it streams)"),
        "415": _err("a body that is not application/json"),
        "422": _err("invalid value: names the field and the allowed values"),
        "500": _err("failed (e.g. moved to the dead-letter stream after repeated worker deaths, or an internal "
                    "error: the body carries the request id it was logged under)"),
        "503": _err("queue full (in requests, or in work that would not finish before the deadline), no live "
                    "worker, or the queue unreachable", RETRY_AFTER),
        "504": _err("the deadline passed before the images were done"),
    }
    if auth:
        responses["401"] = _err("missing or wrong API key")
    return {"description": GENERATE_DOC, "responses": responses,
            "requestBody": {"required": True, "content": {"application/json": {"schema": body_schema(registry, settings)}}}}


def _json(desc: str, schema: dict | None = None) -> dict:
    return {"description": desc, "content": {"application/json": {"schema": schema or {"type": "object"}}}}


READY = {"type": "object", "required": ["ready", "reason", "workers", "depth"], "properties": {
    "ready": {"type": "boolean"}, "reason": {"type": "string"}, "redis": {"type": ["boolean", "null"]},
    "workers": {"type": "object", "additionalProperties": {"type": "integer"}},
    "depth": {"type": "object", "additionalProperties": {"type": "integer"}}}}


def build(app, svc, operations: dict) -> dict:
    """The document; cached on the app (it depends only on what is served)."""
    if app.openapi_schema:
        return app.openapi_schema
    auth = bool(svc.settings.api_key_value())
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    paths = doc["paths"]
    paths["/generate"]["post"].update(generate_operation(svc.registry, svc.settings, auth))
    for path, operation in operations.items():  # routes that document themselves (the OpenAI API)
        paths[path]["post"].update(operation(svc.registry, svc.settings, auth))
    for p in ("/models", "/solvers"):
        paths[p]["get"]["responses"] = {"200": _json("see the summary"), **({"401": _err("missing or wrong API key")}
                                                                              if auth else {})}
    paths["/healthz"]["get"]["responses"] = {"200": _json("the API process answers", {
        "type": "object", "required": ["status"], "properties": {"status": {"enum": ["ok"]}}})}
    paths["/readyz"]["get"]["responses"] = {"200": _json("ready", READY), "503": _json("not ready: why", READY)}
    paths["/metrics"]["get"]["responses"] = {"200": {"description": "Prometheus text exposition format 0.0.4",
                                                     "content": {"text/plain": {"schema": {"type": "string"}}}}}
    doc.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR
    if auth:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for p in ("/generate", "/models", "/solvers", "/v1/images/generations"):
            for op in paths.get(p, {}).values():
                op["security"] = [{"bearer": []}]
        _redact(doc, served_names(svc.registry))
    app.openapi_schema = doc
    return doc


def served_names(registry) -> set[str]:
    """What /models and /solvers tell only a client with the key: models, classes, samplers, decoders."""
    out = set(registry.names())
    for e in registry:
        out |= {*e.class_names, *e.samplers.names(), *(s.name for s in e.samplers), *e.decoders}
    return out


def _redact(node, secret: set[str]):
    """With an API key the open document names nothing that /models protects: a request body keeps
    each field's type and bounds but loses its per-model branches, and a list of values that holds a
    served name is dropped (the field's description points to /models)."""
    if isinstance(node, list):
        for v in node:
            _redact(v, secret)
        return
    if not isinstance(node, dict):
        return
    if isinstance(node.get("properties"), dict) and isinstance(node.get("anyOf"), list):
        del node["anyOf"]  # the (model, sampler family) branches of a request body
    if any(isinstance(v, str) and v in secret for v in node.get("enum") or ()):
        del node["enum"]
    for v in node.values():
        _redact(v, secret)


def install(app, svc, docs_path: str = "/docs", operations: dict | None = None):
    """The OpenAPI generator, and Swagger UI at `docs_path` from files installed with the package."""
    app.openapi = lambda: build(app, svc, operations or {})

    @app.get(docs_path, include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} API",
                                   swagger_js_url=f"{docs_path}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{docs_path}/swagger-ui.css",
                                   swagger_favicon_url=f"{docs_path}/favicon-32x32.png",
                                   swagger_ui_parameters={"validatorUrl": None})  # no call to validator.swagger.io

    for name in DOC_FILES:
        app.add_api_route(f"{docs_path}/{name}", _asset(STATIC / name), methods=["GET"], include_in_schema=False)


def _asset(path: Path):
    """A route serving one packaged file. Its handler takes no parameter: FastAPI would read one as a
    query parameter, and ?name=../../.. would serve any file the process can read."""
    async def asset():
        return FileResponse(path)

    return asset

