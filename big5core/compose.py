"""Exact LoRA composition on the adapter files alone: no base model is loaded, so it scales to 8B.

The result equals PEFT's ``add_weighted_adapter(..., combination_type="cat")`` (peft 0.21.2,
``peft/tuners/lora/model.py``). For every target module PEFT builds

    A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]   (rows, i.e. along the rank)
    B = [B_1, B_2, ...]                   (columns)

with ``s_i = lora_alpha_i / r_i``, rank ``r = sum r_i`` and ``lora_alpha = r`` (scaling 1), so that
``B @ A = sum_i w_i s_i B_i A_i``: the weighted sum of the parts' deltas, exactly. In ``cat`` mode
PEFT puts the whole weight, sign included, on ``A``; the ``sqrt(|w s|)`` split with the sign on
``A`` belongs to the ``linear``/``ties`` modes, which are not exact. We do the same as ``cat``.

Target modules: the union. A module that only some parts adapt gets the rows of those parts, packed
first, and zero rows up to the full rank -- what PEFT's ``cat`` does too (it skips an adapter that
lacks the module and leaves the rest of the zero-initialised tensor). The delta of a missing part is
zero, so the sum stays exact.

Refused with :class:`CompositionError`: rsLoRA (PEFT's ``cat`` copies ``use_rslora`` from the first
adapter, which makes the result inexact), DoRA, trained biases, ``modules_to_save``,
``rank_pattern``/``alpha_pattern``, embedding LoRA, and parts whose shapes for one module disagree
(adapters trained on different base models).

:class:`ComposedCache` keeps composed folders on disk, shared by the processes that share the folder:
each built once (a file lock per name), reused while its manifest matches, evicted least recently
used beyond a budget but never while a process holds it. :class:`Residency` bounds how many
composed adapters one engine keeps loaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from big5core.errors import Conflict

if TYPE_CHECKING:  # torch is imported when composing, so importing big5core.persona stays light
    import torch

try:  # POSIX: a file lock makes "built once" hold across processes sharing a cache folder
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MANIFEST_FILE = "composition.json"
MANIFEST_FORMAT = 1
_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"


class CompositionError(Conflict, ValueError):
    """The parts cannot be composed exactly."""

    code, title = "composition-failed", "The adapters cannot be composed exactly"


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise CompositionError(f"{folder} is not a PEFT LoRA folder ({CONFIG_FILE} + {WEIGHTS_FILE})")
    config: dict[str, Any] = json.loads(path.read_text())
    if config.get("peft_type") != "LORA":
        raise CompositionError(f"{folder}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_rslora"):
        raise CompositionError(f"{folder}: rsLoRA adapters cannot be composed exactly; train without use_rslora")
    if config.get("use_dora"):
        raise CompositionError(f"{folder}: DoRA adapters cannot be composed")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise CompositionError(f"{folder}: adapters with trained biases cannot be composed")
    if config.get("modules_to_save"):
        raise CompositionError(f"{folder}: adapters with modules_to_save cannot be composed")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise CompositionError(f"{folder}: rank_pattern/alpha_pattern are not supported")
    if config.get("target_parameters"):
        raise CompositionError(f"{folder}: LoRA on nn.Parameter (target_parameters) is not supported")
    if int(config.get("r") or 0) < 1:
        raise CompositionError(f"{folder}: rank r must be positive")
    return config


def _scaling(config: Mapping[str, Any]) -> float:
    r = int(config["r"])
    alpha = float(config.get("lora_alpha", r))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _split(tensors: Mapping[str, torch.Tensor], folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``module -> (A, B)`` from a PEFT state dict; anything else is an error."""
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in tensors:
        if key.endswith(_A_SUFFIX):
            module = key[: -len(_A_SUFFIX)]
            b_key = module + _B_SUFFIX
            if b_key not in tensors:
                raise CompositionError(f"{folder}: {key} has no matching lora_B")
            modules[module] = (tensors[key], tensors[b_key])
        elif not key.endswith(_B_SUFFIX):
            raise CompositionError(f"{folder}: unsupported tensor {key} (only lora_A/lora_B of linear layers)")
        elif key[: -len(_B_SUFFIX)] + _A_SUFFIX not in tensors:
            raise CompositionError(f"{folder}: {key} has no matching lora_A")
    return modules


