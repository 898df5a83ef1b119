"""A validated request on its way to a worker (Job) and what comes back (Result).

A Job travels as JSON through Redis; a Result as a JSON header line followed by the raw uint8
pixels (no base64 on the worker), or, where the job asks for it (`encode`: /generate's png, jpeg and
webp bodies), by the response body the worker encoded, which the API forwards as is. A Result says how the request ended as
an `Outcome` (transport.py); the API alone maps it to an HTTP status. Times are wall-clock epoch seconds because the API and the
workers may sit on different hosts (keep their clocks in sync with NTP).
"""
from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field

import numpy as np


class Outcome(str, enum.Enum):
    """How a request ended (a Result's `outcome`; its value is what a Redis result carries)."""

    OK = "ok"  # the images
    CANCELLED = "cancelled"  # the client went away, before or while it ran
    EXPIRED = "expired"  # the deadline passed, in the worker or while the API waited
    FAILED = "failed"  # the model call failed
    REFUSED = "refused"  # the worker cannot run it (API and worker disagree on models or solvers)
    DEAD_LETTER = "dead_letter"  # moved to the dead-letter stream after repeated worker deaths
    LOST = "lost"  # the queue lost the request, or the API lost contact with the queue: not run


# Job fields outside the job's JSON (Job.watch), which a worker of the previous version ignores:
# streamed requests' wishes, and `encode`
WATCH = ("progress", "preview", "encode")

# a result written by a worker of the previous version carries an HTTP status instead of an outcome
_OLD_STATUS = {200: Outcome.OK, 499: Outcome.CANCELLED, 503: Outcome.LOST, 504: Outcome.EXPIRED}


@dataclass
class Job:
    id: str
    model: str
    steps: int
    solver: str  # resolved: never 'auto'
    label: int
    n: int
    seed: int  # image i uses seed + i
    guidance: float
    format: str  # png | jpeg | webp | json (the API process encodes; the worker does not read it)
    deadline: float
    enqueued: float
    reply: str = ""  # Redis pub/sub channel of the waiting API
    quality: int | None = None  # jpeg / webp
    decoder: str | None = None  # the model's decoder to use (ModelEntry.decoders); None: its own
    progress: bool = False  # streamed: the worker publishes step events on `reply` (service/stream.py)
    preview: int = 0  # streamed: a preview event every `preview` steps (service/previews.py); 0: none
    encode: bool = False  # the worker encodes the response body (`format`, `quality`) in its own pool
    # worker-side bookkeeping, not serialised
    entry: str = field(default="", compare=False)
    stream: str = field(default="", compare=False)
    deliveries: int = field(default=1, compare=False)

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.n)]

    def dumps(self) -> str:
        d = asdict(self)
        for k in ("entry", "stream", "deliveries"):
            d.pop(k)
        if d["decoder"] is None:  # absent: a worker of the previous version reads the job too
            del d["decoder"]
        for k in WATCH:
            del d[k]
        return json.dumps(d)

    def watch(self) -> str:
        """What a streamed request asks of the worker beyond the job ('' for none): JSON that travels
        beside the job, so that a worker of the previous version, which reads the job alone, runs it."""
        w = {k: getattr(self, k) for k in WATCH if getattr(self, k)}
        return json.dumps(w) if w else ""

    @classmethod
    def loads(cls, s, watch=None) -> Job:
        d = json.loads(s)
        if watch:
            d.update({k: v for k, v in json.loads(watch).items() if k in WATCH})
        return cls(**d)


@dataclass
class Result:
    id: str
    outcome: Outcome
    detail: str = ""  # what went wrong, for the caller
    solver: str = ""
    nfe: int = 0
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    pixels: bytes = b""  # uint8 images [n, H, W, C], C-contiguous; or the encoded body (`encoded`)
    shape: list[int] = field(default_factory=list)
    worker: str = ""
    encoded: str = ""  # the format `pixels` is encoded in (a job with `encode`); "": raw pixels

    def __post_init__(self):
        self.outcome = Outcome(self.outcome)  # read back from JSON: its value

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK

    @classmethod
    def of_images(cls, job_id: str, images: np.ndarray, **kw) -> Result:
        return cls(job_id, Outcome.OK, pixels=np.ascontiguousarray(images, dtype=np.uint8).tobytes(),
                   shape=list(images.shape), **kw)

    def images(self) -> np.ndarray:
        if self.encoded:
            raise ValueError(f"the result holds a {self.encoded} body, not pixels")
        return np.frombuffer(self.pixels, dtype=np.uint8).reshape(self.shape)

    def dumps(self) -> bytes:
        d = asdict(self)
        del d["pixels"]
        if not d["encoded"]:  # absent: an API of the previous version reads the result too
            del d["encoded"]
        return json.dumps(d).encode() + b"\n" + self.pixels

    @classmethod
    def loads(cls, s: bytes) -> Result:
        head, _, pixels = bytes(s).partition(b"\n")  # JSON escapes newlines: the first one ends the header
        d = json.loads(head)
        if "status" in d:
            d["outcome"] = _OLD_STATUS.get(d.pop("status"), Outcome.FAILED)
        return cls(**d, pixels=pixels)
