"""Every knob of saft-filter, read once from the environment (prefix ``SAFT_``) or ``.env``.

No other module reads a ``SAFT_*`` knob from ``os.environ``; code receives a ``Settings`` instance. (The environment is
passed on whole where a process is started — ``app.launcher``, the jemalloc re-exec in ``saft serve`` — and the Ray
engine turns Ray's usage report off there.)

Owns: ``Settings`` (every ``SAFT_*`` knob, its default and validation), ``BATCH_DEFAULTS`` and ``get_settings``.
Must not: import anything of ``app`` (the core imports it, so it sits below every layer), or import torch at module
level (only resolving ``device="auto"`` for the batch defaults needs it).
"""

from __future__ import annotations

import json
import os
import socket
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


#: Batch settings by device type, for those left unset.
BATCH_DEFAULTS: dict[str, dict[str, float]] = {
    "cpu": {"max_batch_tokens": 1024, "max_batch_size": 4, "max_batch_padding": 0.25},
    "cuda": {"max_batch_tokens": 16384, "max_batch_size": 128, "max_batch_padding": 1.0},
}


class Settings(BaseSettings):
    """Service and CLI settings; every field maps to ``SAFT_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="SAFT_", env_file=".env", extra="ignore")

    # --- model -------------------------------------------------------------------------------
    model: str = Field(
        "smollm2-135m-instruct",
        description="'smollm2-135m-instruct' (embedded GGUF default), 'all-minilm-l6-v2' (embedded "
        "encoder), a local Hugging Face model directory (safetensors only) or a .gguf file (converted once into the cache).",
    )
    model_cache_dir: Path = Field(
        Path.home() / ".cache" / "saft-filter" / "models",
        description="Where the embedded GGUF default is converted to safetensors once.",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="'auto': bfloat16 on CUDA, float32 on CPU."
    )
    num_threads: int = Field(0, ge=0, description="torch CPU threads; 0 keeps torch's default.")
    compile_blocks: bool = Field(
        False, description="torch.compile (inductor, dynamic shapes) every transformer block's forward. Measured on the "
        "committed default, CPU, 120 dev items: 1.06x texts/s, max |Δscore| 1e-5, AUROC unchanged (BENCHMARKS.md 7d), "
        "for ~23 s of compiling at the first passes and a C compiler at run time; off by default for that cost."
    )

    # --- subspaces -----------------------------------------------------------------------------
    models_dir: Path = Field(PROJECT_ROOT / "models", description="Root of subspace artifacts.")
    subspace_name: str = Field("default", pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")

    # --- batching in the core ------------------------------------------------------------------
    # Defaults by device: a CPU pass is fastest with a few items (big padded batches fall out of
    # cache), a GPU needs big ones to fill; `python -m bench.run core` measures it (BENCHMARKS.md).
    max_batch_tokens: int = Field(
        int(BATCH_DEFAULTS["cpu"]["max_batch_tokens"]), ge=1,
        description=f"Padded-token budget of one forward pass; unset on CUDA: {BATCH_DEFAULTS['cuda']['max_batch_tokens']}.",
    )
    max_batch_size: int = Field(
        int(BATCH_DEFAULTS["cpu"]["max_batch_size"]), ge=1,
        description=f"Items per forward pass at most; unset on CUDA: {BATCH_DEFAULTS['cuda']['max_batch_size']}.",
    )
    max_batch_padding: float = Field(
        BATCH_DEFAULTS["cpu"]["max_batch_padding"], ge=0, le=1,
        description="Service batches: the share of a pass's padded tokens that may be padding (a padded token costs a "
        f"CPU as much as a real one); unset on CUDA: {BATCH_DEFAULTS['cuda']['max_batch_padding']} (no cap).",
    )

    # --- service ------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_tokens: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Bearer tokens for /score and /filter (JSON list or comma-separated); empty = open.",
    )
    admin_token: str | None = Field(None, description="Bearer token for /subspace writes; unset = writes refused.")
    max_wait_ms: float = Field(5.0, ge=0, description="How long a partial batch waits for more items.")
    malloc_trim_interval_s: float = Field(
        10.0, ge=0, description="Return glibc's free heap pages to the OS this often (malloc_trim, off the event loop; "
        "resident memory otherwise stays at every arena's high-water mark); 0 turns it off. Only on glibc: under "
        "jemalloc, which returns freed pages itself, the loop is not started."
    )
    allocator: Literal["auto", "jemalloc", "glibc"] = Field(
        "auto", description="The C allocator of `saft serve`: jemalloc (preloaded by re-executing the server with "
        "LD_PRELOAD; where every request runs the model, glibc's heap keeps growing: RELIABILITY.md, Memory), glibc, or "
        "auto: jemalloc where its library is installed (Debian's libjemalloc2, in the image), else glibc.",
    )
    malloc_arena_max: int = Field(
        2, ge=0, description="Cap on glibc's malloc arenas, set when `saft serve` starts (as MALLOC_ARENA_MAX would); "
        "0 leaves glibc's default of 8 per core."
    )
    feeder_nice: int = Field(
        10, ge=0, le=19, description="Linux: the service's threads other than the inference worker (event loop, tokenizing) "
        "run at this nice, so request handling does not stall a CPU forward pass; 0 leaves priorities alone."
    )
    max_queue: int = Field(4096, ge=1, description="Queued items before /score answers 429.")
    fair_queuing: bool = Field(True, description="Share the inference worker fairly between client tokens (start-time fair "
                               "queuing on token cost); false: first come, first served across all clients.")
    overtake_tokens: int = Field(512, ge=0, description="With fair queuing: while a batch runs, a batch of at most this "
                                 "many padded tokens of callers with nothing in it, due in fair order, runs at once and "
                                 "the running batch pauses between two transformer blocks (0: wait for the whole pass).")
    max_queue_per_client: int = Field(0, ge=0, description="Queued items one client token may hold (0: the whole "
                                      "queue); past it that client alone gets 429 (a /filter stream waits for its own items).")
    rate_limit_requests_per_s: float = Field(0.0, ge=0, description="Requests per second per client token on /score, "
                                             "/filter and /v1/moderations (0: no limit); past it 429 with Retry-After.")
    rate_limit_items_per_s: float = Field(0.0, ge=0, description="Items per second per client token on /score and "
                                          "/v1/moderations (0: no limit).")
    rate_limit_burst_s: float = Field(2.0, gt=0, description="A client may burst this many seconds' worth of its rate.")
    max_items_per_request: int = Field(1024, ge=1)
    max_chars_per_item: int = Field(200_000, ge=1, description="Longer items are refused (413), not cut.")
    max_body_bytes: int = Field(64 * 2**20, ge=1, description="Largest /score body, checked before parsing.")
    max_upload_bytes: int = Field(1024 * 2**20, ge=1, description="Largest /filter or refit upload.")
    body_read_timeout_s: float = Field(
        30.0, gt=0, description="A request head and a /score body must arrive whole within this, and an upload (/filter, "
        "refit) may not stall longer than this between chunks; otherwise 408 (slow-loris bound)."
    )
    filter_chunk_lines: int = Field(64, ge=1, description="Lines of a /filter stream scored together.")
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="On SIGTERM: work that has not started within this fails with 503 + Retry-After (a "
        "retryable answer, not a cut connection); what runs finishes. Keep it below the orchestrator's kill timeout "
        "(k8s terminationGracePeriodSeconds 45, compose stop_grace_period 45s) by more than one batch."
    )
    log_level: str = "INFO"

    # --- fleet (Redis) ------------------------------------------------------------------------
    redis_url: str | None = Field(
        None, description="redis://host:port/db shared by all replicas; unset = one replica, state on local disk only."
    )
    redis_prefix: str = Field("saft", pattern=r"^[A-Za-z0-9_.-]{1,32}$", description="Namespace of every Redis key.")
    redis_timeout_s: float = Field(1.0, gt=0, description="Socket timeout of Redis calls; an outage costs at most this.")
    redis_poll_s: float = Field(0.5, gt=0, description="Active-version check when pub/sub is silent (fallback).")
    replica_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}", description="This replica's name in locks and jobs."
    )
    refit_lock_ttl_s: float = Field(15.0, gt=0, description="A crashed replica's refit lock expires after this.")
    job_ttl_s: int = Field(7 * 86400, ge=60, description="How long refit job states are kept in Redis.")
    refit_guard_min_agreement: float = Field(0.9, ge=0, le=1, description="activate=auto: an unlabeled refit whose verdicts "
                                             "agree with the active version's on less of the upload is published, not activated.")
    refit_guard_max_drop_ratio: float = Field(1.5, ge=1, description="activate=auto: ... or whose drop share (benign drop share "
                                              "where the upload is labelled) moves by more than this factor ...")
    refit_guard_drop_slack: float = Field(0.02, ge=0, le=1, description="... plus this many points (0.02 = 2 points).")
    refit_guard_max_auroc_loss: float = Field(0.01, ge=0, le=1, description="activate=auto: a refit whose AUROC on the "
                                              "upload's labelled lines falls by more than this is published, not activated.")

    # --- embedding cache -----------------------------------------------------------------------
    cache_max_bytes: int = Field(256 * 2**20, ge=0, description="In-process cache bound in bytes; 0 turns the cache off.")
    cache_ttl_s: int = Field(86400, ge=1, description="Lifetime of a cached embedding (both tiers).")
    cache_redis: bool = Field(True, description="Share cached embeddings through Redis when SAFT_REDIS_URL is set.")

    @property
    def client_queue_share(self) -> int:
        """The queued items one client may hold: SAFT_MAX_QUEUE_PER_CLIENT, or the whole queue where it is 0."""
        return self.max_queue_per_client or self.max_queue

    def guard_bounds(self) -> dict[str, float]:
        """The refit guard's bounds (``app.core.anchoring.GuardBounds``' fields)."""
        return {"min_agreement": self.refit_guard_min_agreement, "max_drop_ratio": self.refit_guard_max_drop_ratio,
                "drop_slack": self.refit_guard_drop_slack, "max_auroc_loss": self.refit_guard_max_auroc_loss}

    @model_validator(mode="after")
    def _batch_limits_by_device(self) -> Settings:
        unset = BATCH_DEFAULTS["cuda"].keys() - self.model_fields_set
        if unset and self.device != "cpu":
            import torch  # only here: whether "auto" means CUDA needs it, and nothing else in this module does

            if self.device == "cuda" or torch.cuda.is_available():
                for name in unset:
                    setattr(self, name, type(getattr(self, name))(BATCH_DEFAULTS["cuda"][name]))
        return self

    @model_validator(mode="after")
    def _limits_fit_the_queue(self) -> Settings:
        # One request's items are admitted to the queue together, so they must fit in it.
        for name in ("max_items_per_request", "filter_chunk_lines"):
            if getattr(self, name) > self.client_queue_share:
                raise ValueError(f"SAFT_{name.upper()} ({getattr(self, name)}) must not exceed a client's queue share "
                                 f"({self.client_queue_share}: SAFT_MAX_QUEUE_PER_CLIENT, or SAFT_MAX_QUEUE where it is 0)")
        if self.max_queue_per_client > self.max_queue:
            raise ValueError(f"SAFT_MAX_QUEUE_PER_CLIENT ({self.max_queue_per_client}) must not exceed SAFT_MAX_QUEUE ({self.max_queue})")
        return self

    @field_validator("api_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: object) -> object:
        if isinstance(value, str):
            if value.strip().startswith("["):
                return json.loads(value)
            return [t.strip() for t in value.split(",") if t.strip()]
        return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
