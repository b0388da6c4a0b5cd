"""``big5 quickstart``: from nothing to the paper's tables, questionnaire and dialogue, on the embedded defaults.

Stages, each timed: provision the bundled model; build the trait judge (per trait, P(high | reply),
trained on the bundled real BIG5-CHAT replies); train the adapters on the bundled real data (SFT
per-trait, SFT unified, DPO); extract the activation-steering vectors (forward passes, no training);
start the engine; assess Direct, Prompt-Inst, Prompt-Demo, Steer, SFT and DPO for the 10 trait-level
conditions on the questionnaires (log-prob scoring) and in dialogue
(held-out Speaker X turns, replies scored by the judge), plus a dose-response over requested trait
values and 2x2 mixtures of two traits; print the tables with the judge's own accuracy and the
real replies' gap beside as the ceiling. A rerun reuses whatever is already trained and assessed.

The default plan fits in about 30 minutes on 2 CPU cores; ``--full`` trains longer and asks the
whole held-out set (the settings of ``bench/fidelity.py``).

This module is the command and its stages; the plan (what is trained and assessed) is
``big5.quickstart_plan``, the training ``big5.quickstart_training``, the tables ``big5.quickstart_report``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from big5.quickstart_plan import (
    FULL_TRAINING,
    QUICK_TRAINING,
    Planned,
    plan_assessments,
    reference_path,
    request_signature,
)
from big5.quickstart_report import print_reports
from big5.quickstart_training import ensure_vectors, train_all

logger = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    app.command("quickstart")(quickstart)


@dataclass
class Stages:
    """Wall time of each stage, printed as it ends and again at the end."""

    times: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        typer.echo(f"== {name}")
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.times[name] = time.monotonic() - t0
            typer.echo(f"== {name}: {self.times[name]:.0f} s")

    def format(self) -> str:
        return "\n".join(f"  {name:<28}{seconds:>7.0f} s" for name, seconds in self.times.items())


def quickstart(
    inventory: Annotated[
        list[str] | None, typer.Option(help="questionnaires (default bfi44; --full adds ipip_neo_120)")
    ] = None,
    methods: Annotated[
        list[str] | None, typer.Option(help="methods to assess (default direct prompt demo steer sft dpo)")
    ] = None,
    skip_training: Annotated[bool, typer.Option(help="assess only what is already trained")] = False,
    full: Annotated[bool, typer.Option(help="train longer and ask every held-out turn (the bench's plan)")] = False,
    dialogue_items: Annotated[
        int | None, typer.Option(min=1, help="held-out Speaker X turns asked per persona (default 12; --full all)")
    ] = None,
    reply_tokens: Annotated[
        int | None, typer.Option(min=8, max=256, help="dialogue reply length in tokens (default 48; --full 64)")
    ] = None,
    runs: Annotated[
        int, typer.Option(min=1, help="questionnaire runs per assessment (instruction variants cycle)")
    ] = 1,
    concurrency: Annotated[int, typer.Option(min=1, help="assessments sent to the engine at once")] = 4,
) -> None:
    """Train, serve and measure: the whole BIG5-CHAT experiment on this machine's defaults."""
    from big5core.settings import get_settings

    _quiet_libraries()
    stages = Stages()
    started = time.monotonic()
    settings = get_settings()
    inventories = inventory or (["ipip_neo_120", "bfi44"] if full else ["bfi44"])
    wanted = methods or ["direct", "prompt", "demo", "steer", "sft", "dpo"]
    plan = FULL_TRAINING if full else QUICK_TRAINING
    items = dialogue_items if dialogue_items is not None else (None if full else 12)
    reply_tokens = reply_tokens or (64 if full else 48)
    typer.echo(f"data dir: {settings.data_dir.resolve()}  database: {settings.resolved_database_url}")
    from big5personas.stack import build_stack

    with stages.stage("provision base model"):
        stack = build_stack(settings)
        typer.echo(f"base model: {stack.base_model_path}")
    with stages.stage("trait judge"):
        from evaluator.judge import JudgeStore

        judge = JudgeStore(settings.data_dir / "judges", settings.evaluator.judge_dataset).get()
        typer.echo(judge.card.format())
    if not skip_training:
        with stages.stage("training"):
            train_all(stack, {k: v for k, v in plan.items() if v["method"] in wanted}, stages.times)
    if "steer" in wanted:
        with stages.stage("steering vectors"):
            ensure_vectors(stack)
    try:
        reports = settings.data_dir / "reports"
        reports.mkdir(parents=True, exist_ok=True)
        with stages.stage("assessments"):
            requests = plan_assessments(stack, inventories, wanted, runs=runs, items=items, reply_tokens=reply_tokens)
            run_assessments(
                stack,
                [r for r in requests.values() if r.assessment_id is None],
                concurrency,
                reference=reference_path(reports, items),
                items=items,
            )
        print_reports(stack, requests, inventories, judge, reports)
    finally:
        stack.close()
    typer.echo("\nstage times:\n" + stages.format())
    typer.echo(f"quickstart finished in {time.monotonic() - started:.0f} s")


