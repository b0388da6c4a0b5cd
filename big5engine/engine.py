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
import concurrent.futures
import contextlib
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from big5core.errors import Invalid, Unavailable
from big5core.generation import ContinuationScore, GenerationChunk, GenerationResult, OptionScores, SamplingOptions
from big5core.prompts import ChatMessage
from big5core.settings import EngineSettings
from big5engine.lora import AdapterTable, LoraHandle, lora_engine_setup
from big5engine.option_tokens import OptionTokenCheck, OptionTokensUnavailable, check_option_tokens, encode_pair

if TYPE_CHECKING:
    from vllm import CompletionOutput, RequestOutput, SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)

T = TypeVar("T")


class EngineNotReady(Unavailable, RuntimeError):
    """The engine is not started, still starting, restarting, failed, or shut down."""

    code, title = "engine-not-ready", "The generation engine is not ready"


class PromptTooLong(Invalid):
    """Prompt tokens plus ``max_tokens`` exceed the engine's context length."""

    code, title = "prompt-too-long", "Prompt and max_tokens exceed the context length"

    def __init__(self, prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
        super().__init__(
            f"prompt has {prompt_tokens} tokens and max_tokens is {max_tokens} "
            f"({prompt_tokens + max_tokens} in all), but the context length is {max_model_len}"
        )
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len


def cpu_env_defaults(*, kv_cache_bytes: int | None = None, tensor_parallel_size: int = 1) -> dict[str, str]:
    """Set vLLM-CPU environment defaults (only those not already set); return what was set.

    Per ``/work/shared/CPU_NOTES.md``: bind OpenMP threads to every CPU this process may use and
    reserve none (+60-75 % over vLLM's default of reserving one), and cap the KV cache at 1 GiB when
    no explicit size is configured (otherwise the CPU backend claims most of the machine's RAM).
    Call before the engine is created: the spawned engine processes inherit ``os.environ``.
    """
    wanted: dict[str, str] = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    if tensor_parallel_size == 1 and hasattr(os, "sched_getaffinity"):  # TP > 1: one list per rank
        wanted["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    if kv_cache_bytes is None:
        wanted["VLLM_CPU_KVCACHE_SPACE"] = "1"  # GiB
    applied = {key: value for key, value in wanted.items() if not os.environ.get(key)}
    os.environ.update(applied)
    if applied:
        logger.info("vLLM CPU defaults: %s", applied)
    return applied


def _engine_died(exc: BaseException) -> bool:
    """Whether ``exc`` is vLLM's EngineDeadError (its engine core process is gone)."""
    try:
        from vllm.v1.engine.exceptions import EngineDeadError
    except ImportError:  # another vLLM layout: nothing to translate
        return False
    return isinstance(exc, EngineDeadError)


class _LoopThread:
    """A daemon thread running one private asyncio event loop."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        tasks = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
        for task in tasks:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, timeout: float = 30.0) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)


@dataclass
class _Prepared:
    token_ids: list[int]
    params: SamplingParams
    lora: LoRARequest | None
    request_id: str


class PersonaEngine:
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
        self.model_path = model_path
        self.settings = engine
        self.enable_lora = enable_lora
        self.work_dir = Path(work_dir)
        self._zero_flag = zero_adapter_for_base
        self._llm: AsyncLLM | None = None
        self._thread: _LoopThread | None = None
        self._start_lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        self._tokenizer: Any = None
        self._option_checks: dict[tuple[str, ...], OptionTokenCheck] = {}
        self._starting = False
        self._error: str | None = None
        self._max_model_len = engine.max_model_len
        self._zero: LoraHandle | None = None
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
    def error(self) -> str | None:
        if self._llm is not None and self._llm.errored:
            return f"engine died: {self._llm.dead_error!r}" + (f"; {self._error}" if self._error else "")
        return self._error

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
            self._thread = _LoopThread("big5-engine")
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
                if _engine_died(exc):
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

    # ---------------------------------------------------------------- tokens

    @property
    def tokenizer(self) -> Any:
        """The model's Hugging Face tokenizer (loaded on first use; usable before the engine starts)."""
        if self._tokenizer is None:
            with self._tokenizer_lock:
                if self._tokenizer is None:
                    from transformers import AutoTokenizer

                    self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        return self._tokenizer

    def render(self, messages: Sequence[ChatMessage]) -> str:
        """The chat template applied to ``messages``, ending with the assistant generation prompt."""
        chat = [dict(m) for m in messages]
        return str(self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text`` as the engine receives it (special tokens are spelled out in the text)."""
        return len(self.encode(text))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def option_tokens(self, options: Sequence[str] = ("1", "2", "3", "4", "5")) -> OptionTokenCheck:
        """:func:`check_option_tokens` for this engine's tokenizer (cached per option tuple)."""
        key = tuple(options)
        check = self._option_checks.get(key)
        if check is None:
            check = self._option_checks[key] = check_option_tokens(self.tokenizer, key)
        return check

    def option_token_ids(self, options: Sequence[str]) -> list[int]:
        """One token id per option; :class:`OptionTokensUnavailable` unless each is one distinct token."""
        return self.option_tokens(options).ids

    # ---------------------------------------------------------------- requests

    def _require(self) -> tuple[_LoopThread, AsyncLLM]:
        if self._llm is None or self._thread is None:
            state = "starting" if self._starting else (f"failed: {self._error}" if self._error else "not started")
            raise EngineNotReady(f"engine is {state}")
        if self._llm.errored:
            raise EngineNotReady("engine is restarting after its core died" if self._starting else self.error)
        return self._thread, self._llm

    async def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the engine loop and await it from the caller's loop."""
        try:
            thread, _ = self._require()
        except EngineNotReady:
            coro.close()
            raise
        future = thread.submit(coro)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if future.cancelled() and current is not None and not current.cancelling():
                raise EngineNotReady("engine shut down while the request was running") from None
            raise
        except Exception as exc:
            if _engine_died(exc):  # requests in flight when the engine core died: not ready, not a bug
                raise EngineNotReady(f"engine died: {exc}") from exc
            raise

    def _lora_request(self, lora: LoraHandle | None) -> LoRARequest | None:
        if lora is None:  # index -1, unless the zero adapter must stand in for it (no plugin)
            return None if self._zero is None else self._zero.to_request()
        if not self.enable_lora:
            raise ValueError("this engine was started without LoRA support")
        return lora.to_request()

    def _prepare(
        self,
        messages: Sequence[ChatMessage],
        sampling: SamplingOptions,
        kind: str,
        lora: LoraHandle | None,
        request_id: str | None = None,
        **extra: Any,
    ) -> _Prepared:
        """Checks readiness, tokenises the rendered chat, then as :meth:`_prepare_ids`."""
        self._require()
        return self._prepare_ids(self.encode(self.render(messages)), sampling, kind, lora, request_id, **extra)

    def _prepare_ids(
        self,
        token_ids: list[int],
        sampling: SamplingOptions,
        kind: str,
        lora: LoraHandle | None,
        request_id: str | None = None,
        **extra: Any,
    ) -> _Prepared:
        """Checks readiness and length, builds vLLM's request pieces for the prompt ``token_ids``."""
        self._require()
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if len(token_ids) + sampling.max_tokens > self._max_model_len:
            raise PromptTooLong(len(token_ids), sampling.max_tokens, self._max_model_len)
        params = SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            stop=list(sampling.stop) if sampling.stop else None,
            ignore_eos=sampling.ignore_eos,
            min_p=sampling.min_p,
            repetition_penalty=sampling.repetition_penalty,
            frequency_penalty=sampling.frequency_penalty,
            presence_penalty=sampling.presence_penalty,
            output_kind=RequestOutputKind[kind],
            **extra,
        )
        return _Prepared(token_ids, params, self._lora_request(lora), request_id or uuid.uuid4().hex)

    def _engine_stream(self, prepared: _Prepared) -> AsyncIterator[RequestOutput]:
        from vllm.inputs import TokensPrompt

        return self._require()[1].generate(
            TokensPrompt(prompt_token_ids=prepared.token_ids),
            prepared.params,
            prepared.request_id,
            lora_request=prepared.lora,
        )

    async def _final_on_loop(self, prepared: _Prepared) -> RequestOutput:
        final = None
        async for output in self._engine_stream(prepared):
            final = output
        if final is None or not final.outputs:
            raise RuntimeError(f"request {prepared.request_id} produced no output")
        return final

    async def _first_step(self, prepared: _Prepared) -> tuple[Any, CompletionOutput]:
        """Run a request that asks for log-probabilities: those of its first step, and its completion."""
        completion = (await self._call(self._final_on_loop(prepared))).outputs[0]
        if not completion.logprobs:
            raise RuntimeError(f"request {prepared.request_id} returned no log-probabilities")
        return completion.logprobs[0], completion

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

    async def _generate(self, prepared: _Prepared) -> GenerationResult:
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
                    if _engine_died(item):
                        raise EngineNotReady(f"engine died: {item}") from item
                    raise item
                yield item
        finally:
            if not future.done():
                future.cancel()  # cancels the engine-side task, which aborts the vLLM request

    async def option_scores(
        self,
        messages: Sequence[ChatMessage],
        options: Sequence[str] = ("1", "2", "3", "4", "5"),
        lora: LoraHandle | None = None,
    ) -> OptionScores:
        """Next-token probabilities of single-token ``options`` after the rendered prompt (one step).

        Uses ``SamplingParams(logprob_token_ids=...)``, which returns log-probabilities (from the raw
        logits, before temperature) for exactly these ids, unlike top-k ``logprobs``.
        """
        self._require()
        ids = self.option_token_ids(options)
        prepared = self._prepare(messages, SamplingOptions(max_tokens=1), "FINAL_ONLY", lora, logprob_token_ids=ids)
        step, _ = await self._first_step(prepared)
        return OptionScores.from_logprobs([step[i].logprob if i in step else -math.inf for i in ids])

    async def next_token_logprobs(
        self, prompt_ids: Sequence[int], token_ids: Sequence[int], lora: LoraHandle | None = None
    ) -> list[tuple[float, bool]]:
        """Per single-token continuation in ``token_ids``: its log-probability after ``prompt_ids`` and
        whether it is the argmax, from ONE greedy one-token request with ``logprob_token_ids`` (the
        log-softmax of the raw logits). No chat template: the ids are the whole prompt."""
        wanted = list(dict.fromkeys(token_ids))
        prepared = self._prepare_ids(
            list(prompt_ids), SamplingOptions(max_tokens=1), "FINAL_ONLY", lora, logprob_token_ids=wanted
        )
        step, completion = await self._first_step(prepared)
        chosen = completion.token_ids[0]
        missing = [t for t in wanted if t not in step]
        if missing:
            raise RuntimeError(f"request {prepared.request_id}: no log-probability for token ids {missing}")
        return [(float(step[t].logprob), t == chosen) for t in token_ids]

    async def continuation_logprobs(
        self,
        prompt: str | list[int],
        continuations: list[str],
        lora: LoraHandle | None = None,
    ) -> list[ContinuationScore]:
        """Log-likelihood of each continuation after ``prompt`` (lm-eval's ``loglikelihood``).

        ``prompt`` is text (tokenised with the continuation as lm-evaluation-harness does, see
        :func:`encode_pair`; no special tokens are added, so render chat templates first) or token
        ids (each continuation is then tokenised on its own and appended). An empty prompt is
        preceded by the BOS (else EOS) token so that the first continuation token has a context.
        One vLLM request per continuation, all in flight together, each with ``prompt_logprobs``
        (vLLM reads no prefix cache for such requests, so each prompt is computed in full).
        """
        self._require()
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        pairs: list[tuple[list[int], list[int]]] = []
        for continuation in continuations:
            if isinstance(prompt, str):
                context_ids, cont_ids = encode_pair(self.tokenizer, prompt, continuation)
            else:
                context_ids, cont_ids = list(prompt), self.encode(continuation)
            if not context_ids:
                prefix = self.tokenizer.bos_token_id
                context_ids = [prefix if prefix is not None else self.tokenizer.eos_token_id]
            if not cont_ids:
                raise ValueError(f"continuation {continuation!r} has no tokens after the prompt")
            if len(context_ids) + len(cont_ids) + 1 > self._max_model_len:
                raise PromptTooLong(len(context_ids) + len(cont_ids), 1, self._max_model_len)
            pairs.append((context_ids, cont_ids))
        params = SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=0, output_kind=RequestOutputKind.FINAL_ONLY
        )
        lora_request = self._lora_request(lora)

        async def one(context_ids: list[int], cont_ids: list[int]) -> ContinuationScore:
            prepared = _Prepared(context_ids + cont_ids, params, lora_request, uuid.uuid4().hex)
            rows = (await self._final_on_loop(prepared)).prompt_logprobs
            if rows is None:
                raise RuntimeError(f"request {prepared.request_id} returned no prompt log-probabilities")
            total, greedy = 0.0, True
            for position, token in enumerate(cont_ids, start=len(context_ids)):
                entry = rows[position]
                if entry is None or token not in entry:
                    raise RuntimeError(f"request {prepared.request_id}: no log-probability at position {position}")
                total += entry[token].logprob
                greedy = greedy and entry[token].rank == 1
            return ContinuationScore(logprob=total, n_tokens=len(cont_ids), n_chars=0, greedy=greedy)

        async def all_on_loop() -> list[ContinuationScore]:
            return list(await asyncio.gather(*(one(c, t) for c, t in pairs)))

        scores = await self._call(all_on_loop())
        return [
            ContinuationScore(s.logprob, s.n_tokens, len(continuation), s.greedy)
            for s, continuation in zip(scores, continuations, strict=True)
        ]

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
