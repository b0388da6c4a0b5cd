"""Settings from the environment: an empty value means unset, as the README and the Dockerfile use it."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from big5core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
ASSIGNMENT = re.compile(r"^(BIG5_[A-Z0-9_]+)=(.*)$")


def _assignments(words: list[str]) -> dict[str, str]:
    return {m.group(1): m.group(2) for word in words if (m := ASSIGNMENT.match(word))}


def readme_exports() -> dict[str, str]:
    """Every ``export BIG5_...=`` of the README's shell blocks (comments dropped)."""
    found: dict[str, str] = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        line = line.strip()
        if line.startswith("export "):
            found.update(_assignments(shlex.split(line, comments=True)[1:]))
    return found


def dockerfile_env() -> dict[str, dict[str, str]]:
    """``ENV BIG5_...`` per Dockerfile stage, inherited along ``FROM <stage> AS <name>``."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    stages: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "FROM":
            parent = stages.get(words[1], {})
            current = dict(parent)
            stages[words[3] if len(words) > 3 and words[2].upper() == "AS" else words[1]] = current
        elif words[0] == "ENV":
            current.update(_assignments(shlex.split(" ".join(words[1:]))))
    return stages


def settings_from(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Settings:
    """Settings built from exactly ``env`` (every other BIG5_ variable removed)."""
    for key in [k for k in os.environ if k.startswith("BIG5_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def test_the_readme_gpu_recipe_lets_vllm_size_the_kv_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    env = readme_exports()
    assert env.get("BIG5_ENGINE__KV_CACHE_BYTES") == ""  # the recipe this test is about
    settings = settings_from(monkeypatch, env)
    assert settings.engine.kv_cache_bytes is None
    assert settings.engine.dtype == env["BIG5_ENGINE__DTYPE"]
    assert settings.database_url == env["BIG5_DATABASE_URL"]


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_the_dockerfile_targets_build_settings(monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    env = dockerfile_env()[target]
    assert "BIG5_DATA_DIR" in env and "BIG5_ENGINE__DTYPE" in env
    settings = settings_from(monkeypatch, env)
    assert settings.data_dir == Path(env["BIG5_DATA_DIR"])
    assert settings.engine.dtype == env["BIG5_ENGINE__DTYPE"]
    if target == "gpu":
        assert env["BIG5_ENGINE__KV_CACHE_BYTES"] == ""
        assert settings.engine.kv_cache_bytes is None
    else:
        assert settings.engine.kv_cache_bytes == 1 << 30


def test_empty_means_unset_for_every_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """Optional settings become None; the others keep their defaults (never a parsing error)."""
    env = {
        "BIG5_DATABASE_URL": "",
        "BIG5_BASE_MODEL": "",
        "BIG5_DATA_DIR": "",
        "BIG5_ENGINE__KV_CACHE_BYTES": "",
        "BIG5_ENGINE__BLOCK_SIZE": "",
        "BIG5_ENGINE__MAX_LORAS": "",
        "BIG5_ENGINE__DTYPE": "",
        "BIG5_SERVICE__API_KEYS": "",
        "BIG5_TRAINER__LEASE_SECONDS": "",
    }
    settings = settings_from(monkeypatch, env)
    defaults = Settings.model_construct()
    assert settings.database_url is None
    assert settings.engine.kv_cache_bytes is None and settings.engine.block_size is None
    assert settings.base_model == defaults.base_model and settings.data_dir == defaults.data_dir
    assert settings.engine.max_loras == 4 and settings.engine.dtype == "float32"
    assert settings.service.api_keys == [] and settings.trainer.lease_seconds == 120


def test_set_values_still_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from(
        monkeypatch, {"BIG5_ENGINE__KV_CACHE_BYTES": "1024", "BIG5_SERVICE__API_KEYS": '["k"]', "BIG5_BASE_MODEL": "m"}
    )
    assert settings.engine.kv_cache_bytes == 1024 and settings.base_model == "m"
    assert [k.get_secret_value() for k in settings.service.api_keys] == ["k"]


def _settings_classes() -> list[tuple[type, str]]:
    """Every BaseSettings class that reads the environment, with its prefix (one: every section is in Settings)."""
    return [(Settings, "BIG5_")]


def _env_names(model: type, prefix: str) -> list[str]:
    from pydantic import BaseModel

    names = []
    for name, field in model.model_fields.items():  # type: ignore[attr-defined]
        names.append(prefix + name.upper())
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            names += _env_names(field.annotation, prefix + name.upper() + "__")
    return names


def test_every_settings_class_is_listed() -> None:
    """A new settings class must join the empty-value test below (trainer/cli.py's TrainArgs reads no env)."""
    packages = {"big5core", "big5engine", "big5personas", "evaluator", "service", "trainer", "big5"}
    found = set()
    for path in ROOT.glob("*/**/*.py"):
        if path.parts[len(ROOT.parts)] in packages:
            found |= {m.group(1) for m in re.finditer(r"^\s*class (\w+)\(.*BaseSettings", path.read_text(), re.M)}
    assert found - {"TrainArgs"} == {cls.__name__ for cls, _ in _settings_classes()}


@pytest.mark.parametrize("index", [0], ids=["Settings"])
def test_every_setting_of_every_class_loads_when_empty(monkeypatch: pytest.MonkeyPatch, index: int) -> None:
    """``BIG5_...=`` (each variable empty, one at a time and all at once) loads: unset, never a parsing error."""
    cls, prefix = _settings_classes()[index]
    names = _env_names(cls, prefix)
    for name in [k for k in os.environ if k.startswith("BIG5_")]:
        monkeypatch.delenv(name)
    for name in names:
        monkeypatch.setenv(name, "")
        cls()
        monkeypatch.delenv(name)
    for name in names:
        monkeypatch.setenv(name, "")
    cls()


def test_the_reasoning_settings_keep_their_defaults_when_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SOURCE", "MAX_GEN_TOKS", "CONCURRENCY", "DATA_DIR"):
        monkeypatch.setenv(f"BIG5_REASONING__{name}", "")
    loaded = Settings().reasoning
    assert (loaded.source, loaded.max_gen_toks, loaded.concurrency, loaded.data_dir) == ("local", 256, 16, None)


def test_an_empty_database_url_is_refused_where_one_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    """In the image (BIG5_REQUIRE_DATABASE_URL=1) an empty BIG5_DATABASE_URL never means a SQLite file."""
    from big5core.settings import DatabaseUrlRequired

    settings = settings_from(monkeypatch, {"BIG5_DATABASE_URL": "", "BIG5_REQUIRE_DATABASE_URL": "1"})
    assert settings.require_database_url and settings.database_url is None
    with pytest.raises(DatabaseUrlRequired, match="BIG5_DATABASE_URL is not set"):
        _ = settings.resolved_database_url
    url = "postgresql+psycopg://big5@db/big5"
    given = settings_from(monkeypatch, {"BIG5_DATABASE_URL": url, "BIG5_REQUIRE_DATABASE_URL": "1"})
    assert given.resolved_database_url == url
    outside = settings_from(monkeypatch, {"BIG5_DATABASE_URL": ""})  # outside the image: the SQLite default
    assert outside.resolved_database_url.startswith("sqlite:///")


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_the_image_requires_a_database_url(monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    """The image's environment with BIG5_DATABASE_URL missing or empty: an error, not a SQLite file in /data."""
    from big5core.settings import DatabaseUrlRequired

    env = dockerfile_env()[target]
    assert env.get("BIG5_REQUIRE_DATABASE_URL") == "1"
    for given in ({}, {"BIG5_DATABASE_URL": ""}):
        with pytest.raises(DatabaseUrlRequired):
            _ = settings_from(monkeypatch, {**env, **given}).resolved_database_url


def test_the_reasoning_section_reads_its_old_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Folded into Settings as ``reasoning``, it keeps the names it had as a class of its own."""
    monkeypatch.setenv("BIG5_REASONING__DATA_DIR", str(tmp_path))
    monkeypatch.setenv("BIG5_REASONING__CONCURRENCY", "3")
    loaded = Settings().reasoning
    assert (loaded.data_dir, loaded.concurrency) == (tmp_path, 3)
