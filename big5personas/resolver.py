"""Persona resolution: from what a client asks for to what generation applies.

The service (chat) and the evaluator (questionnaires) both call :meth:`PersonaResolver.resolve`, so a
persona means the same thing wherever it is used. A persona is a method and a trait vector:

- ``direct``: no persona (the paper's Direct baseline).
- ``prompt``: Prompt-Inst. The paper's line for one pole; for intensities or several traits one
  sentence per trait with an intensity word (``You are a person with fairly high openness.``).
- ``demo``: Prompt-Demo, one pole only: ten dataset replies of that trait-level.
- ``sft`` / ``dpo``: a trained adapter. One pole with a unified adapter -> that adapter plus the
  paper's instruction. Otherwise one per-trait adapter per nonzero trait (``high`` for a positive
  value, ``low`` for a negative one) weighted by ``|v|``; a single part at weight 1 is used as is,
  anything else is composed exactly (:mod:`big5engine.compose`) into a deterministic folder
  ``adapters_dir/_composed/composed-<16 hex>`` kept under an LRU budget.

What a client asks for, and its canonical string form, is :mod:`big5personas.spec`. Errors are domain
exceptions; the service maps them to HTTP problems.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from big5core.errors import NotFound
from big5core.models import Adapter
from big5core.prompts import (
    ChatMessage,
    TemplateId,
    prompt_demo,
    prompt_inst,
    prompt_inst_sentence,
    unified_instruction,
    with_prefix,
    with_system,
)
from big5core.settings import Settings
from big5core.training import PER_TRAIT, UNIFIED
from big5core.traits import ADAPTER_METHODS, TRAITS, Level, Method, Trait, TraitVector, single_pole
from big5engine.compose_cache import COMPOSED_PREFIX, ComposedCache, Hold
from big5engine.steering import STEER_LAYOUT, Steer, VectorSet, read_vector_set, rows_digest, steer_rows
from big5personas import registry
from big5personas.registry import AdapterRef, RegistryError
from big5personas.spec import PersonaError, PersonaSpec, fmt_value, persona_key

logger = logging.getLogger(__name__)

COMPOSED_DIRNAME = "_composed"


class PersonaNotFound(NotFound):
    """No registered adapter can realise the persona."""

    code, title = "persona-not-found", "No adapter can realise the persona"


AdapterNotReadyError = registry.AdapterNotReady
"""An explicitly named adapter exists but is not ready (pending, errored, retired)."""


def composed_name(parts: Sequence[tuple[str, float]]) -> str:
    """Deterministic engine name of a composition from its parts' (sha256, weight), in order."""
    payload = json.dumps([[sha, round(float(w), 6)] for sha, w in parts], separators=(",", ":"))
    return COMPOSED_PREFIX + hashlib.sha256(payload.encode()).hexdigest()[:16]


def _describe(traits: Mapping[Trait, float]) -> str:
    return ", ".join(f"{t.value}={fmt_value(traits[t])}" for t in TRAITS if t in traits) or "none"


@dataclass(frozen=True)
class ResolvedPersona:
    """What generation applies: a prompt prefix and/or an adapter, plus how to report it."""

    method: Method
    traits: dict[str, float]
    template_id: TemplateId
    key: str
    prefix: str | None = None
    adapter_name: str | None = None
    adapter_path: Path | None = None
    parts: tuple[dict[str, Any], ...] = ()
    base_model: str | None = None
    system: str | None = None
    """a unified adapter trained with its instruction as the system turn gets it there"""
    hold: Hold | None = field(default=None, compare=False, repr=False)
    """a composed adapter's use of its folder, ended by :meth:`PersonaResolver.release`"""
    steering: dict[str, Any] | None = None
    """the activation steering served with it: vector set, layers, scale per trait, intensities"""

    @property
    def composed(self) -> bool:
        return bool(self.adapter_name and self.adapter_name.startswith(COMPOSED_PREFIX))

    def apply(self, messages: Sequence[ChatMessage]) -> list[ChatMessage]:
        """The messages with the persona's prefix in front of the last user turn (and its system turn, if any)."""
        return with_system(with_prefix(messages, self.prefix), self.system)

    def report(self) -> dict[str, Any]:
        """JSON-friendly description returned to clients (enough to reproduce the persona)."""
        return {
            "key": self.key,
            "method": self.method.value,
            "traits": dict(self.traits),
            "template_id": self.template_id.value,
            "prefix": self.prefix,
            "system": self.system,
            "adapter": self.adapter_name,
            "composed": self.composed,
            "parts": [dict(p) for p in self.parts],
            "base_model": self.base_model,
            "steering": None if self.steering is None else dict(self.steering),
        }


