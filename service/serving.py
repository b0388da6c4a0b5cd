"""The generation flow shared by /v1/generate and /v1/chat/completions (vLLM's "serving class").

spec -> resolver.resolve (in a thread: it may compose an adapter) -> persona.apply(messages) ->
length check (prompt tokens + max_tokens against the engine's context) -> engine.register_lora when
the persona has an adapter -> engine.generate / engine.stream with that handle. Requests for
different personas in flight at once share the engine's batch: each carries its own LoRA request.

Every call is admitted first (:class:`~service.admission.Admission`) and bounded by
``request_timeout_s``; prompts and completions are logged only with ``log_prompts``.

A composed adapter's folder is held on disk from resolve to the end of the request, on every path
(served, refused as too long, timed out, failed, cancelled), then the shared cache may evict it.
Composed adapters (one per trait vector asked for) stay loaded in the engine up to a bound
(:class:`~big5engine.compose_cache.Residency`): beyond it the least recently used one that no request is
using is unloaded from the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

from big5core.generation import GenerationChunk, GenerationResult, SamplingOptions
from big5core.prompts import ChatMessage
from big5core.settings import ServiceSettings
from big5engine.compose_cache import COMPOSED_PREFIX, Residency
from big5engine.engine import PersonaEngine
from big5engine.errors import EngineNotReady, PromptTooLong
from big5engine.lora import LoraHandle
from big5personas.resolver import PersonaResolver, ResolvedPersona
from big5personas.spec import PersonaSpec
from service.admission import Admission, Slot
from service.errors import AdapterLoadFailed, GenerationTimeout
from service.metrics import ServiceMetrics
from service.schemas import REST_OF_CONTEXT

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    persona: ResolvedPersona
    messages: list[ChatMessage]
    sampling: SamplingOptions
    lora: LoraHandle | None
    prompt_tokens: int


@dataclass(frozen=True)
class Completion:
    id: str
    persona: ResolvedPersona
    result: GenerationResult


class CompletionStream:
    """An opened stream: the persona and prompt size are known, the first chunk already arrived.

    Iterate it once; it holds its admission slot until exhausted, closed or garbage-collected.
    """

    def __init__(
        self,
        service: GenerationService,
        prepared: Prepared,
        chunks: AsyncIterator[GenerationChunk],
        first: GenerationChunk | None,
        slot: Slot,
        deadline: float,
        request_id: str,
    ) -> None:
        self.id = request_id
        self.persona = prepared.persona
        self.prompt_tokens = prepared.prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._service = service
        self._prepared = prepared
        self._chunks = chunks
        self._first = first
        self._slot = slot
        self._deadline = deadline
        self._done = _Once(slot.release, lambda: service._release(prepared))
        weakref.finalize(self, self._done)  # a stream nobody iterates still gives its slot back

    async def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        pieces: list[str] = []
        try:
            chunk = self._first
            self._first = None
            while chunk is not None:
                pieces.append(chunk.delta_text)
                self.completion_tokens = chunk.completion_tokens
                self.finish_reason = chunk.finish_reason
                yield chunk
                chunk = await self._service._next_chunk(self._chunks, self._deadline, self.id)
            self._service._finished(self.id, self._prepared, "".join(pieces), self.completion_tokens)
        finally:
            self._done()
            with contextlib.suppress(Exception):
                await self._chunks.aclose()  # type: ignore[attr-defined]


class GenerationService:
    def __init__(
        self,
        settings: ServiceSettings,
        resolver: PersonaResolver,
        engine: PersonaEngine,
        admission: Admission,
        metrics: ServiceMetrics,
    ) -> None:
        self.settings = settings
        self.resolver = resolver
        self.engine = engine
        self.admission = admission
        self.metrics = metrics
        limits = engine.settings
        # at least a full batch (max_loras); beyond the engine's host cache (max_cpu_loras) it would reload anyway
        self.resident = Residency(max(limits.max_loras, min(limits.max_cpu_loras, settings.composed_cache_size)))

    # ------------------------------------------------------------ entry points

    async def complete(
        self, spec: PersonaSpec, messages: list[ChatMessage], sampling: SamplingOptions, *, prefix: str = "gen"
    ) -> Completion:
        """One whole reply."""
        slot = self._admit()
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        prepared: Prepared | None = None
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                prepared = await self.prepare(spec, messages, sampling, request_id)
                result = await self.engine.generate(
                    prepared.messages, prepared.sampling, lora=prepared.lora, request_id=request_id
                )
        except TimeoutError as exc:
            raise self._timeout(request_id) from exc
        finally:
            slot.release()
            if prepared is not None:
                self._release(prepared)
        self._finished(request_id, prepared, result.text, result.completion_tokens)
        return Completion(request_id, prepared.persona, result)

    async def open_stream(
        self, spec: PersonaSpec, messages: list[ChatMessage], sampling: SamplingOptions, *, prefix: str = "gen"
    ) -> CompletionStream:
        """Resolve, check and start a stream, waiting for its first chunk.

        Errors before the first token (unknown persona, prompt too long, engine not ready) raise here,
        so the route can still answer with a problem status instead of a broken event stream.
        """
        slot = self._admit()
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        deadline = asyncio.get_running_loop().time() + self.settings.request_timeout_s
        chunks: AsyncIterator[GenerationChunk] | None = None
        prepared: Prepared | None = None
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    prepared = await self.prepare(spec, messages, sampling, request_id)
            except TimeoutError as exc:
                raise self._timeout(request_id) from exc
            chunks = self.engine.stream(prepared.messages, prepared.sampling, lora=prepared.lora, request_id=request_id)
            first = await self._next_chunk(chunks, deadline, request_id)
        except BaseException:
            slot.release()
            if prepared is not None:
                self._release(prepared)
            if chunks is not None:
                with contextlib.suppress(Exception):
                    await chunks.aclose()  # type: ignore[attr-defined]
            raise
        return CompletionStream(self, prepared, chunks, first, slot, deadline, request_id)

    # ------------------------------------------------------------ steps

    async def prepare(
        self, spec: PersonaSpec, messages: list[ChatMessage], sampling: SamplingOptions, request_id: str
    ) -> Prepared:
        """Resolve and check; the caller releases the result (:meth:`_release`), or nothing is held on failure."""
        persona = await self.resolver.aresolve(spec)
        try:
            return await self._checked(persona, messages, sampling, request_id)
        except BaseException:
            self.resolver.release(persona)
            raise

    async def _checked(
        self, persona: ResolvedPersona, messages: list[ChatMessage], sampling: SamplingOptions, request_id: str
    ) -> Prepared:
        final = persona.apply(messages)
        prompt_tokens = await asyncio.to_thread(self._count, final)
        limit = self.engine.max_model_len
        if sampling.max_tokens == REST_OF_CONTEXT:
            sampling = replace(sampling, max_tokens=max(1, limit - prompt_tokens))
        if prompt_tokens + sampling.max_tokens > limit:
            raise PromptTooLong(prompt_tokens, sampling.max_tokens, limit)
        lora = await self._register(persona) if persona.adapter_name else None
        self.metrics.observe_persona(persona)
        if self.settings.log_prompts:
            logger.info("%s persona %s prompt %r", request_id, persona.key, final)
        else:
            logger.debug("%s persona %s, %d prompt tokens", request_id, persona.key, prompt_tokens)
        return Prepared(persona, final, sampling, lora, prompt_tokens)

    def _count(self, messages: list[ChatMessage]) -> int:
        return self.engine.count_tokens(self.engine.render(messages))

    async def _register(self, persona: ResolvedPersona) -> LoraHandle:
        assert persona.adapter_name is not None
        if persona.adapter_path is None:
            raise AdapterLoadFailed(f"adapter {persona.adapter_name} has no files to load")
        try:
            handle = await self.engine.register_lora(persona.adapter_name, persona.adapter_path)
        except (ValueError, FileNotFoundError, RuntimeError) as exc:
            if isinstance(exc, EngineNotReady):
                raise
            raise AdapterLoadFailed(f"adapter {persona.adapter_name}: {exc}") from exc
        if persona.adapter_name.startswith(COMPOSED_PREFIX):
            for victim in self.resident.acquire(persona.adapter_name):
                await self._unload(victim)
        return handle

    def _release(self, prepared: Prepared) -> None:
        """The request that used ``prepared`` is over: its composed adapter may be unloaded, its folder evicted."""
        name = prepared.persona.adapter_name
        if name is not None and name.startswith(COMPOSED_PREFIX):
            self.resident.release(name)
        self.resolver.release(prepared.persona)

    async def _unload(self, name: str) -> None:
        """Unload an idle composed adapter from the engine (its folder is held only by requests using it)."""
        try:
            await self.engine.remove_lora(name)
        except Exception:  # e.g. the engine is restarting: it comes back without it or reloads it from disk
            logger.warning("could not unload composed adapter %s", name, exc_info=True)
            return
        logger.info("Unloaded composed adapter %s (more than %d loaded)", name, self.resident.capacity)

    async def _next_chunk(
        self, chunks: AsyncIterator[GenerationChunk], deadline: float, request_id: str
    ) -> GenerationChunk | None:
        try:
            async with asyncio.timeout_at(deadline):
                return await anext(chunks, None)
        except TimeoutError as exc:
            raise self._timeout(request_id) from exc

    def _admit(self) -> Slot:
        if not self.engine.ready:
            self.metrics.observe_rejection("engine_not_ready")
            state = "starting" if self.engine.starting else "not started"
            raise EngineNotReady(f"the engine is {state}" if not self.engine.error else self.engine.error)
        return self.admission.acquire()

    def _timeout(self, request_id: str) -> GenerationTimeout:
        return GenerationTimeout(
            f"{request_id}: no answer within request_timeout_s={self.settings.request_timeout_s:g} s"
        )

    def _finished(self, request_id: str, prepared: Prepared, text: str, completion_tokens: int) -> None:
        self.metrics.observe_tokens(prepared.persona.method.value, prepared.prompt_tokens, completion_tokens)
        if self.settings.log_prompts:
            logger.info("%s completion %r", request_id, text)
        else:
            logger.debug("%s done: %d tokens", request_id, completion_tokens)


class _Once:
    """Calls its functions the first time it is called, never again (idempotent clean-up)."""

    def __init__(self, *functions: Callable[[], object]) -> None:
        self._functions: tuple[Callable[[], object], ...] | None = functions

    def __call__(self) -> None:
        functions, self._functions = self._functions, None
        for function in functions or ():
            function()
