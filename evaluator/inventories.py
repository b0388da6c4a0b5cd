"""Questionnaire inventories (BFI-44, IPIP-NEO-120/300), their prompts and human norms.

Everything here is pure data handling: the item files and ``norms.json`` ship in ``evaluator/data``
(see its README for citations, licences and provenance) and are read through ``importlib.resources``.
Validation errors name the offending row, so a broken custom inventory is easy to fix.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import re
import string
from collections.abc import Sequence
from importlib import resources
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from big5core.errors import Invalid
from big5core.prompts import BFI_ANCHORS, INSTRUCTION_VARIANTS, IPIP_ANCHORS
from big5core.traits import TRAITS, Trait

CSV_COLUMNS: tuple[str, ...] = ("id", "text", "trait", "facet", "keyed")
TEMPLATE_FIELDS: frozenset[str] = frozenset({"statement", "statement_lower"})
POOLED = "pooled"
"""Default norm group: equal-weight pool of a source's demographic groups."""
DIALOGUE_INVENTORY = "big5chat-dialogue"
"""The dialogue assessment (:mod:`evaluator.dialogue`): replies to Speaker X turns scored by the trait judge."""

_FACET_CODE = re.compile(r"^([OCEAN])\d+$")


class InventoryError(Invalid):
    """An inventory, its item file or a norms lookup is invalid."""

    code, title = "invalid-inventory", "Invalid inventory"


class InventoryItem(BaseModel):
    """One statement of a questionnaire and how it is keyed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, description="Item id, unique within the inventory (the CSV's position 1..n).")
    text: str = Field(min_length=1, description="Item stem exactly as printed in the source.")
    trait: Trait = Field(description="Big Five domain the item measures; accepts 'O' or 'openness'.")
    facet: str | None = Field(default=None, description="Facet code such as 'N1', or None.")
    keyed: Literal["+", "-"] = Field(description="'+' if agreeing means more of the trait, '-' if reverse-keyed.")

    @field_validator("id", "text", mode="before")
    @classmethod
    def _strip(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        return value.strip() if isinstance(value, str) else value

    @field_validator("trait", mode="before")
    @classmethod
    def _parse_trait(cls, value: Any) -> Any:
        if isinstance(value, str) and not isinstance(value, Trait):
            try:
                return Trait.parse(value)
            except ValueError:
                raise ValueError(f"unknown trait {value!r}; expected O/C/E/A/N or a trait name") from None
        return value

    @field_validator("facet", mode="before")
    @classmethod
    def _empty_facet(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value.strip() or None
        return value

    @field_validator("keyed", mode="before")
    @classmethod
    def _check_keyed(cls, value: Any) -> Any:
        text = value.strip() if isinstance(value, str) else value
        if text not in ("+", "-"):
            raise ValueError(f"bad keyed value {value!r}; expected '+' or '-' (reverse-keyed)")
        return text

    @model_validator(mode="after")
    def _facet_matches_trait(self) -> InventoryItem:
        match = _FACET_CODE.match(self.facet or "")
        if match and match.group(1) != self.trait.code:
            raise ValueError(f"facet {self.facet!r} does not belong to trait {self.trait.code}")
        return self

    @property
    def reverse_keyed(self) -> bool:
        return self.keyed == "-"


class LikertScale(BaseModel):
    """A numbered answer scale; the answer options are the strings "1" .. str(points)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    points: int = Field(default=5, ge=2, le=11, description="Number of answer options.")
    anchors: list[str] = Field(description="Label of each option, lowest first; one per point.")

    @model_validator(mode="after")
    def _anchors_match_points(self) -> LikertScale:
        if len(self.anchors) != self.points:
            raise ValueError(f"anchors: {len(self.anchors)} labels for a {self.points}-point scale")
        return self

    @property
    def options(self) -> tuple[str, ...]:
        """The option tokens a model may answer with, "1" .. str(points)."""
        return tuple(str(i) for i in range(1, self.points + 1))


