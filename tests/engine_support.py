"""Starting the real engine on the bundled model for tests (reusable from ``tests/conftest.py``).

One engine uses ~4 GB of RAM and two cores for ~45 s to start: start at most one per test session
(module- or session-scoped fixture) and shut it down afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path

from big5core.settings import EngineSettings, Settings
from big5engine.engine import PersonaEngine

TEST_ENGINE = EngineSettings(
    max_model_len=2048,
    max_loras=4,
    max_lora_rank=64,
    max_cpu_loras=8,
    kv_cache_bytes=1 << 30,
    block_size=32,
    enforce_eager=True,
    max_num_seqs=64,
)


def engine_data_dir() -> Path:
    return Path(os.environ.get("BIG5_DATA_DIR", "./big5-data")).resolve()


def engine_model_path() -> str:
    """The bundled base model (provisioned on first use, ~40 s)."""
    from big5engine.modelstore import resolve_base_model

    return resolve_base_model(Settings(data_dir=engine_data_dir()))


def start_test_engine(work_dir: Path, *, enable_lora: bool = True) -> PersonaEngine:
    """A started :class:`PersonaEngine` on the bundled model; the caller must ``shutdown()`` it."""
    engine = PersonaEngine(engine_model_path(), TEST_ENGINE, enable_lora=enable_lora, work_dir=work_dir)
    engine.start()
    return engine
