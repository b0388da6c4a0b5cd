"""The quickstart's dialogue tables: gaps, dose-response and the 2x2 mixtures beside the real replies' reference."""

from __future__ import annotations

from types import SimpleNamespace

from big5.quickstart_plan import MIXTURE_PAIRS
from big5.quickstart_report import dialogue_tables
from big5core.traits import TRAITS
from evaluator.judge import JudgeCard, TraitMetrics


def _card() -> JudgeCard:
    traits = {
        t.value: TraitMetrics(
            202,
            52,
            0.95,
            0.6,
            {o.value: (-0.39 if {t, o} == set(MIXTURE_PAIRS[-1]) else 0.02) for o in TRAITS if o is not t},
        )
        for t in TRAITS
    }
    return JudgeCard("j", "kind", "ds", "0" * 64, 0.2, "now", {}, traits, "f" * 64)


def _reply(**scores: float) -> dict[str, dict[str, float]]:
    base = {t.value: 0.5 for t in TRAITS}
    return {f"i{n}": {**base, **scores} for n in range(3)}


def test_mixture_lines_print_own_cross_and_the_real_replies_cross() -> None:
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for a, b in MIXTURE_PAIRS:
        for sa in (1, -1):
            for sb in (1, -1):
                scores[f"mix-sft|{a.value}:{sa:+d}|{b.value}:{sb:+d}"] = _reply(
                    **{a.value: 0.5 + 0.3 * sa, b.value: 0.5 + 0.2 * sb}
                )
    out = dialogue_tables(scores, SimpleNamespace(card=_card()))
    assert len(out["json"]["mixtures"]) == len(MIXTURE_PAIRS) >= 3
    lines = [line for line in out["text"].splitlines() if line.startswith("2x2 mixture")]
    assert len(lines) == len(MIXTURE_PAIRS)
    first = out["json"]["mixtures"][0]
    a, b = first["traits"]
    assert abs(first["own"][a] - 0.6) < 1e-9 and abs(first["own"][b] - 0.4) < 1e-9
    assert all(abs(v) < 1e-9 for v in first["cross"].values())
    assert first["real_cross"] == {f"{a}->{b}": 0.02, f"{b}->{a}": 0.02}
    o, n = MIXTURE_PAIRS[-1]
    assert out["json"]["mixtures"][-1]["real_cross"] == {f"{o.value}->{n.value}": -0.39, f"{n.value}->{o.value}": -0.39}
    assert lines[-1].endswith("(real replies -0.39, -0.39)")


def test_a_missing_cell_leaves_the_mixture_out() -> None:
    a, b = MIXTURE_PAIRS[0]
    scores = {f"mix-sft|{a.value}:+1|{b.value}:{sb:+d}": _reply() for sb in (1, -1)}
    out = dialogue_tables(scores, SimpleNamespace(card=_card()))
    assert out["json"]["mixtures"] == []


def test_quality_table_sits_beside_the_gaps_with_coverage_and_validity() -> None:
    from big5.quickstart_report import quality_tables
    from evaluator.quality import opening, repetition
    from evaluator.quality_report import Replies, gap_quality_figure

    def replies(texts: list[str]) -> Replies:
        return Replies(texts, [{"repetition": repetition(t), "opening": opening(t), "relevance": 0.1,
                                "perplexity": 20.0, "n_words": 5} for t in texts])  # fmt: skip

    varied = ["Sure, let's go.", "No, I'm tired.", "Maybe later?", "What a fun plan!"]
    scores, found, rep = {}, {}, {}
    for i, trait in enumerate(TRAITS):
        for level, sign in (("high", 1), ("low", -1)):
            label = f"sft-per-trait|{trait.value}|{level}"
            scores[label] = _reply(**{trait.value: 0.5 + 0.2 * sign})
            rep[label] = replies(varied)
            found[label] = {"coverage": 0.9, "traits": {t.value: 3 + sign * (t is trait) + 0.1 * i for t in TRAITS}}
    gaps = dialogue_tables(scores, SimpleNamespace(card=_card()))["json"]
    reference = {"openness|high": replies(varied)}
    out = quality_tables(gaps, scores, rep, reference, {"bfi44": found})
    (row,) = [r for r in out["rows"] if r.title == "SFT (per-trait)"]
    assert abs(row.gap_mean - 0.4) < 1e-9 and row.coverage_min == 0.9 and row.relevance_ratio == 1.0
    assert "SFT (per-trait): repetition <= 0.10 met" in out["text"]
    validity = out["json"]["convergent_validity"]
    assert validity["inventory"] == "bfi44" and all(c["n"] == 10 for c in validity["traits"])
    assert all(c["r"] > 0.9 for c in validity["traits"])  # planted: questionnaire and judge agree
    assert gap_quality_figure(out["rows"]).startswith(b"\x89PNG")


def test_steer_rows_dose_response_and_mixtures_are_tabled() -> None:
    from big5.quickstart_plan import DOSE_LEVELS

    scores: dict[str, dict[str, dict[str, float]]] = {}
    for trait in TRAITS:
        scores[f"steer|{trait.value}|high"] = _reply(**{trait.value: 0.8})
        scores[f"steer|{trait.value}|low"] = _reply(**{trait.value: 0.3})
        for value in DOSE_LEVELS:
            scores[f"dose-steer|{trait.value}|{value:+.1f}"] = _reply(**{trait.value: 0.5 + 0.2 * value})
    a, b = MIXTURE_PAIRS[0]
    for sa in (1, -1):
        for sb in (1, -1):
            scores[f"mix-steer|{a.value}:{sa:+d}|{b.value}:{sb:+d}"] = _reply(**{a.value: 0.5 + 0.1 * sa})
    out = dialogue_tables(scores, SimpleNamespace(card=_card()))
    assert abs(out["json"]["gaps"]["Steer"]["openness"]["gap"] - 0.5) < 1e-9
    assert set(out["json"]["dose"]["dose-steer"]) == {t.value for t in TRAITS}
    assert len(out["curves"]["dose-steer"]) == len(TRAITS)
    (mix,) = out["json"]["mixtures"]
    assert mix["method"] == "steer" and abs(mix["own"][a.value] - 0.2) < 1e-9
    assert any(line.startswith(f"2x2 mixture {a.value} x {b.value} (steering)") for line in out["text"].splitlines())
