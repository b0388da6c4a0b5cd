"""The adapter registry: what the trainer publishes and the only thing the service reads.

An adapter is staged in a temporary folder beside its final place, checked (PEFT config that vLLM
can load: plain LoRA, no DoRA, no bias, no modules_to_save, rank within the engine's limit),
hashed, fsynced (files, then folder), then moved into place with one ``os.replace`` (whose folders
are fsynced too) and only then registered as ready. A crash at any point, a power cut included,
leaves either nothing or an unregistered staging folder that :func:`sweep_staging` removes; never
a half-written adapter marked ready.

Concurrent publishers of one name (workers on several machines) are serialised by a lock on the
adapter name held from the version choice to the caller's commit (:func:`lock_name`): a
PostgreSQL transaction-level advisory lock, and on SQLite the database's write lock (taken at
once, also held to commit). Under it ``max(version) + 1`` is a version no committed row has, so a
folder found at its path can only be an orphan of a publish that never committed, and replacing it
cannot touch committed files. (Unique folder names alone would not do: the loser's INSERT would
still fail on the unique (name, version) constraint.)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import false, func, select, update
from sqlalchemy.orm import Session

from big5core import fsio
from big5core.errors import Conflict, Invalid, NotFound, NotReady
from big5core.models import Adapter, AdapterState
from big5engine.modelstore import sha256_tree

logger = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
STAGING_PREFIX = ".staging-"
LOADABLE_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class RegistryError(Invalid):
    """An adapter is malformed, unknown or not ready."""

    code, title = "invalid-adapter-reference", "Invalid adapter reference"


class AdapterNotFound(NotFound, RegistryError):
    code, title = "adapter-not-found", "Unknown adapter"


class AdapterNotReady(NotReady, RegistryError):
    code, title = "adapter-not-ready", "Adapter not ready"


class ChecksumMismatch(Conflict, RegistryError):
    code, title = "adapter-checksum-mismatch", "Adapter refused: its files do not match the registry"


MAX_VERSION = 2**31 - 1  # versions are stored as 32-bit integers


@dataclass(frozen=True)
class AdapterRef:
    name: str
    version: int | None

    @classmethod
    def parse(cls, text: str) -> AdapterRef:
        name, sep, version = text.partition("@")
        if not name or (sep and not (version.isascii() and version.isdigit() and int(version) <= MAX_VERSION)):
            raise RegistryError(f"bad adapter reference {text!r}: expected name or name@version")
        return cls(name, int(version) if sep else None)

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


def check_adapter_folder(folder: Path, max_rank: int | None = None) -> dict[str, Any]:
    """Validate a PEFT LoRA folder for vLLM; return its config. Raises RegistryError."""
    for name in ADAPTER_FILES:
        if not (folder / name).is_file():
            raise RegistryError(f"adapter folder {folder.name} lacks {name}")
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise RegistryError(f"adapter is {config.get('peft_type')!r}, not LORA")
    if config.get("use_dora"):
        raise RegistryError("DoRA adapters cannot be served by vLLM")
    if config.get("bias", "none") != "none":
        raise RegistryError("adapters with trained biases cannot be served by vLLM")
    if config.get("modules_to_save"):
        raise RegistryError("adapters with modules_to_save cannot be served by vLLM")
    rank = int(config.get("r", 0))
    if rank < 1:
        raise RegistryError("adapter rank must be positive")
    if max_rank is not None and rank > max_rank:
        raise RegistryError(f"adapter rank {rank} exceeds the engine's max_lora_rank {max_rank}")
    return config


def staging_dir(adapters_dir: Path) -> Path:
    adapters_dir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=adapters_dir))


def sweep_staging(adapters_dir: Path) -> int:
    """Remove staging folders left by crashed writers; returns how many were removed.

    Every staging folder goes, live ones too: call it only while no worker is publishing (workers
    remove their own jobs' dead staging folders themselves).
    """
    if not adapters_dir.is_dir():
        return 0
    removed = 0
    for path in adapters_dir.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    return removed


ADVISORY_NAMESPACE = 0x6235  # "b5": the first key of pg_advisory_xact_lock(int, int), the name's hash the second


def lock_name(session: Session, name: str) -> None:
    """Hold a lock on adapter ``name`` until the session's transaction ends (commit or rollback)."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(ADVISORY_NAMESPACE, func.hashtext(name))))
    elif dialect == "sqlite":
        # an UPDATE (even of no row) takes SQLite's RESERVED lock: one writer at a time until commit;
        # the busy timeout (big5core.db) makes the second publisher wait instead of failing
        session.execute(update(Adapter).where(false()).values(name=Adapter.name))
    else:  # pragma: no cover - only PostgreSQL and SQLite are supported
        raise RegistryError(f"no adapter-name lock for database dialect {dialect!r}")


def next_version(session: Session, name: str) -> int:
    current = session.scalar(select(func.max(Adapter.version)).where(Adapter.name == name))
    return (current or 0) + 1


def publish(
    session: Session,
    staged: Path,
    adapters_dir: Path,
    *,
    name: str,
    base_model: str,
    method: str,
    layout: str,
    traits: dict[str, Any],
    hyperparams: dict[str, Any] | None = None,
    dataset_hash: str | None = None,
    train_loss: float | None = None,
    eval_loss: float | None = None,
    max_rank: int | None = None,
    check: Callable[[Path, int | None], dict[str, Any]] | None = None,
) -> Adapter:
    """Check, hash and move a staged adapter into place, then add its ready row to ``session``.

    ``check`` validates the staged folder and returns a config with its rank ``r`` (by default
    :func:`check_adapter_folder`; a steering vector set passes its own, rank 0).

    Takes the name lock (:func:`lock_name`), which the caller's commit or rollback releases. If the
    transaction rolls back, the moved folder is unreferenced: remove it with :func:`discard` before
    the rollback, or leave it; the next publish of the name reuses that version and replaces it.
    """
    config = (check or check_adapter_folder)(staged, max_rank)
    digest = sha256_tree(staged)
    fsio.fsync_tree(staged)  # the files, then their folder: durable before the rename makes them visible
    lock_name(session, name)
    version = next_version(session, name)
    final = adapters_dir / name / f"v{version}"
    fsio.make_dirs(final.parent)
    if final.exists():  # no committed row has this version (we hold the name lock): an orphan
        logger.warning("Replacing %s, left by a publish that never committed", final)
        trash = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX + "orphan-", dir=adapters_dir))
        os.replace(final, trash / final.name)
        shutil.rmtree(trash, ignore_errors=True)
    fsio.replace(staged, final)  # fsyncs both parents: the move is on disk before the row can commit
    adapter = Adapter(
        name=name,
        version=version,
        base_model=base_model,
        method=method,
        layout=layout,
        traits=traits,
        rank=int(config["r"]),
        hyperparams=hyperparams or {},
        dataset_hash=dataset_hash,
        path=str(final.resolve()),
        sha256=digest,
        state=AdapterState.READY,
        train_loss=train_loss,
        eval_loss=eval_loss,
    )
    session.add(adapter)
    session.flush()
    logger.info("Registered adapter %s (rank %d, sha256 %s)", adapter.ref, adapter.rank, digest[:12])
    return adapter


