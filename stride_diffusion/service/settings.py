"""Service settings: environment (STRIDE_*, plus REDIS_URL) overridden by `stride serve` flags."""
from __future__ import annotations

import os
import socket
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STRIDE_", populate_by_name=True, extra="forbid")

    role: Literal["all", "api", "worker"] = "all"
    artifacts: Annotated[list[str], NoDecode] = ["artifacts/digits"]
    device: str = "cpu"
    dtype: Literal["fp32", "bf16", "fp16"] | None = None  # network + decoder; None: what the artifact records
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    # batching, admission, deadlines
    max_batch: int = Field(64, ge=2, description="rows per model call: images x 2 with guidance")
    max_wait_ms: float = Field(2.0, ge=0)
    queue_limit: int = Field(256, ge=1, description="requests queued or running, per model")
    deadline_s: float = Field(30.0, gt=0)
    retry_after_s: int = Field(1, ge=1)

    # what a request may ask for
    steps: Annotated[list[int], NoDecode] = [1, 2, 3, 4, 5, 6, 8, 10, 12, 16]
    default_steps: int = 4
    max_images: int = Field(16, ge=1)
    guidance_max: float = Field(20.0, gt=0)
    encode_threads: int = Field(2, ge=1, description="API process: threads encoding images (PNG/JPEG/WebP)")

    # the worker's hot path
    graphs: bool = True  # CUDA graphs per (network, batch bucket); eager off CUDA
    # the fused update: auto = Triton on CUDA, torch elsewhere; triton = the kernel everywhere (on the
    # CPU in Triton's interpreter: slow, but it runs every CUDA-only path of the hot loop); torch
    update: Literal["auto", "torch", "triton"] = "auto"
    variants: Annotated[list[str], NoDecode] | None = None  # secant networks to load; None: the auto-pick's

    api_key: SecretStr | None = None

    # Redis transport
    redis_url: str | None = Field(None, validation_alias=AliasChoices("redis_url", "STRIDE_REDIS_URL", "REDIS_URL"))
    redis_ca_cert: str | None = None
    key_prefix: str = "stride"
    worker_id: str = Field(default_factory=_default_worker_id)
    metrics_port: int | None = Field(None, ge=0, le=65535)
    heartbeat_s: float = Field(1.0, gt=0)
    claim_idle_ms: int = Field(5000, ge=10)
    max_deliveries: int = Field(3, ge=1)
    result_ttl_s: int = Field(300, ge=1)
    # SIGTERM: finish what is held for at most this long; the orchestrator's grace period must exceed it
    drain_timeout_s: float = Field(25.0, gt=0)

    warmup: bool = True
    test_model: str | None = None  # hidden: an analytic model instead of artifacts (tests, benchmarks)

    @field_validator("artifacts", mode="before")
    @classmethod
    def _split_paths(cls, v):
        return [p for p in v.split(",") if p.strip()] if isinstance(v, str) else v

    @field_validator("variants", mode="before")
    @classmethod
    def _split_variants(cls, v):
        return [p.strip() for p in v.split(",") if p.strip()] if isinstance(v, str) else v

    @field_validator("steps", mode="before")
    @classmethod
    def _split_steps(cls, v):
        return [int(s) for s in v.split(",") if s.strip()] if isinstance(v, str) else v

    @field_validator("redis_url", "test_model", mode="before")
    @classmethod
    def _empty_is_none(cls, v):
        return None if v == "" else v

    @model_validator(mode="after")
    def _check(self):
        if not self.steps or min(self.steps) < 1:
            raise ValueError(f"steps must be a non-empty list of positive integers, got {self.steps}")
        self.steps = sorted(set(self.steps))
        if self.default_steps not in self.steps:
            self.default_steps = min(self.steps, key=lambda s: (abs(s - self.default_steps), s))
        if self.result_ttl_s < self.deadline_s + 5:
            raise ValueError(f"result_ttl_s ({self.result_ttl_s}) must outlast the deadline ({self.deadline_s} s) "
                             "by a few seconds, or a finished result could expire before the API reads it")
        if self.role != "all" and not self.redis_url:
            raise ValueError(f"--role {self.role} needs REDIS_URL (a separate API and worker talk through Redis)")
        return self

    @property
    def embedded(self) -> bool:
        return not self.redis_url

    def api_key_value(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key else None
