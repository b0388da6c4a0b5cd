"""Training specifications: one pydantic model, stored as JSON in the job row.

``big5 train`` reads it from a YAML file and flags with one parser (``trainer/cli.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from big5core.traits import Level, Method, Trait

Layout = Literal["unified", "per-trait"]
"""How adapters are trained: one adapter for all ten conditions, told apart by the paper's instruction
(unified), or one adapter per trait-level without an instruction (per-trait)."""
UNIFIED: Final = "unified"
PER_TRAIT: Final = "per-trait"
LAYOUTS: tuple[Layout, ...] = get_args(Layout)

ALL_CONDITIONS: tuple[str, ...] = tuple(f"{t.value}:{lv.value}" for t in Trait for lv in Level)


def normalise_conditions(value: list[str]) -> list[str]:
    """``trait:level`` conditions in canonical form (``openness:high``), first occurrence kept.

    A trait may be written as :meth:`Trait.parse` takes it, a level in any case. Raises ValueError
    (a pydantic validator's error) for a malformed condition or an empty list.
    """
    out: list[str] = []
    for item in value:
        trait_text, sep, level_text = item.partition(":")
        if not sep:
            raise ValueError(f"condition {item!r} must be trait:level, e.g. openness:high")
        try:
            trait = Trait.parse(trait_text)
        except ValueError as exc:
            raise ValueError(f"condition {item!r}: {exc}") from None
        try:
            level = Level(level_text.strip().lower())
        except ValueError:
            raise ValueError(f"condition {item!r}: level must be high or low") from None
        key = f"{trait.value}:{level.value}"
        if key not in out:
            out.append(key)
    if not out:
        raise ValueError("at least one condition is needed")
    return out


def parse_conditions(conditions: list[str]) -> list[tuple[Trait, Level]]:
    """Canonical ``trait:level`` conditions (see :func:`normalise_conditions`) as (trait, level) pairs."""
    return [(Trait(trait), Level(level)) for trait, _, level in (c.partition(":") for c in conditions)]


class LoraOptions(BaseModel):
    """LoRA shape. Defaults are the paper's (r=8, alpha=16, dropout 0, all linear projections)."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, ge=1, le=256)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class ConditionsSpec(BaseModel):
    """A spec with a ``conditions`` field (declared by each subclass with its own default and description):
    validated by :func:`normalise_conditions`, read as (trait, level) pairs by :meth:`parsed_conditions`."""

    if TYPE_CHECKING:  # a field of the subclasses, not of this base (which would put it first)
        conditions: list[str]

    @field_validator("conditions", check_fields=False)
    @classmethod
    def _valid_conditions(cls, value: list[str]) -> list[str]:
        return normalise_conditions(value)

    def parsed_conditions(self) -> list[tuple[Trait, Level]]:
        return parse_conditions(self.conditions)


AnswerFormatTarget = Literal["options", "base"]
"""What the answer-format term keeps (trainer/answer_format.py): the option numbers' mass, or the base model's
whole answer distribution."""


class TrainSpec(ConditionsSpec):
    """Everything a training run needs besides the base model. Defaults follow BIG5-CHAT."""

    model_config = ConfigDict(extra="forbid")

    method: Literal[Method.SFT, Method.DPO] = Field(
        Method.SFT, description="sft (SFTTrainer) or dpo (DPOTrainer, rejected = opposite level)"
    )
    layout: Layout = Field(UNIFIED, description="unified: one adapter, 10 conditions by instruction")
    conditions: list[str] = Field(
        default_factory=lambda: list(ALL_CONDITIONS),
        description="trait:level conditions; per-trait trains one adapter each, unified trains on all",
    )
    dataset: str = Field(
        "bundled:big5chat-real", description="CSV/JSONL/parquet path, hub name or bundled:big5chat-real"
    )
    name: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9_.-]{0,100}$", description="adapter name prefix")
    lora: LoraOptions = Field(default_factory=LoraOptions)
    learning_rate: float = Field(1e-5, gt=0)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="> 0 overrides epochs")
    per_device_train_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(1024, ge=32, description="token cutoff of prompt + reply")
    warmup_steps: int = Field(20, ge=0)
    lr_scheduler_type: str = "cosine"
    beta: float = Field(0.1, gt=0, description="DPO beta (sigmoid loss)")
    sft_weight: float = Field(
        0.0,
        ge=0,
        description="DPO: weight of an NLL term on the chosen reply beside the sigmoid loss (TRL's 'sft' loss, as in "
        "RPO/MPO): SFT and the contrastive step in one stage; 0 = plain DPO",
    )
    level_contrast: float = Field(
        0.0,
        ge=0,
        description="SFT, unified layout: weight of a level-contrast term beside the NLL: each reply must be more "
        "likely under its own level's instruction than under the opposite one (trainer/level_contrast.py); "
        "0 = plain SFT",
    )
    answer_format: float = Field(
        0.0,
        ge=0,
        description="weight of the answer-format term beside the loss, on the first answer token of rating "
        "questions whose statements are no inventory's (trainer/answer_format.py), so a persona trained on "
        "dialogue still answers a questionnaire; 0 = none",
    )
    answer_format_target: AnswerFormatTarget = Field(
        "base",
        description="what the answer-format term keeps: 'options' = the probability of answering with one of "
        "the scale's numbers (-log of their mass; which number stays free), 'base' = the base model's whole "
        "distribution (KL from it: the number too)",
    )
    seed: int = 0
    test_fraction: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="share of scenarios held out; >= 0.2 at seed 0 keeps the dialogue assessment's scenarios unseen",
    )
    max_train_rows: int | None = Field(None, ge=1, description="cap on training rows per adapter")
    save_steps: int = Field(50, ge=1, description="checkpoint interval (resume point after a crash)")
    eval: bool = Field(True, description="compute eval loss on the held-out scenarios")
    init_from: str | None = Field(
        None,
        pattern=r"^[a-z0-9][a-z0-9_.-]{0,100}$",
        description="start each adapter from the registry's adapter of this name prefix, same layout and condition "
        "(e.g. 'sft': DPO after SFT, the contrastive step); its LoRA shape then replaces `lora`",
    )
    instruction_placement: Literal["user", "system"] = Field(
        "user",
        description="unified layout: the instruction before Speaker X's words in the user turn (the paper's) or as "
        "the system turn; recorded with the adapter, so serving places it the same way",
    )
    mirror_batches: bool | None = Field(
        None,
        description="train on blocks of twins (one Speaker X turn at a condition and its opposite level) in one "
        "batch, in a seeded random block order; default: yes for the unified layout, whose only signal is the level "
        "word (what makes its DPO condition; plain SFT stays level-blind either way: see level_contrast), "
        "no for per-trait",
    )
    gradient_checkpointing: bool | None = Field(
        None, description="recompute activations in the backward pass; default: on a GPU yes, on a CPU no"
    )

    @model_validator(mode="after")
    def _level_contrast_is_unified_sft(self) -> TrainSpec:
        if self.level_contrast > 0 and (self.method != Method.SFT or self.layout != UNIFIED):
            raise ValueError(
                "level_contrast needs method sft and the unified layout: it contrasts a reply under its level's "
                f"instruction with the opposite one (got method {self.method}, layout {self.layout})"
            )
        return self

    def mirrored_batches(self) -> bool:
        return self.layout == UNIFIED if self.mirror_batches is None else self.mirror_batches

    def adapter_name(self, condition: tuple[Trait, Level] | None) -> str:
        prefix = self.name or self.method
        if self.layout == UNIFIED or condition is None:
            return f"{prefix}-unified"
        trait, level = condition
        return f"{prefix}-{trait.value}-{level.value}"

    def targets(self) -> list[tuple[Trait, Level] | None]:
        """The adapters this spec produces: one (None) for unified, one per condition otherwise."""
        return [None] if self.layout == UNIFIED else list(self.parsed_conditions())


STEER_KIND: Final = "steer-vectors"


class SteerSpec(BaseModel):
    """A steering-vector extraction job (``big5 steer extract``): it shares the training queue."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["steer-vectors"] = STEER_KIND
    dataset: str = Field("bundled:big5chat-real", description="BIG5-CHAT source; its held-out scenarios are left out")
    name: str = Field("steer-vectors", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=128)
    rows_per_arm: int | None = Field(64, ge=2, description="rows per trait-level at most (None: all)")
    depth: int | None = Field(None, ge=1, description="decoder layers that get a vector (None: two thirds)")
