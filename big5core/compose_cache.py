"""Composed adapter folders on disk and in an engine: the shared cache and the residency bound.

:class:`ComposedCache` keeps the folders that :func:`big5core.compose.compose_adapters` writes, shared
by the processes that share the folder: each built once (a file lock per name), reused while its
manifest matches, evicted least recently used beyond a budget but never while a process holds it.
:class:`Residency` bounds how many composed adapters one engine keeps loaded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO

from big5core.compose import CONFIG_FILE, WEIGHTS_FILE, CompositionError, compose_adapters, read_manifest

try:  # POSIX: a file lock makes "built once" hold across processes sharing a cache folder
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

COMPOSED_PREFIX = "composed-"
LOCKS_DIRNAME = ".locks"
STALE_STAGING_SECONDS = 600.0


@dataclass(frozen=True)
class _Wanted:
    """One request of :meth:`ComposedCache.get_or_build`: the folder of ``name`` composing ``parts``."""

    name: str
    folder: Path
    parts: Sequence[tuple[Path, float]]
    part_meta: Sequence[Mapping[str, Any]]

    @cached_property
    def expected(self) -> list[dict[str, Any]]:
        """The ``parts`` of the manifest that a folder composing exactly these parts records."""
        return [
            {**dict(meta), "path": str(path), "weight": float(weight)}
            for (path, weight), meta in zip(self.parts, self.part_meta, strict=True)
        ]

    def is_built(self) -> bool:
        """The folder holds this composition (it appears atomically, so the manifest implies the weights)."""
        manifest = read_manifest(self.folder)
        if manifest is None or not (self.folder / CONFIG_FILE).is_file() or not (self.folder / WEIGHTS_FILE).is_file():
            return False
        return bool(manifest.get("parts") == self.expected)

    def build(self) -> None:
        compose_adapters(self.parts, self.folder, part_meta=self.part_meta)
        if not self.is_built():  # pragma: no cover - compose_adapters writes what we check
            raise CompositionError(f"composed folder {self.folder} does not record the requested parts")


class ComposedCache:
    """Composed adapter folders under ``root``, each built once, kept under an LRU budget.

    Shared by every process whose ``root`` is the same folder (API replicas on one compose volume):

    - built once: a lock file per name, ``root/.locks/<name>.lock``, taken exclusively (``flock``)
      around the check and the build, so two processes composing one vector at once leave one
      folder: the second finds the first's and uses it;
    - never deleted while in use: a process holds a shared lock on the name's lock file while it
      uses the folder (from :meth:`get_or_build` until :meth:`release`, e.g. while the adapter is
      loaded in its engine, which may read the files again). Eviction takes the exclusive lock
      without waiting and skips a name it cannot get, so it never deletes another process's folder;
    - evicted least recently used beyond ``budget`` (recency is the folder's mtime, so the order
      survives restarts), under ``root/.lock``. Held folders can keep the cache above its budget.

    A folder counts as built when its ``composition.json`` records exactly the requested parts (the
    folder appears atomically, so the manifest implies the weights). Thread-safe (a lock per name).
    Lock files are never deleted (deleting one another process has open would split the lock).
    Without ``fcntl`` (Windows) the cache is safe within one process only.
    """

    def __init__(self, root: Path, budget: int) -> None:
        self.root = Path(root)
        self.budget = budget
        self.stats: dict[str, int] = {"composed_hits": 0, "composed_misses": 0}
        self._lock = threading.Lock()  # guards the dicts and counters, never held during I/O
        self._name_locks: dict[str, threading.Lock] = {}
        self._holds: dict[str, BinaryIO] = {}  # name -> its lock file, share-locked by this process
        self._last_touch_ns = 0

    def get_or_build(
        self, name: str, parts: Sequence[tuple[Path, float]], part_meta: Sequence[Mapping[str, Any]]
    ) -> Path:
        """The folder ``root/name`` holding the composition of ``parts``, built if needed.

        The folder stays held by this process (never evicted) until :meth:`release`.
        """
        wanted = _Wanted(name, self.root / name, parts, part_meta)
        with self._name_lock(name):
            held = self._holds.get(name)
            if held is not None:  # held by us: no other process can have removed it
                hit = wanted.is_built()
                if not hit:  # damaged on disk: rebuild under an exclusive lock, then share it again
                    _flock(held, exclusive=True)
                    try:
                        wanted.build()
                    finally:
                        _flock(held, exclusive=False)
            else:
                hit = self._acquire(wanted)
            self._touch(wanted.folder)
            with self._lock:
                self.stats["composed_hits" if hit else "composed_misses"] += 1
        if not hit:
            self._evict(keep=name)
        return wanted.folder

    def release(self, name: str) -> None:
        """This process no longer uses ``name`` (e.g. unloaded it from its engine): it may be evicted."""
        with self._name_lock(name):
            handle = self._holds.pop(name, None)
        if handle is not None:
            handle.close()  # drops the shared lock

    def held(self) -> list[str]:
        with self._lock:
            return sorted(self._holds)

    def _acquire(self, wanted: _Wanted) -> bool:
        """Build ``wanted`` unless built, then hold it shared; True on a hit (nothing built here)."""
        hit = True
        while True:
            handle = self._open_lock(wanted.name)
            try:
                # A hit needs only the shared lock (so another holder of it, even in this process, never
                # blocks it); building takes the exclusive one (flock converts by release and re-take).
                _flock(handle, exclusive=False)
                if not wanted.is_built():
                    _flock(handle, exclusive=True)
                    if not wanted.is_built():
                        hit = False
                        wanted.build()
                    _flock(handle, exclusive=False)  # not atomic: an evictor may slip in, checked below
                if wanted.is_built():
                    with self._lock:
                        self._holds[wanted.name] = handle
                    return hit
            except BaseException:
                handle.close()
                raise
            handle.close()  # evicted in between: start again

    def _name_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._name_locks.setdefault(name, threading.Lock())

    def _open_lock(self, name: str) -> BinaryIO:
        locks = self.root / LOCKS_DIRNAME
        locks.mkdir(parents=True, exist_ok=True)
        return open(locks / f"{name}.lock", "a+b")  # noqa: SIM115 - held beyond this call

    def _touch(self, folder: Path) -> None:
        """Mark as most recently used (strictly increasing mtimes within this process)."""
        with self._lock:
            stamp = self._last_touch_ns = max(time.time_ns(), self._last_touch_ns + 1)
        with contextlib.suppress(FileNotFoundError):
            os.utime(folder, ns=(stamp, stamp))

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """The cache-wide lock of eviction and staging sweeps (building takes only the name's lock)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as handle:
            _flock(handle, exclusive=True)
            yield

    def _sweep_staging(self) -> None:
        """Remove folders left by a crashed composition: older than any composition takes."""
        cutoff = time.time() - STALE_STAGING_SECONDS
        for pattern in (".compose-*", ".trash-*"):
            for path in self.root.glob(pattern):
                with contextlib.suppress(FileNotFoundError):
                    if path.stat().st_mtime < cutoff:
                        shutil.rmtree(path, ignore_errors=True)

    def _evict(self, keep: str) -> None:
        """Delete the least recently used folders beyond the budget.

        Never ``keep``, one this process holds, nor one whose name lock another process holds
        (shared: in use; exclusive: being built).
        """
        with self._exclusive():
            self._sweep_staging()
            entries: list[tuple[int, Path]] = []
            for path in self.root.glob(f"{COMPOSED_PREFIX}*"):
                with contextlib.suppress(FileNotFoundError):
                    if path.is_dir():
                        entries.append((path.stat().st_mtime_ns, path))
            excess = len(entries) - self.budget
            for _, path in sorted(entries):
                if excess <= 0:
                    break
                if path.name == keep or path.name in self._holds:
                    continue
                lock = self._name_lock(path.name)
                if not lock.acquire(blocking=False):  # another thread resolves it right now
                    continue
                try:
                    with self._open_lock(path.name) as handle:
                        if not _flock(handle, exclusive=True, wait=False):
                            continue  # in use by another process
                        shutil.rmtree(path, ignore_errors=True)
                    excess -= 1
                    logger.info("Evicted composed adapter %s (LRU budget %d)", path.name, self.budget)
                finally:
                    lock.release()


def _flock(handle: BinaryIO, *, exclusive: bool, wait: bool = True) -> bool:
    """Lock (or convert the lock of) an open file; False when ``wait`` is off and it is taken."""
    if fcntl is None:  # pragma: no cover - Windows: in-process locks only
        return True
    flags = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB)
    try:
        fcntl.flock(handle, flags)
    except BlockingIOError:
        return False
    return True


