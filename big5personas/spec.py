"""What a client asks for: a method and a trait vector, and its canonical string form.

The canonical string form, also accepted as the OpenAI ``model`` field, reads
``big5/sft?openness=0.75&neuroticism=-1`` (traits quantised, OCEAN order, ``&adapter=name@3`` when
explicit). :mod:`big5personas.resolver` turns a :class:`PersonaSpec` into what generation applies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from urllib.parse import quote, unquote

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from big5core.errors import Invalid
from big5core.traits import TRAITS, Method, Trait, TraitVector
from big5personas.registry import AdapterRef, RegistryError

KEY_PREFIX = "big5/"


class PersonaError(Invalid):
    """The persona is well-formed but makes no sense (e.g. demo with a mixed vector)."""

    code, title = "invalid-persona", "Invalid persona"


def fmt_value(value: float) -> str:
    return f"{value:g}"


STEER_PARAM = "steer."
"""Query prefix of steering added to another method: ``big5/dpo?extraversion=1&steer.extraversion=0.5``."""
STEER_STEP = 0.05
"""Steering intensities are continuous; they are rounded to this step (one served folder per value)."""


def persona_key(
    method: Method | str,
    traits: Mapping[Trait, float],
    adapter: str | None = None,
    steer: Mapping[Trait, float] | None = None,
) -> str:
    """Canonical string of a (quantised) persona: ``big5/sft?openness=0.75&neuroticism=-1``."""
    params = [f"{t.value}={fmt_value(traits[t])}" for t in TRAITS if traits.get(t)]
    if adapter:
        params.append(f"adapter={quote(adapter, safe='@-_.:')}")
    params += [f"{STEER_PARAM}{t.value}={fmt_value(steer[t])}" for t in TRAITS if steer and steer.get(t)]
    return f"{KEY_PREFIX}{Method(method).value}" + ("?" + "&".join(params) if params else "")


class PersonaSpec(BaseModel):
    """What a client asks for: a method and a trait vector, or an explicit registry adapter."""

    model_config = ConfigDict(extra="forbid")

    method: Method = Field(
        Method.SFT,
        description="sft/dpo: trained adapters; prompt: Prompt-Inst; demo: Prompt-Demo; direct: no persona.",
    )
    traits: TraitVector | None = Field(
        None, description="Trait intensities in [-1, 1] (or high/low); quantised by the server."
    )
    adapter: str | None = Field(
        None,
        description="Explicit registry adapter, name or name@version (sft/dpo; for steer: the vector set).",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*(@[0-9]+)?$",
        max_length=160,
    )
    steer: TraitVector | None = Field(
        None,
        description="Activation steering added to this persona (e.g. a DPO adapter plus a steering vector for "
        "intensity): trait intensities in [-1, 1], rounded to 0.05. Method steer takes its vector from traits.",
    )

    def quantised(self, step: float = 0.25) -> dict[Trait, float]:
        if self.method is Method.STEER:
            return self.traits.quantised(STEER_STEP) if self.traits is not None else {}
        return self.traits.quantised(step) if self.traits is not None else {}

    def quantised_steer(self) -> dict[Trait, float]:
        return self.steer.quantised(STEER_STEP) if self.steer is not None else {}

    def to_key(self, step: float = 0.25) -> str:
        """Canonical readable key (traits quantised to ``step``, OCEAN order)."""
        return persona_key(self.method, self.quantised(step), self.adapter, self.quantised_steer())

    @classmethod
    def from_model_name(cls, text: str) -> PersonaSpec:
        """Parse ``big5/<method>[?trait=value&...][&adapter=name@version]`` (values numbers or high/low)."""
        raw = text.strip()
        if not raw.lower().startswith(KEY_PREFIX):
            raise PersonaError(
                f"persona model names look like 'big5/<method>?openness=0.5&neuroticism=low'; got {text!r}"
            )
        method_text, _, query = raw[len(KEY_PREFIX) :].partition("?")
        try:
            method = Method(method_text.strip().lower())
        except ValueError:
            names = ", ".join(m.value for m in Method)
            raise PersonaError(f"unknown persona method {method_text!r} in {text!r}; expected one of {names}") from None
        traits: dict[Trait, float | str] = {}
        steer: dict[Trait, float | str] = {}
        adapter: str | None = None
        for item in filter(None, query.split("&")):
            name, sep, value = (unquote(s).strip() for s in item.partition("="))
            if not sep or not value:
                raise PersonaError(f"{item!r} in {text!r} needs a value: name=value")
            into = traits
            if name.lower().startswith(STEER_PARAM):
                name, into = name[len(STEER_PARAM) :], steer
            if name.lower() == "adapter":
                if adapter is not None:
                    raise PersonaError(f"adapter given twice in {text!r}")
                try:
                    adapter = str(AdapterRef.parse(value))
                except RegistryError as exc:
                    raise PersonaError(str(exc)) from None
                continue
            try:
                trait = Trait.parse(name)
            except ValueError as exc:
                raise PersonaError(f"{exc} (in {text!r})") from None
            if trait in into:
                raise PersonaError(f"{trait.value} given twice in {text!r}")
            if value.lower() in ("high", "low"):
                into[trait] = value.lower()
                continue
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if not math.isfinite(number) or not -1.0 <= number <= 1.0:
                raise PersonaError(f"{trait.value}={value!r} in {text!r}: expected a number in [-1, 1], high or low")
            into[trait] = number
        try:
            return cls(
                method=method,
                traits=TraitVector.model_validate(traits) if traits else None,
                adapter=adapter,
                steer=TraitVector.model_validate(steer) if steer else None,
            )
        except ValidationError as exc:
            raise PersonaError(f"invalid persona {text!r}: {exc.errors()[0]['msg']}") from None
