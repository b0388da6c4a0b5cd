"""Settings of the reasoning evaluation (environment prefix ``BIG5_REASONING__``).

Kept apart from :class:`big5core.settings.Settings` (another owner); the prefix is the one a nested
``reasoning`` section there would read, so moving it in later changes no environment variable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ReasoningSettings(BaseSettings):
    # An empty value means unset (its default), as for big5core's Settings: ``BIG5_REASONING__SOURCE=`` loads.
    model_config = SettingsConfigDict(
        env_prefix="BIG5_REASONING__", extra="ignore", env_file=None, env_ignore_empty=True
    )

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


def get_reasoning_settings(**overrides: object) -> ReasoningSettings:
    return ReasoningSettings(**overrides)  # type: ignore[arg-type]
