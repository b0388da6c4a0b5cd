"""The persona model on the real engine: Direct agrees with lm-eval's stock ``hf`` backend, personas
batch in one engine, and a reasoning run stores whole units, resumes after a failure, never half-done.

One engine for the session (tests/conftest.py); small slices keep this under a few minutes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select

from big5core.models import ReasoningItem, ReasoningResult, ReasoningRun
from big5core.settings import ReasoningSettings, Settings
from big5engine.engine import PersonaEngine
from big5personas.stack import Stack, build_stack
from evaluator.reasoning.harness import evaluate_unit
from evaluator.reasoning.lm import Big5LM
from evaluator.reasoning.runner import ReasoningRunner
from evaluator.reasoning.schemas import ReasoningRequest
from evaluator.reasoning.tasks import task_info
from evaluator.stats import mean_of_means_ci

pytestmark = [pytest.mark.slow, pytest.mark.long]  # see pyproject: passed 2026-12-02, outside the default run

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "reasoning"
RS = ReasoningSettings(data_dir=SHARED if SHARED.is_dir() else None, max_gen_toks=32, concurrency=8)
SLICE = 12


@pytest.fixture(scope="module")
def stack(settings_module: Settings) -> Any:
    built = build_stack(settings_module)
    yield built
    built.close()


@pytest.fixture(scope="module")
def settings_module(tmp_path_factory: pytest.TempPathFactory, pg_url: str, data_dir: Path) -> Settings:
    work = tmp_path_factory.mktemp("reasoning") / "data"
    work.mkdir()
    (work / "models").symlink_to(data_dir / "models", target_is_directory=True)
    return Settings(data_dir=work, database_url=pg_url)


def _hf_unit(model_path: Path, name: str) -> dict[str, Any]:
    """lm-eval's stock ``hf`` model on the same local task config and items."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from evaluator.reasoning.tasks import lm_task_spec

    info = task_info(name)
    hf = _HF.setdefault("lm", HFLM(pretrained=str(model_path), dtype="float32", device="cpu", batch_size=16))
    results = lm_eval.simple_evaluate(
        model=hf,
        tasks=[lm_task_spec(info, RS)],
        task_manager=TaskManager(include_defaults=False),
        samples={info.lm_task: list(range(SLICE))},
        log_samples=True,
        bootstrap_iters=0,
        verbosity="WARNING",
    )
    assert results is not None
    return {int(s["doc_id"]): s for s in results["samples"][info.lm_task]}


_HF: dict[str, Any] = {}


@pytest.mark.parametrize("name", ["piqa", "arc_easy", "commonsense_qa"])
def test_direct_agrees_with_stock_hf_backend(
    name: str, engine: PersonaEngine, stack: Stack, bundled_model_path: Path
) -> None:
    if name == "piqa" and RS.data_dir is None:
        pytest.skip("PIQA is not bundled: needs ../shared/data/reasoning")
    lm = Big5LM("direct", engine=engine, resolver=stack.resolver)
    ours = evaluate_unit(lm, task_info(name), RS, limit=SLICE)
    theirs = _hf_unit(bundled_model_path, name)
    assert [i.doc_index for i in ours.items] == sorted(theirs)
    diffs, ll_gap = [], 0.0
    for item in ours.items:
        sample = theirs[item.doc_index]
        hf_ll = [float(r[0]) for r in sample["filtered_resps"]]
        assert item.loglikelihoods is not None
        ll_gap = max(ll_gap, float(np.max(np.abs(np.array(item.loglikelihoods) - np.array(hf_ll)))))
        diffs.append(item.score - float(sample["acc"]))
    low, high = mean_of_means_ci([np.array(diffs)]) or (0.0, 0.0)
    assert low <= 0.0 <= high, f"{name}: big5 direct - hf accuracy CI [{low}, {high}]"
    assert ll_gap < 0.05, f"{name}: log-likelihoods differ by up to {ll_gap}"


def test_personas_share_the_engine_and_change_the_prompt(engine: PersonaEngine, stack: Stack) -> None:
    """Direct and Prompt-Inst at once (threads, one engine): same items, the persona's prefix in its prompts."""
    from concurrent.futures import ThreadPoolExecutor

    direct = Big5LM("big5/direct", engine=engine, resolver=stack.resolver)
    prompted = Big5LM("big5/prompt?conscientiousness=1", engine=engine, resolver=stack.resolver)
    assert (
        prompted.prompt("Question: x\nAnswer:")
        == "You are a person with high conscientiousness.\n\nQuestion: x\nAnswer:"
    )
    assert direct.prompt("Question: x\nAnswer:") == "Question: x\nAnswer:"
    info = task_info("arc_easy")
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda lm: evaluate_unit(lm, info, RS, limit=6), [direct, prompted])
    assert [i.item_id for i in a.items] == [i.item_id for i in b.items]
    assert any(x.loglikelihoods != y.loglikelihoods for x, y in zip(a.items, b.items, strict=True))
    assert b.resolved_persona["prefix"] == "You are a person with high conscientiousness."
    assert a.task_config_hash == b.task_config_hash


def test_gsm8k_generates_and_scores(engine: PersonaEngine, stack: Stack) -> None:
    lm = Big5LM("direct", engine=engine, resolver=stack.resolver)
    unit = evaluate_unit(lm, task_info("gsm8k"), RS, limit=2, max_gen_toks=24)
    assert len(unit.items) == 2
    for item in unit.items:
        assert item.generated is not None and item.loglikelihoods is None
        assert set(item.metrics["extracted"]) == {"strict-match", "flexible-extract"}
        assert item.score in (0.0, 1.0) and item.correct == (item.score == 1.0)
    assert unit.task_config["generation_kwargs"]["max_gen_toks"] == 24


def test_run_fails_whole_and_resumes(engine: PersonaEngine, stack: Stack) -> None:
    """A unit that raises stands in for a process killed midway: the run ends failed with only whole units
    stored; resuming evaluates only the missing unit and marks the run done."""
    calls: list[tuple[str, str]] = []

    def crashing(lm: Big5LM, info: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append((info.name, lm.persona.key))
        if info.name == "commonsense_qa" and lm.persona.key == "big5/prompt?neuroticism=-1":
            raise RuntimeError("killed midway")
        return evaluate_unit(lm, info, *args, **kwargs)

    request = ReasoningRequest(personas=["direct", "big5/prompt?neuroticism=-1"], tasks=["arc_easy", "csqa"], limit=4)
    runner = ReasoningRunner(stack.sessions, stack.resolver, engine, RS, evaluate=crashing)
    run_id = runner.prepare(request)
    assert asyncio.run(runner.run(run_id)) == "failed"
    with stack.sessions() as session:
        run = session.get(ReasoningRun, run_id)
        assert run is not None and run.state == "failed" and "killed midway" in (run.error or "")
        results = session.scalars(select(ReasoningResult).where(ReasoningResult.run_id == run_id)).all()
        assert len(results) == 3 and all(r.n_items == 4 for r in results)
        for r in results:
            n = session.scalar(select(func.count()).select_from(ReasoningItem).where(ReasoningItem.result_id == r.id))
            assert n == 4
    calls.clear()
    runner.evaluate = evaluate_unit
    runner.check_resumable(run_id)
    assert asyncio.run(runner.run(run_id)) == "done"
    with stack.sessions() as session:
        run = session.get(ReasoningRun, run_id)
        assert run is not None and run.state == "done" and run.progress["units_done"] == 4
        assert (
            session.scalar(select(func.count()).select_from(ReasoningResult).where(ReasoningResult.run_id == run_id))
            == 4
        )
