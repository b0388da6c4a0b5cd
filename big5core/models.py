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
    scoring_mode: Mapped[str] = mapped_column(String(16), doc="logprob | generate")
    runs: Mapped[int] = mapped_column(Integer)
    options: Mapped[dict[str, Any]] = mapped_column(default=dict, doc="shuffle, seed, variants, sampling")
    state: Mapped[str] = mapped_column(String(16), default=AssessmentState.QUEUED)
    error: Mapped[str | None] = mapped_column(Text)
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    summary: Mapped[dict[str, Any]] = mapped_column(default=dict, doc="alpha, failures, option mass, norms")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

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
    option_probs: Mapped[list[Any] | None] = mapped_column(doc="renormalised probabilities of options 1..k")
    option_mass: Mapped[float | None] = mapped_column(Float, doc="next-token probability on the options")
    expected: Mapped[float | None] = mapped_column(Float)
    argmax: Mapped[int | None] = mapped_column(Integer)
    value: Mapped[float | None] = mapped_column(Float, doc="the answer used for scoring (before reverse keying)")
    parse_error: Mapped[str | None] = mapped_column(Text)

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
    alpha: Mapped[float | None] = mapped_column(Float)
    z: Mapped[float | None] = mapped_column(Float)

    assessment: Mapped[Assessment] = relationship(back_populates="scores")
