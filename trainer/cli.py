"""``big5 train`` and ``big5 worker``: queue training jobs and process them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

if TYPE_CHECKING:
    from big5core.settings import Settings
    from trainer.ranks import RankGroup

T = TypeVar("T")


def register(app: typer.Typer) -> None:
    # The training flags are parsed by pydantic-settings (train_args), which also prints --help.
    passthrough = {"ignore_unknown_options": True, "allow_extra_args": True}
    app.command("train", context_settings=passthrough, add_help_option=False)(train)
    app.command("worker")(worker)  # `big5 jobs ...` lives in trainer/jobs_cli.py


def train_args_model() -> type[Any]:
    """``big5 train``'s options: every :class:`TrainSpec` field as a flag, plus ``--config`` and ``--wait``.

    One parser reads the YAML file and the flags (pydantic-settings: CLI over YAML over defaults,
    merged field by field), so ``--lora.r 16`` (or ``--rank 16``) changes only ``lora.r`` of the
    file's ``lora`` section.
    """
    from pydantic import AliasChoices, Field, model_validator
    from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

    from big5core.training import ALL_CONDITIONS, TrainSpec

    class TrainArgs(TrainSpec, BaseSettings):  # type: ignore[misc]
        model_config = SettingsConfigDict(
            extra="forbid",
            cli_prog_name="big5 train",
            cli_kebab_case=True,
            cli_implicit_flags=True,
            cli_avoid_json=True,
            cli_hide_none_type=True,
        )

        config: Path | None = Field(None, description="YAML file of these options; each flag overrides its own field")
        wait: bool = Field(True, description="Run a worker here until the job ends.")
        rank: int | None = Field(None, description="LoRA r (short for --lora.r; alpha and the rest stay as set)")
        conditions: list[str] = Field(
            default_factory=lambda: list(ALL_CONDITIONS),
            validation_alias=AliasChoices("condition", "conditions"),
            description="trait:level (repeatable; default all 10)",
        )
        per_device_train_batch_size: int = Field(
            4, ge=1, validation_alias=AliasChoices("batch_size", "per_device_train_batch_size")
        )

        @model_validator(mode="before")
        @classmethod
        def _rank_is_lora_r(cls, data: Any) -> Any:
            if isinstance(data, dict) and data.get("rank") is not None:
                data = {**data, "lora": {**(data.get("lora") or {}), "r": data["rank"]}}
            return data

        @classmethod
        def settings_customise_sources(
            cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource, **_: Any
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return init_settings, YamlConfigSettingsSource(settings_cls)  # no environment: flags and file only

        def spec(self) -> TrainSpec:
            return TrainSpec.model_validate(self.model_dump(exclude={"config", "wait", "rank"}))

    return TrainArgs


def parse_train_args(argv: list[str]) -> Any:
    """Parse ``big5 train`` arguments (and the ``--config`` YAML they name); argparse exits on errors."""
    import argparse

    from pydantic import ValidationError
    from pydantic_settings import CliApp

    model = train_args_model()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    config = pre.parse_known_args(argv)[0].config
    if config is not None:
        if not config.is_file():
            raise typer.BadParameter(f"{config}: no such file", param_hint="--config")
        model = type(model.__name__, (model,), {"model_config": {**model.model_config, "yaml_file": config}})
    try:
        return CliApp.run(model, cli_args=argv)
    except ValidationError as exc:  # a value of the file or of a flag (argparse reports unknown flags itself)
        raise typer.BadParameter(str(exc)) from exc


def train(ctx: typer.Context) -> None:
    """Queue a training job (SFT or DPO, unified or per-trait) and, by default, run it here.

    Options: `big5 train --help`. A YAML file (--config) sets any of them; flags override its fields.
    """
    from big5core.migrate import open_database
    from big5core.settings import get_settings
    from trainer.worker import Worker, job_snapshot, submit

    args = parse_train_args(list(ctx.args))
    spec, wait = args.spec(), args.wait
    settings = get_settings()

    def lead(group: RankGroup | None) -> str:
        with open_database(settings) as db:  # one engine for queueing and running the job
            job_id = submit(settings, spec, db=db)
            typer.echo(f"queued job {job_id}")
            if not wait:
                return "queued"
            runner = Worker(settings, group=group, db=db)
            runner.run_job(job_id)
            job = job_snapshot(db.sessions, job_id)
            summary = {"job": job.id, "state": job.state, "result": job.result, "error": job.error}
            typer.echo(json.dumps(summary, indent=2))
            return str(job.state)

    state = _lead_or_follow(settings, lead)
    if state not in (None, "queued", "succeeded"):
        raise typer.Exit(1)


def _lead_or_follow(settings: Settings, lead: Callable[[RankGroup | None], T]) -> T | None:
    """Run ``lead`` here, or, under `accelerate launch`, on rank 0 while the other ranks follow it.

    Returns None on the following ranks.
    """
    from trainer.ranks import Order, RanksOutOfStep, follow, join_launch

    group = join_launch(settings.trainer.rank_timeout_seconds)
    if group is None:
        return lead(None)
    if not group.is_main:
        trained = follow(group)
        group.close()
        typer.echo(f"rank {group.rank}: helped train {trained} adapter(s)")
        return None
    try:
        result = lead(group)
    except RanksOutOfStep:
        raise  # the other ranks are inside a collective: only ending the launch frees them
    except Exception:
        group.send(Order("stop"))
        raise
    group.send(Order("stop"))
    group.close()
    return result


def worker(
    once: Annotated[bool, typer.Option(help="Process one job and exit.")] = False,
    exit_when_idle: Annotated[bool, typer.Option(help="Exit when the queue is empty.")] = False,
    liveness_file: Annotated[
        Path | None,
        typer.Option(help="Rewrite this file while alive: each idle poll, each lease renewal (for --check-health)."),
    ] = None,
    check_health: Annotated[
        bool,
        typer.Option(
            "--check-health",
            help="Only check the worker that writes --liveness-file: exit 1 once it is older than the lease.",
        ),
    ] = False,
) -> None:
    """Process training jobs from the database queue (run several, on several machines).

    Under `accelerate launch --num_processes N` the N processes train each job together (the main
    one writes --liveness-file).
    """
    from big5core.settings import get_settings

    settings = get_settings()
    if check_health:
        _check_health(settings, liveness_file)
        return
    from trainer.liveness import Liveness
    from trainer.worker import Worker

    def lead(group: RankGroup | None) -> int:
        with Worker(settings, group=group) as runner:
            if liveness_file is not None:
                runner.liveness = Liveness(liveness_file, runner.owner)
            return runner.run(once=once, exit_when_idle=exit_when_idle)

    count = _lead_or_follow(settings, lead)
    if count is not None:
        typer.echo(f"processed {count} job(s)")


def _check_health(settings: Settings, liveness_file: Path | None) -> None:
    """A container healthcheck: the worker's liveness file younger than its lease, or exit 1."""
    from trainer.liveness import check

    if liveness_file is None:
        raise typer.BadParameter("--check-health reads the file the worker writes: give --liveness-file")
    health = check(liveness_file, settings.trainer.lease_seconds)
    typer.echo(health.message, err=not health.healthy)
    if not health.healthy:
        raise typer.Exit(1)
