"""The generation engine: vLLM's ``AsyncLLM`` on a dedicated thread with its own event loop.

``AsyncLLM`` binds itself to the loop it is created in, so it lives on a private loop in a background
thread; every public coroutine submits its work there (``run_coroutine_threadsafe``) and awaits it
with ``wrap_future``, so FastAPI's loop, a CLI's ``asyncio.run`` and each test's loop can all call it.
Streams bridge through a per-call queue on the caller's loop; cancelling a caller aborts the request.
vLLM is imported only inside methods: importing this module is cheap and safe under ``spawn``.
LoRA on CPU: "no adapter" (LoRA index -1) is handled by the grouped ops of :mod:`big5engine.vllm_plugin`,
or else sent as an explicit zero adapter -- see :mod:`big5engine.lora` for the upstream bug
(vllm-project/vllm PRs #49656, #48421).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from big5core.generation import GenerationChunk, GenerationResult, SamplingOptions
from big5core.prompts import ChatMessage
from big5core.settings import EngineSettings
from big5engine.base import Prepared
from big5engine.cpu import cpu_env_defaults
from big5engine.errors import EngineNotReady, engine_died
from big5engine.loop import LoopThread
from big5engine.lora import AdapterTable, LoraHandle, lora_engine_setup
from big5engine.option_tokens import OptionTokensUnavailable
from big5engine.scoring import LogprobScoring

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)


class PersonaEngine(LogprobScoring):
    """vLLM ``AsyncLLM`` on a private event-loop thread; its coroutines work from any event loop.

    ``zero_adapter_for_base``: serve ``lora=None`` through an all-zero adapter instead of LoRA index
    -1 (the vLLM-CPU bug described in :mod:`big5engine.lora`, upstream PRs #49656 and #48421). ``None``
    means on when LoRA is enabled, no CUDA device is present and the grouped-ops plugin
    (:mod:`big5engine.vllm_plugin`, which handles -1 itself) is not active. When on, the zero adapter
    is pinned in one extra LoRA slot, so ``engine.max_loras`` real adapters still fit in a batch.
    Its folder is written once under ``work_dir``.
    """

    def __init__(
        self,
        model_path: str,
        engine: EngineSettings,
        *,
        enable_lora: bool = True,
        work_dir: Path,
        zero_adapter_for_base: bool | None = None,
    ) -> None:
        super().__init__(model_path, enable_lora=enable_lora, max_model_len=engine.max_model_len)
        self.settings = engine
        self.work_dir = Path(work_dir)
        self._zero_flag = zero_adapter_for_base
        self._start_lock = threading.Lock()
        self._adapters = AdapterTable(engine.max_lora_rank)  # mutated on the engine loop only
        self.start_seconds: float | None = None
        self.restarts = 0  # engine cores replaced by restart() after they died

    # ---------------------------------------------------------------- lifecycle

    @property
    def ready(self) -> bool:
        return self._llm is not None and not self._llm.errored

    @property
    def starting(self) -> bool:
        return self._starting

    @property
    def dead(self) -> bool:
        """The engine ran and its core died (vLLM's ``errored``: the process is gone): see :meth:`restart`."""
        return self._llm is not None and self._llm.errored

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def zero_adapter(self) -> LoraHandle | None:
        """The zero adapter standing in for "no adapter" (None when the workaround is off)."""
        return self._zero

    @property
    def loras(self) -> dict[str, LoraHandle]:
        """Registered adapters by name (a copy; the zero adapter is not listed)."""
        return dict(self._adapters.handles)

    def start(self) -> None:
        """Start the engine (blocking; ~45 s on 2 CPU cores). A no-op when already running."""
        with self._start_lock:
            if self._llm is not None:
                return
            self._starting, self._error = True, None
            began = time.monotonic()
            try:
                self._start_locked()
            except BaseException as exc:
                self._error = f"{type(exc).__name__}: {exc}"
                logger.exception("Engine failed to start")
                if self._thread is not None:
                    self._thread.stop()
                    self._thread = None
                raise
            finally:
                self._starting = False
            self.start_seconds = time.monotonic() - began
            logger.info("Engine ready in %.1f s (max_model_len %d)", self.start_seconds, self._max_model_len)

    async def astart(self) -> None:
        """:meth:`start` without blocking the caller's event loop."""
        await asyncio.to_thread(self.start)

    def restart(self) -> bool:
        """Replace a :attr:`dead` engine with a new one (blocking, as long as a start); False if not dead.

        vLLM's ``AsyncLLM`` cannot recover a lost engine core, so a new one is created on the same
        private loop; the adapters the old one had come back under the same names and ids before it
        takes requests. Meanwhile calls fail with :class:`EngineNotReady`. A failed restart raises and
        leaves the engine dead, so it may be restarted again.
        """
        with self._start_lock:
            dead = self._llm
            if dead is None or not dead.errored:
                return False
            self._starting = True
            self.restarts += 1
            began = time.monotonic()
            logger.warning("Engine core died; restarting the engine (restart %d)", self.restarts)
            try:
                self._start_locked(dead)
            except BaseException as exc:
                self._error = f"restart {self.restarts} failed: {type(exc).__name__}: {exc}"
                logger.exception("Engine restart failed")
                raise
            finally:
                self._starting = False
            self._error = None
            self.start_seconds = time.monotonic() - began
            logger.info(
                "Engine restarted in %.1f s with %d adapter(s)", self.start_seconds, len(self._adapters.handles)
            )
            return True

    async def arestart(self) -> bool:
        """:meth:`restart` without blocking the caller's event loop."""
        return await asyncio.to_thread(self.restart)

    def _start_locked(self, dead: AsyncLLM | None = None) -> None:
        import torch

        s = self.settings
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            cpu_env_defaults(kv_cache_bytes=s.kv_cache_bytes, tensor_parallel_size=s.tensor_parallel_size)
        lora_kwargs, zero_path = lora_engine_setup(
            s, self.model_path, self.work_dir, enable_lora=self.enable_lora, zero=self._zero_flag, on_gpu=on_gpu
        )
        self.tokenizer  # noqa: B018 - load it now so render() works as soon as we are ready
        digits = self.option_tokens()
        if digits.single_tokens:
            logger.info("Answer options %s are token ids %s", list(digits.options), digits.ids)
        else:  # not fatal: the label-text scoring mode still works; the digit mode raises a clear error
            logger.warning("%s", OptionTokensUnavailable(digits))

        from vllm.engine.arg_utils import AsyncEngineArgs

        kwargs: dict[str, Any] = {
            "model": self.model_path,
            "dtype": s.dtype,
            "max_model_len": s.max_model_len,
            "block_size": s.block_size,
            "enforce_eager": s.enforce_eager,
            "tensor_parallel_size": s.tensor_parallel_size,
            "max_num_seqs": s.max_num_seqs,
            "seed": s.seed,
            "enable_prefix_caching": True,
            **lora_kwargs,
        }
        if on_gpu:
            kwargs["gpu_memory_utilization"] = s.gpu_memory_utilization
        elif s.kv_cache_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = s.kv_cache_bytes
        if self._thread is None:
            self._thread = LoopThread("big5-engine")
        self._thread.submit(self._create_on_loop(AsyncEngineArgs(**kwargs), zero_path, dead)).result()

    async def _create_on_loop(self, args: Any, zero_path: Path | None, dead: AsyncLLM | None = None) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        if dead is not None:  # a restart: release what is left of the dead one first
            with contextlib.suppress(Exception):
                dead.shutdown()
        llm = AsyncLLM.from_engine_args(args)  # blocks this (private) loop while loading: fine
        self._max_model_len = int(llm.model_config.max_model_len)
        try:
            if zero_path is not None:
                self._zero = await self._adapters.add_zero(llm, zero_path)
            await self._restore_adapters(llm)
        except BaseException:
            llm.shutdown()
            raise
        self._llm = llm

    async def _restore_adapters(self, llm: AsyncLLM) -> None:
        """After a restart: load the adapters the dead engine had (same ids), before any request."""
        for name, handle in list(self._adapters.handles.items()):
            try:
                if await llm.add_lora(handle.to_request()):
                    continue
                reason = "the engine refused it"
            except Exception as exc:  # e.g. its files are gone; a later register_lora tries again
                if engine_died(exc):
                    raise
                reason = f"{type(exc).__name__}: {exc}"
            logger.warning("Adapter %s not restored after the restart: %s", name, reason)
            del self._adapters.handles[name]

    def shutdown(self) -> None:
        """Stop the engine and its thread (idempotent). Calls in flight fail with EngineNotReady."""
        with self._start_lock:
            llm, thread, self._llm, self._thread, self._zero = self._llm, self._thread, None, None, None
            self._adapters = AdapterTable(self.settings.max_lora_rank)
            if thread is not None:
                if llm is not None:  # on its own loop; the loop stops after it (callbacks run in order)
                    thread.loop.call_soon_threadsafe(llm.shutdown)
                thread.stop(timeout=120)

    # ---------------------------------------------------------------- generation

    async def generate(
        self,
        messages: Sequence[ChatMessage],
        sampling: SamplingOptions,
        lora: LoraHandle | None = None,
        request_id: str | None = None,
    ) -> GenerationResult:
        """Generate one reply (``lora=None``: the base model)."""
        return await self._generate(self._prepare(messages, sampling, "FINAL_ONLY", lora, request_id))

    async def generate_ids(
        self,
        token_ids: Sequence[int],
        sampling: SamplingOptions,
        lora: LoraHandle | None = None,
        request_id: str | None = None,
    ) -> GenerationResult:
        """Generate from prompt token ids as they are, no chat template applied (lm-eval renders its own).

        :class:`PromptTooLong` unless the prompt and ``sampling.max_tokens`` fit the context.
        """
        return await self._generate(self._prepare_ids(list(token_ids), sampling, "FINAL_ONLY", lora, request_id))

    async def _generate(self, prepared: Prepared) -> GenerationResult:
        completion = (await self._call(self._final_on_loop(prepared))).outputs[0]
        return GenerationResult(
            text=completion.text,
            finish_reason=completion.finish_reason,
            prompt_tokens=len(prepared.token_ids),
            completion_tokens=len(completion.token_ids),
        )

    async def stream(
        self,
        messages: Sequence[ChatMessage],
        sampling: SamplingOptions,
        lora: LoraHandle | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        """Yield the reply in pieces; the concatenated ``delta_text`` equals :meth:`generate`'s text."""
        prepared = self._prepare(messages, sampling, "DELTA", lora, request_id)
        caller = asyncio.get_running_loop()
        queue: asyncio.Queue[GenerationChunk | BaseException | None] = asyncio.Queue()

        def push(item: GenerationChunk | BaseException | None) -> None:
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody listens
                caller.call_soon_threadsafe(queue.put_nowait, item)

        async def produce() -> None:
            produced = 0
            try:
                async for output in self._engine_stream(prepared):
                    completion = output.outputs[0]
                    produced += len(completion.token_ids)
                    push(GenerationChunk(completion.text, completion.finish_reason, produced))
            except asyncio.CancelledError:
                push(EngineNotReady("engine shut down while the request was running"))
                raise
            except BaseException as exc:
                push(exc)
            else:
                push(None)

        future = self._require()[0].submit(produce())
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    if engine_died(item):
                        raise EngineNotReady(f"engine died: {item}") from item
                    raise item
                yield item
        finally:
            if not future.done():
                future.cancel()  # cancels the engine-side task, which aborts the vLLM request

    # ---------------------------------------------------------------- adapters

    async def register_lora(self, name: str, path: Path) -> LoraHandle:
        """Load a PEFT adapter under ``name``; its integer id stays the same for the engine's life.

        Concurrent first calls for one name register it once. Registering a name again with the same
        path returns the existing handle; with a new path it replaces the adapter (same id).
        """
        if not self.enable_lora:
            raise ValueError("this engine was started without LoRA support")
        path = self._adapters.check(name, Path(path))
        return await self._call(self._adapters.register(self._require()[1], name, path))

    async def remove_lora(self, name: str) -> bool:
        """Unload adapter ``name``; False when it was not registered."""
        return await self._call(self._adapters.remove(self._require()[1], name))
