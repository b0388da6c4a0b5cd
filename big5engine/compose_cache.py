"""Composed adapter folders on disk and in an engine: the shared cache and the residency bound.

:class:`ComposedCache` keeps the folders that :func:`big5engine.compose.compose_adapters` writes, shared
by the processes that share the folder: each built once (a file lock per name), reused while its
manifest matches, evicted least recently used beyond a budget (a count, and optionally bytes) but never
while a process holds it. A process holds a folder only while a request uses it (:class:`Hold`).
:class:`Residency` bounds how many composed adapters one engine keeps loaded.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import struct
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO

from big5core.errors import Unavailable
from big5engine.compose import CONFIG_FILE, WEIGHTS_FILE, CompositionError, compose_adapters, read_manifest
from big5engine.steering import STEER_FILE, Steer

try:  # POSIX: a file lock makes "built once" hold across processes sharing a cache folder
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

COMPOSED_PREFIX = "composed-"
LOCKS_DIRNAME = ".locks"
RESERVATIONS_DIRNAME = ".reservations"
STALE_STAGING_SECONDS = 600.0
_FILE_SLACK = 16 << 10  # the JSON files of one composed folder, at most
_HEADER_BYTES_PER_TENSOR = 256  # a tensor's entry in the safetensors header, at most


class ComposedStorageFull(Unavailable):
    """The composed adapters' disk budget is spent by folders in use (or the disk itself is full)."""

    code, title, retry_after = "composed-storage-full", "No room for another composed adapter", 30


@dataclass(frozen=True)
class _Wanted:
    """One request of :meth:`ComposedCache.get_or_build`: the folder of ``name`` composing ``parts``."""

    name: str
    folder: Path
    parts: Sequence[tuple[Path, float]]
    part_meta: Sequence[Mapping[str, Any]]
    steer: Steer | None = None

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
        if self.steer is not None and not (self.folder / STEER_FILE).is_file():
            return False
        return bool(manifest.get("parts") == self.expected and manifest.get("steer") == self._steer_meta)

    @property
    def _steer_meta(self) -> dict[str, Any] | None:
        return None if self.steer is None else json.loads(json.dumps(dict(self.steer.meta)))

    def build(self) -> None:
        try:
            compose_adapters(self.parts, self.folder, part_meta=self.part_meta, steer=self.steer)
        except OSError as exc:  # compose_adapters removed its staging folder: nothing half-written is left
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ComposedStorageFull("the disk holding composed adapters is full; retry later") from exc
            raise
        if not self.is_built():  # pragma: no cover - compose_adapters writes what we check
            raise CompositionError(f"composed folder {self.folder} does not record the requested parts")


