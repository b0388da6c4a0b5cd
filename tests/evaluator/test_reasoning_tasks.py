"""The local reasoning tasks mirror lm-eval's stock tasks: same prompts, choices, targets and metrics.

Each stock YAML is read from the installed lm_eval package and rendered, with lm-eval's own template
function, on the stock-shaped form of a local item; the local config must give the same text.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from big5core.settings import ReasoningSettings
from evaluator.reasoning import tasks as T
from evaluator.reasoning.errors import TaskDataMissing, UnknownTask

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "reasoning"
LOCAL = ReasoningSettings(data_dir=SHARED if SHARED.is_dir() else None)
NEEDS_SHARED = {"piqa", "social_iqa"}
STOCK_YAML = {
    "piqa": "piqa/piqa.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "commonsense_qa": "commonsense_qa/default.yaml",
    "social_iqa": "siqa/siqa.yaml",
    "truthfulqa_mc1": "truthfulqa/truthfulqa_mc1.yaml",
    "truthfulqa_mc2": "truthfulqa/truthfulqa_mc2.yaml",
    "gsm8k": "gsm8k/gsm8k.yaml",
    "mmlu": "mmlu/default/mmlu_anatomy.yaml",
}


def _stock_config(name: str) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(Path(lm_eval.__file__).parent / "tasks" / STOCK_YAML[name], resolve_func=False)


def _first(info: T.TaskInfo, subject: str | None = None) -> dict[str, Any]:
    for doc in T._read_jsonl(T.data_path(info, LOCAL)):
        if subject is None or doc["meta"]["subject"] == subject:
            return doc
    raise AssertionError("no item")


def _stock_doc(name: str, d: dict[str, Any]) -> dict[str, Any]:
    """The item in the field layout of the stock task's Hugging Face dataset."""
    letters = ["A", "B", "C", "D", "E"]
    if name == "piqa":
        return {"goal": d["question"], "sol1": d["choices"][0], "sol2": d["choices"][1], "label": d["label"]}
    if name in ("arc_easy", "arc_challenge"):
        labels = d["meta"]["choice_labels"]
        return {
            "question": d["question"],
            "choices": {"text": d["choices"], "label": labels},
            "answerKey": labels[d["label"]],
        }
    if name == "commonsense_qa":
        return {
            "question": d["question"],
            "choices": {"text": d["choices"], "label": letters},
            "answerKey": letters[d["label"]],
        }
    if name == "social_iqa":
        m = d["meta"]
        return {"context": m["context"], "question": m["question"], "answerA": d["choices"][0],
                "answerB": d["choices"][1], "answerC": d["choices"][2], "label": m["label_orig"]}  # fmt: skip
    if name == "truthfulqa_mc1":
        return {"question": d["question"], "mc1_targets": {"choices": d["choices"]}}
    if name == "truthfulqa_mc2":
        return {"question": d["question"], "mc2_targets": {"choices": d["choices"], "labels": d["labels"]}}
    if name == "mmlu":
        return {
            "question": d["question"],
            "choices": d["choices"],
            "answer": d["label"],
            "subject": d["meta"]["subject"],
        }
    if name == "gsm8k":
        return {"question": d["question"], "answer": d["answer"]}
    raise AssertionError(name)


def _render(config: dict[str, Any], key: str, doc: dict[str, Any]) -> Any:
    from lm_eval.utils import apply_template

    value = config.get(key)
    if isinstance(value, str) and value in doc:
        return doc[value]
    if isinstance(value, str) and "{{" in value:
        rendered = apply_template(value, doc)
        if key == "doc_to_choice":
            import ast

            return ast.literal_eval(rendered)
        return rendered
    return value


def _target(config: dict[str, Any], doc: dict[str, Any], choices: list[str]) -> int:
    value = _render(config, "doc_to_target", doc)
    if isinstance(value, str) and value in choices:
        return choices.index(value)
    return int(value)


@pytest.mark.parametrize("name", sorted(STOCK_YAML))
def test_local_task_mirrors_stock(name: str) -> None:
    if name in NEEDS_SHARED and LOCAL.data_dir is None:
        pytest.skip("needs ../shared/data/reasoning")
    info = T.task_info(name)
    local = T.load_local_config(info, LOCAL)
    stock = _stock_config(name)
    item = _first(info, "anatomy" if name == "mmlu" else None)
    doc = _stock_doc(name, item)
    assert _render(local, "doc_to_text", item) == _render(stock, "doc_to_text", doc)
    if name == "mmlu":
        described = _render(local, "description", item)
        assert described == stock["description"]
    if info.kind != "generate":
        local_choices = _render(local, "doc_to_choice", item)
        stock_choices = _render(stock, "doc_to_choice", doc)
        assert local_choices == stock_choices
        assert _target(local, item, local_choices) == _target(stock, doc, stock_choices)
        assert local.get("target_delimiter", " ") == stock.get("target_delimiter", " ")
    else:
        assert local["generation_kwargs"] == stock["generation_kwargs"]
        assert local["filter_list"] == stock["filter_list"]
        assert local["num_fewshot"] == 0 and stock["num_fewshot"] == 5  # the documented difference
    assert [m["metric"] for m in local["metric_list"]] == [m["metric"] for m in stock["metric_list"]]
    assert local["output_type"] == stock.get("output_type", local["output_type"])
    if name == "truthfulqa_mc2":
        assert local["process_results"].__name__ == "process_results_mc2"


