"""One persona on one task through ``lm_eval.simple_evaluate``, with every item kept.

:func:`evaluate_unit` is the only place that calls lm-eval: the task config comes from
:mod:`evaluator.reasoning.tasks`, lm-eval builds the requests, calls the model, applies the task's
filters and metrics, and returns the per-item samples (``log_samples``), which become
:class:`ItemResult` rows: per-choice log-likelihoods or the generated text, the task's primary
metric and whether the item was answered correctly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

from big5core.settings import ReasoningSettings
from evaluator.reasoning.tasks import (
    TaskInfo,
    config_for_hash,
    config_hash,
    item_indices,
    lm_task_name,
    lm_task_spec,
)

if TYPE_CHECKING:
    from evaluator.reasoning.lm import Big5LM

logger = logging.getLogger(__name__)


def lm_eval_version() -> str:
    return version("lm_eval")


@dataclass
class ItemResult:
    doc_index: int
    item_id: str
    target: str
    score: float
    correct: bool
    loglikelihoods: list[float] | None = None
    greedy: list[bool] | None = None
    generated: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class UnitResult:
    task: str
    lm_task: str
    persona_key: str
    method: str
    resolved_persona: dict[str, Any]
    lm_eval_version: str
    task_config_hash: str
    task_config: dict[str, Any]
    metrics: dict[str, Any]
    items: list[ItemResult]
    seconds: float


def _number(value: Any) -> float:
    return float(value[0] if isinstance(value, list | tuple) else value)


def items_from_samples(info: TaskInfo, samples: list[dict[str, Any]]) -> list[ItemResult]:
    """lm-eval's logged samples (one per item, or one per item and filter) as :class:`ItemResult` rows."""
    by_doc: dict[int, list[dict[str, Any]]] = {}
    for sample in samples:
        by_doc.setdefault(int(sample["doc_id"]), []).append(sample)
    metric, _, wanted_filter = info.primary.partition(",")
    out = []
    for doc_index in sorted(by_doc):
        entries = by_doc[doc_index]
        first = entries[0]
        doc = first.get("doc") or {}
        item_id = str(doc.get("id", doc_index))
        metrics: dict[str, Any] = {}
        for entry in entries:
            suffix = f",{entry.get('filter', 'none')}"
            for key in entry.get("metrics", []):
                if key in entry:
                    metrics[key + suffix] = entry[key]
        if info.kind == "generate":
            chosen = next((e for e in entries if e.get("filter") == wanted_filter), first)
            score = _number(chosen[metric])
            text = first["resps"][0][0] if first.get("resps") else ""
            extracted = {str(e.get("filter")): e.get("filtered_resps", [None])[0] for e in entries}
            metrics["extracted"] = extracted
            out.append(
                ItemResult(
                    doc_index,
                    item_id,
                    str(first.get("target", "")),
                    score,
                    score >= 1.0,
                    generated=str(text),
                    metrics=metrics,
                )  # fmt: skip
            )
            continue
        pairs = [tuple(r) for r in first["filtered_resps"]]
        lls = [float(p[0]) for p in pairs]
        greedy = [bool(p[1]) for p in pairs]
        score = _number(first[metric])
        if info.kind == "mc2":
            labels = list(doc.get("labels") or doc.get("mc2_targets", {}).get("labels") or [])
            best = max(range(len(lls)), key=lls.__getitem__)
            correct = bool(labels) and labels[best] == 1
        else:
            correct = score >= 1.0
        out.append(
            ItemResult(doc_index, item_id, str(first.get("target", "")), score, correct, lls, greedy, None, metrics)
        )
    return out


def shared_progress_lock() -> None:
    """Give tqdm its class-wide lock before units run side by side in threads.

    ``datasets`` loads task files through ``tqdm.contrib.concurrent.thread_map``, whose
    ``ensure_lock`` creates tqdm's class lock when there is none and deletes it afterwards; two units
    loading at once both delete it and the second dies (``type object 'tqdm' has no attribute
    '_lock'``, seen in bench/reasoning.py). With the lock already there it is kept, never deleted.
    """
    from tqdm import tqdm

    tqdm.get_lock()


def run_lm_eval(
    model: Any,
    info: TaskInfo,
    settings: ReasoningSettings,
    *,
    limit: int | None,
    apply_chat_template: bool = False,
    max_gen_toks: int | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """lm-eval's ``simple_evaluate`` of one task on the items ``limit`` selects (MMLU stratified), for
    any lm-eval model (a persona, or the stock ``hf`` backend in the agreement bench): its results and
    the logged samples of that task."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    shared_progress_lock()
    spec = lm_task_spec(info, settings, max_gen_toks=max_gen_toks)
    name = lm_task_name(info, settings)
    stock = settings.source == "stock"
    indices = item_indices(info, settings, limit)
    results = lm_eval.simple_evaluate(
        model=model,
        tasks=[spec],
        task_manager=TaskManager(include_defaults=stock),
        limit=limit if stock else None,
        samples=None if stock or indices is None else {name: indices},
        log_samples=True,
        bootstrap_iters=0,
        apply_chat_template=apply_chat_template,
        verbosity="WARNING",
    )
    if results is None:
        raise RuntimeError(f"lm-eval returned no results for {name}")
    samples: list[dict[str, Any]] = []
    for task_name, task_samples in results["samples"].items():
        if task_name == name or stock:
            samples += task_samples
    return results, samples


def evaluate_unit(
    lm: Big5LM,
    info: TaskInfo,
    settings: ReasoningSettings,
    *,
    limit: int | None,
    apply_chat_template: bool = False,
    max_gen_toks: int | None = None,
) -> UnitResult:
    """Run ``info`` for the persona of ``lm`` (limit: items; MMLU stratified) and keep every item."""
    started = time.monotonic()
    name = lm_task_name(info, settings)
    results, samples = run_lm_eval(
        lm, info, settings, limit=limit, apply_chat_template=apply_chat_template, max_gen_toks=max_gen_toks
    )
    config = results["configs"].get(name) or next(iter(results["configs"].values()))
    metrics = {
        key: value
        for key, value in (results["results"].get(name) or {}).items()
        if isinstance(value, int | float) and "stderr" not in key
    }
    items = items_from_samples(info, samples)
    return UnitResult(
        task=info.name,
        lm_task=name,
        persona_key=lm.persona.key,
        method=lm.persona.method.value,
        resolved_persona=lm.persona.report(),
        lm_eval_version=lm_eval_version(),
        task_config_hash=config_hash(config),
        task_config=config_for_hash(config),
        metrics=metrics,
        items=items,
        seconds=time.monotonic() - started,
    )