class ComposedCache:
    """Composed adapter folders under ``root``, each built once, kept under an LRU budget.

    Shared by every process whose ``root`` is the same folder (API replicas on one compose volume):

    - built once: a lock file per name, ``root/.locks/<name>.lock``, taken exclusively (``flock``)
      around the check and the build, so two processes composing one vector at once leave one
      folder: the second finds the first's and uses it;
    - never deleted while in use: a process holds a shared lock on the name's lock file while any of
      its requests uses the folder (each :meth:`get_or_build` counts one use, each :meth:`release`
      ends one; the lock goes with the last). Eviction takes the exclusive lock without waiting and
      skips a name it cannot get, so it never deletes another process's folder. A folder no request
      uses may be evicted even while an engine has it loaded: the engine reads the files again only
      for a request, and that request's :meth:`get_or_build` rebuilds them first (same name, same
      bytes: a composition is deterministic);
    - evicted least recently used beyond ``budget`` folders (recency is the folder's mtime, so the
      order survives restarts), under ``root/.lock``. Folders in use can keep the count above it;
    - with ``max_bytes``, a hard disk budget: before a folder is built its size is reserved (a file
      under ``root/.reservations``, so replicas see each other's builds); idle folders are evicted
      to make room, and when the folders in use leave none, :class:`ComposedStorageFull` is raised
      and nothing is written.

    A folder counts as built when its ``composition.json`` records exactly the requested parts (the
    folder appears atomically, so the manifest implies the weights). Thread-safe (a lock per name).
    Lock files are never deleted (deleting one another process has open would split the lock).
    Without ``fcntl`` (Windows) the cache is safe within one process only.
    """

    def __init__(self, root: Path, budget: int, *, max_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.budget = budget
        self.max_bytes = max_bytes
        self.stats: dict[str, int] = {"composed_hits": 0, "composed_misses": 0}
        self._lock = threading.Lock()  # guards the dicts and counters, never held during I/O
        self._name_locks: dict[str, threading.Lock] = {}
        self._holds: dict[str, BinaryIO] = {}  # name -> its lock file, share-locked by this process
        self._uses: dict[str, int] = {}  # name -> requests of this process using it (> 0 while held)
        self._last_touch_ns = 0

    def get_or_build(
        self,
        name: str,
        parts: Sequence[tuple[Path, float]],
        part_meta: Sequence[Mapping[str, Any]],
        steer: Steer | None = None,
    ) -> Path:
        """The folder ``root/name`` holding the composition of ``parts`` (and ``steer``), built if needed.

        Counts one use: the folder stays held by this process (never evicted) until a matching
        :meth:`release`. Raises :class:`ComposedStorageFull` when the disk budget leaves no room.
        """
        wanted = _Wanted(name, self.root / name, parts, part_meta, steer)
        with self._name_lock(name):
            held = self._holds.get(name)
            if held is not None:  # held by us: no other process can have removed it
                hit = wanted.is_built()
                if not hit:  # damaged on disk: rebuild under an exclusive lock, then share it again
                    _flock(held, exclusive=True)
                    try:
                        with self._reservation(wanted):
                            wanted.build()
                    finally:
                        _flock(held, exclusive=False)
            else:
                hit = self._acquire(wanted)
            with self._lock:
                self._uses[name] = self._uses.get(name, 0) + 1
            self._touch(wanted.folder)
            with self._lock:
                self.stats["composed_hits" if hit else "composed_misses"] += 1
        if not hit:
            self._evict(keep=name)
        return wanted.folder

    def release(self, name: str) -> None:
        """One use of ``name`` by this process ended; after the last one it may be evicted."""
        with self._name_lock(name), self._lock:
            uses = self._uses.get(name, 0) - 1
            if uses > 0:
                self._uses[name] = uses
                return
            self._uses.pop(name, None)
            handle = self._holds.pop(name, None)
        if handle is not None:
            handle.close()  # drops the shared lock

    def held(self) -> list[str]:
        with self._lock:
            return sorted(self._holds)

    def usage(self) -> tuple[int, int]:
        """(composed folders, their bytes) on disk now, every process's together."""
        folders = self._folders()
        return len(folders), sum(size for _, size, _ in folders)

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
                        with self._reservation(wanted):
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
        """The cache-wide lock of eviction, reservations and staging sweeps (building takes only the name's lock)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as handle:
            _flock(handle, exclusive=True)
            yield

    def _sweep_staging(self) -> None:
        """Remove what a crashed composition left (staging folders, reservations): older than any composition takes."""
        cutoff = time.time() - STALE_STAGING_SECONDS
        for pattern in (".compose-*", ".trash-*", f"{RESERVATIONS_DIRNAME}/*"):
            for path in self.root.glob(pattern):
                with contextlib.suppress(FileNotFoundError):
                    if path.stat().st_mtime < cutoff:
                        if path.is_dir():
                            shutil.rmtree(path, ignore_errors=True)
                        else:
                            path.unlink()

    def _folders(self) -> list[tuple[int, int, Path]]:
        """(mtime ns, bytes, path) of every composed folder, least recently used first."""
        entries: list[tuple[int, int, Path]] = []
        for path in self.root.glob(f"{COMPOSED_PREFIX}*"):
            with contextlib.suppress(FileNotFoundError):
                if path.is_dir():
                    entries.append((path.stat().st_mtime_ns, _tree_bytes(path), path))
        return sorted(entries)

    def _reserved(self) -> int:
        total = 0
        for path in (self.root / RESERVATIONS_DIRNAME).glob("*"):
            with contextlib.suppress(OSError, ValueError):
                total += int(path.read_text() or 0)
        return total

    @contextlib.contextmanager
    def _reservation(self, wanted: _Wanted) -> Iterator[None]:
        """Room for ``wanted`` under ``max_bytes`` while it is built: reserved, after evicting idle folders.

        Raises :class:`ComposedStorageFull` (and writes nothing) when the folders in use leave no room.
        """
        if self.max_bytes is None:
            yield
            return
        need = estimate_bytes([path for path, _ in wanted.parts]) + steer_bytes(wanted.steer)
        with self._exclusive():
            self._sweep_staging()
            folders = self._folders()
            used = sum(size for _, size, _ in folders) + self._reserved()
            if used + need > self.max_bytes:
                used -= self._evict_locked(folders, keep=wanted.name, free=used + need - self.max_bytes)
            if used + need > self.max_bytes:
                mib = 1 << 20
                raise ComposedStorageFull(
                    f"composing this trait vector needs about {need / mib:.1f} MiB; composed adapters in use "
                    f"take {used / mib:.1f} MiB of their {self.max_bytes / mib:.1f} MiB budget "
                    "(service.composed_max_bytes); retry when requests using them have finished"
                )
            ticket = self.root / RESERVATIONS_DIRNAME / f"{wanted.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            ticket.parent.mkdir(parents=True, exist_ok=True)
            ticket.write_text(str(need))
        try:
            yield
        finally:
            ticket.unlink(missing_ok=True)

    def _evict(self, keep: str) -> None:
        """Delete the least recently used folders beyond the count budget."""
        with self._exclusive():
            self._sweep_staging()
            folders = self._folders()
            self._evict_locked(folders, keep=keep, count=len(folders) - self.budget)

    def _evict_locked(self, folders: list[tuple[int, int, Path]], *, keep: str, count: int = 0, free: int = 0) -> int:
        """Under the cache-wide lock: delete idle folders, oldest first, until ``count`` are gone and
        ``free`` bytes are freed; returns the bytes freed.

        Never ``keep``, one this process holds, nor one whose name lock another process holds
        (shared: in use; exclusive: being built).
        """
        freed = 0
        for _, size, path in folders:
            if count <= 0 and freed >= free:
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
                count -= 1
                freed += size
                logger.info("Evicted composed adapter %s (budget %d folders, %s bytes)", path.name, self.budget,
                            self.max_bytes)  # fmt: skip
            finally:
                lock.release()
        return freed


def _tree_bytes(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        with contextlib.suppress(FileNotFoundError):
            if path.is_file():
                total += path.stat().st_size
    return total


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}


def estimate_bytes(parts: Sequence[Path]) -> int:
    """An upper bound of the size of the folder composing ``parts`` (LoRA folders), from their headers only.

    Every module of the union gets ``A`` of (sum of ranks) x in and ``B`` of out x (sum of ranks), at
    the widest dtype of the parts (f32 when they mix half types, as torch promotes f16 with bf16).
    """
    shapes: dict[str, tuple[int, int]] = {}  # module -> (in, out)
    rank = 0
    widths: set[str] = set()
    for folder in parts:
        header = _safetensors_header(Path(folder) / WEIGHTS_FILE)
        part_rank = 0
        for key, info in header.items():
            if key == "__metadata__":
                continue
            widths.add(str(info.get("dtype")))
            rows, cols = (list(info.get("shape") or []) + [0, 0])[:2]
            if key.endswith(".lora_A.weight"):
                module = key[: -len(".lora_A.weight")]
                shapes[module] = (int(cols), shapes.get(module, (0, 0))[1])
                part_rank = max(part_rank, int(rows))
            elif key.endswith(".lora_B.weight"):
                module = key[: -len(".lora_B.weight")]
                shapes[module] = (shapes.get(module, (0, 0))[0], int(rows))
        rank += part_rank
    itemsize = max((_DTYPE_BYTES.get(w, 4) for w in widths), default=4)
    if {"F16", "BF16"} <= widths:
        itemsize = max(itemsize, 4)
    weights = sum(rank * (fan_in + fan_out) for fan_in, fan_out in shapes.values()) * itemsize
    return weights + 2 * len(shapes) * _HEADER_BYTES_PER_TENSOR + _FILE_SLACK


def steer_bytes(steer: Steer | None) -> int:
    """An upper bound of what ``steer`` adds to a folder: its rows, and the null LoRA when it has no parts."""
    if steer is None:
        return 0
    model = steer.model
    layers, hidden = int(model["num_hidden_layers"]), int(model["hidden_size"])
    width = int(model["num_attention_heads"]) * int(model["head_dim"])
    return 4 * layers * (hidden + width + hidden) + 2 * layers * _HEADER_BYTES_PER_TENSOR + _FILE_SLACK


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (8-byte little-endian length, then the JSON)."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header: dict[str, Any] = json.loads(handle.read(min(length, 100 << 20)))
    except (OSError, ValueError, struct.error) as exc:
        raise CompositionError(f"{path.parent.name}: unreadable {WEIGHTS_FILE}: {exc}") from exc
    return header


class Hold:
    """One use of a composed folder (one :meth:`ComposedCache.get_or_build`): :meth:`release` ends it, once."""

    __slots__ = ("_cache", "_lock", "name")

    def __init__(self, cache: ComposedCache, name: str) -> None:
        self.name = name
        self._cache: ComposedCache | None = cache
        self._lock = threading.Lock()

    @property
    def released(self) -> bool:
        return self._cache is None

    def release(self) -> None:
        with self._lock:
            cache, self._cache = self._cache, None
        if cache is not None:
            cache.release(self.name)


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