class Inventory(BaseModel):
    """A questionnaire: its items, answer scale, instruction and where its norms live."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{1,63}$", description="Slug such as 'ipip_neo_120'.")
    title: str = Field(min_length=1, description="Human-readable title.")
    citation: str = Field("", description="Reference for the instrument.")
    licence: str = Field("", description="Terms of use of the item wording.")
    instruction: str = Field(min_length=1, description="Likert instruction shown before each statement.")
    instruction_variants: list[str] = Field(
        default_factory=list,
        description="Alternative phrasings of the instruction for reliability runs (variants 1..n).",
    )
    statement_template: str = Field(
        description="How a statement is shown; placeholders {statement} and/or {statement_lower}."
    )
    scale: LikertScale = Field(description="Answer scale.")
    items: list[InventoryItem] = Field(description="Items in administration order; ids unique.")
    norms_key: str | None = Field(default=None, description="Key of this inventory's human norms in norms.json.")

    @model_validator(mode="before")
    @classmethod
    def _validate_items(cls, data: Any) -> Any:
        """Validate items one by one so that errors read "items[7] (id 8): unknown trait 'X'"."""
        if not isinstance(data, dict) or not isinstance(data.get("items"), list):
            return data
        raw_items: list[Any] = data["items"]
        if not raw_items:
            raise ValueError("items: empty item list")
        problems: list[str] = []
        parsed: list[InventoryItem] = []
        first_index: dict[str, int] = {}
        for index, raw in enumerate(raw_items):
            label = f"items[{index}]"
            if isinstance(raw, dict) and raw.get("id") not in (None, ""):
                label += f" (id {raw['id']})"
            try:
                item = raw if isinstance(raw, InventoryItem) else InventoryItem.model_validate(raw)
            except ValidationError as exc:
                problems.extend(f"{label}: {message}" for message in _messages(exc))
                continue
            if item.id in first_index:
                problems.append(f"items[{index}]: duplicate id {item.id!r} (first at items[{first_index[item.id]}])")
            first_index.setdefault(item.id, index)
            parsed.append(item)
        if problems:
            raise ValueError("; ".join(problems))
        return {**data, "items": parsed}

    @field_validator("statement_template")
    @classmethod
    def _check_template(cls, value: str) -> str:
        try:
            names = {field for _, field, _, _ in string.Formatter().parse(value) if field is not None}
        except ValueError as exc:
            raise ValueError(f"malformed template: {exc}") from None
        unknown = names - TEMPLATE_FIELDS
        if unknown:
            raise ValueError(f"unknown placeholder(s) {sorted(unknown)}; allowed: {sorted(TEMPLATE_FIELDS)}")
        if not names:
            raise ValueError("template must contain {statement} or {statement_lower}")
        return value

    @property
    def n_variants(self) -> int:
        """Number of instruction phrasings available (the main one plus its variants)."""
        return 1 + len(self.instruction_variants)

    def instruction_for(self, variant: int = 0) -> str:
        """Variant 0 is ``instruction``; variant k >= 1 is ``instruction_variants[k - 1]``."""
        if not 0 <= variant < self.n_variants:
            raise InventoryError(f"{self.name}: instruction variant {variant} out of range 0..{self.n_variants - 1}")
        return self.instruction if variant == 0 else self.instruction_variants[variant - 1]

    def render_statement(self, item: InventoryItem) -> str:
        text = item.text
        return self.statement_template.format(statement=text, statement_lower=text[:1].lower() + text[1:])

    def render_item(self, item: InventoryItem, variant: int = 0) -> str:
        """The full user message for one item: instruction, a blank line, then the statement."""
        return f"{self.instruction_for(variant)}\n\n{self.render_statement(item)}"

    def items_for(self, trait: Trait) -> list[InventoryItem]:
        return [item for item in self.items if item.trait is trait]

    @property
    def facets(self) -> tuple[str, ...]:
        """Facet codes in order of first appearance."""
        return tuple(dict.fromkeys(item.facet for item in self.items if item.facet is not None))


def _messages(exc: ValidationError) -> list[str]:
    out = []
    for error in exc.errors():
        message = str(error["msg"]).removeprefix("Value error, ")
        field = ".".join(str(part) for part in error["loc"])
        # Our own validators (type value_error) already name the field in their message.
        out.append(message if error["type"] == "value_error" or not field else f"{field}: {message}")
    return out


def load_csv_items(text: str) -> list[InventoryItem]:
    """Parse the ``id,text,trait,facet,keyed`` CSV format; errors name the data row and its id."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        raise InventoryError("empty CSV: no header line")
    header = [column.strip() for column in header]
    if tuple(header) != CSV_COLUMNS:
        raise InventoryError(f"CSV header is {','.join(header)!r}; expected {','.join(CSV_COLUMNS)!r}")
    items: list[InventoryItem] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    row_number = 0
    for fields in reader:
        if not fields or all(not field.strip() for field in fields):
            continue  # blank line
        row_number += 1
        label = f"row {row_number} (line {reader.line_num}"
        label += f", id {fields[0].strip()})" if fields[0].strip() else ")"
        if len(fields) != len(CSV_COLUMNS):
            problems.append(f"{label}: {len(fields)} fields, expected {len(CSV_COLUMNS)}")
            continue
        try:
            item = InventoryItem.model_validate(dict(zip(CSV_COLUMNS, fields, strict=True)))
        except ValidationError as exc:
            problems.extend(f"{label}: {message}" for message in _messages(exc))
            continue
        if item.id in seen:
            problems.append(f"{label}: duplicate id {item.id!r} (first in row {seen[item.id]})")
        seen.setdefault(item.id, row_number)
        items.append(item)
    if problems:
        raise InventoryError("; ".join(problems))
    if not items:
        raise InventoryError("CSV has a header but no items")
    return items


