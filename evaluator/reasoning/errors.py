"""Domain errors of the reasoning evaluation: categories of :mod:`big5core.errors` (service/errors.py maps them)."""

from __future__ import annotations

from big5core.errors import Conflict, NotFound


class UnknownTask(NotFound):
    """A task name that is not one of the reasoning tasks."""

    code, title = "reasoning-task-not-found", "Unknown reasoning task"


class TaskDataMissing(Conflict):
    """A known task whose data file is neither bundled nor in the configured data folder."""

    code, title = "reasoning-data-missing", "The task's data is not available here"


class ReasoningRunNotFound(NotFound):
    """No reasoning run has this id."""

    code, title = "reasoning-run-not-found", "Unknown reasoning run"


class ReasoningRunNotResumable(Conflict):
    """The run is done, or still running under a live process."""

    code, title = "reasoning-run-not-resumable", "The reasoning run cannot be resumed"
