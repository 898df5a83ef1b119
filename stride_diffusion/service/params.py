"""/generate parameters: parsed from the query and a JSON body, validated against the model and
the settings. Every error names the field and what it accepts."""
from __future__ import annotations

import json
import math
import random
import re
import secrets
from dataclasses import dataclass

from pydantic import BaseModel, Field

from stride_diffusion.solvers.samplers import SolverError

from .encode import FORMATS
from .labels import class_index
from .models import ModelEntry, Registry

SEED_MAX = 2 ** 32 - 1
PREVIEW_EVERY_MAX = 1000
_BOOL = {"1": True, "true": True, "0": False, "false": False}
_rng = random.Random(secrets.randbits(64))  # seeds need not be secret; os.urandom per request is slow on some VMs


class GenerateBody(BaseModel):
    """The JSON body of POST /generate (the same fields are accepted as query parameters)."""

    class_label: int | str = Field(..., description="class index 0..K-1 or class name (GET /models)")
    n: int = Field(1, description="number of images; image i uses seed + i")
    seed: int | None = Field(None, description=f"0..{SEED_MAX}; random (and returned) when absent")
    guidance: float | None = Field(None, description="classifier-free guidance scale; 1 = off")
    steps: int | None = Field(None, description="model evaluations (NFE): one of the offered step counts")
    solver: str = Field("auto", description="'auto' (best measured for the step count) or a name from GET /solvers")
    format: str = Field("png", description="png | jpeg | webp (one image, or a grid for n > 1) | json (base64 PNGs "
                                           "+ seeds)")
    quality: int | None = Field(None, description="jpeg / webp quality 1..100 (default 90)")
    model: str | None = Field(None, description="model name (GET /models); default the first")
    decoder: str | None = Field(None, description="latents -> pixels: one of the model's `decoders` (GET /models); "
                                                  "'tiny' where the model has a tiny decoder (faster, lower quality); "
                                                  "default the model's own")
    preview: bool = Field(False, description="streamed requests (POST /generate/stream): `preview` events with a "
                                             "small image of the current clean-image estimate; the plain answer "
                                             "ignores it")
    preview_every: int | None = Field(None, ge=1, le=PREVIEW_EVERY_MAX,
                                      description="a preview every k steps (default 1); given alone it turns "
                                                  "previews on")


FIELDS = tuple(GenerateBody.model_fields)
# null stands for "absent" exactly where the body model's type admits None (one place: GenerateBody)
NULLABLE = frozenset(k for k, f in GenerateBody.model_fields.items() if not f.is_required() and f.default is None)
INT_DIGITS = 20  # longer digit strings are no int we accept: refuse them before int() does (its 4300-digit limit)
_INT = re.compile(rf"^\s*[+-]?\d{{1,{INT_DIGITS}}}\s*$")
_FLOAT = re.compile(rf"^\s*[+-]?(\d{{1,{INT_DIGITS}}}(\.\d*)?|\.\d+)([eE][+-]?\d{{1,3}})?\s*$")
JSON_TYPES = ("application/json",)


class ApiError(Exception):
    def __init__(self, status: int, detail: str, field: str | None = None, allowed=None, headers=None):
        super().__init__(detail)
        self.status, self.detail, self.field, self.allowed, self.headers = status, detail, field, allowed, headers

    def body(self) -> dict:
        d = {"detail": self.detail}
        if self.field:
            d["field"] = self.field
        if self.allowed is not None:
            d["allowed"] = self.allowed
        return d


@dataclass
class GenerateParams:
    entry: ModelEntry
    label: int
    n: int
    seed: int
    guidance: float
    steps: int
    solver: str  # resolved
    format: str
    quality: int | None = None
    decoder: str | None = None  # None: the model's own
    preview: int = 0  # streamed: a preview every `preview` steps; 0: none


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ApiError(422, f"body gives {quoted(k)} more than once", k)
        out[k] = v
    return out


def _query_value(k: str, v: str):
    """A query string as the JSON value it stands for: numbers for the numeric fields, else the string."""
    if k == "preview":
        return _BOOL.get(v.strip().lower(), v)
    if k in ("n", "seed", "steps", "quality", "preview_every") or k == "class_label" and _INT.match(v):
        return int(v) if _INT.match(v) else v  # a non-integer string is refused by the field's check
    if k == "guidance":
        if _FLOAT.match(v):
            return float(v)
        return v if v.strip().lower() not in ("nan", "inf", "+inf", "-inf", "infinity") else math.nan
    return v


def merge(query_items, body: bytes, content_type: str | None = None) -> dict:
    """Query parameters and a JSON object body as one dict; a field given twice is an error."""
    out = {}
    for k, v in query_items:
        if k in out:
            raise ApiError(422, f"query parameter {quoted(k)} given more than once", k)
        out[k] = _query_value(k, v)
    if body.strip():
        media = (content_type or "").split(";")[0].strip().lower()
        if media not in JSON_TYPES:
            raise ApiError(415, f"the body must be JSON sent as 'Content-Type: application/json' (got "
                                f"{quoted(content_type)})", "content-type", list(JSON_TYPES))
        try:
            data = json.loads(body, object_pairs_hook=_no_duplicates)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise ApiError(422, f"body is not valid JSON: {str(e)[:200]}") from None
        if not isinstance(data, dict):
            raise ApiError(422, f"body must be a JSON object with fields {list(FIELDS)}, got {type(data).__name__}")
        for k, v in data.items():
            if k in out:
                raise ApiError(422, f"{quoted(k)} given both as a query parameter and in the body", k)
            out[k] = v
    unknown = sorted(set(out) - set(FIELDS))
    if unknown:
        raise ApiError(422, f"unknown field(s) {[u[:100] for u in unknown[:5]]}; allowed: {list(FIELDS)}",
                       unknown[0][:100], list(FIELDS))
    for k in [k for k, v in out.items() if v is None]:
        if k not in NULLABLE:
            raise ApiError(422, f"{k} may not be null (leave it out for the default)", k)
        del out[k]
    return out


