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

from .encode import FORMATS
from .models import ModelEntry, Registry, SolverError

SEED_MAX = 2 ** 32 - 1
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


FIELDS = tuple(GenerateBody.model_fields)
_INT = re.compile(r"^\s*[+-]?\d+\s*$")


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
    seed_given: bool
    guidance: float
    steps: int
    solver: str  # resolved
    format: str
    quality: int | None = None


def merge(query_items, body: bytes) -> dict:
    """Query parameters and a JSON object body as one dict; a field given twice is an error."""
    out = {}
    for k, v in query_items:
        if k in out:
            raise ApiError(422, f"query parameter {k!r} given more than once", k)
        out[k] = v
    if body.strip():
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(422, f"body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ApiError(422, f"body must be a JSON object with fields {list(FIELDS)}, got {type(data).__name__}")
        for k, v in data.items():
            if k in out:
                raise ApiError(422, f"{k!r} given both as a query parameter and in the body", k)
            out[k] = v
    unknown = sorted(set(out) - set(FIELDS))
    if unknown:
        raise ApiError(422, f"unknown field(s) {unknown}; allowed: {list(FIELDS)}", unknown[0], list(FIELDS))
    return out


def _int(name: str, v, hint: str, allowed=None) -> int:
    if isinstance(v, bool):
        pass
    elif isinstance(v, int):
        return v
    elif isinstance(v, float) and v.is_integer() or isinstance(v, str) and _INT.match(v):
        return int(v)
    raise ApiError(422, f"{name} must be an integer, {hint} (got {v!r})", name, allowed)


def _float(name: str, v, lo: float, hi: float) -> float:
    hint = f"a finite number in [{lo:g}, {hi:g}]"
    try:
        if isinstance(v, bool):
            raise ValueError
        x = float(v)
    except (TypeError, ValueError):
        raise ApiError(422, f"{name} must be {hint} (got {v!r})", name, [lo, hi]) from None
    if not math.isfinite(x) or not lo <= x <= hi:
        raise ApiError(422, f"{name} must be {hint} (got {v!r})", name, [lo, hi])
    return x


def parse(raw: dict, registry: Registry, settings) -> GenerateParams:
    name = raw.get("model") or registry.default
    if not isinstance(name, str) or name not in registry:
        raise ApiError(404, f"unknown model {name!r}; available: {registry.names()}", "model", registry.names())
    e = registry[name]

    if raw.get("class_label") is None:
        raise ApiError(422, f"class_label is required: an integer in 0..{e.num_classes - 1} or one of "
                            f"{e.class_names}", "class_label", e.class_names)
    try:
        label = e.class_index(raw["class_label"])
    except ValueError as err:
        raise ApiError(422, f"{err} (got {raw['class_label']!r})", "class_label", e.class_names) from None

    n = _int("n", raw.get("n", 1), f"in 1..{settings.max_images}", [1, settings.max_images])
    if not 1 <= n <= settings.max_images:
        raise ApiError(422, f"n must be in 1..{settings.max_images} (got {n})", "n", [1, settings.max_images])

    seed_given = raw.get("seed") is not None
    seed = _int("seed", raw["seed"], f"in 0..{SEED_MAX}", [0, SEED_MAX]) if seed_given else _rng.randrange(2 ** 31)
    if not 0 <= seed <= SEED_MAX:
        raise ApiError(422, f"seed must be in 0..{SEED_MAX} (got {seed})", "seed", [0, SEED_MAX])

    g = raw.get("guidance")
    guidance = e.default_guidance if g is None else _float("guidance", g, 0.0, settings.guidance_max)

    solver = raw.get("solver") or "auto"
    if not isinstance(solver, str):
        raise ApiError(422, f"solver must be a string: 'auto' or one of {e.solver_names()}", "solver",
                       ["auto", *e.solver_names()])
    offered = settings.steps
    if raw.get("steps") is None:
        steps = e.learned[solver].nfe if solver in e.learned else settings.default_steps
    else:
        steps = _int("steps", raw["steps"], f"one of {offered}", offered)
    if steps not in offered:
        raise ApiError(422, f"steps must be one of {offered} (got {steps})", "steps", offered)
    try:
        solver = e.resolve(steps, solver)
    except SolverError as err:
        raise ApiError(422, str(err), "solver", ["auto", *e.solver_names()]) from None

    fmt = raw.get("format", "png")
    fmt = fmt.lower() if isinstance(fmt, str) else fmt
    if fmt not in FORMATS:
        raise ApiError(422, f"format must be one of {list(FORMATS)} (got {raw.get('format')!r})", "format",
                       list(FORMATS))
    quality = raw.get("quality")
    if quality is not None:
        quality = _int("quality", quality, "in 1..100", [1, 100])
        if not 1 <= quality <= 100:
            raise ApiError(422, f"quality must be in 1..100 (got {quality})", "quality", [1, 100])
    return GenerateParams(e, label, n, seed, seed_given, guidance, steps, solver, fmt, quality)
