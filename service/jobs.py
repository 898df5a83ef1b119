"""A validated request on its way to a worker (Job) and what comes back (Result).

Both travel as JSON through Redis; times are wall-clock epoch seconds because the API and the
workers may sit on different hosts (keep their clocks in sync with NTP).
"""
from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, field


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
    format: str  # png | json
    deadline: float
    enqueued: float
    reply: str = ""  # Redis pub/sub channel of the waiting API
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
    images: list[bytes] = field(default_factory=list)  # one PNG (format png) or one per image (json)
    worker: str = ""

    def dumps(self) -> bytes:
        d = asdict(self)
        d["images"] = [base64.b64encode(b).decode() for b in self.images]
        return json.dumps(d).encode()

    @classmethod
    def loads(cls, s) -> Result:
        d = json.loads(s)
        d["images"] = [base64.b64decode(b) for b in d.get("images", [])]
        return cls(**d)
