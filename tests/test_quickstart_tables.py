"""The quickstart's dialogue tables: gaps, dose-response and the 2x2 mixtures beside the real replies' reference."""

from __future__ import annotations

from types import SimpleNamespace

from big5.quickstart import MIXTURE_PAIRS
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
