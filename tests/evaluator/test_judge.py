"""The trait judge: trained on the bundled real replies, measured on held-out scenarios, a checked artefact."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from big5core.dataset import BUNDLED_REAL, heldout_split, load_filtered
from big5core.traits import TRAITS, Level
from evaluator.judge import (
    JUDGE_NAME,
    JUDGE_STORAGE,
    JudgeCorrupt,
    JudgeNotFound,
    JudgeOutdated,
    JudgeStore,
    TraitJudge,
)


@pytest.fixture(scope="module")
def judge_store(tmp_path_factory: pytest.TempPathFactory) -> JudgeStore:
    return JudgeStore(tmp_path_factory.mktemp("judges"))


@pytest.fixture(scope="module")
def fitted(judge_store: JudgeStore) -> TraitJudge:
    """The judge as trained, in memory (``JudgeStore.train`` saves it and returns this object)."""
    return judge_store.train()


@pytest.fixture(scope="module")
def judge(judge_store: JudgeStore, fitted: TraitJudge) -> TraitJudge:
    """The same judge read back from its files."""
    return TraitJudge.load(judge_store.folder())


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
    assert card["sha256"] == judge.card.sha256 == hashlib.sha256((folder / "model.npz").read_bytes()).hexdigest()
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("card.json", "model.npz"):
        (copy / name).write_bytes((folder / name).read_bytes())
    with (copy / "model.npz").open("ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(JudgeCorrupt, match="does not match its card.*big5 judge train --name copy"):
        TraitJudge.load(copy)
    with pytest.raises(JudgeNotFound):
        TraitJudge.load(tmp_path / "nothing")
    with pytest.raises(JudgeNotFound):
        judge_store.get("someone-elses-judge")


def test_reloaded_judge_scores_exactly_as_the_fitted_one(fitted: TraitJudge, judge: TraitJudge) -> None:
    """The arrays rebuild the very pipeline: the same P(high) to the last bit, traits in the same order."""
    assert judge is not fitted and judge.card == fitted.card
    rows, _ = load_filtered(BUNDLED_REAL)
    _, held = heldout_split(rows)
    texts = [r.speaker_y for r in held] + ["", "Sure, whatever you want.", "Zzyzx qwertyuiop!!", "Ça va? 你好 🎉"]
    assert list(judge.score(texts)) == list(fitted.score(texts)) == [t.value for t in TRAITS]
    assert judge.score(texts) == fitted.score(texts)


def test_model_file_is_arrays_not_a_pickle(judge_store: JudgeStore, fitted: TraitJudge, tmp_path: Path) -> None:
    folder = judge_store.folder()
    assert sorted(p.name for p in folder.iterdir()) == ["card.json", "model.npz"]
    assert json.loads((folder / "card.json").read_text())["storage"] == JUDGE_STORAGE
    with np.load(folder / "model.npz", allow_pickle=False) as npz:  # refuses any object (pickled) array
        arrays = {key: npz[key] for key in npz.files}
    assert len(arrays) == 7 * len(TRAITS) and all(a.dtype.kind in "Uif" for a in arrays.values())
    # the same parameters give the same bytes: no timestamps in the archive
    again = TraitJudge(fitted.models, fitted.card).save(tmp_path / "again")
    assert (again / "model.npz").read_bytes() == (folder / "model.npz").read_bytes()


class _Payload:
    """Unpickling this creates ``marker``: what any code in a pickle could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.touch, (self.marker,))


def _pickled_judge(folder: Path, judge: TraitJudge, marker: Path) -> None:
    """A judge folder as the joblib version wrote it: ``model.joblib`` and a card without ``storage``."""
    folder.mkdir(parents=True)
    data = pickle.dumps({t.value: _Payload(marker) for t in TRAITS})
    (folder / "model.joblib").write_bytes(data)
    card = {k: v for k, v in judge.card.to_json().items() if k != "storage"}
    card["sha256"] = hashlib.sha256(data).hexdigest()
    (folder / "card.json").write_text(json.dumps(card))


def test_a_pickled_judge_is_refused_unread(judge: TraitJudge, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    _pickled_judge(tmp_path / "judges" / "old-judge", judge, marker)
    with pytest.raises(JudgeOutdated, match=r"pickle \(model.joblib\).*big5 judge train --name old-judge"):
        TraitJudge.load(tmp_path / "judges" / "old-judge")
    with pytest.raises(JudgeOutdated):
        JudgeStore(tmp_path / "judges").get("old-judge")  # not the default judge: never rebuilt behind one's back
    assert not marker.exists()


def test_cli_names_the_refusal_and_how_to_rebuild(judge: TraitJudge, tmp_path: Path) -> None:
    """`big5 judge show --name X` on a pickled judge: exit 1 and the message, no traceback, nothing unpickled."""
    marker = tmp_path / "code-ran"
    _pickled_judge(tmp_path / "data" / "judges" / "old-judge", judge, marker)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BIG5_")} | {"BIG5_DATA_DIR": str(tmp_path / "data")}
    command = [sys.executable, "-m", "big5.cli", "judge", "show", "--name", "old-judge"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "big5 judge train --name old-judge" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()


def test_an_object_array_is_refused_even_under_a_matching_card(judge_store: JudgeStore, tmp_path: Path) -> None:
    """Whoever can rewrite the model can rewrite its card too: the loader itself must not unpickle."""
    marker = tmp_path / "code-ran"
    folder = tmp_path / "forged"
    folder.mkdir()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive, archive.open("openness.logreg.coef.npy", "w") as member:
        np.lib.format.write_array(member, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    (folder / "model.npz").write_bytes(buffer.getvalue())
    card = json.loads((judge_store.folder() / "card.json").read_text())
    card["sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()
    (folder / "card.json").write_text(json.dumps(card))
    with pytest.raises(JudgeCorrupt, match="does not hold"):
        TraitJudge.load(folder)
    assert not marker.exists()


def test_the_default_judge_saved_as_a_pickle_is_rebuilt(judge: TraitJudge, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    _pickled_judge(tmp_path / "judges" / JUDGE_NAME, judge, marker)
    rebuilt = JudgeStore(tmp_path / "judges").get()
    folder = tmp_path / "judges" / JUDGE_NAME
    assert sorted(p.name for p in folder.iterdir()) == ["card.json", "model.npz"]
    assert rebuilt.card.storage == JUDGE_STORAGE and rebuilt.card.traits == judge.card.traits
    texts = ["Let's throw a huge party and invite everyone!", "I'd rather stay home alone."]
    assert rebuilt.score(texts) == judge.score(texts)
    assert not marker.exists()


def test_importing_the_judge_builds_nothing(tmp_path: Path) -> None:
    code = f"import os, evaluator.judge, evaluator.dialogue, evaluator.runner; print(os.listdir({str(tmp_path)!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "[]"


def test_default_judge_is_built_once_and_reused(tmp_path: Path) -> None:
    store = JudgeStore(tmp_path / "judges")
    first = store.get()
    mtime = (store.folder() / "model.npz").stat().st_mtime_ns
    again = JudgeStore(tmp_path / "judges").get()  # another process would read the same folder
    assert (store.folder() / "model.npz").stat().st_mtime_ns == mtime
    assert again.card.sha256 == first.card.sha256 and again.card.name == JUDGE_NAME
