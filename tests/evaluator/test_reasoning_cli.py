"""`big5 reason`: bad input is refused before any engine starts, with the reason, and nothing is stored."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from big5.cli import _register_edges, app
from big5core.db import make_engine
from big5core.models import ReasoningRun


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[Path]:
    """One data dir for the module (its SQLite file is migrated once), the bundled task data only."""
    work = tmp_path_factory.mktemp("reason-cli") / "data"
    work.mkdir()
    (work / "models").symlink_to(data_dir / "models", target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BIG5_DATA_DIR", str(work))
        mp.delenv("BIG5_DATABASE_URL", raising=False)
        mp.delenv("BIG5_REASONING__DATA_DIR", raising=False)
        _register_edges()
        yield work


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--persona", "direct", "--task", "mathqa"], "unknown reasoning task"),
        (["--persona", "direct", "--task", "piqa"], "BIG5_REASONING__DATA_DIR"),
        (["--persona", "big5/sft?conscientiousness=1", "--task", "arc_easy"], "no ready sft"),
        (["--persona", "direct", "--task", "arc_easy", "--limit", "0"], "limit"),
    ],
)
def test_bad_input_exits_2_without_a_run(cli_env: Path, args: list[str], needle: str) -> None:
    result = CliRunner().invoke(app, ["reason", *args])
    assert result.exit_code == 2, result.output
    assert needle.lower() in result.output.lower()
    db = cli_env / "big5.sqlite3"
    if db.exists():
        engine = make_engine(f"sqlite:///{db}")
        with engine.connect() as conn:
            assert conn.scalar(select(func.count()).select_from(ReasoningRun)) == 0
        engine.dispose()