@dataclass(frozen=True)
class _AdapterInfo:
    """The columns of a registry row that resolution needs, detached from the session."""

    ref: str
    path: str
    sha256: str
    rank: int
    method: str
    layout: str
    base_model: str
    traits: dict[str, Any]
    placement: str = "user"

    @classmethod
    def of(cls, row: Adapter) -> _AdapterInfo:
        return cls(
            ref=row.ref,
            path=row.path,
            sha256=row.sha256 or "",
            rank=row.rank,
            method=row.method,
            layout=row.layout,
            base_model=row.base_model,
            traits=dict(row.traits or {}),
            placement=str((row.hyperparams or {}).get("instruction_placement", "user")),
        )


def _unified_persona(
    method: Method, traits: dict[Trait, float], key: str, info: _AdapterInfo, pole: tuple[Trait, Level]
) -> ResolvedPersona:
    """A unified adapter with the paper's instruction for ``pole``, placed where the adapter was trained with it."""
    instruction = unified_instruction(*pole)
    system = info.placement == "system"
    return ResolvedPersona(
        method,
        _plain(traits),
        TemplateId.UNIFIED_SYSTEM if system else TemplateId.UNIFIED,
        key,
        None if system else instruction,
        info.ref,
        Path(info.path),
        ({"adapter": info.ref, "weight": 1.0},),
        system=instruction if system else None,
    )