def discard(adapter: Adapter) -> None:
    """Remove the files of an adapter whose row is about to be rolled back (call under the name lock).

    Only while they are still this adapter's files: if the database connection died, the name lock
    went with it, and another publisher may already have put its own files at this version's path.
    """
    folder = Path(adapter.path)
    if folder.is_dir() and sha256_tree(folder) != adapter.sha256:
        logger.warning("Not removing %s: it holds another publish's files now", folder)
        return
    shutil.rmtree(folder, ignore_errors=True)


def get(session: Session, ref: str | AdapterRef, *, ready: bool = True) -> Adapter:
    """The adapter ``name@version`` (or the newest version of ``name``)."""
    parsed = AdapterRef.parse(ref) if isinstance(ref, str) else ref
    query = select(Adapter).where(Adapter.name == parsed.name)
    if parsed.version is not None:
        query = query.where(Adapter.version == parsed.version)
    else:
        query = query.where(Adapter.state == AdapterState.READY)
    adapter = session.scalars(query.order_by(Adapter.version.desc()).limit(1)).first()
    if adapter is None:
        raise AdapterNotFound(f"unknown adapter {parsed}")
    if ready and adapter.state != AdapterState.READY:
        raise AdapterNotReady(f"adapter {adapter.ref} is {adapter.state}, not ready")
    return adapter


def list_adapters(session: Session, *, state: str | None = None, base_model: str | None = None) -> Sequence[Adapter]:
    query = select(Adapter).order_by(Adapter.name, Adapter.version)
    if state:
        query = query.where(Adapter.state == state)
    if base_model:
        query = query.where(Adapter.base_model == base_model)
    return session.scalars(query).all()


def find(
    session: Session, *, method: str, layout: str, base_model: str, traits: dict[str, Any] | None = None
) -> Adapter | None:
    """The newest ready adapter of a method/layout (and trait assignment) for a base model."""
    query = (
        select(Adapter)
        .where(
            Adapter.method == method,
            Adapter.layout == layout,
            Adapter.base_model == base_model,
            Adapter.state == AdapterState.READY,
        )
        .order_by(Adapter.created_at.desc(), Adapter.id.desc())
    )
    for adapter in session.scalars(query):
        if traits is None or adapter.traits == traits:
            return adapter
    return None


def verify(adapter: Adapter) -> None:
    """Raise ChecksumMismatch unless the folder on disk still hashes to the registered sha256."""
    folder = Path(adapter.path)
    if not folder.is_dir():
        raise ChecksumMismatch(f"adapter {adapter.ref}: folder {folder} is missing")
    digest = sha256_tree(folder)
    if digest != adapter.sha256:
        raise ChecksumMismatch(
            f"adapter {adapter.ref}: files on disk do not match the registered sha256 "
            f"({digest[:12]} != {(adapter.sha256 or '')[:12]}); refusing to serve it"
        )
