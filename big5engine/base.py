"""What generation and scoring share: the engine's state, its tokenizer, and the request plumbing.

Every public coroutine of :class:`~big5engine.engine.PersonaEngine` submits its work to the engine's
private loop (:class:`~big5engine.loop.LoopThread`) through :meth:`EngineBase._call` and builds vLLM's
request pieces with :meth:`EngineBase._prepare`. vLLM is imported only inside methods.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from big5core.generation import SamplingOptions
from big5core.prompts import ChatMessage
from big5engine.errors import EngineNotReady, PromptTooLong, engine_died
from big5engine.loop import LoopThread
from big5engine.lora import LoraHandle
from big5engine.option_tokens import OptionTokenCheck, check_option_tokens

if TYPE_CHECKING:
    from vllm import CompletionOutput, RequestOutput, SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

T = TypeVar("T")


@dataclass
class Prepared:
    token_ids: list[int]
    params: SamplingParams
    lora: LoRARequest | None
    request_id: str


class EngineBase:
    """The state an engine's requests read, its tokenizer, and how a request reaches the engine loop."""

    def __init__(self, model_path: str, *, enable_lora: bool, max_model_len: int) -> None:
        self.model_path = model_path
        self.enable_lora = enable_lora
        self._llm: AsyncLLM | None = None
        self._thread: LoopThread | None = None
        self._tokenizer_lock = threading.Lock()
        self._tokenizer: Any = None
        self._option_checks: dict[tuple[str, ...], OptionTokenCheck] = {}
        self._starting = False
        self._error: str | None = None
        self._max_model_len = max_model_len
        self._zero: LoraHandle | None = None

    @property
    def error(self) -> str | None:
        if self._llm is not None and self._llm.errored:
            return f"engine died: {self._llm.dead_error!r}" + (f"; {self._error}" if self._error else "")
        return self._error

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

    def _require(self) -> tuple[LoopThread, AsyncLLM]:
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
            if engine_died(exc):  # requests in flight when the engine core died: not ready, not a bug
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
    ) -> Prepared:
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
    ) -> Prepared:
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
        return Prepared(token_ids, params, self._lora_request(lora), request_id or uuid.uuid4().hex)

    def _engine_stream(self, prepared: Prepared) -> AsyncIterator[RequestOutput]:
        from vllm.inputs import TokensPrompt

        return self._require()[1].generate(
            TokensPrompt(prompt_token_ids=prepared.token_ids),
            prepared.params,
            prepared.request_id,
            lora_request=prepared.lora,
        )

    async def _final_on_loop(self, prepared: Prepared) -> RequestOutput:
        final = None
        async for output in self._engine_stream(prepared):
            final = output
        if final is None or not final.outputs:
            raise RuntimeError(f"request {prepared.request_id} produced no output")
        return final

    async def _first_step(self, prepared: Prepared) -> tuple[Any, CompletionOutput]:
        """Run a request that asks for log-probabilities: those of its first step, and its completion."""
        completion = (await self._call(self._final_on_loop(prepared))).outputs[0]
        if not completion.logprobs:
            raise RuntimeError(f"request {prepared.request_id} returned no log-probabilities")
        return completion.logprobs[0], completion
