"""``big5 quickstart``: from nothing to the paper's tables, questionnaire and dialogue, on the embedded defaults.

Stages, each timed: provision the bundled model; build the trait judge (per trait, P(high | reply),
trained on the bundled real BIG5-CHAT replies); train the adapters on the bundled real data (SFT
per-trait, SFT unified, DPO); start the engine; assess Direct, Prompt-Inst, Prompt-Demo, SFT and
DPO for the 10 trait-level conditions on the questionnaires (log-prob scoring) and in dialogue
(held-out Speaker X turns, replies scored by the judge), plus a dose-response over requested trait
values and 2x2 mixtures of two traits; print the tables with the judge's own accuracy and the
real replies' gap beside as the ceiling. A rerun reuses whatever is already trained and assessed.

The default plan fits in about 30 minutes on 2 CPU cores; ``--full`` trains longer and asks the
whole held-out set (the settings of ``bench/fidelity.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer

from big5core.traits import TRAITS, Level, Trait

logger = logging.getLogger(__name__)

# FULL_TRAINING is what docs/RESULTS.md measured (bench/fidelity.py, 2026-12-01): one core per job,
# SFT ~6.5 s/step, DPO ~25 s/step at batch 4 x <= 160 tokens. QUICK_TRAINING halves the steps. The
# per-trait adapters are the persona and the parts every composed trait vector is built from; the
# unified adapter is the paper's main method; DPO starts from the SFT adapter of the same condition
# (`init_from`), the contrastive step that makes an adapter use its level. The unified adapters train
# on twin batches (a Speaker X turn at a level and at its opposite, `TrainSpec.mirror_batches`): with
# random batches even DPO left the unified adapter level-blind; with twins 30 DPO steps make it
# condition. SFT unified trains with the level-contrast term (`TrainSpec.level_contrast`): plain SFT
# stayed level-blind even after 300 steps (1.2 epochs); with the term it conditions (200 steps or
# weight 3 did no better, measured on a GPU). A step costs more than a plain one (each reply is
# scored under the opposite level too), hence 80 steps. DPO unified, started from the
# contrast-trained SFT, moves all five traits by +0.36..+0.65, so the default plan leaves per-trait
# DPO to `--full`. Timed on 2 idle cores (2026-12-04, docs/RESULTS.md): 33 min in all. DPO unified trains
# with an NLL term on the chosen reply (`sft_weight` 1, TRL's "sft" loss beside the sigmoid), beta 0.5 and
# lr 5e-4 (issue 25, 2026-12-07): plain DPO at lr 1e-3 (loss 0.002 at step 30) collapsed onto stock openings
# (half of a condition's replies opening alike) and ignored the user (relevance 0.27x the real replies'); with
# the NLL term its worst cell shares 8% and relevance is 0.85x, the judge gap >= +0.30 on every trait.
# The unified adapters train with the answer-format term (`answer_format` 1, trainer/answer_format.py):
# without it SFT unified answered half of BFI-44 (some conditions none) and DPO unified none; with it SFT
# unified answers every item (issue 25, 2026-12-07; DPO with the term not yet measured).
_E_A = ["extraversion:high", "extraversion:low", "agreeableness:high", "agreeableness:low"]
QUICK_TRAINING: dict[str, dict[str, Any]] = {
    "sft-per-trait": {"method": "sft", "layout": "per-trait", "max_steps": 20, "learning_rate": 1e-3},
    "sft-unified": {
        "method": "sft",
        "layout": "unified",
        "max_steps": 80,
        "learning_rate": 1e-3,
        "level_contrast": 1.0,
        "answer_format": 1.0,
    },
    "dpo-unified": {
        "method": "dpo",
        "layout": "unified",
        "init_from": "sft",
        "max_steps": 30,
        "learning_rate": 5e-4,
        "beta": 0.5,
        "sft_weight": 1.0,
        "answer_format": 1.0,
    },
}
FULL_TRAINING: dict[str, dict[str, Any]] = {
    "sft-per-trait": {"method": "sft", "layout": "per-trait", "max_steps": 40, "learning_rate": 1e-3},
    "sft-unified": {
        "method": "sft",
        "layout": "unified",
        "max_steps": 200,
        "learning_rate": 1e-3,
        "level_contrast": 1.0,
        "answer_format": 1.0,
    },
    "dpo-per-trait": {
        "method": "dpo",
        "layout": "per-trait",
        "init_from": "sft",
        "max_steps": 12,
        "learning_rate": 5e-4,
        "conditions": [*_E_A, "neuroticism:high", "neuroticism:low"],
    },
    "dpo-unified": {
        "method": "dpo",
        "layout": "unified",
        "init_from": "sft",
        "max_steps": 60,
        "learning_rate": 5e-4,
        "beta": 0.5,
        "sft_weight": 1.0,
        "answer_format": 1.0,
    },
}
COMMON_TRAINING: dict[str, Any] = {
    "per_device_train_batch_size": 4,
    "max_length": 160,
    "warmup_steps": 2,
    "save_steps": 50,
    "eval": False,
}
DOSE_LEVELS: tuple[float, ...] = (-1.0, -0.5, 0.0, 0.5, 1.0)
MIXTURE_PAIRS: tuple[tuple[Trait, Trait], ...] = (
    (Trait.EXTRAVERSION, Trait.AGREEABLENESS),
    (Trait.EXTRAVERSION, Trait.CONSCIENTIOUSNESS),
    (Trait.OPENNESS, Trait.NEUROTICISM),
)
"""2x2 mixtures of the dialogue plan. The first two pairs are ones whose judges the real replies keep
apart (cross effect within 0.10 in the judge card); openness x neuroticism is one they do not (the
real O replies move the N judge by about -0.4), kept to show the reference at work."""


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
        list[str] | None, typer.Option(help="methods to assess (default direct prompt demo sft dpo)")
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
    wanted = methods or ["direct", "prompt", "demo", "sft", "dpo"]
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
            train_all(stack, {k: v for k, v in plan.items() if v["method"] in wanted}, stages)
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
        from big5.quickstart_report import print_reports

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


# ----------------------------------------------------------------------------- training


def train_all(stack: Any, plan: dict[str, dict[str, Any]], stages: Stages | None = None) -> None:
    """Queue and run each planned job here, skipping adapters the registry already has."""
    from big5core.training import TrainSpec
    from big5personas import registry
    from trainer.worker import Worker, submit

    worker = Worker(stack.settings)
    for label, options in plan.items():
        spec = TrainSpec.model_validate({**COMMON_TRAINING, **options})
        with stack.sessions() as session:
            missing = []
            for target in spec.targets():
                traits = None if target is None else {target[0].value: target[1].value}
                found = registry.find(
                    session, method=spec.method, layout=spec.layout, base_model=stack.base_model_id, traits=traits
                )
                if found is None:
                    missing.append(target)
        if not missing:
            typer.echo(f"[train] {label}: already trained, reused")
            continue
        if spec.layout == "per-trait":
            spec = spec.model_copy(update={"conditions": [f"{t.value}:{lv.value}" for t, lv in missing]})
        t0 = time.monotonic()
        typer.echo(f"[train] {label}: {len(missing)} adapter(s), {spec.max_steps} steps each")
        job_id = submit(stack.settings, spec)
        with _job_bar(stack, job_id, label):
            worker.run(max_jobs=1, exit_when_idle=True)
        with stack.sessions() as session:
            from big5core.jobs import get_job

            job = get_job(session, job_id)
            if job.state != "succeeded":
                raise typer.Exit(f"training job {job_id} {job.state}: {job.error}")  # type: ignore[arg-type]
        seconds = time.monotonic() - t0
        if stages is not None:
            stages.times[f"  train {label}"] = seconds
        typer.echo(f"[train] {label}: done in {seconds:.0f} s")


def _conditioning(progress: dict[str, Any]) -> str | None:
    """The training batch's own sign that the adapter uses its condition, from a job's progress:
    DPO's share of chosen replies over rejected ones, or the level-contrast SFT's share of replies
    more likely under their own level (trainer.train.CONDITIONING_METRICS)."""
    if "rewards/accuracies" in progress:
        return f"chosen>rejected {float(progress['rewards/accuracies']):.2f}"
    if "level/accuracy" in progress:
        return f"own level {float(progress['level/accuracy']):.2f}"
    return None


@contextlib.contextmanager
def _job_bar(stack: Any, job_id: str, label: str) -> Iterator[None]:
    """Progress fed from the job's recorded progress (adapter, step, loss) while the worker trains.

    On a terminal: one bar per adapter (reset when the worker moves on, so its rate is the adapter's).
    Elsewhere (a log file, CI): one plain line per adapter when it ends, never a redrawn bar.
    """
    import sys
    import threading

    from tqdm import tqdm

    from big5core.jobs import get_job

    stop = threading.Event()
    live = sys.stderr.isatty()
    bar = tqdm(total=1, desc=label, unit="step", leave=False, disable=not live)
    seen: dict[str, Any] = {}

    def metrics() -> list[str]:
        """The latest loss and conditioning accuracy, as far as recorded: ``["loss 2.283", "own level 1.00"]``."""
        loss = [f"loss {seen['loss']:.3f}"] if seen.get("loss") is not None else []
        return loss + ([seen["accuracy"]] if seen.get("accuracy") else [])

    def finished_line() -> None:
        if not live and seen.get("adapter"):
            parts = [f"step {seen['step']}/{seen['total']}", *metrics(), f"{time.monotonic() - seen['since']:.0f} s"]
            typer.echo(f"[train] {label} {seen['name']}: {', '.join(parts)}")

    def poll() -> None:
        try:
            with stack.sessions() as session:
                progress = dict(get_job(session, job_id).progress or {})
        except Exception:  # the database may be busy for a moment
            return
        adapter = progress.get("adapter")
        if adapter and adapter != seen.get("adapter"):
            finished_line()
            index, total = progress.get("adapter_index", 0), progress.get("adapters", 1)
            name = f"{adapter} ({index + 1}/{total})"
            seen.update(adapter=adapter, name=name, since=time.monotonic(), step=0, total=0, loss=None, accuracy=None)
            bar.reset(total=1)
            bar.set_description(f"{label} {name}", refresh=False)
        if "total_steps" in progress:
            seen.update(step=int(progress.get("step", 0)), total=int(progress["total_steps"]))
            if "loss" in progress:
                seen["loss"] = float(progress["loss"])
                seen["accuracy"] = _conditioning(progress)
                bar.set_postfix_str(", ".join(metrics()), refresh=False)
            bar.total = seen["total"]
            bar.update(seen["step"] - bar.n)

    def watch() -> None:
        while not stop.wait(1.0):
            poll()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        poll()  # the job's last recorded step, which the 1 s poll may not have seen
        finished_line()
        bar.close()


# ----------------------------------------------------------------------------- assessments


@dataclass
class Planned:
    """One assessment of the plan: what it measures (for the tables) and its request."""

    label: str
    kind: str  # questionnaire | dialogue
    request: Any
    assessment_id: str | None = None


def _adapter_exists(stack: Any, name: str) -> bool:
    """A ready adapter ``name`` on this base model is in the registry."""
    from big5core.errors import DomainError
    from big5personas import registry

    with stack.sessions() as session:
        try:
            return registry.get(session, name).base_model == stack.base_model_id
        except DomainError:
            return False


def method_personas(stack: Any, methods: list[str]) -> dict[str, dict[str, Any]]:
    """label -> persona: Direct, and each method x 10 conditions (SFT/DPO: every trained layout, by name)."""
    out: dict[str, dict[str, Any]] = {}
    if "direct" in methods:
        out["direct"] = {"method": "direct"}
    for trait in TRAITS:
        for level in Level:
            condition = {trait.value: level.value}
            if "prompt" in methods:
                out[f"prompt|{trait.value}|{level.value}"] = {"method": "prompt", "traits": condition}
            if "demo" in methods:
                out[f"demo|{trait.value}|{level.value}"] = {"method": "demo", "traits": condition}
            for method in ("sft", "dpo"):
                if method not in methods:
                    continue
                if _adapter_exists(stack, f"{method}-unified"):
                    out[f"{method}-unified|{trait.value}|{level.value}"] = {
                        "method": method,
                        "adapter": f"{method}-unified",
                        "traits": condition,
                    }
                name = f"{method}-{trait.value}-{level.value}"
                if _adapter_exists(stack, name):
                    out[f"{method}-per-trait|{trait.value}|{level.value}"] = {"method": method, "adapter": name}
    return out


def dialogue_personas(stack: Any, methods: list[str]) -> dict[str, dict[str, Any]]:
    """label -> persona of the dialogue plan: :func:`method_personas`, the dose-response, the mixtures."""
    out = method_personas(stack, methods)
    if "sft" in methods:
        for trait in TRAITS:
            if not all(_adapter_exists(stack, f"sft-{trait.value}-{lv.value}") for lv in Level):
                continue
            for value in DOSE_LEVELS:
                if value in (-1.0, 1.0):
                    level = "high" if value > 0 else "low"
                    persona: dict[str, Any] = {"method": "sft", "adapter": f"sft-{trait.value}-{level}"}
                elif value == 0.0:
                    persona = {"method": "direct"}
                else:
                    persona = {"method": "sft", "traits": {trait.value: value}}
                out[f"dose-sft|{trait.value}|{value:+.1f}"] = persona
        for a, b in MIXTURE_PAIRS:
            names = [f"sft-{t.value}-{lv.value}" for t in (a, b) for lv in Level]
            if not all(_adapter_exists(stack, n) for n in names):
                continue
            for sa in (1, -1):
                for sb in (1, -1):
                    out[f"mix-sft|{a.value}:{sa:+d}|{b.value}:{sb:+d}"] = {
                        "method": "sft",
                        "traits": {a.value: float(sa), b.value: float(sb)},
                    }
    if "prompt" in methods:
        for trait in TRAITS:
            for value in DOSE_LEVELS:
                persona = {"method": "direct"} if value == 0.0 else {"method": "prompt", "traits": {trait.value: value}}
                out[f"dose-prompt|{trait.value}|{value:+.1f}"] = persona
    return out


def plan_assessments(
    stack: Any, inventories: list[str], methods: list[str], *, runs: int, items: int | None, reply_tokens: int
) -> dict[str, Planned]:
    """Every assessment of the quickstart's tables, each found done already (reused) or to run."""
    from evaluator import store
    from evaluator.inventories import DIALOGUE_INVENTORY
    from evaluator.schemas import AssessRequest

    plan: dict[str, Planned] = {}
    for inventory in inventories:
        for label, persona in method_personas(stack, methods).items():
            request = AssessRequest.model_validate(
                {"persona": persona, "inventory": inventory, "scoring": "logprob", "runs": runs}
            )
            plan[f"{inventory}:{label}"] = Planned(label, "questionnaire", request)
    for label, persona in dialogue_personas(stack, methods).items():
        body: dict[str, Any] = {"persona": persona, "inventory": DIALOGUE_INVENTORY, "max_tokens": reply_tokens}
        if items is not None:
            body["max_items"] = items
        plan[f"dialogue:{label}"] = Planned(label, "dialogue", AssessRequest.model_validate(body))
    from big5core.errors import DomainError

    seen: dict[tuple[str, str], str] = {}
    pending: set[tuple[str, str]] = set()  # to run; a duplicate stays None too and run_assessments runs it once
    for key, planned in list(plan.items()):
        request = planned.request
        try:
            resolved = stack.resolver.resolve(request.persona)
        except DomainError as exc:  # e.g. a method whose adapters are not trained: left out, said so
            typer.echo(f"[assess] {key}: left out ({exc})")
            del plan[key]
            continue
        signature = (resolved.key, _signature(request))
        if signature in seen:  # e.g. the dose-response's 0 is Direct
            planned.assessment_id = seen[signature]
            continue
        with stack.sessions() as session:
            for a in store.search(session, persona_key=resolved.key, inventory=request.inventory, state="done"):
                if (
                    a.runs == request.runs
                    and a.scoring_mode == request.scoring
                    and _same_options(a.options, request, a.summary)
                ):
                    planned.assessment_id = a.id
                    break
        if planned.assessment_id is not None:
            seen[signature] = planned.assessment_id
        else:
            pending.add(signature)
    todo = len(pending)
    typer.echo(f"[assess] {len(plan)} assessment(s) in the plan: {todo} to run, {len(plan) - todo} reused")
    return plan


def _signature(request: Any) -> str:
    decoding = "|".join(str(getattr(request, k)) for k in DECODING_OPTIONS)
    return f"{request.inventory}|{request.scoring}|{request.runs}|{request.max_items}|{request.max_tokens}|{decoding}"


DECODING_OPTIONS = ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")


def _same_options(options: dict[str, Any], request: Any, summary: dict[str, Any] | None = None) -> bool:
    """A stored assessment answers the planned request: same turns, length and decoding, and (dialogue) its
    replies' quality measured (assessments stored before reply quality existed are run again)."""
    if request.scoring != "judge":
        return True
    same = options.get("max_items") == request.max_items and options.get("max_tokens") == request.max_tokens
    decoding = all(options.get(k, _OLD_DEFAULTS.get(k)) == getattr(request, k) for k in DECODING_OPTIONS)
    return same and decoding and bool((summary or {}).get("quality"))


_OLD_DEFAULTS = {
    "top_p": 1.0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
}
"""The decoding of dialogue assessments stored before these options were recorded (vLLM's neutral values)."""


def reference_path(reports: Any, items: int | None) -> Any:
    """Where the real replies' quality (the reference row) of the dialogue plan's turns is kept."""
    return reports / f"quality-reference-{items or 'all'}.json"


def write_reference(engine: Any, path: Any, items: int | None) -> None:
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
    stack: Any, planned: list[Planned], concurrency: int, *, reference: Any = None, items: int | None = None
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
                signature = f"{stack.resolver.resolve(p.request.persona).key}|{_signature(p.request)}"
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