class PersonaResolver:
    """Resolves :class:`PersonaSpec` into :class:`ResolvedPersona`. Thread-safe; reads the registry only."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        base_model_id: str,
        demo_examples: Callable[[Trait, Level], Sequence[str]] | None = None,
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._base = base_model_id
        self._demo_examples = demo_examples
        self._step = settings.service.composition_step
        self._cache = ComposedCache(
            settings.adapters_dir / COMPOSED_DIRNAME,
            settings.service.composed_cache_size,
            max_bytes=settings.service.composed_max_bytes,
        )
        self.composed_dir = self._cache.root
        self.stats = self._cache.stats  # composed_hits, composed_misses
        self._lock = threading.Lock()  # guards the small caches below, never held during I/O
        self._verified: set[tuple[str, str]] = set()
        self._demo_prefixes: dict[tuple[Trait, Level], tuple[str, tuple[dict[str, Any], ...]]] = {}
        self._vector_sets: dict[str, VectorSet] = {}

    def release_composed(self, name: str) -> None:
        """End one use of composed adapter ``name`` (prefer :meth:`release`, which ends each use once)."""
        self._cache.release(name)

    def release(self, persona: ResolvedPersona) -> None:
        """The caller no longer uses ``persona``'s files: its composed folder may be evicted. Idempotent."""
        if persona.hold is not None:
            persona.hold.release()

    @contextlib.contextmanager
    def holding(self, spec: PersonaSpec) -> Iterator[ResolvedPersona]:
        """:meth:`resolve`, released when the block ends however it ends."""
        persona = self.resolve(spec)
        try:
            yield persona
        finally:
            self.release(persona)

    async def aresolve(self, spec: PersonaSpec) -> ResolvedPersona:
        """:meth:`resolve` in a worker thread (it may compose). A caller cancelled meanwhile (a timeout, a
        client gone) never sees the result: its folder is released as soon as the thread is done with it."""
        future = asyncio.get_running_loop().run_in_executor(None, self.resolve, spec)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(self._release_done)
            raise

    def _release_done(self, future: asyncio.Future[ResolvedPersona]) -> None:
        if not future.cancelled() and future.exception() is None:
            self.release(future.result())

    # -- entry point -------------------------------------------------------------------------

    @property
    def settings(self) -> Settings:
        """The settings this resolver was built with (the assessment runner reads its sections)."""
        return self._settings

    def resolve(self, spec: PersonaSpec) -> ResolvedPersona:
        """What generation applies for ``spec`` on this resolver's base model (which it records).

        A composed adapter's folder is held (never evicted, by any process sharing the cache) until
        :meth:`release`; every caller must release what it resolved (:meth:`holding` does), or the
        folders it held stay until the process exits. Raises ``ComposedStorageFull`` (503) when the
        composed adapters' disk budget has no room for a new one.
        """
        return dataclasses.replace(self._resolve(spec), base_model=self._base)

    def _resolve(self, spec: PersonaSpec) -> ResolvedPersona:
        steer = spec.quantised_steer()
        if spec.method is Method.STEER:
            if steer:
                raise PersonaError("method steer takes its vector from traits; give steer with another method")
            traits = spec.quantised(self._step)
            if not traits:
                raise PersonaError("method steer needs at least one nonzero trait (after rounding to 0.05)")
            return self._steered(None, traits, None, spec.adapter)
        persona = self._resolve_unsteered(spec)
        if not steer:
            return persona
        key = (
            persona.key
            + ("&" if "?" in persona.key else "?")
            + persona_key(persona.method, {}, None, steer).split("?")[1]
        )
        try:
            return self._steered(persona, steer, key)
        finally:
            self.release(persona)  # the steered folder holds what it needs; the base persona's hold ends

    def _resolve_unsteered(self, spec: PersonaSpec) -> ResolvedPersona:
        traits = spec.quantised(self._step)
        asked = spec.adapter is not None or "method" in spec.model_fields_set
        if not asked and (spec.traits is None or not spec.traits.nonzero()):  # nothing asked for: no persona
            return ResolvedPersona(Method.DIRECT, {}, TemplateId.PLAIN, persona_key(Method.DIRECT, {}))
        if spec.adapter is not None and spec.method not in ADAPTER_METHODS:
            raise PersonaError(f"an explicit adapter needs method sft or dpo, not {spec.method.value}")
        if spec.method is Method.DIRECT:
            if spec.traits is not None and spec.traits.nonzero():
                raise PersonaError("method direct is the no-persona baseline: it takes no traits")
            return ResolvedPersona(Method.DIRECT, {}, TemplateId.PLAIN, persona_key(Method.DIRECT, {}))
        if not traits and spec.adapter is None:
            raise PersonaError(
                f"method {spec.method.value} needs at least one nonzero trait "
                f"(after quantisation to steps of {fmt_value(self._step)})"
            )
        if spec.method is Method.PROMPT:
            return self._prompt(traits)
        if spec.method is Method.DEMO:
            return self._demo(traits)
        if spec.adapter is not None:
            return self._explicit(spec, traits)
        return self._by_traits(spec.method, traits)

    # -- prompt baselines --------------------------------------------------------------------

    def _prompt(self, traits: dict[Trait, float]) -> ResolvedPersona:
        pole = single_pole(traits)
        if pole is not None:
            prefix = prompt_inst(*pole)
        else:
            prefix = " ".join(prompt_inst_sentence(t, traits[t]) for t in TRAITS if t in traits)
        return ResolvedPersona(
            Method.PROMPT, _plain(traits), TemplateId.PROMPT_INST, persona_key(Method.PROMPT, traits), prefix
        )

    def _demo(self, traits: dict[Trait, float]) -> ResolvedPersona:
        pole = single_pole(traits)
        if pole is None:
            raise PersonaError(f"Prompt-Demo needs exactly one trait at high or low (-1 or 1); got {_describe(traits)}")
        if self._demo_examples is None:
            raise PersonaError("demo needs a dataset: this resolver was built without demo examples")
        with self._lock:
            prefix = self._demo_prefixes.get(pole)
        if prefix is None:
            chosen = self._demo_examples(*pole)
            examples = [e for e in chosen if e and e.strip()]
            if len(examples) < 10:
                raise PersonaNotFound(
                    f"Prompt-Demo needs 10 example replies of {pole[0].value}-{pole[1].value}; "
                    f"the dataset has {len(examples)}"
                )
            prefix = prompt_demo(examples[:10]), tuple(getattr(chosen, "provenance", ()))
            with self._lock:
                self._demo_prefixes[pole] = prefix
        return ResolvedPersona(
            Method.DEMO,
            _plain(traits),
            TemplateId.PROMPT_DEMO,
            persona_key(Method.DEMO, traits),
            prefix[0],
            parts=prefix[1],  # where the ten examples came from (source, seed, scenario ids)
        )

    # -- adapters ----------------------------------------------------------------------------

    def _verify(self, row: Adapter) -> None:
        """registry.verify once per (path, sha256); failures are not cached and propagate."""
        key = (row.path, row.sha256 or "")
        with self._lock:
            if key in self._verified:
                return
        registry.verify(row)
        with self._lock:
            self._verified.add(key)

    def _explicit(self, spec: PersonaSpec, traits: dict[Trait, float]) -> ResolvedPersona:
        assert spec.adapter is not None
        try:
            ref = AdapterRef.parse(spec.adapter)
        except RegistryError as exc:
            raise PersonaError(str(exc)) from None
        with self._sessions() as session:
            try:
                row = registry.get(session, ref)  # AdapterNotReady propagates
            except registry.AdapterNotFound as exc:
                raise PersonaNotFound(str(exc)) from None
            info = _AdapterInfo.of(row)
            if info.base_model != self._base:
                raise PersonaError(
                    f"adapter {info.ref} was trained on base model {info.base_model!r}, "
                    f"but this server runs {self._base!r}"
                )
            self._verify(row)
        method = spec.method
        if info.method in ADAPTER_METHODS and info.method != method.value:
            if "method" in spec.model_fields_set:
                raise PersonaError(f"adapter {info.ref} was trained with {info.method}, not {method.value}")
            method = Method(info.method)  # method left at its default: take the adapter's
        part = ({"adapter": info.ref, "weight": 1.0},)
        if info.layout == UNIFIED:
            pole = single_pole(traits)
            if pole is None:
                raise PersonaError(
                    f"adapter {info.ref} is a unified adapter: give exactly one trait at high or low; "
                    f"got {_describe(traits)}"
                )
            return _unified_persona(method, traits, persona_key(method, traits, info.ref), info, pole)
        carried = self._row_traits(info)
        if traits and carried and traits != carried:
            raise PersonaError(
                f"adapter {info.ref} carries {_describe(carried)}; the requested traits {_describe(traits)} differ"
            )
        traits = carried or traits
        return ResolvedPersona(
            method,
            _plain(traits),
            TemplateId.PLAIN,
            persona_key(method, traits, info.ref),
            None,
            info.ref,
            Path(info.path),
            part,
        )

    def _row_traits(self, info: _AdapterInfo) -> dict[Trait, float]:
        try:
            return TraitVector.model_validate(info.traits).quantised(self._step)
        except (ValidationError, ValueError):
            return {}

    def _by_traits(self, method: Method, traits: dict[Trait, float]) -> ResolvedPersona:
        key = persona_key(method, traits)
        pole = single_pole(traits)
        found: list[tuple[_AdapterInfo, float]] = []
        with self._sessions() as session:
            unified = None
            if pole is not None:
                unified = registry.find(session, method=method.value, layout=UNIFIED, base_model=self._base)
            if unified is not None:
                self._verify(unified)
                return _unified_persona(method, traits, key, _AdapterInfo.of(unified), pole)  # type: ignore[arg-type]
            missing: list[str] = []
            rows: list[Adapter] = []
            for trait in (t for t in TRAITS if t in traits):
                level = Level.of(traits[trait])
                row = registry.find(
                    session,
                    method=method.value,
                    layout=PER_TRAIT,
                    base_model=self._base,
                    traits={trait.value: level.value},
                )
                if row is None:
                    missing.append(f"{trait.value}={level.value}")
                else:
                    rows.append(row)
                    found.append((_AdapterInfo.of(row), abs(traits[trait])))
            if missing:
                also = " (and no unified adapter)" if pole is not None else ""
                raise PersonaNotFound(
                    f"no ready {method.value} per-trait adapter for {', '.join(missing)}{also} "
                    f"on base model {self._base!r}"
                )
            for row in rows:
                self._verify(row)
        parts = tuple({"adapter": info.ref, "weight": weight} for info, weight in found)
        if len(found) == 1 and found[0][1] == 1.0:
            info = found[0][0]
            return ResolvedPersona(
                method, _plain(traits), TemplateId.PLAIN, key, None, info.ref, Path(info.path), parts
            )
        rank = sum(info.rank for info, _ in found)
        limit = self._settings.engine.max_lora_rank
        if rank > limit:
            raise PersonaError(
                f"composing {_describe(traits)} needs rank {rank}, above the engine's max_lora_rank {limit}"
            )
        name = composed_name([(info.sha256, weight) for info, weight in found])
        path = self._cache.get_or_build(
            name,
            [(Path(info.path), weight) for info, weight in found],
            [{"adapter": info.ref, "sha256": info.sha256} for info, _ in found],
        )
        hold = Hold(self._cache, name)
        return ResolvedPersona(method, _plain(traits), TemplateId.PLAIN, key, None, name, path, parts, hold=hold)

    # -- activation steering -----------------------------------------------------------------

    def vector_set(self, ref: str | None = None) -> tuple[_AdapterInfo, VectorSet]:
        """The steering vector set ``ref`` (name@version), or the newest ready one for this base model,
        verified and read (cached by sha256)."""
        with self._sessions() as session:
            if ref is None:
                row = registry.find(session, method=Method.STEER.value, layout=STEER_LAYOUT, base_model=self._base)
            else:
                try:
                    row = registry.get(session, AdapterRef.parse(ref))
                except registry.AdapterNotFound as exc:
                    raise PersonaNotFound(str(exc)) from None
                except RegistryError as exc:
                    raise PersonaError(str(exc)) from None
                if row.method != Method.STEER.value or row.base_model != self._base:
                    raise PersonaError(f"{row.ref} is not a steering vector set for base model {self._base!r}")
            if row is None:
                raise PersonaNotFound(
                    f"no ready steering vectors for base model {self._base!r}; run 'big5 steer extract'"
                )
            self._verify(row)  # a changed file on disk is refused (409) before anything reads it
            info = _AdapterInfo.of(row)
        with self._lock:
            vectors = self._vector_sets.get(info.sha256)
        if vectors is None:
            vectors = read_vector_set(Path(info.path))
            with self._lock:
                self._vector_sets[info.sha256] = vectors
        return info, vectors

    def _steered(
        self, persona: ResolvedPersona | None, steer: dict[Trait, float], key: str | None, ref: str | None = None
    ) -> ResolvedPersona:
        """``persona`` (None: the base model) with ``steer``'s vectors (set ``ref``, default the newest)
        added, served from one folder. A steer persona's key names its vector set (``&adapter=name@v``),
        so stored assessments of other vectors are never taken for it."""
        info, vectors = self.vector_set(ref)
        if key is None:
            key = persona_key(Method.STEER, steer, info.ref)
        rows = steer_rows(vectors, steer)
        steering = {
            "vectors": info.ref,
            "sha256": info.sha256,
            "layers": vectors.layers,
            "scales": {t.value: vectors.scale(t) for t in TRAITS},
            "traits": _plain(steer),
            "rows": rows_digest(rows),
        }
        parts: list[tuple[Path, float]] = []
        meta: list[dict[str, Any]] = []
        if persona is not None and persona.adapter_path is not None:
            parts.append((persona.adapter_path, 1.0))
            meta.append({"adapter": persona.adapter_name or ""})
        payload = json.dumps([[m.get("adapter") for m in meta], steering["sha256"], steering["rows"]])
        name = COMPOSED_PREFIX + hashlib.sha256(payload.encode()).hexdigest()[:16]
        path = self._cache.get_or_build(name, parts, meta, Steer(rows, steering, vectors.model))
        hold = Hold(self._cache, name)
        part = {"adapter": info.ref, "steering": True}  # a registry part too: its data split is checked
        if persona is None:
            return ResolvedPersona(
                Method.STEER,
                _plain(steer),
                TemplateId.PLAIN,
                key,
                None,
                name,
                path,
                (part,),
                hold=hold,
                steering=steering,
            )
        return dataclasses.replace(
            persona, key=key, adapter_name=name, adapter_path=path, parts=(*persona.parts, part), hold=hold,
            steering=steering,
        )  # fmt: skip


def _plain(traits: Mapping[Trait, float]) -> dict[str, float]:
    """JSON-friendly traits in OCEAN order."""
    return {t.value: traits[t] for t in TRAITS if t in traits}