# --- built-in instruments ----------------------------------------------------------------------

_IPIP_LICENCE = "Public domain (International Personality Item Pool); no permission needed."
_BUILTIN_SPECS: dict[str, dict[str, Any]] = {
    "bfi44": {
        "title": "Big Five Inventory (BFI-44)",
        "citation": "John, O. P., Donahue, E. M., & Kentle, R. L. (1991). The Big Five Inventory: Versions 4a "
        "and 54. Berkeley: University of California, Berkeley, Institute of Personality and Social Research. "
        "John, O. P., & Srivastava, S. (1999). In L. A. Pervin & O. P. John (Eds.), Handbook of personality "
        "(2nd ed., pp. 102-138). Guilford.",
        "licence": "Copyright O. P. John; free for non-commercial research only. Not public domain.",
        "family": "bfi",
        "anchors": list(BFI_ANCHORS),
        "statement_template": "Statement: I see myself as someone who {statement_lower}.",
        "norms_key": "bfi44_psychobench_crowd",
    },
    "ipip_neo_120": {
        "title": "IPIP-NEO-120",
        "citation": "Johnson, J. A. (2014). Measuring thirty facets of the Five Factor Model with a 120-item "
        "public domain inventory: Development of the IPIP-NEO-120. Journal of Research in Personality, 51, "
        "78-89. doi:10.1016/j.jrp.2014.05.003",
        "licence": _IPIP_LICENCE,
        "family": "ipip",
        "anchors": list(IPIP_ANCHORS),
        "statement_template": "Statement: {statement}",
        "norms_key": "ipip_neo_120",
    },
    "ipip_neo_300": {
        "title": "IPIP-NEO (300 items)",
        "citation": "Goldberg, L. R. (1999). A broad-bandwidth, public domain, personality inventory measuring "
        "the lower-level facets of several five-factor models. In I. Mervielde et al. (Eds.), Personality "
        "Psychology in Europe (Vol. 7, pp. 7-28). Tilburg University Press.",
        "licence": _IPIP_LICENCE,
        "family": "ipip",
        "anchors": list(IPIP_ANCHORS),
        "statement_template": "Statement: {statement}",
        "norms_key": "ipip_neo_300",
    },
}


def _data_text(filename: str) -> str:
    return resources.files("evaluator").joinpath("data", filename).read_text(encoding="utf-8")


@functools.cache
def _builtins() -> dict[str, Inventory]:
    out: dict[str, Inventory] = {}
    for name, spec in _BUILTIN_SPECS.items():
        first, *variants = INSTRUCTION_VARIANTS[spec["family"]]
        out[name] = Inventory(
            name=name,
            title=spec["title"],
            citation=spec["citation"],
            licence=spec["licence"],
            instruction=first,
            instruction_variants=variants,
            statement_template=spec["statement_template"],
            scale=LikertScale(points=5, anchors=spec["anchors"]),
            items=load_csv_items(_data_text(f"{name}.csv")),
            norms_key=spec["norms_key"],
        )
    return out


def builtin_inventories() -> dict[str, Inventory]:
    """The bundled instruments by name: "bfi44", "ipip_neo_120", "ipip_neo_300"."""
    return dict(_builtins())


def get_builtin(name: str) -> Inventory:
    try:
        return _builtins()[name]
    except KeyError:
        raise InventoryError(f"unknown inventory {name!r}; built-ins: {', '.join(_builtins())}") from None


# --- human norms --------------------------------------------------------------------------------


