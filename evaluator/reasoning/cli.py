"""``big5 reason``: personas on reasoning tasks from the shell (embedded engine), and the paper's table."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer


def register(app: typer.Typer) -> None:
    app.command("reason")(reason)


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


def reason(
    persona: Annotated[
        list[str] | None,
        typer.Option(help="persona (repeatable): big5/sft?conscientiousness=1, direct, prompt?neuroticism=-1 ..."),
    ] = None,
    task: Annotated[
        list[str] | None, typer.Option(help="task (repeatable or comma-separated): piqa, arc_easy, mmlu, gsm8k ...")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="items per task (MMLU: a stratified slice)")] = None,
    chat_template: Annotated[bool, typer.Option(help="render prompts with the chat template")] = False,
    max_gen_toks: Annotated[int | None, typer.Option(min=1, help="generation limit (GSM8K)")] = None,
    resume: Annotated[str | None, typer.Option(help="resume a failed or interrupted run by its id")] = None,
    plot: Annotated[Path | None, typer.Option(help="write the table's plot here (.svg or .png)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the run and its table as JSON")] = False,
) -> None:
    """Evaluate personas on lm-evaluation-harness tasks, store every item, print the paper's table."""
    from evaluator.reasoning.schemas import ReasoningRequest

    request = None
    if resume is None:
        if not persona or not task:
            raise typer.BadParameter("give --persona and --task (or --resume RUN_ID)")
        try:
            request = ReasoningRequest.model_validate(
                {
                    "personas": _split(persona),
                    "tasks": _split(task),
                    "limit": limit,
                    "apply_chat_template": chat_template,
                    "max_gen_toks": max_gen_toks,
                }
            )
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
    result = embedded(request, resume, echo=not as_json)
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
    else:
        typer.echo(result["text"])
    if plot is not None:
        from evaluator.reasoning.report import reasoning_table, table_figure

        plot.write_bytes(table_figure(reasoning_table(result["units"]), plot.suffix.lstrip(".") or "svg"))
    if result["run"]["state"] != "done":
        raise typer.Exit(1)


def embedded(request: Any, resume: str | None, *, echo: bool = True) -> dict[str, Any]:
    """Prepare (or resume) and run on an engine started here; returns the run, its units and its table."""
    from big5core.settings import get_settings
    from big5personas.stack import build_stack
    from evaluator.reasoning import store
    from evaluator.reasoning.errors import ReasoningRunNotFound, TaskDataMissing, UnknownTask
    from evaluator.reasoning.harness import UnitResult
    from evaluator.reasoning.report import reasoning_table
    from evaluator.reasoning.routes import run_out
    from evaluator.reasoning.runner import ReasoningRunner

    stack = build_stack(get_settings())
    engine = stack.make_engine()
    try:
        runner = ReasoningRunner(stack.sessions, stack.resolver, engine, stack.settings.reasoning)
        try:
            if resume is not None:
                runner.check_resumable(resume)
                run_id = resume
            else:
                run_id = runner.prepare(request)  # bad input fails here, before the engine starts
        except (UnknownTask, TaskDataMissing, ReasoningRunNotFound, LookupError, ValueError) as exc:
            raise typer.BadParameter(str(exc)) from exc
        engine.start()
        began = time.monotonic()

        def on_unit(unit: UnitResult) -> None:
            if echo:
                rate = len(unit.items) / unit.seconds if unit.seconds else 0.0
                typer.echo(
                    f"{unit.task:<16} {unit.persona_key:<40} {len(unit.items):>5} items {unit.seconds:7.1f} s "
                    f"{rate:6.2f} items/s  {_primary(unit.metrics)}"
                )

        state = asyncio.run(runner.run(run_id, on_unit))
        with stack.sessions() as session:
            run = run_out(store.get(session, run_id)).model_dump(mode="json")
            units = store.unit_scores(session, [run_id])
        table = reasoning_table(units, run["tasks"])
        text = table.format() + f"\n\nrun {run_id}: {state} in {time.monotonic() - began:.1f} s"
        if run.get("error"):
            text += f"\nerror: {run['error']}"
        return {"run": run, "units": units, "table": table.to_dict(), "text": text}
    finally:
        engine.shutdown()
        stack.close()


def _primary(metrics: dict[str, Any]) -> str:
    return "  ".join(f"{k}={v:.3f}" for k, v in metrics.items() if isinstance(v, float))
