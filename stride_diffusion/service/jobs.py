"""A validated request on its way to a worker (Job) and what comes back (Result).

A Job travels as JSON through Redis; a Result as a JSON header line followed by the raw uint8
pixels (no base64 on the worker: the API process encodes). A Result says how the request ended as
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
        if not d["progress"]:
            del d["progress"]
        return json.dumps(d)

    @classmethod
    def loads(cls, s) -> Job:
        return cls(**json.loads(s))


@dataclass
class Result:
    id: str
    outcome: Outcome
    detail: str = ""  # what went wrong, for the caller
    solver: str = ""
    nfe: int = 0
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    pixels: bytes = b""  # uint8 images [n, H, W, C], C-contiguous
    shape: list[int] = field(default_factory=list)
    worker: str = ""

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
        return np.frombuffer(self.pixels, dtype=np.uint8).reshape(self.shape)

    def dumps(self) -> bytes:
        d = asdict(self)
        del d["pixels"]
        return json.dumps(d).encode() + b"\n" + self.pixels

    @classmethod
    def loads(cls, s: bytes) -> Result:
        head, _, pixels = bytes(s).partition(b"\n")  # JSON escapes newlines: the first one ends the header
        d = json.loads(head)
        if "status" in d:
            d["outcome"] = _OLD_STATUS.get(d.pop("status"), Outcome.FAILED)
        return cls(**d, pixels=pixels)