class Residency:
    """Which composed adapters one engine keeps loaded: at most ``capacity``, least recently used out.

    Any trait vector composes its own adapter, so without a bound a long-running server would keep
    every vector ever asked for registered (and its folder held on disk). :meth:`acquire` marks a
    name used by one more request and returns the names to unload now: the least recently used
    beyond ``capacity`` that no request is using (unloading one in use would only make the engine
    read it back from disk). Choose ``capacity`` of at least the engine's ``max_loras``, so a full
    batch of distinct composed adapters never unloads its own members. Not thread-safe: use it from
    one event loop.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._in_use: OrderedDict[str, int] = OrderedDict()  # name -> requests using it; oldest first

    def acquire(self, name: str) -> list[str]:
        self._in_use[name] = self._in_use.get(name, 0) + 1
        self._in_use.move_to_end(name)
        victims: list[str] = []
        excess = len(self._in_use) - self.capacity
        for other, count in list(self._in_use.items()):
            if excess <= 0:
                break
            if count == 0 and other != name:
                del self._in_use[other]
                victims.append(other)
                excess -= 1
        return victims

    def release(self, name: str) -> None:
        if self._in_use.get(name, 0) > 0:
            self._in_use[name] -= 1

    def __contains__(self, name: object) -> bool:
        return name in self._in_use

    def __len__(self) -> int:
        return len(self._in_use)
