"""Every knob of saft-filter, read once from the environment (prefix ``SAFT_``) or ``.env``.

Nothing else in the package reads ``os.environ``; code receives a ``Settings`` instance.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Service and CLI settings; every field maps to ``SAFT_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="SAFT_", env_file=".env", extra="ignore")

    # --- model -------------------------------------------------------------------------------
    model: str = Field(
        "smollm2-135m-instruct",
        description="'smollm2-135m-instruct' (embedded GGUF default), 'all-minilm-l6-v2' (embedded "
        "encoder) or a local Hugging Face model directory (safetensors only).",
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

    # --- subspaces -----------------------------------------------------------------------------
    models_dir: Path = Field(PROJECT_ROOT / "models", description="Root of subspace artifacts.")
    subspace_name: str = Field("default", pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")

    # --- batching in the core ------------------------------------------------------------------
    max_batch_tokens: int = Field(8192, ge=1, description="Padded-token budget of one forward pass.")
    max_batch_size: int = Field(32, ge=1)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