def _quiet_libraries() -> None:
    """Progress bars and our own lines; the libraries' INFO chatter and dataset bars stay out of the way."""
    import os

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM configures its own loggers, engine process too
    for name in ("vllm", "transformers", "datasets", "httpx", "peft", "trl", "accelerate", "filelock", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("trainer").setLevel(logging.WARNING)
    logging.getLogger("evaluator").setLevel(logging.WARNING)  # one line per assessment would break the bar
    with contextlib.suppress(ImportError):
        import datasets

        datasets.disable_progress_bars()


def write_reference(engine: Any, path: Path, items: int | None) -> None:
    """Measure the real replies of the plan's held-out scenarios (evaluator.quality) once, into ``path``."""
    import json

    from evaluator.dialogue import load_dialogue_set
    from evaluator.quality import real_reply_quality

    turns = load_dialogue_set()
    asked = turns.items[:items] if items else turns.items
    found = asyncio.run(real_reply_quality(engine, turns.source, turns.split, [i.scenario for i in asked]))
    payload = {"items_hash": turns.items_hash, "items": items, "arms": found}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(path)


def run_assessments(
    stack: Any, planned: list[Planned], concurrency: int, *, reference: Path | None = None, items: int | None = None
) -> None:
    """Run the planned assessments on one engine (LoRA on), ``concurrency`` at a time; fills their ids.
    With ``reference``, the real replies' quality is measured there too when the file is missing."""
    if not planned and (reference is None or reference.exists()):
        return
    from tqdm import tqdm

    from evaluator.runner import AssessmentRunner

    engine = stack.make_engine()
    t0 = time.monotonic()
    engine.start()
    typer.echo(f"[assess] engine ready in {time.monotonic() - t0:.0f} s")
    by_request: dict[str, str] = {}
    try:
        runner = AssessmentRunner(stack.sessions, stack.resolver, engine)
        bar = tqdm(total=len(planned), unit="assessment", desc="assess")

        async def one(p: Planned, gate: asyncio.Semaphore) -> None:
            async with gate:
                signature = f"{stack.resolver.resolve(p.request.persona).key}|{request_signature(p.request)}"
                if signature in by_request:  # the same persona and options planned twice: run it once
                    p.assessment_id = by_request[signature]
                else:
                    assessment_id, resolved, instrument = await asyncio.to_thread(runner.prepare, p.request)
                    by_request[signature] = p.assessment_id = assessment_id
                    await runner.run(assessment_id, p.request, resolved, instrument)
                bar.update(1)

        async def go() -> None:
            gate = asyncio.Semaphore(concurrency)
            await asyncio.gather(*(one(p, gate) for p in planned))

        asyncio.run(go())
        bar.close()
        if reference is not None and not reference.exists():
            write_reference(engine, reference, items)
    finally:
        engine.shutdown()
