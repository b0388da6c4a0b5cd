"""A training job's lease, held by the worker that runs it: the heartbeat that renews it, and what ends it.

The lease is the job row's (``big5core.jobs``, on the database's clock). :class:`LeaseHeartbeat` renews it
from a thread while the worker trains and records the latest progress; it notices a lost lease or a cancel,
and gives the lease up on its own clock once no renewal has succeeded in time (see the worker's module
docstring, ``trainer.worker``). :class:`LeaseLost` and :class:`JobCancelled` are how the worker learns it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from big5core import jobs
from big5core.db import transaction
from big5core.errors import Conflict, Invalid
from big5core.heartbeat import beat_every
from big5core.lease import renewed_in_time
from big5core.settings import Settings

logger = logging.getLogger(__name__)


class LeaseLost(Conflict, RuntimeError):
    """Another worker holds the job now (this worker's lease expired)."""

    code, title = "lease-lost", "The job's lease was lost"


class JobCancelled(Conflict, RuntimeError):
    """The job was cancelled while this worker ran it."""

    code, title = "training-job-cancelled", "The training job was cancelled"


class LeaseSettingsInvalid(Invalid):
    """The heartbeat would not renew the lease before it expires."""

    code, title = "lease-settings-invalid", "The heartbeat interval must be shorter than the lease"


def check_lease_settings(settings: Settings) -> None:
    """Refuse a heartbeat interval at or above the lease: every lease would expire between renewals."""
    lease, interval = settings.trainer.lease_seconds, settings.trainer.heartbeat_seconds
    if not renewed_in_time(interval, lease):
        raise LeaseSettingsInvalid(
            f"BIG5_TRAINER__HEARTBEAT_SECONDS ({interval}) must be below BIG5_TRAINER__LEASE_SECONDS ({lease}): "
            "the lease would expire before it is renewed and another worker would take the job over mid-training "
            "(a third of the lease or less is a good heartbeat)"
        )


class LeaseHeartbeat(threading.Thread):
    """Renews the job's lease and writes the latest progress while training runs.

    It also keeps the worker's own view of the lease: ``leased_at`` is when (on this machine's
    monotonic clock) the last successful renewal was sent, and the database cannot let the lease
    expire before ``leased_at + lease``. Once ``(lease + interval) / 2`` has passed without a
    successful renewal, :meth:`stop_reason` says stop, whether or not the thread itself is stuck in
    a database call: half of the slack the heartbeat leaves is kept for the current step to end.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        job_id: str,
        owner: str,
        settings: Settings,
        leased_at: float | None = None,
    ) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{job_id[:8]}")
        self.sessions = sessions
        self.job_id = job_id
        self.owner = owner
        self.lease = settings.trainer.lease_seconds
        self.interval = settings.trainer.heartbeat_seconds
        self.unrenewed_limit = (self.lease + self.interval) / 2
        self.leased_at = time.monotonic() if leased_at is None else leased_at
        self.progress: dict[str, Any] = {}
        self.ended: jobs.LeaseState | None = None  # LOST or CANCELLED, once a renewal failed
        self.expired = False  # no renewal succeeded in time: this worker gave the lease up on its own
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self.on_renewed: Callable[[], None] | None = None  # the worker's liveness file (trainer.liveness)

    def _unrenewed(self) -> bool:
        if not self.expired and time.monotonic() - self.leased_at > self.unrenewed_limit:
            self.expired = True
            self._stop_event.set()  # renew no more: training stops and another worker may take over
            logger.warning(
                "Job %s: the lease was not renewed for %.0f s (it expires after %d s); stopping before another "
                "worker takes the job over (step %s)",
                self.job_id, time.monotonic() - self.leased_at, self.lease, self.snapshot().get("step"),
            )  # fmt: skip
        return self.expired

    @property
    def lost(self) -> bool:
        return self.ended is not None or self._unrenewed()

    def stop_reason(self) -> str | None:
        """Why training must stop now (read by the trainer callback after every step), or None."""
        if self.ended is jobs.LeaseState.CANCELLED:
            return f"job {self.job_id} was cancelled"
        if self.ended is not None:
            return f"the lease on job {self.job_id} was lost"
        if self._unrenewed():
            return f"the lease on job {self.job_id} could not be renewed for {self.unrenewed_limit:g} s"
        return None

    def check(self) -> None:
        """Raise JobCancelled or LeaseLost if a renewal found the job gone, or none succeeded in time."""
        if self.ended is jobs.LeaseState.CANCELLED:
            raise JobCancelled(self.job_id)
        if self.ended is not None or self._unrenewed():
            raise LeaseLost(self.stop_reason() or self.job_id)

    def update(self, info: dict[str, Any]) -> None:
        with self._lock:
            self.progress = {**self.progress, **info}

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self.progress)

    def beat(self) -> None:
        if self._unrenewed():
            return
        with self._lock:
            progress = dict(self.progress)
        sent = time.monotonic()  # before the UPDATE: the database's expiry is later than sent + lease
        try:
            with transaction(self.sessions) as session:
                if jobs.heartbeat(session, self.job_id, self.owner, self.lease, progress):
                    self.leased_at = sent
                    if self.on_renewed is not None:
                        self.on_renewed()
                else:
                    state = jobs.lease_state(session, self.job_id, self.owner)
                    if state is not jobs.LeaseState.HELD and self.ended is None:
                        self.ended = state
                        logger.warning(
                            "Job %s: %s (noticed at step %s)", self.job_id, self.stop_reason(), progress.get("step")
                        )
        except Exception:  # a database blip must not kill training; the lease covers it
            logger.warning("heartbeat for job %s failed", self.job_id, exc_info=True)

    def run(self) -> None:
        beat_every(self._stop_event, self.interval, self._beat_while_held, f"job {self.job_id}")

    def _beat_while_held(self) -> bool:
        self.beat()
        return self.ended is None and not self.expired

    def stop(self) -> None:
        self._stop_event.set()