def _int(name: str, v, hint: str, allowed=None) -> int:
    """A JSON integer (an integral float too, as JSON Schema counts it); never a bool or a string."""
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    raise ApiError(422, f"{name} must be an integer, {hint} (got {quoted(v)})", name, allowed)


def _float(name: str, v, lo: float, hi: float) -> float:
    hint = f"a finite number in [{lo:g}, {hi:g}]"
    x = None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        try:
            x = float(v)
        except OverflowError:  # a JSON integer beyond any float
            x = None
    if x is None or not math.isfinite(x) or not lo <= x <= hi:
        raise ApiError(422, f"{name} must be {hint} (got {quoted(v)})", name, [lo, hi])
    return x


def quoted(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:40] + f"... ({len(r)} characters)"


def parse(raw: dict, registry: Registry, settings) -> GenerateParams:
    """`raw` from `merge`: JSON types, null already dropped. Strict: a JSON string is never a number."""
    name = raw.get("model", registry.default)
    if not isinstance(name, str):
        raise ApiError(422, f"model must be a string naming a served model: {registry.names()} (got {quoted(name)})",
                       "model", registry.names())
    if name not in registry:
        raise ApiError(404, f"unknown model {quoted(name)}; available: {registry.names()}", "model", registry.names())
    e = registry[name]

    if "class_label" not in raw:
        raise ApiError(422, f"class_label is required: an integer in 0..{e.num_classes - 1} or one of "
                            f"{e.class_names}", "class_label", e.class_names)
    try:
        label = class_index(e.class_names, raw["class_label"])
    except ValueError as err:
        raise ApiError(422, f"{err} (got {quoted(raw['class_label'])})", "class_label", e.class_names) from None

    n = _int("n", raw.get("n", 1), f"in 1..{settings.max_images}", [1, settings.max_images])
    if not 1 <= n <= settings.max_images:
        raise ApiError(422, f"n must be in 1..{settings.max_images} (got {n})", "n", [1, settings.max_images])

    seed = _int("seed", raw["seed"], f"in 0..{SEED_MAX}", [0, SEED_MAX]) if "seed" in raw else _rng.randrange(2 ** 31)
    if not 0 <= seed <= SEED_MAX:
        raise ApiError(422, f"seed must be in 0..{SEED_MAX} (got {seed})", "seed", [0, SEED_MAX])
    if seed + n - 1 > SEED_MAX:  # image i uses seed + i: every returned seed stays in range
        raise ApiError(422, f"seed + n - 1 must be at most {SEED_MAX}: with n {n} the seed must be in "
                            f"0..{SEED_MAX - n + 1} (got {seed})", "seed", [0, SEED_MAX - n + 1])

    g = raw.get("guidance")
    guidance = e.default_guidance if g is None else _float("guidance", g, 0.0, settings.guidance_max)

    solvers = ["auto", *e.samplers.names()]
    solver = raw.get("solver", "auto")
    if not isinstance(solver, str) or not solver:
        raise ApiError(422, f"solver must be 'auto' or one of {e.samplers.names()} (got {quoted(solver)})", "solver",
                       solvers)
    offered = settings.steps
    if "steps" not in raw:
        steps = e.samplers.steps_for(solver, settings.default_steps)
    else:
        steps = _int("steps", raw["steps"], f"one of {offered}", offered)
    if steps not in offered:
        raise ApiError(422, f"steps must be one of {offered} (got {steps})", "steps", offered)
    try:
        solver = e.samplers.resolve(steps, solver, guidance).name
    except SolverError as err:
        msg = str(err).replace(repr(solver), quoted(solver))  # a long unknown name is not echoed whole
        raise ApiError(422, msg, err.field, solvers if err.allowed is None else err.allowed) from None

    fmt = raw.get("format", "png")
    if fmt not in FORMATS:
        raise ApiError(422, f"format must be one of {list(FORMATS)} (got {quoted(fmt)})", "format", list(FORMATS))
    quality = raw.get("quality")
    if quality is not None:
        quality = _int("quality", quality, "in 1..100", [1, 100])
        if not 1 <= quality <= 100:
            raise ApiError(422, f"quality must be in 1..100 (got {quality})", "quality", [1, 100])
    decoder = raw.get("decoder")
    if decoder is not None and (not isinstance(decoder, str) or decoder not in e.decoders):
        raise ApiError(422, f"decoder must be one of {list(e.decoders)} for model {e.name} (got {quoted(decoder)})",
                       "decoder", list(e.decoders))
    if decoder == e.decoder.kind:
        decoder = None  # the model's own, named
    preview = raw.get("preview", False)
    if not isinstance(preview, bool):
        raise ApiError(422, f"preview must be true or false (1 or 0 in the query) (got {quoted(preview)})", "preview",
                       [True, False])
    every = raw.get("preview_every")
    if every is not None:
        every = _int("preview_every", every, f"in 1..{PREVIEW_EVERY_MAX}", [1, PREVIEW_EVERY_MAX])
        if not 1 <= every <= PREVIEW_EVERY_MAX:
            raise ApiError(422, f"preview_every must be in 1..{PREVIEW_EVERY_MAX} (got {every})", "preview_every",
                           [1, PREVIEW_EVERY_MAX])
    preview = (every or 1) if preview or every is not None else 0
    return GenerateParams(e, label, n, seed, guidance, steps, solver, fmt, quality, decoder, preview)
