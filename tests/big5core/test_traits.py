from __future__ import annotations

import pytest
from pydantic import ValidationError

from big5core.prompts import prompt_inst, training_messages, unified_instruction, with_prefix
from big5core.traits import Level, Trait, TraitVector


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"openness": 0.5}, {Trait.OPENNESS: 0.5}),
        ({"Openness": "high", "N": "low"}, {Trait.OPENNESS: 1.0, Trait.NEUROTICISM: -1.0}),
        ({"extraversion": -1, "agreeableness": 0}, {Trait.EXTRAVERSION: -1.0, Trait.AGREEABLENESS: 0.0}),
        ({"conscientiousness": "LOW"}, {Trait.CONSCIENTIOUSNESS: -1.0}),
        ({}, {}),
    ],
)
def test_trait_vector_accepts(raw: dict[str, object], expected: dict[Trait, float]) -> None:
    assert TraitVector.model_validate(raw).values() == expected


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"opennes": 0.5}, "opennes"),
        ({"openness": 1.5}, "openness"),
        ({"neuroticism": -1.01}, "neuroticism"),
        ({"agreeableness": "medium"}, "agreeableness"),
        ({"extraversion": None}, "extraversion"),
    ],
)
def test_trait_vector_rejects_naming_the_field(raw: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        TraitVector.model_validate(raw)
    locations = {str(part) for error in info.value.errors() for part in error["loc"]}
    assert field in locations, info.value.errors()


def test_quantise_and_single_pole() -> None:
    vector = TraitVector.model_validate({"openness": 0.62, "neuroticism": -0.1, "extraversion": 1})
    assert vector.quantised(0.25) == {Trait.OPENNESS: 0.5, Trait.EXTRAVERSION: 1.0}
    assert vector.single_pole() is None
    assert TraitVector.model_validate({"agreeableness": "low"}).single_pole() == (Trait.AGREEABLENESS, Level.LOW)
    assert TraitVector.model_validate({"agreeableness": 0.5}).single_pole() is None


def test_trait_parse_codes_and_names() -> None:
    assert [Trait.parse(c) for c in "OCEAN"] == list(Trait)
    assert Trait.parse("Neuroticism") is Trait.NEUROTICISM
    with pytest.raises(ValueError, match="unknown trait"):
        Trait.parse("X")


def test_paper_prompt_formats() -> None:
    assert (
        unified_instruction(Trait.OPENNESS, Level.HIGH)
        == "You are a helpful assistant with the following Big Five personality traits: Openness - high"
    )
    assert prompt_inst(Trait.NEUROTICISM, Level.LOW) == "You are a person with low neuroticism."
    messages = training_messages(unified_instruction(Trait.EXTRAVERSION, Level.LOW), "Hi!", "Hello.")
    assert messages[0]["role"] == "user"
    assert messages[0]["content"].startswith("You are a helpful assistant") and messages[0]["content"].endswith("Hi!")
    assert messages[1] == {"role": "assistant", "content": "Hello."}
    original = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    prefixed = with_prefix(original, "P")  # type: ignore[arg-type]
    assert prefixed[1]["content"] == "P\n\nq" and original[1]["content"] == "q"