class NormStat(BaseModel):
    """Human mean and SD of an item-mean score (1-5 metric)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mean: float = Field(description="Mean of the item-mean score.")
    sd: float = Field(gt=0, description="Standard deviation of the item-mean score.")
    n: int | None = Field(default=None, description="Sample size, None where the source does not state it.")


class TraitNorms(BaseModel):
    """Reference figures for one inventory and one demographic group."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source_key: str = Field(description="Key of the source in norms.json.")
    group: str = Field(description="'pooled', 'all' (single-table sources) or a group key like 'female:21-40'.")
    citation: str
    provenance_verified: bool = Field(description="False where the human sample behind the numbers is unknown.")
    traits: dict[Trait, NormStat]
    facets: dict[str, NormStat] = Field(default_factory=dict)


@functools.cache
def _norms_json() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(_data_text("norms.json"))
    return data


def _group_key(group: dict[str, Any]) -> str:
    return f"{group['sex'].lower()}:{group['age_condition']}"


def norm_groups(inventory_name: str) -> tuple[str, ...]:
    """Group keys accepted by ``norms_for`` for this inventory (empty if it has no norms)."""
    source = _norm_source(inventory_name)
    if source is None:
        return ()
    if "groups" not in source[1]:
        return ("all",)
    return (POOLED, *(_group_key(g) for g in source[1]["groups"]))


def _norm_source(inventory_name: str) -> tuple[str, dict[str, Any]] | None:
    key = _BUILTIN_SPECS[inventory_name]["norms_key"] if inventory_name in _BUILTIN_SPECS else inventory_name
    data = _norms_json()
    if key in ("intertrait_correlations",) or key.startswith("_") or key not in data:
        return None
    return key, data[key]


def _pool(stats: Sequence[dict[str, Any]]) -> NormStat:
    """Equal-weight mixture: mean of means; SD from mean within-group variance plus between-group spread."""
    means = [float(s["mean_item"]) for s in stats]
    pooled_mean = sum(means) / len(means)
    within = sum(float(s["sd_item"]) ** 2 for s in stats) / len(stats)
    between = sum((m - pooled_mean) ** 2 for m in means) / len(means)
    return NormStat(mean=pooled_mean, sd=(within + between) ** 0.5)


def norms_for(inventory_name: str, group: str | None = None) -> TraitNorms | None:
    """Human norms for a built-in inventory (or a norms.json key); None where none exist.

    IPIP sources list demographic groups without their Ns; the default (``group=None`` or "pooled")
    pools them with equal weight, see ``_pool``. BFI-44 has one table, flagged unverified.
    """
    source = _norm_source(inventory_name)
    if source is None:
        return None
    key, entry = source
    verified = bool(entry.get("provenance_verified", True))
    if "groups" not in entry:
        if group not in (None, "all", POOLED):
            raise InventoryError(f"{key}: norms have a single table; unknown group {group!r}")
        traits = {t: NormStat(**entry["traits"][t.code]) for t in TRAITS if t.code in entry["traits"]}
        return TraitNorms(
            source_key=key, group="all", citation=entry["citation"], provenance_verified=verified, traits=traits
        )
    groups: list[dict[str, Any]] = entry["groups"]
    if group in (None, POOLED):
        chosen, label = groups, POOLED
    else:
        chosen = [g for g in groups if _group_key(g) == group]
        if not chosen:
            raise InventoryError(f"{key}: unknown norm group {group!r}; choose from {', '.join(norm_groups(key))}")
        label = group
    codes = groups[0]["domains"]
    traits = {t: _pool([g["domains"][t.code] for g in chosen]) for t in TRAITS if t.code in codes}
    facets = {code: _pool([g["facets"][code] for g in chosen]) for code in groups[0]["facets"]}
    return TraitNorms(
        source_key=key,
        group=label,
        citation=entry["citation"],
        provenance_verified=verified,
        traits=traits,
        facets=facets,
    )


def human_correlation_matrix(kind: Literal["r", "rho"] = "r") -> tuple[tuple[Trait, ...], list[list[float]]]:
    """Davies et al. (2015) meta-analytic trait intercorrelations, N-coded, in OCEAN order.

    ``kind="r"`` is the mean observed correlation (the comparison the paper makes); "rho" is
    corrected for unreliability.
    """
    source = _norms_json()["intertrait_correlations"]["davies_2015_meta_analysis"]
    order = [Trait.parse(code) for code in source["order"]]
    index = [order.index(trait) for trait in TRAITS]
    matrix = source[kind]
    return TRAITS, [[float(matrix[i][j]) for j in index] for i in index]
