"""ORM models: every table of the stack in one ``Base.metadata``.

Runs on PostgreSQL (the deployment database) and SQLite (the embedded default). JSON columns
use JSONB on PostgreSQL. Repository functions never commit: the caller owns the transaction.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

JSONType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSONType, list[Any]: JSONType}


class AdapterState(StrEnum):
    PENDING = "pending"
    READY = "ready"
    ERRORED = "errored"
    RETIRED = "retired"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class AssessmentState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class Adapter(Base):
    """A LoRA adapter in the registry, addressed by ``name@version``."""

    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_adapters_name_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer)
    base_model: Mapped[str] = mapped_column(String(512))
    method: Mapped[str] = mapped_column(String(16), doc="sft | dpo | zero | composed")
    layout: Mapped[str] = mapped_column(String(16), doc="unified | per-trait | composed")
    traits: Mapped[dict[str, Any]] = mapped_column(doc="trait -> level or weight this adapter carries")
    rank: Mapped[int] = mapped_column(Integer)
    hyperparams: Mapped[dict[str, Any]] = mapped_column(default=dict)
    dataset_hash: Mapped[str | None] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(1024))
    sha256: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=AdapterState.PENDING, index=True)
    train_loss: Mapped[float | None] = mapped_column(Float)
    eval_loss: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


class TrainingJob(Base):
    """A queued training run. Workers claim rows with ``FOR UPDATE SKIP LOCKED`` and hold a lease."""

    __tablename__ = "training_jobs"
    __table_args__ = (Index("ix_training_jobs_state_lease", "state", "lease_expires_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED)
    spec: Mapped[dict[str, Any]] = mapped_column(doc="method, layout, dataset, hyper-parameters, adapter name")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    checkpoint_dir: Mapped[str | None] = mapped_column(String(1024))
    error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any]] = mapped_column(default=dict, doc="registered adapter refs")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class InventoryRecord(Base):
    """A questionnaire (built-in or uploaded)."""

    __tablename__ = "inventories"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    title: Mapped[str] = mapped_column(String(256))
    citation: Mapped[str] = mapped_column(Text, default="")
    licence: Mapped[str] = mapped_column(Text, default="")
    instruction: Mapped[str] = mapped_column(Text)
    statement_template: Mapped[str] = mapped_column(Text)
    scale: Mapped[dict[str, Any]] = mapped_column()
    definition: Mapped[dict[str, Any]] = mapped_column(doc="the full validated inventory document")
    builtin: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    items: Mapped[list[InventoryItemRecord]] = relationship(
        back_populates="inventory", cascade="all, delete-orphan", order_by="InventoryItemRecord.position"
    )


class InventoryItemRecord(Base):
    __tablename__ = "inventory_items"
    __table_args__ = (UniqueConstraint("inventory_id", "item_id", name="uq_inventory_items_item"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    inventory_id: Mapped[int] = mapped_column(ForeignKey("inventories.id", ondelete="CASCADE"), index=True)
    item_id: Mapped[str] = mapped_column(String(64))
    position: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    trait: Mapped[str] = mapped_column(String(32))
    facet: Mapped[str | None] = mapped_column(String(16))
    keyed: Mapped[str] = mapped_column(String(1))

    inventory: Mapped[InventoryRecord] = relationship(back_populates="items")


class Assessment(Base):
    """One administration of an inventory to a persona (several runs)."""

    __tablename__ = "assessments"
    __table_args__ = (Index("ix_assessments_state_method", "state", "method"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    persona: Mapped[dict[str, Any]] = mapped_column(doc="method, traits, adapter as requested")
    resolved_persona: Mapped[dict[str, Any]] = mapped_column(default=dict, doc="what generation applied")
    persona_key: Mapped[str] = mapped_column(String(256), index=True, doc="canonical persona string")
    method: Mapped[str] = mapped_column(String(16))
    inventory_id: Mapped[int] = mapped_column(ForeignKey("inventories.id"), index=True)
    scoring_mode: Mapped[str] = mapped_column(String(16), doc="logprob | label | label-norm | generate")
    runs: Mapped[int] = mapped_column(Integer)
    options: Mapped[dict[str, Any]] = mapped_column(default=dict, doc="shuffle, seed, variants, sampling")
    state: Mapped[str] = mapped_column(String(16), default=AssessmentState.QUEUED)
    error: Mapped[str | None] = mapped_column(Text)
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    summary: Mapped[dict[str, Any]] = mapped_column(default=dict, doc="alpha, failures, option mass, norms")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    owner_key: Mapped[str | None] = mapped_column(
        String(64), index=True, doc="id of the API key that created it (a sha256 prefix, never the key); NULL: no key"
    )
    lease_owner: Mapped[str | None] = mapped_column(String(128), doc="the runner working on it (big5core.lease)")
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), doc="on the database's clock")

    inventory: Mapped[InventoryRecord] = relationship()
    responses: Mapped[list[ItemResponse]] = relationship(
        back_populates="assessment", cascade="all, delete-orphan", order_by="(ItemResponse.run, ItemResponse.position)"
    )
    scores: Mapped[list[TraitScore]] = relationship(back_populates="assessment", cascade="all, delete-orphan")


class ItemResponse(Base):
    """One item answered in one run: raw text and/or the option distribution, and the parsed value."""

    __tablename__ = "item_responses"
    __table_args__ = (UniqueConstraint("assessment_id", "run", "item_id", name="uq_item_responses_run_item"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    assessment_id: Mapped[str] = mapped_column(ForeignKey("assessments.id", ondelete="CASCADE"), index=True)
    run: Mapped[int] = mapped_column(Integer)
    position: Mapped[int] = mapped_column(Integer, doc="order in which the item was presented in this run")
    item_id: Mapped[str] = mapped_column(String(64))
    variant: Mapped[int] = mapped_column(Integer, default=0)
    raw_text: Mapped[str | None] = mapped_column(Text)
    option_variant: Mapped[int] = mapped_column(Integer, default=0, server_default="0", doc="answer-format wording")
    option_probs: Mapped[list[Any] | None] = mapped_column(doc="renormalised probabilities of options 1..k")
    option_logprobs: Mapped[list[Any] | None] = mapped_column(
        doc="per option: next-token log-prob (digits) or the label text's summed log-prob (None: -inf)"
    )
    option_probs_norm: Mapped[list[Any] | None] = mapped_column(
        doc="label-text modes: softmax of the per-character log-probs (lm-eval's acc_norm)"
    )
    option_mass: Mapped[float | None] = mapped_column(Float, doc="next-token probability on the options")
    expected: Mapped[float | None] = mapped_column(Float)
    argmax: Mapped[int | None] = mapped_column(Integer)
    value: Mapped[float | None] = mapped_column(Float, doc="the answer used for scoring (before reverse keying)")
    parse_error: Mapped[str | None] = mapped_column(Text)
    judge_scores: Mapped[dict[str, Any] | None] = mapped_column(doc="dialogue: P(high | reply) per trait")
    quality: Mapped[dict[str, Any] | None] = mapped_column(
        doc="dialogue: reply quality (repeated n-gram share, opening, relevance to the turn, base-model perplexity)"
    )

    assessment: Mapped[Assessment] = relationship(back_populates="responses")


class TraitScore(Base):
    __tablename__ = "trait_scores"
    __table_args__ = (UniqueConstraint("assessment_id", "scope", "key", name="uq_trait_scores_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    assessment_id: Mapped[str] = mapped_column(ForeignKey("assessments.id", ondelete="CASCADE"), index=True)
    scope: Mapped[str] = mapped_column(String(8), doc="trait | facet")
    key: Mapped[str] = mapped_column(String(32), doc="trait name or facet code")
    mean: Mapped[float | None] = mapped_column(Float)
    sd: Mapped[float | None] = mapped_column(Float)
    n_runs: Mapped[int] = mapped_column(Integer)
    coverage: Mapped[float | None] = mapped_column(Float, doc="answered (item, run) pairs / all of them")
    n_answered: Mapped[int | None] = mapped_column(Integer)
    n_asked: Mapped[int | None] = mapped_column(Integer)
    z: Mapped[float | None] = mapped_column(Float)

    assessment: Mapped[Assessment] = relationship(back_populates="scores")


# ---------------------------------------------------------------- reasoning (issue 14)
# A reasoning run evaluates personas on lm-evaluation-harness tasks. Each (persona, task) unit is
# stored whole, with every item, in ONE transaction (a ReasoningResult and its ReasoningItems); a run
# is done only when every unit is stored. Written by evaluator/reasoning/store.py.


class ReasoningState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class ReasoningRun(Base):
    """Personas x tasks on lm-evaluation-harness, with a per-task item limit."""

    __tablename__ = "reasoning_runs"
    __table_args__ = (Index("ix_reasoning_runs_state", "state"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    state: Mapped[str] = mapped_column(String(16), default=ReasoningState.QUEUED)
    personas: Mapped[list[Any]] = mapped_column(doc="canonical persona keys, in request order")
    tasks: Mapped[list[Any]] = mapped_column(doc="task names, in request order")
    item_limit: Mapped[int | None] = mapped_column(Integer, doc="items per task (None: the whole split)")
    options: Mapped[dict[str, Any]] = mapped_column(default=dict, doc="chat template, source, generation limits")
    lm_eval_version: Mapped[str] = mapped_column(String(32))
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    lease_owner: Mapped[str | None] = mapped_column(String(128), doc="the runner working on it (big5core.lease)")
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), doc="on the database's clock")

    results: Mapped[list[ReasoningResult]] = relationship(
        back_populates="run", cascade="all, delete-orphan", order_by="ReasoningResult.id"
    )


class ReasoningResult(Base):
    """One persona on one task: lm-eval's metrics, the resolved persona and the exact task config."""

    __tablename__ = "reasoning_results"
    __table_args__ = (UniqueConstraint("run_id", "task", "persona_key", name="uq_reasoning_results_unit"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("reasoning_runs.id", ondelete="CASCADE"), index=True)
    task: Mapped[str] = mapped_column(String(64), doc="task name (piqa, arc_easy, ...)")
    lm_task: Mapped[str] = mapped_column(String(128), doc="the lm-eval task that ran (big5_piqa or the stock name)")
    persona_key: Mapped[str] = mapped_column(String(256), index=True)
    method: Mapped[str] = mapped_column(String(16))
    resolved_persona: Mapped[dict[str, Any]] = mapped_column(doc="what generation applied (PersonaResolver)")
    lm_eval_version: Mapped[str] = mapped_column(String(32))
    task_config_hash: Mapped[str] = mapped_column(String(64), doc="sha256 of the task config (data by content)")
    task_config: Mapped[dict[str, Any]] = mapped_column(doc="the task config lm-eval ran, as it dumps it")
    metrics: Mapped[dict[str, Any]] = mapped_column(doc="lm-eval's aggregate metrics for this unit")
    n_items: Mapped[int] = mapped_column(Integer)
    seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    run: Mapped[ReasoningRun] = relationship(back_populates="results")
    items: Mapped[list[ReasoningItem]] = relationship(
        back_populates="result", cascade="all, delete-orphan", order_by="ReasoningItem.doc_index"
    )


class ReasoningItem(Base):
    """One item of one unit: per-choice log-likelihoods or the generated text, and whether it was right."""

    __tablename__ = "reasoning_items"
    __table_args__ = (UniqueConstraint("result_id", "doc_index", name="uq_reasoning_items_doc"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("reasoning_results.id", ondelete="CASCADE"), index=True)
    doc_index: Mapped[int] = mapped_column(Integer, doc="position in the task's split")
    item_id: Mapped[str] = mapped_column(String(128), doc="the dataset's id (or the position)")
    target: Mapped[str] = mapped_column(Text, doc="the gold answer as lm-eval states it")
    loglikelihoods: Mapped[list[Any] | None] = mapped_column(doc="per choice, multiple-choice tasks")
    greedy: Mapped[list[Any] | None] = mapped_column(doc="per choice: every token the argmax")
    generated: Mapped[str | None] = mapped_column(Text, doc="generated text, generation tasks")
    score: Mapped[float] = mapped_column(Float, doc="the task's primary metric for this item")
    correct: Mapped[bool] = mapped_column()
    metrics: Mapped[dict[str, Any]] = mapped_column(doc="every per-item metric lm-eval computed")

    result: Mapped[ReasoningResult] = relationship(back_populates="items")
