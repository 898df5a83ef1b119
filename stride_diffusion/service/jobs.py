"""A validated request on its way to a worker (Job) and what comes back (Result).

A Job travels as JSON through Redis; a Result as a JSON header line followed by the raw uint8
pixels (no base64 on the worker: the API process encodes). Times are wall-clock epoch seconds because the API and the
workers may sit on different hosts (keep their clocks in sync with NTP).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np


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
        return json.dumps(d)

    @classmethod
    def loads(cls, s) -> Job:
        return cls(**json.loads(s))


@dataclass
class Result:
    id: str
    status: int  # 200, or the HTTP error the caller gets (500, 504)
    detail: str = ""
    solver: str = ""
    nfe: int = 0
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    pixels: bytes = b""  # uint8 images [n, H, W, C], C-contiguous
    shape: list[int] = field(default_factory=list)
    worker: str = ""

    @classmethod
    def of_images(cls, job_id: str, images: np.ndarray, **kw) -> Result:
        return cls(job_id, 200, pixels=np.ascontiguousarray(images, dtype=np.uint8).tobytes(),
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
        return cls(**json.loads(head), pixels=pixels)
