"""The Big Five traits, their levels, validated trait vectors and the methods that induce a persona.

This module is the one place that names the traits and the methods. Training data, prompts, the
persona resolver and the questionnaire scorer all speak in these terms.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, RootModel, model_validator


class Trait(StrEnum):
    """A Big Five domain, valued by its lower-case name as in the BIG5-CHAT dataset."""

    OPENNESS = "openness"
    CONSCIENTIOUSNESS = "conscientiousness"
    EXTRAVERSION = "extraversion"
    AGREEABLENESS = "agreeableness"
    NEUROTICISM = "neuroticism"

    @property
    def code(self) -> str:
        """One-letter code used by the inventories (O, C, E, A, N)."""
        return self.value[0].upper()

    @property
    def title(self) -> str:  # type: ignore[override]
        """Capitalised name as it appears in the paper's instruction ("Openness")."""
        return self.value.capitalize()

    @classmethod
    def parse(cls, value: str) -> Trait:
        """Accept a name ("openness", "Openness") or a code ("O"); raise ValueError otherwise."""
        text = value.strip()
        if len(text) == 1:
            for trait in cls:
                if trait.code == text.upper():
                    return trait
        try:
            return cls(text.lower())
        except ValueError:
            names = ", ".join(t.value for t in cls)
            raise ValueError(f"unknown trait {value!r}; expected one of {names} or O/C/E/A/N") from None


TRAITS: tuple[Trait, ...] = tuple(Trait)
"""The traits in the conventional OCEAN order."""


class Level(StrEnum):
    HIGH = "high"
    LOW = "low"

    @property
    def opposite(self) -> Level:
        return Level.LOW if self is Level.HIGH else Level.HIGH

    @property
    def sign(self) -> float:
        return 1.0 if self is Level.HIGH else -1.0

    @classmethod
    def of(cls, value: float) -> Level:
        """The pole a nonzero intensity leans to: high for a positive value, low for a negative one."""
        return cls.HIGH if value > 0 else cls.LOW


class Method(StrEnum):
    """How a persona is induced: an adapter (sft, dpo), Prompt-Inst (prompt), Prompt-Demo (demo), activation
    steering (steer) or none (direct)."""

    SFT = "sft"
    DPO = "dpo"
    PROMPT = "prompt"
    DEMO = "demo"
    DIRECT = "direct"
    STEER = "steer"


METHOD_ORDER: tuple[Method, ...] = (Method.DIRECT, Method.PROMPT, Method.DEMO, Method.STEER, Method.SFT, Method.DPO)
"""The order tables, plans and reports list the methods in: the no-persona baseline, the prompting
baselines, then the adapters. (The enum's own order is kept: it is the OpenAPI document's.)"""

ADAPTER_METHODS: tuple[Method, ...] = (Method.SFT, Method.DPO)
"""The methods that apply a trained adapter."""


TraitValue = Annotated[float, Field(ge=-1.0, le=1.0)] | Literal["high", "low"]


def single_pole(values: Mapping[Trait, float]) -> tuple[Trait, Level] | None:
    """(trait, level) when exactly one trait is nonzero and it is at +-1 (the paper's one-pole persona), else None."""
    nonzero = {t: v for t, v in values.items() if v != 0.0}
    if len(nonzero) != 1:
        return None
    ((trait, value),) = nonzero.items()
    if abs(value) != 1.0:
        return None
    return trait, Level.of(value)


class TraitVector(RootModel[dict[Trait, TraitValue]]):
    """A partial assignment of traits to intensities in [-1, 1].

    "high" and "low" are accepted as +1 and -1. A trait that is absent is unspecified (0).
    Unknown traits and out-of-range values are validation errors naming the field.
    """

    model_config = ConfigDict(json_schema_extra={"example": {"openness": 0.8, "neuroticism": "low"}})

    @model_validator(mode="before")
    @classmethod
    def _normalise_keys(cls, data: Any) -> Any:
        if isinstance(data, TraitVector):
            return data.root
        if isinstance(data, Mapping):
            out: dict[Any, Any] = {}
            for key, value in data.items():
                if isinstance(key, str):
                    # left as is when unknown: the dict[Trait, ...] schema reports the field by name
                    with contextlib.suppress(ValueError):
                        key = Trait.parse(key)
                if isinstance(value, str) and value.strip().lower() in ("high", "low"):
                    value = value.strip().lower()
                out[key] = value
            return out
        return data

    def values(self) -> dict[Trait, float]:
        """Numeric intensities, levels mapped to +-1, unspecified traits omitted."""
        out: dict[Trait, float] = {}
        for trait, value in self.root.items():
            if isinstance(value, str):
                out[trait] = Level(value).sign
            else:
                out[trait] = float(value)
        return out

    def nonzero(self) -> dict[Trait, float]:
        return {t: v for t, v in self.values().items() if v != 0.0}

    def quantised(self, step: float = 0.25) -> dict[Trait, float]:
        """Round each intensity to the nearest multiple of ``step`` (zeros dropped)."""
        if step <= 0:
            raise ValueError("step must be positive")
        out: dict[Trait, float] = {}
        for trait, value in self.values().items():
            q = round(round(value / step) * step, 6)
            q = max(-1.0, min(1.0, q))
            if q != 0.0:
                out[trait] = q
        return out

    def single_pole(self) -> tuple[Trait, Level] | None:
        """(trait, level) when exactly one trait is set and it is at +-1, else None (:func:`single_pole`)."""
        return single_pole(self.values())

    def __iter__(self) -> Iterator[Trait]:  # type: ignore[override]
        return iter(self.root)

    def __len__(self) -> int:
        return len(self.root)

    def to_dict(self) -> dict[str, float]:
        """JSON-friendly numeric form in OCEAN order."""
        values = self.values()
        return {t.value: values[t] for t in TRAITS if t in values}
