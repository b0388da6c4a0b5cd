"""Training checkpoints that count only once written to the end.

The Trainer writes a checkpoint's files one after another (weights, optimizer, scheduler, RNG
state, ``trainer_state.json``); a worker killed or cut off in between leaves a folder that looks
like a checkpoint but cannot be resumed from. So after the Trainer has saved one, every file and
folder of it is fsynced and then a marker, :data:`MARKER`, is written last (atomically, itself
fsynced). A checkpoint without the marker is incomplete, whatever else it holds; resuming picks
the newest complete one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from big5core import fsio

logger = logging.getLogger(__name__)

MARKER = "complete.json"  # not "checkpoint-*": code that globs for checkpoints must not find it
PREFIX = "checkpoint-"


def mark_complete(checkpoint: Path, step: int) -> None:
    """Make ``checkpoint``'s files durable, then write its marker (last)."""
    fsio.fsync_tree(checkpoint)
    fsio.write_atomically(checkpoint / MARKER, json.dumps({"step": step}).encode())


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / MARKER).is_file()


def complete_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the complete checkpoints in ``folder``, oldest first."""
    found: list[tuple[int, Path]] = []
    if folder.is_dir():
        for path in folder.glob(f"{PREFIX}*"):
            step = path.name[len(PREFIX) :]
            if step.isdigit() and is_complete(path):
                found.append((int(step), path))
            elif step.isdigit():
                logger.info("Skipping %s: incomplete (no %s)", path, MARKER)
    return sorted(found)


def newest_complete(folder: Path) -> Path | None:
    found = complete_checkpoints(folder)
    return found[-1][1] if found else None


def marker_callback() -> Any:
    """A TrainerCallback that marks each checkpoint complete right after the Trainer saved it.

    ``on_save`` runs after the whole checkpoint is written (and older ones rotated out); only the
    main process writes the marker, as only it writes the checkpoint's shared files.
    """
    from transformers import TrainerCallback

    class _MarkComplete(TrainerCallback):  # type: ignore[misc]
        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if not state.is_world_process_zero:
                return
            checkpoint = Path(args.output_dir) / f"{PREFIX}{state.global_step}"
            if checkpoint.is_dir():
                mark_complete(checkpoint, int(state.global_step))

    return _MarkComplete()


ATTEMPT_PREFIX = "attempt-"
"""Each attempt of a job writes its checkpoints to ``checkpoints/<job>/attempt-<n>/<adapter>``."""


def resume_point(job_checkpoints: Path, adapter: str, attempt: int) -> Path | None:
    """The newest complete checkpoint of ``adapter`` written by an attempt before ``attempt``.

    Complete: its marker was written (:mod:`trainer.checkpoints`); a newer checkpoint cut short is
    skipped for the one before it. The most recent attempt that got as far as a complete checkpoint
    wins (the step counts of earlier attempts can only be lower or equal, since each resumed from
    its predecessor).
    """
    for number in range(attempt - 1, 0, -1):
        newest = newest_complete(job_checkpoints / f"{ATTEMPT_PREFIX}{number}" / adapter)
        if newest is not None:
            return newest
    return None
