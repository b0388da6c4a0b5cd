"""Tests for the BIG5-CHAT data (big5core.dataset via trainer.dataset): loading, validation, filtering,
splits and the TRL example builders.

Most tests run on the hand-written fixture (tests/fixtures/handwritten_sample.csv: 70 clean scenarios
x 10 arms, written for this project, not real data); the bundled real excerpt has tests of its own.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
import types
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from big5core.prompts import unified_instruction
from big5core.traits import TRAITS, Level, Trait
from trainer.dataset import (
    BUNDLED_REAL,
    DATASET_FILENAME,
    REQUIRED_COLUMNS,
    DatasetError,
    FilterReport,
    PairReport,
    Row,
    bundled_path,
    dataset_hash,
    dpo_pairs,
    filter_artifacts,
    heldout_split,
    load_rows,
    near_duplicate_key,
    select,
    sft_examples,
    split_by_scenario,
)

ALL_ARMS = {(trait, level) for trait in TRAITS for level in Level}
HANDWRITTEN = Path(__file__).resolve().parents[1] / "fixtures" / "handwritten_sample.csv"


def bundled_sample_path() -> Path:
    """The hand-written fixture (the name the older tests use)."""
    return HANDWRITTEN


@pytest.fixture(scope="module")
def sample() -> list[Row]:
    return load_rows(HANDWRITTEN)


def make_row(reply: str, scenario: str = "s0", x: str = "Want to come to the party?", **kw: Any) -> Row:
    return Row(
        scenario=scenario,
        trait=kw.get("trait", Trait.EXTRAVERSION),
        level=kw.get("level", Level.HIGH),
        speaker_x=x,
        speaker_y=reply,
        instruction=None,
    )


def write_csv(path: Path, records: list[dict[str, Any]], columns: list[str] | None = None) -> Path:
    columns = columns or list(records[0])
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows({c: r.get(c) for c in columns} for r in records)
    return path


def sample_records(n: int = 4) -> list[dict[str, Any]]:
    with bundled_sample_path().open(newline="", encoding="utf-8") as handle:
        return [dict(r) for _, r in zip(range(n), csv.DictReader(handle), strict=False)]


# ----------------------------------------------------------------------------- loading


def test_bundled_sample_has_every_arm_of_every_scenario(sample: list[Row]) -> None:
    assert len(sample) == 700
    arms: dict[str, set[tuple[Trait, Level]]] = {}
    for row in sample:
        arms.setdefault(row.scenario, set()).add((row.trait, row.level))
    assert len(arms) == 70
    assert all(found == ALL_ARMS for found in arms.values())
    assert all(row.instruction == unified_instruction(row.trait, row.level) for row in sample)
    assert all(row.speaker_x and row.speaker_y for row in sample)


def test_filtering_keeps_the_whole_sample(sample: list[Row]) -> None:
    kept, report = filter_artifacts(sample)
    assert kept == sample
    assert (report.total_in, report.kept, report.dropped) == (700, 700, 0)
    assert set(report.by_arm) == {f"{t.value}-{lv.value}" for t, lv in ALL_ARMS}
    assert all(counts["kept"] == counts["total_in"] == 70 for counts in report.by_arm.values())


# ----------------------------------------------------------------------------- the bundled real data


@pytest.fixture(scope="module")
def real() -> list[Row]:
    return load_rows(BUNDLED_REAL)


def test_bundled_real_excerpt_loads_with_every_arm(real: list[Row]) -> None:
    assert bundled_path().name == "big5chat_real.csv"
    assert len(real) == 1280
    arms: dict[tuple[Trait, Level], int] = {}
    for row in real:
        arms[(row.trait, row.level)] = arms.get((row.trait, row.level), 0) + 1
    assert arms == dict.fromkeys(ALL_ARMS, 128)
    assert len({row.scenario for row in real}) == 128


def test_filter_on_real_data_drops_the_refusal_scenario_only(real: list[Row]) -> None:
    kept, report = filter_artifacts(real)
    assert (report.refusal, report.dropped, report.kept) == (10, 10, 1270)
    dropped = [row for row in real if row not in kept]
    assert len({row.scenario for row in dropped}) == 1  # line 115: its Speaker X turn is itself a refusal
    assert all(report.by_arm[name]["refusal"] == 1 and report.by_arm[name]["kept"] == 127 for name in report.by_arm)
    table = report.format()
    assert "openness-high" in table and "dropped 10 of 1280" in table


def test_real_dpo_pairs_share_speaker_x_within_a_trait(real: list[Row]) -> None:
    kept, _ = filter_artifacts(real)
    pairs, skipped = dpo_pairs(kept, "unified")
    assert skipped == PairReport(unpaired=0, mismatched_speaker_x=0)
    assert len(pairs) == 1270


def test_heldout_split_is_disjoint_and_stable(real: list[Row]) -> None:
    train, held = heldout_split(real)
    assert {r.scenario for r in train}.isdisjoint({r.scenario for r in held})
    assert 15 <= len({r.scenario for r in held}) <= 40
    # a training job's split at a larger fraction (same seed) holds out a superset of these scenarios
    _, larger = split_by_scenario(real, 0.3, 0)
    assert {r.scenario for r in held} <= {r.scenario for r in larger}


def test_path_folder_jsonl_and_parquet_load_the_same_rows(sample: list[Row], tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = sample_records(700)
    folder = tmp_path / "release"
    folder.mkdir()
    shutil.copy(bundled_sample_path(), folder / DATASET_FILENAME)
    jsonl = tmp_path / "big5.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    parquet = tmp_path / "big5.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "original_index": int(r["original_index"])} for r in records]), parquet)
    expected = dataset_hash(sample)
    for source in (bundled_sample_path(), str(bundled_sample_path()), folder, jsonl, parquet):
        assert dataset_hash(load_rows(source)) == expected, source


def test_hub_name_goes_through_datasets_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    # Stand-in for the `datasets` package: the real hub needs a network this machine lacks.
    calls: list[tuple[str, str]] = []

    class FakeDataset:
        def to_list(self) -> list[dict[str, Any]]:
            return [{**r, "original_index": int(r["original_index"])} for r in sample_records(4)]

    def load_dataset(name: str, split: str) -> FakeDataset:
        calls.append((name, split))
        return FakeDataset()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    rows = load_rows("wenkai-li/big5_chat")
    assert calls == [("wenkai-li/big5_chat", "train")]
    assert [r.scenario for r in rows] == ["0"] * 4


def test_null_text_cells_load_and_are_filtered(tmp_path: Path) -> None:
    records = sample_records(4)
    records[1]["train_output"] = ""
    records[2]["train_input"] = None
    rows = load_rows(write_csv(tmp_path / "nulls.csv", records))
    assert [r.speaker_y == "" for r in rows] == [False, True, False, False]
    kept, report = filter_artifacts(rows)
    assert report.null == 2 and report.kept == 2
    assert kept == [rows[0], rows[3]]


def test_optional_columns_may_be_absent(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "minimal.csv", sample_records(2), list(REQUIRED_COLUMNS))
    rows = load_rows(path)
    assert [(r.trait, r.level, r.instruction) for r in rows] == [
        (Trait.OPENNESS, Level.HIGH, None),
        (Trait.OPENNESS, Level.LOW, None),
    ]


def test_missing_columns_are_named(tmp_path: Path) -> None:
    columns = [c for c in sample_records(1)[0] if c not in ("level", "train_output")]
    path = write_csv(tmp_path / "cols.csv", sample_records(2), columns)
    with pytest.raises(DatasetError, match=r"missing required column\(s\): level, train_output"):
        load_rows(path)


def test_unknown_trait_names_value_and_row(tmp_path: Path) -> None:
    records = sample_records(4)
    records[2]["trait"] = "opennes"
    with pytest.raises(DatasetError, match=r"unknown trait value\(s\): 'opennes' at row 3\b"):
        load_rows(write_csv(tmp_path / "trait.csv", records))


def test_unknown_level_names_value_and_rows(tmp_path: Path) -> None:
    records = sample_records(4)
    records[0]["level"] = "medium"
    records[3]["level"] = "medium"
    with pytest.raises(DatasetError, match=r"unknown level value\(s\): 'medium' at rows 1, 4\b"):
        load_rows(write_csv(tmp_path / "level.csv", records))


def test_empty_file_and_header_only(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DatasetError, match="empty file"):
        load_rows(empty)
    header_only = tmp_path / "header.csv"
    header_only.write_text(",".join(REQUIRED_COLUMNS) + "\n")
    with pytest.raises(DatasetError, match="no rows"):
        load_rows(header_only)
    blank_jsonl = tmp_path / "blank.jsonl"
    blank_jsonl.write_text("\n\n")
    with pytest.raises(DatasetError, match="empty file"):
        load_rows(blank_jsonl)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.csv", None, "no such file or folder"),
        ("data.txt", "x", "unsupported file type '.txt'"),
        ("bad.jsonl", '{"trait": "openness"}\nnot json\n', "line 2 is not valid JSON"),
        ("list.jsonl", "[1, 2]\n", "line 1 is not a JSON object"),
    ],
)
def test_unusable_sources(tmp_path: Path, name: str, content: str | None, message: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_rows(path)


def test_folder_without_release_csv(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=DATASET_FILENAME):
        load_rows(tmp_path)


# ----------------------------------------------------------------------------- filtering

CLEAN = [
    "Yes! I'll bring snacks and a speaker.",
    "I can't help you move Saturday, I'm busy.",  # a low-agreeableness reply, not a refusal
    "I'm sorry, but I can't make it this time.",
    "See you at 5 :)",
    "Two times 3*4 is 24, so bring plenty.",
]
REFUSALS = [
    "I cannot create content that depicts a real person in a harmful way.",
    "I can't fulfill that request.",
    "As an AI, I don't go to parties.",
    "I'm sorry, but I can't help with that request.",
    "I can\u2019t assist with that.",
    "As a language model I have no weekends.",
]
STAGE_DIRECTIONS = ["*sighs* Fine, I'll come.", "(laughs nervously) Sure, why not.", "Okay. *grabs coat*"]
ORDINARY_WRITING = [
    "I'm *so* excited about Saturday!",
    "My sister (the older one) is coming too.",
    "That was great (really!). Thanks for asking.",
]


@pytest.mark.parametrize("text", STAGE_DIRECTIONS)
def test_stage_directions_are_dropped(text: str) -> None:
    _, report = filter_artifacts([make_row(text)])
    assert report.stage_direction == 1


@pytest.mark.parametrize("text", ORDINARY_WRITING)
def test_emphasis_and_asides_stay(text: str) -> None:
    kept, report = filter_artifacts([make_row(text)])
    assert len(kept) == 1 and report.dropped == 0


def test_a_reply_at_both_levels_of_a_trait_is_dropped_on_both_sides() -> None:
    rows = [
        make_row("Sure, sounds good.", scenario="s1", level=Level.HIGH),
        make_row("sure sounds good", scenario="s1", level=Level.LOW),
        make_row("Sure, sounds good!", scenario="s2", level=Level.HIGH),
        # the same text under another trait is an ordinary (later) duplicate, not a cross-level one
        make_row("Count me in.", scenario="s3", trait=Trait.OPENNESS, level=Level.HIGH),
        make_row("Count me in.", scenario="s3", trait=Trait.AGREEABLENESS, level=Level.LOW),
    ]
    kept, report = filter_artifacts(rows)
    assert kept == [rows[3]]
    assert (report.cross_level_duplicate, report.exact_duplicate) == (3, 1)
    assert report.by_arm["extraversion-high"]["cross_level_duplicate"] == 2
    assert report.by_arm["extraversion-low"]["cross_level_duplicate"] == 1


def test_planted_artifacts_are_dropped_and_counted() -> None:
    rows = [make_row(text, scenario=f"c{i}") for i, text in enumerate(CLEAN)]
    rows += [make_row(text) for text in REFUSALS + STAGE_DIRECTIONS]
    rows += [make_row(""), make_row("   "), make_row("nan"), make_row("Fine.", x="")]
    rows += [make_row(CLEAN[0], scenario="dup"), make_row("  " + CLEAN[2] + "\n", scenario="dup2")]
    rows += [make_row("yes ill bring SNACKS, and a speaker", scenario="near", trait=Trait.OPENNESS)]
    rows += [make_row("See you at 5!", scenario="near2")]
    kept, report = filter_artifacts(rows)
    assert kept == rows[: len(CLEAN)]
    counts = {reason: getattr(report, reason) for reason in FilterReport.REASONS}
    assert counts == {
        "null": 4,
        "refusal": len(REFUSALS),
        "stage_direction": len(STAGE_DIRECTIONS),
        "cross_level_duplicate": 0,
        "exact_duplicate": 2,
        "near_duplicate": 2,
    }
    assert (report.total_in, report.kept) == (len(rows), len(CLEAN))
    assert report.dropped + report.kept == report.total_in
    table = report.format()
    for label in ("null", "refusal", "stage", "x-level", "exact", "near", "kept", "all arms"):
        assert label in table
    assert f"dropped {report.dropped} of {len(rows)}" in table
    assert report.as_dict()["dropped"]["refusal"] == len(REFUSALS)


def test_a_refusal_does_not_shadow_a_later_clean_copy() -> None:
    # Only kept replies register as "seen": the first clean occurrence of a text is kept.
    rows = [make_row("(shrugs) ok whatever"), make_row("ok whatever"), make_row("OK, whatever.")]
    kept, report = filter_artifacts(rows)
    assert kept == [rows[1]]
    assert (report.stage_direction, report.near_duplicate) == (1, 1)


@given(st.text(alphabet="abcXYZ  .,!?'-\n", max_size=40))
def test_near_duplicate_key_ignores_case_punctuation_and_spacing(text: str) -> None:
    key = near_duplicate_key(text)
    assert near_duplicate_key(key) == key
    assert near_duplicate_key("  " + text.upper() + " !! ") == key
    assert "  " not in key and key == key.strip()


# ----------------------------------------------------------------------------- splits and selection


def test_split_separates_scenarios_and_is_deterministic(sample: list[Row]) -> None:
    train, test = split_by_scenario(sample, test_fraction=0.2, seed=3)
    assert not {r.scenario for r in train} & {r.scenario for r in test}
    assert sorted(train + test, key=sample.index) == sample
    assert train == [r for r in sample if r in train]  # order kept
    assert 0 < len({r.scenario for r in test}) < 70
    assert (train, test) == split_by_scenario(sample, test_fraction=0.2, seed=3)
    assert split_by_scenario(sample, test_fraction=0.2, seed=4) != (train, test)


def test_split_of_a_subset_agrees_with_the_full_split(sample: list[Row]) -> None:
    _, test = split_by_scenario(sample, seed=1)
    subset = select(sample, Trait.NEUROTICISM)[::3]
    _, sub_test = split_by_scenario(subset, seed=1)
    assert sub_test == [r for r in subset if r in test]


def test_split_edges(sample: list[Row]) -> None:
    assert split_by_scenario(sample, test_fraction=0.0) == (sample, [])
    assert split_by_scenario(sample, test_fraction=1.0) == ([], sample)
    with pytest.raises(ValueError, match="test_fraction"):
        split_by_scenario(sample, test_fraction=1.5)


def test_select(sample: list[Row]) -> None:
    assert len(select(sample)) == 700
    assert len(select(sample, Trait.AGREEABLENESS)) == 140
    assert len(select(sample, level=Level.LOW)) == 350
    rows = select(sample, Trait.OPENNESS, Level.HIGH)
    assert len(rows) == 70 and {(r.trait, r.level) for r in rows} == {(Trait.OPENNESS, Level.HIGH)}


def test_dataset_hash_is_canonical(sample: list[Row]) -> None:
    assert dataset_hash(sample) == dataset_hash(list(sample))
    assert len(dataset_hash(sample)) == 64
    assert dataset_hash(sample[::-1]) != dataset_hash(sample)
    changed = [*sample[:-1], make_row(sample[-1].speaker_y + " ")]
    assert dataset_hash(changed) != dataset_hash(sample)


# ----------------------------------------------------------------------------- TRL examples


def test_sft_unified_carries_the_paper_instruction(sample: list[Row]) -> None:
    examples = sft_examples(sample, "unified")
    assert len(examples) == 700
    for row, example in zip(sample, examples, strict=True):
        user, assistant = example["messages"]
        instruction = unified_instruction(row.trait, row.level)
        assert instruction.startswith("You are a helpful assistant with the following Big Five personality traits: ")
        assert user == {"role": "user", "content": f"{instruction}\n\n{row.speaker_x.strip()}"}
        assert assistant == {"role": "assistant", "content": row.speaker_y.strip()}


def test_sft_unified_rebuilds_the_instruction_instead_of_copying_the_csv(sample: list[Row]) -> None:
    row = replace(sample[0], instruction="something else entirely")
    (example,) = sft_examples([row], "unified")
    assert example["messages"][0]["content"].startswith(unified_instruction(row.trait, row.level) + "\n\n")


def test_sft_per_trait_has_no_instruction(sample: list[Row]) -> None:
    rows = select(sample, Trait.NEUROTICISM, Level.LOW)
    for row, example in zip(rows, sft_examples(rows, "per-trait"), strict=True):
        assert example["messages"] == [
            {"role": "user", "content": row.speaker_x.strip()},
            {"role": "assistant", "content": row.speaker_y.strip()},
        ]
        assert "Big Five" not in example["messages"][0]["content"]
    with pytest.raises(ValueError, match="one trait-level condition"):
        sft_examples(select(sample, Trait.NEUROTICISM), "per-trait")
    with pytest.raises(ValueError, match="unknown layout"):
        sft_examples(rows, "mixed")  # type: ignore[arg-type]


def test_dpo_pairs_every_reply_with_its_opposite_level(sample: list[Row]) -> None:
    pairs, skipped = dpo_pairs(sample, "unified")
    assert (len(pairs), skipped) == (700, PairReport())
    by_reply = {row.speaker_y.strip(): row for row in sample}
    assert len(by_reply) == 700
    for row, pair in zip(sample, pairs, strict=True):
        (chosen,), (rejected,) = pair["chosen"], pair["rejected"]
        assert chosen == {"role": "assistant", "content": row.speaker_y.strip()}
        partner = by_reply[rejected["content"]]
        assert rejected["role"] == "assistant"
        assert (partner.scenario, partner.trait, partner.level) == (row.scenario, row.trait, row.level.opposite)
        instruction = unified_instruction(row.trait, row.level)
        assert pair["prompt"] == [{"role": "user", "content": f"{instruction}\n\n{row.speaker_x.strip()}"}]


def test_dpo_skips_and_counts_rows_without_a_partner(sample: list[Row]) -> None:
    lonely = sample[5]
    rows = [r for r in sample if r is not lonely]
    pairs, skipped = dpo_pairs(rows, "unified")
    assert (len(pairs), skipped) == (698, PairReport(unpaired=1))
    partner = next(
        r for r in rows if (r.scenario, r.trait, r.level) == (lonely.scenario, lonely.trait, lonely.level.opposite)
    )
    assert all(p["chosen"][0]["content"] != partner.speaker_y.strip() for p in pairs)
    assert all(lonely.speaker_y.strip() not in (p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs)


def test_dpo_per_trait_targets_one_condition_with_partners_from_all_rows(sample: list[Row]) -> None:
    pairs, skipped = dpo_pairs(sample, "per-trait", trait=Trait.OPENNESS, level=Level.LOW)
    assert (len(pairs), skipped) == (70, PairReport())
    targets = select(sample, Trait.OPENNESS, Level.LOW)
    for row, pair in zip(targets, pairs, strict=True):
        assert pair["prompt"] == [{"role": "user", "content": row.speaker_x.strip()}]
        assert pair["chosen"][0]["content"] == row.speaker_y.strip()
    # Given only the target rows, no partner can be found.
    assert dpo_pairs(targets, "per-trait") == ([], PairReport(unpaired=70))
    with pytest.raises(ValueError, match="one trait-level condition"):
        dpo_pairs(sample, "per-trait", trait=Trait.OPENNESS)


def test_dpo_skips_and_counts_a_partner_that_answers_another_speaker_x(sample: list[Row]) -> None:
    target = select(sample, Trait.OPENNESS, Level.HIGH)[0]
    rows = [
        Row(r.scenario, r.trait, r.level, "Something else entirely?", r.speaker_y, r.instruction)
        if (r.scenario, r.trait, r.level) == (target.scenario, target.trait, Level.LOW)
        else r
        for r in sample
    ]
    pairs, skipped = dpo_pairs(rows, "per-trait", trait=Trait.OPENNESS, level=Level.HIGH)
    assert skipped == PairReport(mismatched_speaker_x=1)
    assert len(pairs) == 69
    assert all(p["chosen"][0]["content"] != target.speaker_y.strip() for p in pairs)


# ----------------------------------------------------------------------------- mirrored batches (unified layout)


def _condition_of(example: dict[str, Any]) -> str:
    """The level word at the end of the unified instruction, wherever it was placed."""
    text = " ".join(m["content"] for m in example["prompt"])
    return "high" if " - high" in text else "low"


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_unified_examples_come_in_twin_blocks_in_a_seeded_random_order(sample: list[Row], method: str) -> None:
    """Each pair of examples answers one Speaker X turn at both levels of one trait; the block order is
    random but fixed by the seed, and the per-trait layout keeps its old random order."""
    from big5core.training import TrainSpec
    from trainer.train import prepare

    def train(**kw: Any) -> list[dict[str, Any]]:
        spec = TrainSpec.model_validate({"method": method, "layout": "unified", "max_steps": 1, **kw})
        return prepare(spec, sample, "", None).train

    examples = train()
    assert len(examples) % 2 == 0 and "mirror" not in examples[0]
    for first, second in zip(examples[::2], examples[1::2], strict=True):
        speaker_x = first["prompt"][-1]["content"].split("\n\n")[-1]
        assert second["prompt"][-1]["content"].endswith(speaker_x)
        assert {_condition_of(first), _condition_of(second)} == {"high", "low"}
        if method == "dpo":
            assert first["chosen"] == second["rejected"] and first["rejected"] == second["chosen"]
    traits = [next(t for t in TRAITS if t.title in e["prompt"][-1]["content"]) for e in examples[::2]]
    assert len(set(traits[:10])) > 1, "blocks are shuffled across traits, not one trait after another"
    assert train() == examples
    assert train(seed=1) != examples
    assert train(mirror_batches=False) != examples
    assert sorted(map(str, train(mirror_batches=False))) == sorted(map(str, examples))


def test_mirror_blocks_keeps_every_item_and_groups_by_key() -> None:
    from trainer.dataset import mirror_blocks

    items = [("a", 1), ("b", 1), ("a", 2), ("c", 1), ("b", 2)]
    out = mirror_blocks(items, lambda i: i[0], seed=3)
    assert sorted(out) == sorted(items)
    keys = [k for k, _ in out]
    assert all(keys.index(k) + keys.count(k) - 1 == len(keys) - 1 - keys[::-1].index(k) for k in set(keys))
    assert [n for k, n in out if k == "a"] == [1, 2]
    assert mirror_blocks(items, lambda i: i[0], seed=3) == out
