"""Every setting of the service, in one place: `LORA_*` environment variables and `lora-serve` flags.

    lora-serve --base-model ./my-gpt2 --store /data/store --admin-keys $KEY      # flags win,
    LORA_STORE=/data/store LORA_ADMIN_KEYS=k1,k2 lora-serve                     # then LORA_* variables,
                                                                                # then the defaults below.

Nothing else in the codebase reads `os.environ`. Settings that would make the service unsafe or
ambiguous (several workers, short or shared API keys, a missing base model directory) are refused
here, with the reason, before anything is loaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ByteSize, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["Settings", "MIN_KEY_LENGTH"]

MIN_KEY_LENGTH = 16
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_KEY = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII without spaces: it travels in an HTTP header
_MiB = 2**20

Keys = Annotated[list[str], NoDecode]  # "k1,k2" from the environment, not JSON


class Settings(BaseSettings):
    """
    lora-serve: one frozen base model, many LoRA adapters, served over HTTP.

    Every flag can also be set by the environment variable shown beside it; flags win. Lists such as
    --admin-keys are comma-separated (LORA_ADMIN_KEYS=key1,key2). Byte sizes accept units (64MiB, 1GB).
    """

    model_config = SettingsConfigDict(
        env_prefix="LORA_", cli_prog_name="lora-serve", cli_kebab_case=True, cli_hide_none_type=True,
        cli_avoid_json=True, cli_show_env_vars=True, use_attribute_docstrings=True, extra="forbid",
    )

    # ---------------------------------------------------------------- the model
    base_model: str | None = None
    """Hugging Face checkpoint directory of the frozen base model (default: the packaged all-MiniLM-L6-v2)."""
    task: Literal["generate", "classify", "embed"] | None = None
    """Override the task inferred from the checkpoint (causal LM: generate, classifier: classify, else embed)."""
    device: str = "auto"
    """auto (CUDA when present, else CPU), cpu, cuda or cuda:N."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the base weights and of resident adapters."""
    torch_threads: int | None = Field(None, ge=1, le=1024)
    """Threads torch uses for one forward on the CPU. Default: torch's own (one per core)."""

    # ---------------------------------------------------------------- the store
    store: Path | None = None
    """Adapter store directory (created if missing; keep it on a durable volume). Default: ./store/<model>-<identity>,
    one per base model; a store belongs to the base that first used it, and another base refuses to start on it."""
    max_rank: int = Field(64, ge=1, le=4096)
    """Largest LoRA rank accepted on upload (a larger one is refused with 422)."""
    max_upload_bytes: ByteSize = Field(ByteSize(64 * _MiB), ge=1024)
    """Largest upload body, enforced while it streams (a larger one is refused with 413)."""
    max_request_bytes: ByteSize = Field(ByteSize(4 * _MiB), ge=1024)
    """Largest JSON request body (inference, compose); a larger one is refused with 413."""

    # ---------------------------------------------------------------- a store shared by several servers
    index_url: str | None = Field(None, repr=False)
    """Shared adapter index for several servers: postgresql://user:pass@host:5432/db (default: SQLite in --store)."""
    blob_url: str | None = None
    """Shared adapter files: s3://bucket/prefix (endpoint and keys from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...),
    or file:///path on a shared volume (default: under --store)."""
    name_cache_ttl_s: float = Field(5.0, ge=0, le=3600)
    """With --index-url: longest a resolved adapter name stays in memory (kept exact by NOTIFY; 0: no cache)."""

    # ---------------------------------------------------------------- HTTP
    host: str = "127.0.0.1"
    """Interface to listen on (0.0.0.0 exposes the service; configure API keys first)."""
    port: int = Field(8000, ge=1, le=65535)
    """TCP port."""
    workers: int = 1
    """Worker processes. Must be 1: the process owns the weights, the adapter cache and the merge state."""
    admin_keys: Keys = Field(default=[], repr=False)
    """Bearer keys that may upload, delete, merge and compose adapters (and infer). Comma-separated."""
    inference_keys: Keys = Field(default=[], repr=False)
    """Bearer keys that may only run inference. Auth is off only when neither list holds a key."""
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    """Log level of the service and of uvicorn."""

    # ---------------------------------------------------------------- the engine
    host_cache_bytes: ByteSize = Field(ByteSize(512 * _MiB), ge=0)
    """Host-RAM LRU of validated adapters, in bytes."""
    device_cache_adapters: int = Field(32, ge=1)
    """Most adapters resident on the device at once."""
    device_cache_bytes: ByteSize = Field(ByteSize(256 * _MiB), ge=1)
    """Most bytes of adapters resident on the device at once."""
    device_cache_eviction: Literal["frequency", "lru"] = "frequency"
    """Which resident adapter leaves the device first: the least used recently (counts halved over time), or
    the least recently used."""
    max_batch_size: int = Field(32, ge=1, le=4096)
    """Most requests gathered into one forward."""
    max_wait_ms: float = Field(5.0, ge=0, le=10_000)
    """Longest a request waits for others to share its batch, in milliseconds."""
    max_batch_tokens: int | None = Field(None, ge=1, le=1 << 24)
    """Most padded tokens (rows x longest row) in one embed/classify forward or generation prefill; a longer
    single text runs alone. Default: 16384 on CUDA, 512 on CPU (larger buys a CPU no throughput)."""
    overtake_tokens: int | None = Field(None, ge=0, le=1 << 24)
    """Most padded tokens of newly queued embed/classify requests (on resident adapters) that may run in a pause
    of a forward in flight, between two of its layers, rather than wait for all of it. Default: a quarter of
    --max-batch-tokens; 0: never."""
    merge_policy: Literal["never", "always", "auto"] = "auto"
    """never: always unmerged; always: merge each batch's adapter; auto: merge when one adapter dominates."""
    merge_window: int = Field(64, ge=1, le=1 << 16)
    """auto policy: how many recent requests it watches to decide whether one adapter dominates."""
    merge_min_dwell: int = Field(8, ge=0, le=1 << 16)
    """auto policy: fewest batches between two mode changes (hysteresis against thrashing)."""
    merge_kernel: Literal["auto", "addmm"] = "auto"
    """auto: CPU float32/bfloat16 merges run on the one-pass C kernel where it was built; addmm: always torch.addmm."""

    # ---------------------------------------------------------------- cluster mode (Ray Serve: pip install .[cluster])
    replicas: int = Field(1, ge=1, le=1024)
    """Engine replicas. Above 1 (or with --ray-address) the service runs on Ray Serve: ingresses, N replicas."""
    ingress_replicas: int = Field(1, ge=1, le=64)
    """Ingress processes (HTTP parsing, name resolution, uploads) in cluster mode; Serve's proxy spreads requests
    over them. Each one routes with its own view of the replicas' in-flight requests."""
    ray_address: str | None = None
    """Join this Ray cluster (host:port or ray://...) instead of starting a local one (RAY_ADDRESS works too)."""
    replica_num_cpus: float = Field(1.0, ge=0)
    """CPUs Ray reserves for each replica."""
    replica_num_gpus: float = Field(0.0, ge=0)
    """GPUs Ray reserves for each replica (fractions share one GPU)."""
    min_replicas: int | None = Field(None, ge=0)
    """Autoscaling lower bound (with --max-replicas; default 1)."""
    max_replicas: int | None = Field(None, ge=1)
    """Autoscaling upper bound; unset: a fixed --replicas."""
    target_ongoing_requests: float = Field(16.0, gt=0)
    """Autoscaling target: requests in flight per replica."""
    replica_max_ongoing_requests: int = Field(64, ge=1)
    """Most requests in flight on one replica (more wait in the router); its batches take up to --max-batch-size."""
    cluster_router: Literal["affinity", "multiplex", "spread"] = "affinity"
    """affinity: an adapter's requests go to its rendezvous-hash home (a hot one to several replicas);
    multiplex: Ray's default multiplexed router; spread: ignore the adapter (shortest queue of two)."""
    spill_at: int = Field(8, ge=1)
    """affinity: a home replica whose queue is at least twice its second choice's plus this shares the adapter
    with it."""
    cluster_request_timeout_s: float = Field(120.0, gt=0)
    """Longest the ingress waits for a replica's answer (or a stream's next token) before answering 503."""
    cluster_pin_poll_s: float = Field(1.0, gt=0)
    """How often each replica re-reads the merge pins (an explicit merge reaches every replica at once as well)."""

    # ---------------------------------------------------------------- validation
    @field_validator("admin_keys", "inference_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().startswith("["):  # a JSON list, as pydantic-settings writes
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ValueError(f"API keys: a value starting with '[' must be a JSON list ({exc})") from None
            if not (isinstance(value, list) and all(isinstance(k, str) for k in value)):
                raise ValueError("API keys: a JSON value must be a list of strings")
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("log_level", "dtype", "merge_policy", "merge_kernel", "task", "device", "cluster_router",
                     mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"device must be auto, cpu, mps, cuda or cuda:N, got {value!r}")
        return value

    @field_validator("index_url", "blob_url", mode="before")
    @classmethod
    def _empty_url_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("index_url")
    @classmethod
    def _check_index_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("--index-url must be a PostgreSQL URL: postgresql://user:password@host:5432/database")
        return value

    @field_validator("blob_url")
    @classmethod
    def _check_blob_url(cls, value: str | None) -> str | None:
        if value is not None and "://" in value and not re.match(r"^(s3://[^/]+|file://)", value):
            raise ValueError("--blob-url must be s3://bucket[/prefix], file:///path or a path")
        return value

    @field_validator("base_model")
    @classmethod
    def _check_base_model(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not Path(value).is_dir():
            raise ValueError(f"{value!r} is not a directory; the base model must be a local Hugging Face "
                             "checkpoint directory (nothing is downloaded)")
        return value

    @field_validator("store", mode="before")
    @classmethod
    def _empty_store_is_the_default(cls, value: Any) -> Any:
        # LORA_STORE= (set but empty) would otherwise become Path(""), the current directory.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("store")
    @classmethod
    def _check_store(cls, value: Path | None) -> Path | None:
        if value is not None and value.exists() and not value.is_dir():
            raise ValueError(f"store {str(value)!r} exists and is not a directory")
        return value

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        if self.workers != 1:
            raise ValueError("--workers (LORA_WORKERS) must be 1: a worker owns the weights, the adapter cache and "
                             "the merge state, so several would each hold a copy and disagree about what is merged")
        for key in (*self.admin_keys, *self.inference_keys):
            if len(key) < MIN_KEY_LENGTH or not _KEY.match(key):
                raise ValueError(f"API keys must be at least {MIN_KEY_LENGTH} printable ASCII characters without "
                                 "spaces (make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        if self.max_replicas is not None and not (self.min_replicas or 1) <= self.replicas <= self.max_replicas:
            raise ValueError("autoscaling needs --min-replicas <= --replicas <= --max-replicas")
        if self.ingress_replicas > 1 and not self.cluster_mode:
            raise ValueError("--ingress-replicas is for cluster mode (--replicas above 1, --max-replicas or "
                             "--ray-address); a single server is one process")
        if set(self.admin_keys) & set(self.inference_keys):
            raise ValueError("a key is listed both as an admin key and as an inference key")
        return self

    # ---------------------------------------------------------------- derived
    @property
    def cluster_mode(self) -> bool:
        """Run on Ray Serve (service/cluster) rather than as one process."""
        return self.replicas > 1 or self.max_replicas is not None or bool(self.ray_address)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.admin_keys or self.inference_keys)

    @property
    def is_loopback(self) -> bool:
        return self.host in ("127.0.0.1", "::1", "localhost") or self.host.startswith("127.")

    def public_dict(self) -> dict[str, Any]:
        """Settings for logs and /v1/state: keys are replaced by their count."""
        data = self.model_dump(mode="json", exclude={"admin_keys", "inference_keys"})
        data.update(admin_keys=len(self.admin_keys), inference_keys=len(self.inference_keys))
        if self.index_url:  # the password, if the URL carries one, stays out of logs
            data["index_url"] = re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", self.index_url)
        return data
