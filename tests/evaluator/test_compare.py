"""Grouping of the paper's table: only comparable assessments are averaged; n per cell; base models."""

from __future__ import annotations

from typing import Any

import pytest

from big5core.errors import Invalid
from big5core.models import Assessment, TraitScore
from evaluator import report
from evaluator.scoring import Reliability

BASE = "bundled:smollm2-135m-instruct"


def assessment(
    method: str,
    traits: dict[str, float],
    means: dict[str, float | None],
    *,
    adapter: str | None = None,
    unified: bool = False,
    scoring: str = "logprob",
    runs: int = 5,
    base: str | None = BASE,
    coverage: float = 1.0,
    id_: str = "a",
) -> Assessment:
    resolved: dict[str, Any] = {
        "method": method,
        "traits": traits,
        "template_id": "big5chat-unified-v1" if unified else "plain-v1",
        "parts": [{"adapter": adapter, "weight": 1.0}] if adapter else [],
        "base_model": base,
    }
    a = Assessment(id=id_, method=method, scoring_mode=scoring, runs=runs, state="done", resolved_persona=resolved)
    a.scores = [TraitScore(scope="trait", key=k, mean=v, n_runs=runs, coverage=coverage) for k, v in means.items()]
    return a


def test_adapter_family() -> None:
    assert report.adapter_family("sft-openness-high@3") == "sft@3"
    assert report.adapter_family("sft-unified@1") == "sft-unified@1"
    assert report.adapter_family("mine-neuroticism-low") == "mine"


def test_groups_split_by_adapter_version_layout_scoring_runs_and_base_model() -> None:
    found = [
        assessment("sft", {"openness": 1}, {"openness": 4.0}, adapter="sft-unified@1", unified=True),
        assessment("sft", {"openness": 1}, {"openness": 3.0}, adapter="sft-unified@1", unified=True),
        assessment("sft", {"openness": 1}, {"openness": 1.0}, adapter="sft-unified@2", unified=True),
        assessment("sft", {"openness": 1}, {"openness": 2.0}, adapter="sft-openness-high@1"),
        assessment("sft", {"openness": -1}, {"openness": 1.5}, adapter="sft-openness-low@1"),
        assessment("sft", {"openness": 1}, {"openness": 5.0}, adapter="sft-unified@1", unified=True, scoring="label"),
        assessment("sft", {"openness": 1}, {"openness": 5.0}, adapter="sft-unified@1", unified=True, runs=1),
        assessment("direct", {}, {"openness": 3.0}),
        assessment("direct", {}, {"openness": 2.0}, scoring="label"),
    ]
    table = report.paper_table(found, "bfi44")
    labels = {k.label(): k for k in table.rows}
    assert set(labels) == {
        "sft sft-unified@1 unified logprob x5",
        "sft sft-unified@2 unified logprob x5",
        "sft sft@1 per-trait logprob x5",
        "sft sft-unified@1 unified label x5",
        "sft sft-unified@1 unified logprob x1",
    }
    v1 = table.rows[labels["sft sft-unified@1 unified logprob x5"]]["openness"]
    assert v1.high.mean == 3.5 and v1.high.n == 2 and v1.low.n == 0  # only the two comparable ones averaged
    per_trait = table.rows[labels["sft sft@1 per-trait logprob x5"]]["openness"]
    assert (per_trait.high.mean, per_trait.low.mean, per_trait.gap) == (2.0, 1.5, 0.5)  # the arms form one row
    assert table.n[labels["sft sft@1 per-trait logprob x5"]] == 2
    assert len(table.direct) == 2  # Direct per scoring mode as well
    text = table.format()
    assert "sft sft-unified@2 unified logprob x5" in text and "base model: " + BASE in text
    groups = table.to_dict()["groups"]
    assert {g["label"] for g in groups} == set(labels) and all(g["n"] >= 1 for g in groups)


def test_a_trait_below_coverage_shows_na_with_its_coverage() -> None:
    found = [
        assessment("prompt", {"extraversion": 1}, {"extraversion": None}, coverage=0.03),
        assessment("prompt", {"extraversion": -1}, {"extraversion": 2.5}),
    ]
    table = report.paper_table(found, "bfi44")
    ((key, row),) = table.rows.items()
    cell = row["extraversion"]
    assert cell.high.text() == "n/a (coverage 3%)" and cell.high.n == 0 and cell.high.n_unscored == 1
    assert cell.low.text() == "2.50" and cell.gap is None
    assert "n/a (coverage 3%) / 2.50" in table.format()


def test_columns_widen_to_an_unscored_pair_and_stay_aligned() -> None:
    found = [
        assessment("sft", {"extraversion": 1}, {"extraversion": None}, coverage=0.4),
        assessment("sft", {"extraversion": -1}, {"extraversion": None}, coverage=0.12),
        assessment("direct", {}, {"extraversion": 2.5}),
    ]
    lines = report.paper_table(found, "bfi44").format().splitlines()
    header, rows = lines[1], lines[2:-1]
    assert any("n/a (coverage 40%) / n/a (coverage 12%)" in line for line in rows)
    assert all(len(line) == len(header) for line in rows), lines


def test_mixed_base_models_are_refused_unless_asked() -> None:
    found = [
        assessment("direct", {}, {"openness": 3.0}),
        assessment("direct", {}, {"openness": 3.2}, base="meta-llama/Meta-Llama-3-8B-Instruct"),
    ]
    with pytest.raises(report.MixedBaseModels, match="2 base models") as info:
        report.check_base_models(found)
    assert isinstance(info.value, Invalid)  # -> 400 in service/errors.py
    assert len(report.check_base_models(found, allow_mixed=True)) == 2
    assert len(report.paper_table(found, "bfi44").direct) == 2  # when allowed: separate rows
    assert report.check_base_models(found[:1]) == {BASE}


def test_group_reliability_uses_personas_times_runs() -> None:
    from evaluator.inventories import get_builtin

    inventory = get_builtin("bfi44")
    found = [
        assessment("prompt", {"openness": 1}, {"openness": 4.0}, id_="h"),
        assessment("prompt", {"openness": -1}, {"openness": 2.0}, id_="l"),
    ]
    values = {
        "h": [{i.id: 5.0 if i.keyed == "+" else 1.0 for i in inventory.items} for _ in range(3)],
        "l": [{i.id: 1.0 if i.keyed == "+" else 5.0 for i in inventory.items} for _ in range(3)],
    }
    values["l"][0][inventory.items[0].id] = 2.0  # a little variation within the items
    rel = report.group_reliability(report.groups(found), values, inventory)
    ((key, by_trait),) = rel.items()
    openness = by_trait["openness"]
    assert isinstance(openness, Reliability) and openness.n == 6 and openness.k == 10
    assert openness.alpha is None and "fewer respondents (6) than items (10)" in (openness.note or "")
    table = report.paper_table(found, "bfi44", rel)
    assert table.to_dict()["groups"][0]["reliability"]["openness"]["n"] == 6


@pytest.mark.parametrize(
    ("template", "layout"),
    [("big5chat-unified-v1", "unified"), ("big5chat-unified-system-v1", "unified"), ("plain-v1", "per-trait")],
)
def test_layout_follows_the_template_either_placement(template: str, layout: str) -> None:
    a = assessment("sft", {"openness": 1}, {"openness": 3.0}, adapter="sft-unified@1")
    a.resolved_persona = {**a.resolved_persona, "template_id": template}
    assert report.group_key(a).layout == layout
