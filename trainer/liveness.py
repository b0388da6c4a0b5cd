"""The worker's own heartbeat: a small file it rewrites while it is alive, for a container healthcheck.

A worker serves no port, so a supervisor cannot ask it over HTTP how it is. Started with
``big5 worker --liveness-file PATH``, it rewrites PATH whenever it shows it is working: on every
turn of its polling loop while idle, and on every lease renewal that succeeds while it runs a job
(the job's heartbeat). ``big5 worker --check-health --liveness-file PATH`` reads the file and exits
non-zero once it is older than the lease (``BIG5_TRAINER__LEASE_SECONDS``): a worker that has not
renewed a lease for that long has lost its job to another worker anyway, and one whose loop stopped
turning (hung, or cut off from the database) does not poll for new jobs.

The file is per process and should live on storage of its own (``/tmp`` in a container), never on a
volume other workers share.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


class Liveness:
    """Rewrites ``path`` (atomically: a temporary file renamed over it) with the time and what the worker does."""

    def __init__(self, path: Path, owner: str) -> None:
        self.path = path
        self.owner = owner
        self._lock = threading.Lock()  # the polling loop and the heartbeat thread both write
        self._failed = False

    def touch(self, job: str | None = None) -> None:
        """Record that the worker is alive now (idle, or renewing the lease of ``job``). Never raises."""
        record = {"owner": self.owner, "pid": os.getpid(), "at": time.time(), "job": job}
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with self._lock:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                temporary.write_text(json.dumps(record))
                os.replace(temporary, self.path)
                self._failed = False
            except OSError:  # a full or read-only disk must not stop training; the healthcheck will say so
                if not self._failed:
                    logger.warning("cannot write the worker's liveness file %s", self.path, exc_info=True)
                self._failed = True


@dataclass(frozen=True)
class Health:
    healthy: bool
    message: str


def check(path: Path, max_age_s: float, *, now: float | None = None) -> Health:
    """Whether the worker writing ``path`` was alive within ``max_age_s`` seconds."""
    try:
        record = json.loads(path.read_text())
        at = float(record["at"])
    except FileNotFoundError:
        return Health(False, f"unhealthy: no liveness file {path} (is `big5 worker --liveness-file {path}` running?)")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return Health(False, f"unhealthy: liveness file {path} unreadable ({exc})")
    age = (time.time() if now is None else now) - at
    doing = f"job {record['job']}" if record.get("job") else "idle"
    who = f"worker {record.get('owner')} ({doing})"
    if age > max_age_s:
        return Health(False, f"unhealthy: {who} last alive {age:.0f} s ago (allowed {max_age_s:g} s)")
    return Health(True, f"healthy: {who} alive {max(age, 0.0):.0f} s ago")