def _union_targets(configs: Sequence[Mapping[str, Any]]) -> list[str] | str:
    targets = [c.get("target_modules") for c in configs]
    if all(isinstance(t, str) for t in targets):
        unique = list(dict.fromkeys(t for t in targets if isinstance(t, str)))
        return unique[0] if len(unique) == 1 else "|".join(f"({t})" for t in unique)
    if all(isinstance(t, list | tuple | set) for t in targets):
        return sorted({str(m) for t in targets for m in t})  # type: ignore[union-attr]
    raise CompositionError("parts mix regex and list target_modules; PEFT cannot combine those either")


def compose_adapters(
    parts: Sequence[tuple[Path, float]],
    out_dir: Path,
    *,
    part_meta: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Write the ``cat`` composition ``sum_i w_i * delta_i`` of ``parts`` as a PEFT LoRA folder.

    ``parts`` are (adapter folder, weight) pairs; weights may be negative or fractional.
    ``part_meta`` (one mapping per part, e.g. ``{"adapter": "name@3", "sha256": ...}``) is recorded
    with the path and weight in ``composition.json``. The folder appears atomically: written in a
    temporary sibling and moved into place with ``os.replace`` (an existing ``out_dir`` is replaced).
    """
    import torch
    from safetensors.torch import load_file, save_file

    if not parts:
        raise CompositionError("nothing to compose: no parts")
    if part_meta is not None and len(part_meta) != len(parts):
        raise CompositionError("part_meta must have one entry per part")
    folders = [Path(p) for p, _ in parts]
    weights = [float(w) for _, w in parts]
    if not all(math.isfinite(w) for w in weights):
        raise CompositionError("weights must be finite numbers")
    configs = [_read_config(f) for f in folders]
    for key in ("fan_in_fan_out", "layers_to_transform", "layers_pattern"):
        values = {json.dumps(c.get(key), sort_keys=True) for c in configs}
        if len(values) > 1:
            raise CompositionError(f"parts disagree on {key}: {sorted(values)}")

    total_rank = sum(int(c["r"]) for c in configs)
    per_part: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
    dtype: torch.dtype | None = None
    for folder, config in zip(folders, configs, strict=True):
        modules = _split(load_file(str(folder / WEIGHTS_FILE)), folder)
        for module, (a, b) in modules.items():
            if a.shape[0] != int(config["r"]) or b.shape[1] != int(config["r"]):
                raise CompositionError(f"{folder}: {module} has rank {a.shape[0]}, config says r={config['r']}")
            dtype = a.dtype if dtype is None else torch.promote_types(dtype, a.dtype)
        per_part.append(modules)

    names = sorted({m for modules in per_part for m in modules})
    out: dict[str, torch.Tensor] = {}
    for module in names:
        present = [(i, per_part[i][module]) for i in range(len(parts)) if module in per_part[i]]
        in_features = {a.shape[1] for _, (a, _) in present}
        out_features = {b.shape[0] for _, (_, b) in present}
        if len(in_features) > 1 or len(out_features) > 1:
            raise CompositionError(
                f"parts disagree on the shape of {module} (in {sorted(in_features)}, out {sorted(out_features)}): "
                "were they trained on different base models?"
            )
        fan_in, fan_out = in_features.pop(), out_features.pop()
        a_out = torch.zeros(total_rank, fan_in, dtype=torch.float32)
        b_out = torch.zeros(fan_out, total_rank, dtype=torch.float32)
        row = 0
        for i, (a, b) in present:  # packed first, zero rows after: PEFT's cat layout
            r = a.shape[0]
            a_out[row : row + r] = a.float() * (weights[i] * _scaling(configs[i]))
            b_out[:, row : row + r] = b.float()
            row += r
        assert dtype is not None
        out[module + _A_SUFFIX] = a_out.to(dtype).contiguous()
        out[module + _B_SUFFIX] = b_out.to(dtype).contiguous()

    config = dict(configs[0])
    config.update(
        r=total_rank,
        lora_alpha=total_rank,
        target_modules=_union_targets(configs),
        use_rslora=False,
        use_dora=False,
        bias="none",
        modules_to_save=None,
        rank_pattern={},
        alpha_pattern={},
        inference_mode=True,
    )
    manifest = {
        "format": MANIFEST_FORMAT,
        "combination_type": "cat",
        "rank": total_rank,
        "parts": [
            {**(dict(part_meta[i]) if part_meta else {}), "path": str(folders[i]), "weight": weights[i]}
            for i in range(len(parts))
        ],
    }

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".compose-", dir=out_dir.parent))
    try:
        save_file(out, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        if out_dir.exists():  # replace: move the old folder aside first (rename needs an empty target)
            trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=out_dir.parent))
            os.replace(out_dir, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("Composed %d adapters (rank %d, %d modules) into %s", len(parts), total_rank, len(names), out_dir)
    return out_dir


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The ``composition.json`` of a composed folder, or None when absent or unreadable."""
    try:
        manifest: dict[str, Any] = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    return manifest


def delta_weights(folder: Path) -> dict[str, torch.Tensor]:
    """``module -> B @ A * scaling`` (float32, transposed for fan_in_fan_out) of a LoRA folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise CompositionError(f"{folder}: rank_pattern/alpha_pattern are not supported")
    scaling = _scaling(config)
    deltas: dict[str, torch.Tensor] = {}
    for module, (a, b) in _split(load_file(str(folder / WEIGHTS_FILE)), folder).items():
        delta = b.float() @ a.float() * scaling
        deltas[module] = delta.T if config.get("fan_in_fan_out") else delta
    return deltas


COMPOSED_PREFIX = "composed-"


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
        folder = self.root / name
        expected = [
            {**dict(meta), "path": str(path), "weight": float(weight)}
            for (path, weight), meta in zip(parts, part_meta, strict=True)
        ]
        with self._name_lock(name):
            held = self._holds.get(name)
            if held is not None:  # held by us: no other process can have removed it
                hit = self._is_built(folder, expected)
                if not hit:  # damaged on disk: rebuild under an exclusive lock, then share it again
                    _flock(held, exclusive=True)
                    try:
                        self._build(name, folder, parts, part_meta, expected)
                    finally:
                        _flock(held, exclusive=False)
            else:
                hit = self._acquire(name, folder, parts, part_meta, expected)
            self._touch(folder)
            with self._lock:
                self.stats["composed_hits" if hit else "composed_misses"] += 1
        if not hit:
            self._evict(keep=name)
        return folder

    def release(self, name: str) -> None:
        """This process no longer uses ``name`` (e.g. unloaded it from its engine): it may be evicted."""
        with self._name_lock(name):
            handle = self._holds.pop(name, None)
        if handle is not None:
            handle.close()  # drops the shared lock

    def held(self) -> list[str]:
        with self._lock:
            return sorted(self._holds)

    def _acquire(
        self,
        name: str,
        folder: Path,
        parts: Sequence[tuple[Path, float]],
        part_meta: Sequence[Mapping[str, Any]],
        expected: list[dict[str, Any]],
    ) -> bool:
        """Build ``name`` unless built, then hold it shared; True on a hit (nothing built here)."""
        hit = True
        while True:
            handle = self._open_lock(name)
            try:
                # A hit needs only the shared lock (so another holder of it, even in this process, never
                # blocks it); building takes the exclusive one (flock converts by release and re-take).
                _flock(handle, exclusive=False)
                if not self._is_built(folder, expected):
                    _flock(handle, exclusive=True)
                    if not self._is_built(folder, expected):
                        hit = False
                        self._build(name, folder, parts, part_meta, expected)
                    _flock(handle, exclusive=False)  # not atomic: an evictor may slip in, checked below
                if self._is_built(folder, expected):
                    with self._lock:
                        self._holds[name] = handle
                    return hit
            except BaseException:
                handle.close()
                raise
            handle.close()  # evicted in between: start again

    def _build(
        self,
        name: str,
        folder: Path,
        parts: Sequence[tuple[Path, float]],
        part_meta: Sequence[Mapping[str, Any]],
        expected: list[dict[str, Any]],
    ) -> None:
        compose_adapters(parts, folder, part_meta=part_meta)
        if not self._is_built(folder, expected):  # pragma: no cover - compose_adapters writes what we check
            raise CompositionError(f"composed folder {folder} does not record the requested parts")

    def _name_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._name_locks.setdefault(name, threading.Lock())

    def _open_lock(self, name: str) -> BinaryIO:
        locks = self.root / LOCKS_DIRNAME
        locks.mkdir(parents=True, exist_ok=True)
        return open(locks / f"{name}.lock", "a+b")  # noqa: SIM115 - held beyond this call

    @staticmethod
    def _is_built(folder: Path, expected: list[dict[str, Any]]) -> bool:
        manifest = read_manifest(folder)
        if manifest is None or not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            return False
        return bool(manifest.get("parts") == expected)

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


LOCKS_DIRNAME = ".locks"
STALE_STAGING_SECONDS = 600.0


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
