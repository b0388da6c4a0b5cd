"""The trait:level conditions that training and data-generation specs share (big5core.training)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from big5core.datagen import DatagenSpec
from big5core.training import TrainSpec, normalise_conditions, parse_conditions
from big5core.traits import Level, Trait


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (["openness:high"], ["openness:high"]),
        (["Extraversion:HIGH", "extraversion:high"], ["extraversion:high"]),
        (["O:low", " neuroticism : High "], ["openness:low", "neuroticism:high"]),
    ],
)
def test_conditions_are_canonical_and_unique(given: list[str], expected: list[str]) -> None:
    assert normalise_conditions(given) == expected


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (["openness"], "must be trait:level"),
        (["opennes:high"], r"condition 'opennes:high': unknown trait"),
        (["openness:mid"], r"condition 'openness:mid': level must be high or low"),
        ([], "at least one condition"),
    ],
)
def test_malformed_conditions_are_refused(given: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        normalise_conditions(given)


def test_parsed_conditions() -> None:
    assert parse_conditions(["openness:high", "neuroticism:low"]) == [
        (Trait.OPENNESS, Level.HIGH),
        (Trait.NEUROTICISM, Level.LOW),
    ]


def test_both_specs_validate_conditions_alike() -> None:
    for spec in (TrainSpec, DatagenSpec):
        extra = {"scenarios": "s.csv"} if spec is DatagenSpec else {}
        made = spec.model_validate({**extra, "conditions": ["E:High", "extraversion:high"]})
        assert made.conditions == ["extraversion:high"]
        assert made.parsed_conditions() == [(Trait.EXTRAVERSION, Level.HIGH)]
        with pytest.raises(ValidationError, match="level must be high or low"):
            spec.model_validate({**extra, "conditions": ["openness:mid"]})
