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
    """Every setting of `stride serve`, declared once: service/cli.py builds its flags from these
    fields (`--` + the name with dashes, help = the description, env var and default appended; a
    bool becomes `--x` / `--no-x`, a Literal its choices). json_schema_extra carries what only the
    flag needs: `metavar`, `nargs`, `hidden` (no help line), `shown_default` (for a computed one)."""
    model_config = SettingsConfigDict(env_prefix="STRIDE_", populate_by_name=True, extra="forbid")

    role: Literal["all", "api", "worker"] = Field(
        "all", description="all: API + worker in one process (over Redis when REDIS_URL is set, else an "
                           "in-process queue); api | worker: separate processes, need REDIS_URL")
    artifacts: Annotated[list[str], NoDecode] = Field(
        ["artifacts/digits"], description="artifact directories to serve (env: comma-separated)",
        json_schema_extra={"metavar": "DIR", "nargs": "+"})
    device: str = Field("cpu", description="torch device of the worker (cpu, cuda, cuda:1)",
                        json_schema_extra={"metavar": "DEV"})
    dtype: Literal["fp32", "bf16", "fp16", "fp8"] | None = Field(
        None, description="network and decoder precision (fp32, bf16, fp16; fp8: bf16 with a transformer's "
                          "attention and feed-forward matmuls in float8, on sm_89+ with the fp8 extra); "
                          "default: the artifact's")
    threads: int | None = Field(
        None, ge=1, description="torch intra-op threads (default: all cores; role all on the CPU: all but one)")
    host: str = Field("127.0.0.1", description="bind address of the API and of the worker's metrics port",
                      json_schema_extra={"metavar": "ADDR"})
    port: int = Field(8000, ge=0, le=65535, description="API port")

    # batching, admission, deadlines
    max_batch: int = Field(64, ge=2, description="rows per model call (an image is 2 rows with guidance)")
    max_wait_ms: float = Field(
        2.0, ge=0, description="an idle worker waits this long from the oldest arrival to fill a batch")
    queue_limit: int = Field(
        256, ge=1, description="requests queued or running per model before 503 + Retry-After")
    deadline_s: float = Field(
        30.0, gt=0, description="per-request deadline; past it the request is answered 504 and dropped")
    retry_after_s: int = Field(1, ge=1, description="Retry-After on 503")
    progress_ms: float = Field(
        100.0, ge=0, description="streamed requests: at most one step event each per this many ms (0: every step)")

    # slow and surplus clients (service/http_limits.py)
    header_timeout_s: float = Field(
        10.0, gt=0, description="a connection must send a whole request head (request line and headers) within "
                                "this long of opening, or of its first byte after a response; else 408 and close")
    body_timeout_s: float = Field(
        10.0, gt=0, description="a request body must be complete within this long of its head; else 408 and "
                                "close, nothing queued")
    body_min_rate: int = Field(
        500, ge=0, description="bytes/s a request body must average after its first second; else 408 (0: no floor)")
    max_connections: int = Field(
        1024, ge=1, description="open connections; one more evicts the connection owing a request head the "
                                "longest, else its request gets 503 + Retry-After and it is closed")

    # what a request may ask for
    steps: Annotated[list[int], NoDecode] = Field(
        [1, 2, 3, 4, 5, 6, 8, 10, 12, 16], description="offered step counts (NFE), e.g. 1,2,4,8",
        json_schema_extra={"metavar": "LIST"})
    default_steps: int = Field(4, description="steps when a request gives none")
    max_images: int = Field(16, ge=1, description="largest n per request")
    guidance_max: float = Field(20.0, gt=0, description="largest guidance scale accepted")
    encode_threads: int | None = Field(
        None, ge=1, description="API process: threads encoding images (default: one per core it may use, at most 32)",
        json_schema_extra={"shown_default": "<cores>"})
    png_level: int = Field(
        1, ge=0, le=9, description="zlib level of PNG responses: 0 (no compression) .. 9 (smallest, slowest); "
                                   "1: about half of 6's CPU time for somewhat larger files "
                                   "(benchmarks/png_levels.py)")

    # the worker's hot path
    graphs: bool = Field(
        True, description="CUDA: replay the network as CUDA graphs per batch bucket; --no-graphs runs it "
                          "eagerly (always eager off CUDA)")
    update: Literal["auto", "torch", "triton"] = Field(
        "auto", description="the fused update: auto (Triton on CUDA, torch elsewhere), torch, or triton "
                            "(also on the CPU, in Triton's interpreter: slow; for tests)")
    compile: bool = Field(
        False, description="torch.compile (inductor) the networks, one shape per batch bucket, and the decoders, "
                           "at warm-up (minutes on a cold cache; keep --compile-cache on a volume)")
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = Field(
        "default", description="inductor mode with --compile (max-autotune-no-cudagraphs: autotuned matmuls, a "
                               "longer compile; CUDA graphs come from --graphs either way)")
    compile_cache: str | None = Field(
        None, description="folder of inductor's compiled code (sets TORCHINDUCTOR_CACHE_DIR): a restart reuses it "
                          "(default: TORCHINDUCTOR_CACHE_DIR, else a folder under /tmp)",
        json_schema_extra={"metavar": "DIR"})
    sdpa: Literal["auto", "flash", "cudnn", "efficient", "math"] = Field(
        "auto", description="attention kernel of scaled_dot_product_attention: auto (torch's choice) or that "
                            "backend only; checked at warm-up, refused where it cannot run")
    fuse_qkv: bool = Field(
        False, description="fuse the q, k, v projections of each self-attention of a diffusers network into one "
                           "matmul, at load")
    variants: Annotated[list[str], NoDecode] | None = Field(
        None, description="secant networks to load, e.g. secant-pu,secant-tan (default: those the "
                          "auto-pick serves for the offered steps)", json_schema_extra={"metavar": "LIST"})

    api_key: SecretStr | None = Field(
        None, description="require 'Authorization: Bearer KEY' (prefer the env var: flags show in ps); "
                          "/healthz, /readyz, /metrics stay open", json_schema_extra={"metavar": "KEY"})

    # Redis transport
    redis_url: str | None = Field(
        None, validation_alias=AliasChoices("redis_url", "STRIDE_REDIS_URL", "REDIS_URL"),
        description="redis://[user:password@]host:port/db, or rediss:// for TLS",
        json_schema_extra={"metavar": "URL"})
    redis_ca_cert: str | None = Field(None, description="CA bundle to verify a rediss:// server",
                                      json_schema_extra={"metavar": "PEM"})
    key_prefix: str = Field("stride", description="prefix of every Redis key", json_schema_extra={"metavar": "P"})
    worker_id: str = Field(
        default_factory=_default_worker_id,
        description="consumer name in the group; keep it stable across restarts of one worker",
        json_schema_extra={"metavar": "ID", "shown_default": "<hostname>-<pid>"})
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="worker role: serve Prometheus metrics on this port")
    heartbeat_s: float = Field(1.0, gt=0, description="worker heartbeat period (liveness TTL is 3x)")
    claim_idle_ms: int = Field(5000, ge=10, description="re-claim entries idle this long (their worker died)")
    max_deliveries: int = Field(
        3, ge=1, description="deliveries before an entry goes to the dead-letter stream")
    result_ttl_s: int = Field(300, ge=1, description="TTL of stored results")
    redis_outage_s: float = Field(
        30.0, gt=0, description="Redis may be unreachable this long without failing accepted requests: the API "
                                "waits on for their results (each up to its deadline), workers keep finished "
                                "results to store once it is back; new requests get 503 meanwhile")
    drain_timeout_s: float = Field(
        25.0, gt=0, description="worker: on SIGTERM, finish the requests taken for at most this long, then "
                                "exit; a second SIGTERM stops at once (the orchestrator's grace period must "
                                "exceed it)")

    warmup: bool = Field(
        True, description="warm up every (batch bucket, step count) before ready; --no-warmup skips it")
    test_model: str | None = Field(
        None, description="'gmm[:delay_ms=N]': an analytic model instead of artifacts (tests, benchmarks)",
        json_schema_extra={"hidden": True})

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

    @field_validator("redis_url", "test_model", "compile_cache", mode="before")
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
