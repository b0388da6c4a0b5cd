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
    app.command("train")(train)
    app.command("worker")(worker)
    app.command("jobs")(list_jobs)


def train(
    config: Annotated[Path | None, typer.Option("--config", help="YAML file of TrainSpec options.")] = None,
    method: Annotated[str | None, typer.Option(help="sft or dpo")] = None,
    layout: Annotated[str | None, typer.Option(help="unified or per-trait")] = None,
    dataset: Annotated[str | None, typer.Option(help="CSV/JSONL/parquet path, hub name, or bundled:sample")] = None,
    condition: Annotated[list[str] | None, typer.Option(help="trait:level (repeatable; default all 10)")] = None,
    max_steps: Annotated[int | None, typer.Option()] = None,
    learning_rate: Annotated[float | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    max_length: Annotated[int | None, typer.Option()] = None,
    rank: Annotated[int | None, typer.Option(help="LoRA r (alpha = 2r unless set in the YAML)")] = None,
    name: Annotated[str | None, typer.Option(help="adapter name prefix")] = None,
    wait: Annotated[bool, typer.Option(help="Run a worker here until the job ends.")] = True,
) -> None:
    """Queue a training job (SFT or DPO, unified or per-trait) and, by default, run it here."""
    from big5core.settings import get_settings
    from big5core.training import TrainSpec
    from trainer.worker import Worker, job_snapshot, submit

    overrides: dict[str, Any] = {
        "method": method,
        "layout": layout,
        "dataset": dataset,
        "conditions": condition or None,
        "max_steps": max_steps,
        "learning_rate": learning_rate,
        "per_device_train_batch_size": batch_size,
        "max_length": max_length,
        "name": name,
    }
    if rank is not None:
        overrides["lora"] = {"r": rank, "alpha": 2 * rank}
    try:
        spec = (
            TrainSpec.from_yaml(config, **overrides)
            if config
            else TrainSpec.model_validate({k: v for k, v in overrides.items() if v is not None})
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    settings = get_settings()

    def lead(group: RankGroup | None) -> str:
        job_id = submit(settings, spec)
        typer.echo(f"queued job {job_id}")
        if wait:
            runner = Worker(settings, group=group)
            runner.run_job(job_id)
            job = job_snapshot(runner.sessions, job_id)
            summary = {"job": job.id, "state": job.state, "result": job.result, "error": job.error}
            typer.echo(json.dumps(summary, indent=2))
            return str(job.state)
        return "queued"

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
) -> None:
    """Process training jobs from the database queue (run several, on several machines).

    Under `accelerate launch --num_processes N` the N processes train each job together.
    """
    from big5core.settings import get_settings
    from trainer.worker import Worker

    settings = get_settings()
    count = _lead_or_follow(
        settings, lambda group: Worker(settings, group=group).run(once=once, exit_when_idle=exit_when_idle)
    )
    if count is not None:
        typer.echo(f"processed {count} job(s)")


def list_jobs(limit: int = 20) -> None:
    """List recent training jobs."""
    from sqlalchemy import select

    from big5core import migrate
    from big5core.db import engine_for, session_factory
    from big5core.models import TrainingJob
    from big5core.settings import get_settings

    settings = get_settings()
    migrate.ensure_current(settings.resolved_database_url)
    sessions = session_factory(engine_for(settings))
    with sessions() as session:
        for job in session.scalars(select(TrainingJob).order_by(TrainingJob.created_at.desc()).limit(limit)):
            typer.echo(f"{job.id}  {job.state:<10} attempts={job.attempts} progress={json.dumps(job.progress)}")
