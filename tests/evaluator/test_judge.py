"""The trait judge: trained on the bundled real replies, measured on held-out scenarios, a checked artefact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from big5core.dataset import BUNDLED_REAL, heldout_split, load_filtered
from big5core.traits import TRAITS, Level
from evaluator.judge import JUDGE_NAME, JudgeCorrupt, JudgeNotFound, JudgeStore, TraitJudge


@pytest.fixture(scope="module")
def judge_store(tmp_path_factory: pytest.TempPathFactory) -> JudgeStore:
    return JudgeStore(tmp_path_factory.mktemp("judges"))


@pytest.fixture(scope="module")
def judge(judge_store: JudgeStore) -> TraitJudge:
    return judge_store.get()


def test_held_out_accuracy_and_real_gap_per_trait(judge: TraitJudge) -> None:
    card = judge.card
    assert set(card.traits) == {t.value for t in TRAITS}
    for trait, metrics in card.traits.items():
        assert metrics.heldout_rows >= 40, trait
        assert metrics.heldout_accuracy is not None and metrics.heldout_accuracy >= 0.85, (trait, metrics)
        assert metrics.heldout_gap is not None and metrics.heldout_gap >= 0.3, (trait, metrics)
    assert card.dataset == BUNDLED_REAL and len(card.data_hash) == 64 and len(card.sha256) == 64


def test_judge_never_saw_the_held_out_scenarios(judge: TraitJudge) -> None:
    rows, _ = load_filtered(BUNDLED_REAL)
    train, held = heldout_split(rows)
    assert set(judge.card.heldout_scenarios) == {r.scenario for r in held}
    assert not set(judge.card.heldout_scenarios) & {r.scenario for r in train}
    # the held-out replies are scored on the right side of 0.5 far more often than not
    for trait in TRAITS:
        replies = [r for r in held if r.trait is trait]
        probs = judge.score([r.speaker_y for r in replies])[trait.value]
        high = [p for p, r in zip(probs, replies, strict=True) if r.level is Level.HIGH]
        low = [p for p, r in zip(probs, replies, strict=True) if r.level is Level.LOW]
        assert sum(high) / len(high) > sum(low) / len(low) + 0.3


def test_real_replies_cross_effect_is_each_other_judges_high_low_difference(judge: TraitJudge) -> None:
    """The card's reference for a mixture's cross effect, recomputed from the held-out replies."""
    rows, _ = load_filtered(BUNDLED_REAL)
    _, held = heldout_split(rows)
    for trait in TRAITS:
        cross = judge.card.traits[trait.value].heldout_cross
        assert set(cross) == {t.value for t in TRAITS if t is not trait}
        high = judge.score([r.speaker_y for r in held if r.trait is trait and r.level is Level.HIGH])
        low = judge.score([r.speaker_y for r in held if r.trait is trait and r.level is Level.LOW])
        for other, value in cross.items():
            expected = sum(high[other]) / len(high[other]) - sum(low[other]) / len(low[other])
            assert value == pytest.approx(expected, abs=1e-9), (trait, other)
    assert "cross effect" in judge.card.format()


def test_a_card_written_before_the_cross_effect_still_loads(judge: TraitJudge) -> None:
    from evaluator.judge import JudgeCard

    data = judge.card.to_json()
    for metrics in data["traits"].values():
        del metrics["heldout_cross"]
    old = JudgeCard.from_json(data)
    assert all(m.heldout_cross == {} for m in old.traits.values())
    assert "cross effect" not in old.format()


def test_score_shapes(judge: TraitJudge) -> None:
    out = judge.score(["Let's throw a huge party and invite everyone!", "I'd rather stay home alone."])
    assert set(out) == {t.value for t in TRAITS}
    assert all(len(v) == 2 and all(0.0 <= p <= 1.0 for p in v) for v in out.values())
    assert judge.score([]) == {t.value: [] for t in TRAITS}
    # extraversion: the party invitation reads as more extraverted than staying home alone
    assert out["extraversion"][0] > out["extraversion"][1]


def test_artefact_round_trip_and_tamper_check(judge_store: JudgeStore, judge: TraitJudge, tmp_path: Path) -> None:
    folder = judge_store.folder()
    card = json.loads((folder / "card.json").read_text())
    assert card["sha256"] == judge.card.sha256
    loaded = TraitJudge.load(folder)
    texts = ["Sure, whatever you want.", "Absolutely not, that's a terrible idea!"]
    assert loaded.score(texts) == judge.score(texts)
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("card.json", "model.joblib"):
        (copy / name).write_bytes((folder / name).read_bytes())
    with (copy / "model.joblib").open("ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(JudgeCorrupt):
        TraitJudge.load(copy)
    with pytest.raises(JudgeNotFound):
        TraitJudge.load(tmp_path / "nothing")
    with pytest.raises(JudgeNotFound):
        judge_store.get("someone-elses-judge")


def test_importing_the_judge_builds_nothing(tmp_path: Path) -> None:
    code = f"import os, evaluator.judge, evaluator.dialogue, evaluator.runner; print(os.listdir({str(tmp_path)!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "[]"


def test_default_judge_is_built_once_and_reused(tmp_path: Path) -> None:
    store = JudgeStore(tmp_path / "judges")
    first = store.get()
    mtime = (store.folder() / "model.joblib").stat().st_mtime_ns
    again = JudgeStore(tmp_path / "judges").get()  # another process would read the same folder
    assert (store.folder() / "model.joblib").stat().st_mtime_ns == mtime
    assert again.card.sha256 == first.card.sha256 and again.card.name == JUDGE_NAME