def test_mc2_scoring_matches_lm_eval() -> None:
    from lm_eval.tasks.truthfulqa.utils import process_results_mc2 as stock

    from evaluator.reasoning.taskfns import process_results_mc2

    results = [(-1.0, False), (-2.5, True), (-0.3, False), (-4.0, False)]
    labels = [1, 1, 0, 0]
    assert process_results_mc2({"labels": labels}, results)["acc"] == pytest.approx(
        stock({"mc2_targets": {"labels": labels}}, results)["acc"]
    )


def test_names_aliases_and_errors() -> None:
    assert T.task_info("siqa").name == "social_iqa"
    assert T.task_info("big5_arc_easy").name == "arc_easy"
    with pytest.raises(UnknownTask, match="unknown reasoning task"):
        T.task_info("mathqa")
    with pytest.raises(TaskDataMissing, match="BIG5_REASONING__DATA_DIR"):
        T.resolve_tasks(["piqa"], ReasoningSettings(data_dir=None))
    assert [t.name for t in T.resolve_tasks(["arc_easy", "arc-easy".replace("-", "_"), "gsm8k"], LOCAL)] == [
        "arc_easy",
        "gsm8k",
    ]


def test_bundled_data_needs_no_shared_folder() -> None:
    bundled = ReasoningSettings(data_dir=None)
    for name in ("arc_easy", "arc_challenge", "commonsense_qa", "gsm8k", "mmlu", "truthfulqa_mc1", "truthfulqa_mc2"):
        assert T.data_path(T.task_info(name), bundled).parent == T.BUNDLED_DATA


def test_config_hash_names_data_by_content(tmp_path: Path) -> None:
    info = T.task_info("arc_easy")
    here = T.lm_task_spec(info, ReasoningSettings())
    shutil.copy(T.data_path(info, ReasoningSettings()), tmp_path / "arc_easy_test.jsonl.gz")
    elsewhere = T.lm_task_spec(info, ReasoningSettings(data_dir=tmp_path))
    assert isinstance(here, dict) and isinstance(elsewhere, dict)
    assert here["dataset_kwargs"] != elsewhere["dataset_kwargs"]
    assert T.config_hash(here) == T.config_hash(elsewhere)
    gsm = T.task_info("gsm8k")
    assert T.config_hash(T.lm_task_spec(gsm, LOCAL, max_gen_toks=64)) != T.config_hash(  # type: ignore[arg-type]
        T.lm_task_spec(gsm, LOCAL, max_gen_toks=128)  # type: ignore[arg-type]
    )
    json.dumps(T.config_for_hash(here))  # JSON data (the functions by name)


def test_mmlu_slice_is_stratified() -> None:
    info = T.task_info("mmlu")
    docs = list(T._read_jsonl(T.data_path(info, LOCAL)))
    for limit in (10, 57, 120):
        chosen = T.item_indices(info, LOCAL, limit)
        assert chosen is not None and len(chosen) == limit == len(set(chosen)) and chosen == sorted(chosen)
        subjects = [docs[i]["meta"]["subject"] for i in chosen]
        counts = {s: subjects.count(s) for s in set(subjects)}
        assert len(counts) == min(limit, 57)
        assert max(counts.values()) - min(counts.values()) <= 1
    assert T.item_indices(T.task_info("arc_easy"), LOCAL, 5) == [0, 1, 2, 3, 4]
    assert T.item_indices(info, LOCAL, None) is None


def test_include_dir_loads_in_lm_eval(tmp_path: Path) -> None:
    """What `python -m evaluator.reasoning` hands lm-eval's CLI: its TaskManager finds and builds the tasks."""
    from lm_eval.tasks import TaskManager

    written = T.write_include_dir(tmp_path, LOCAL)
    assert "big5_arc_easy" in written and "big5_mmlu" in written
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    task = manager.load(["big5_truthfulqa_mc2"])["tasks"]["big5_truthfulqa_mc2"]
    assert len(task.test_docs()) == 817
    assert task.config.process_results.__name__ == "process_results_mc2"


def test_units_side_by_side_keep_tqdm_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two units loading task files at once: datasets' thread_map must not delete tqdm's class lock
    under the other (bench/reasoning.py died of it), so evaluate_unit gives tqdm its lock first."""
    from datasets.utils.tqdm import tqdm as hf_tqdm
    from tqdm import tqdm
    from tqdm.contrib.concurrent import ensure_lock

    from evaluator.reasoning.harness import shared_progress_lock

    # no class on the way up holds a lock yet: an earlier test may have given one to tqdm.auto's class
    for cls in hf_tqdm.__mro__:
        if "_lock" in vars(cls):
            monkeypatch.delattr(cls, "_lock")
    assert issubclass(hf_tqdm, tqdm)
    with ensure_lock(hf_tqdm):
        pass
    assert not hasattr(hf_tqdm, "_lock")  # created and deleted: what a second thread tripped over
    shared_progress_lock()
    with ensure_lock(hf_tqdm):
        pass
    assert hasattr(hf_tqdm, "_lock")
