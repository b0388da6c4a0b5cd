"""API models of the evaluator (requests and responses of /v1/assess and friends)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from big5core.persona import PersonaSpec
from evaluator.inventories import InventoryItem, LikertScale


class AssessRequest(BaseModel):
    """Administer an inventory to a persona, one item per fresh conversation."""

    model_config = ConfigDict(extra="forbid")

    persona: PersonaSpec = Field(description="The persona, resolved exactly as /v1/generate resolves it.")
    inventory: str = Field("ipip_neo_120", description="bfi44, ipip_neo_120, ipip_neo_300 or an uploaded name.")
    scoring: Literal["logprob", "generate"] = Field(
        "logprob",
        description="logprob: probability of each option in one forward pass (no sampling); "
        "generate: the paper's protocol (sample, parse strictly, record failures).",
    )
    runs: int = Field(5, ge=1, le=50, description="Administrations of the whole inventory.")
    shuffle: bool = Field(False, description="Shuffle the item order per run (recorded per response).")
    vary_instruction: bool = Field(
        True, description="Cycle through the inventory's instruction variants across runs (run r uses r mod n)."
    )
    seed: int = Field(0, description="Seed for shuffling and sampling.")
    temperature: float = Field(0.6, ge=0, le=2, description="generate mode only (paper: 0.6).")
    max_tokens: int = Field(128, ge=1, le=1024, description="generate mode only (paper: 128).")


class AssessAccepted(BaseModel):
    id: str
    state: str
    links: dict[str, str]


class TraitScoreOut(BaseModel):
    mean: float | None
    sd: float | None
    n_runs: int
    alpha: float | None = None
    z: float | None = None


class AssessmentOut(BaseModel):
    id: str
    state: str
    persona: dict[str, Any]
    resolved_persona: dict[str, Any]
    method: str
    inventory: str
    scoring: str
    runs: int
    options: dict[str, Any]
    progress: dict[str, Any]
    error: str | None
    traits: dict[str, TraitScoreOut] = Field(default_factory=dict)
    facets: dict[str, TraitScoreOut] = Field(default_factory=dict)
    summary: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime
    finished_at: datetime | None


class ItemResponseOut(BaseModel):
    run: int
    position: int
    item_id: str
    variant: int
    raw_text: str | None
    option_probs: list[float] | None
    option_mass: float | None
    expected: float | None
    argmax: int | None
    value: float | None
    parse_error: str | None


class InventoryUpload(BaseModel):
    """A custom inventory: items (id, text, trait, facet, keyed), a Likert scale, instruction, template."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{1,63}$")
    title: str = Field(min_length=1)
    citation: str = ""
    licence: str = ""
    instruction: str = Field(min_length=1, description="Shown before each statement; should name the scale.")
    statement_template: str = Field("Statement: {statement}", description="Must contain {statement}.")
    scale: LikertScale
    items: list[InventoryItem] | None = Field(None, description="Items as objects...")
    items_csv: str | None = Field(None, description="...or as CSV text with header id,text,trait,facet,keyed.")


class InventoryOut(BaseModel):
    name: str
    title: str
    citation: str
    licence: str
    builtin: bool
    n_items: int
    scale: dict[str, Any]


class CompareRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inventory: str = "ipip_neo_120"
    methods: list[str] | None = Field(None, description="Restrict to these methods (default: all found).")
    format: Literal["json", "svg", "png"] = "json"
