"""The persona tests' registry fixture (tests/big5personas/support.py has its pieces)."""

from __future__ import annotations

from pathlib import Path

import pytest

from big5core.db import make_engine, session_factory
from big5core.models import Base
from big5core.settings import ServiceSettings, Settings
from tests.big5personas.support import Env


@pytest.fixture()
def env(tmp_path: Path) -> Env:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    Base.metadata.create_all(engine)
    settings = Settings(data_dir=tmp_path / "data", service=ServiceSettings(composed_cache_size=2))
    e = Env(tmp_path, settings, session_factory(engine))
    e.add("u-sft", layout="unified")
    for trait, level in [("openness", "high"), ("openness", "low"), ("neuroticism", "low"), ("extraversion", "high")]:
        e.add(f"sft-{trait}-{level}", traits={trait: level})
    for trait, level in [("openness", "high"), ("neuroticism", "low"), ("agreeableness", "high")]:
        e.add(f"dpo-{trait}-{level}", method="dpo", traits={trait: level})
    return e
