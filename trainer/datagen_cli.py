"""``big5 datagen``: queue a PsychSteer data-generation job and, by default, run it here.

The trait judge is not the trainer's to build (it lives in the evaluator): the composition root
passes ``judge_factory`` to :func:`register`, and the command hands the judge to the worker.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from big5core.datagen import TraitScorer

JudgeFactory = Callable[[], TraitScorer]


def register(app: typer.Typer, judge_factory: JudgeFactory | None = None) -> None:
    def datagen(
        scenarios: Annotated[Path, typer.Argument(help="CSV/JSONL of scenarios in the released columns.")],
        output: Annotated[Path | None, typer.Option(help="Output .csv/.jsonl (default: data dir/datasets).")] = None,
        condition: Annotated[list[str] | None, typer.Option(help="trait:level (repeatable).")] = None,
        expert: Annotated[str | None, typer.Option(help="Adapter ref template, model folder, or 'prompt'.")] = None,
        antiexpert: Annotated[
            str | None, typer.Option(help="Optional anti-expert, e.g. sft-{trait}-{opposite}.")
        ] = None,
        alpha: Annotated[float | None, typer.Option(help="Expert strength (paper: 0.5).")] = None,
        temperature: Annotated[float | None, typer.Option(help="0 = greedy.")] = None,
        top_p: Annotated[float | None, typer.Option()] = None,
        seed: Annotated[int | None, typer.Option()] = None,
        max_new_tokens: Annotated[int | None, typer.Option()] = None,
        batch_size: Annotated[int | None, typer.Option()] = None,
        limit: Annotated[int | None, typer.Option(help="Only the first N scenarios.")] = None,
        max_reply_chars: Annotated[int | None, typer.Option(help="Length cap of a reply.")] = None,
        min_judge: Annotated[float | None, typer.Option(help="Reject rows with P(target level) below this.")] = None,
        judge: Annotated[bool, typer.Option(help="Score rows with the trait judge.")] = True,
        wait: Annotated[bool, typer.Option(help="Run a worker here until the job ends.")] = True,
    ) -> None:
        """Generate BIG5-CHAT rows with DExperts: the base model steered by a trait expert per condition."""
        from big5core.datagen import DatagenSpec
        from big5core.migrate import open_database
        from big5core.settings import get_settings
        from trainer.datagen.job import submit
        from trainer.worker import Worker, job_snapshot

        fields: dict[str, Any] = {
            "scenarios": str(scenarios),
            "output": str(output) if output else None,
            "conditions": condition or None,
            "expert": expert,
            "antiexpert": antiexpert,
            "alpha": alpha,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "limit": limit,
            "max_reply_chars": max_reply_chars,
            "min_judge": min_judge,
        }
        try:
            spec = DatagenSpec.model_validate({k: v for k, v in fields.items() if v is not None})
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
        settings = get_settings()
        with open_database(settings) as db:  # one engine for queueing and running the job
            job_id = submit(settings, spec, db=db)
            typer.echo(f"queued datagen job {job_id}")
            if not wait:
                return
            runner = Worker(settings, db=db)
            if judge and judge_factory is not None:
                runner.judge = judge_factory()
            runner.run_job(job_id)
            job = job_snapshot(db.sessions, job_id)
        typer.echo(json.dumps({"job": job.id, "state": job.state, "result": job.result, "error": job.error}, indent=2))
        if job.result:
            typer.echo(f"{job.result.get('generated_now')} rows in {job.result.get('seconds')} s: "
                       f"{job.result.get('rows_per_s')} rows/s")  # fmt: skip
        if job.state != "succeeded":
            raise typer.Exit(1)

    app.command("datagen")(datagen)
