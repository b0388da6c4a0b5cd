"""A persona as an lm-evaluation-harness model, registered under ``big5``.

``loglikelihood`` and ``generate_until`` go through the project's engine (:class:`PersonaEngine` on
vLLM) with the persona resolved by :class:`PersonaResolver`, so ``big5/sft?conscientiousness=1``,
composed vectors, ``prompt``, ``demo`` and ``direct`` mean what they mean in ``/v1/generate``: the
persona's prefix (the paper's instruction for a unified adapter, Prompt-Inst, Prompt-Demo) goes in
front of the text, as :func:`big5core.prompts.with_prefix` puts it in front of the user turn, and
its adapter serves every request. With lm-eval's ``apply_chat_template`` the prefix goes into the
last user turn before the model's chat template is applied, exactly as in a chat request.

Many :class:`Big5LM` instances share one started engine (``engine=``), so personas evaluated at the
same time (threads, see :mod:`evaluator.reasoning.harness`) share its batches (multi-LoRA). Built from
lm-eval's CLI (``--model big5 --model_args persona=...``), the first instance builds the stack from
the settings and starts a process-wide engine, shut down at exit.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
from collections import defaultdict
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry, register_model

from big5core.generation import SamplingOptions
from big5core.prompts import ChatMessage, with_prefix
from big5engine.engine import PersonaEngine
from big5engine.option_tokens import encode_pair
from big5personas.resolver import PersonaResolver, ResolvedPersona
from big5personas.spec import KEY_PREFIX, PersonaSpec

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance

    from big5engine.lora import LoraHandle
    from big5personas.stack import Stack

logger = logging.getLogger(__name__)
T = TypeVar("T")

if len(model_registry) == 0:  # lm-eval fills its registry lazily when it is empty: keep its own models
    import lm_eval.models  # noqa: F401


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run an engine coroutine from synchronous code (lm-eval's API is synchronous)."""
    return asyncio.run(coro)


def persona_spec(persona: str | PersonaSpec) -> PersonaSpec:
    if isinstance(persona, PersonaSpec):
        return persona
    text = str(persona).strip()
    return PersonaSpec.from_model_name(text if text.lower().startswith(KEY_PREFIX) else KEY_PREFIX + text)


class _Runtime:
    """The stack and started engine that CLI-built instances share (one per process)."""

    _lock = threading.Lock()
    stack: Stack | None = None
    engine: PersonaEngine | None = None

    @classmethod
    def get(cls) -> tuple[Stack, PersonaEngine]:
        with cls._lock:
            if cls.stack is None or cls.engine is None:
                from big5core.settings import get_settings
                from big5personas.stack import build_stack

                cls.stack = build_stack(get_settings())
                cls.engine = cls.stack.make_engine()
                cls.engine.start()
                atexit.register(cls.close)
            return cls.stack, cls.engine

    @classmethod
    def close(cls) -> None:
        with cls._lock:
            if cls.engine is not None:
                cls.engine.shutdown()
            if cls.stack is not None:
                cls.stack.close()
            cls.stack = cls.engine = None


@register_model("big5")
class Big5LM(LM):
    """lm-eval model: ``persona`` (``big5/sft?neuroticism=-1``, ``direct``, ...) on the project's engine."""

    def __init__(
        self,
        persona: str | PersonaSpec = "big5/direct",
        *,
        engine: PersonaEngine | None = None,
        resolver: PersonaResolver | None = None,
        resolved: ResolvedPersona | None = None,
        lora: LoraHandle | None = None,
        max_gen_toks: int = 256,
        **_ignored: Any,  # batch_size, max_batch_size, device: the engine batches by itself
    ) -> None:
        super().__init__()
        if engine is None or (resolver is None and resolved is None):
            stack, shared = _Runtime.get()
            engine = engine or shared
            resolver = resolver or stack.resolver
        self.engine = engine
        if resolved is None:
            assert resolver is not None
            resolved = resolver.resolve(persona_spec(persona))
        self.persona = resolved
        self.max_gen_toks = int(max_gen_toks)
        if lora is None and resolved.adapter_name is not None and resolved.adapter_path is not None:
            lora = run_sync(engine.register_lora(resolved.adapter_name, resolved.adapter_path))
        self.lora = lora
        self._rendered: set[str] = set()  # contexts built by apply_chat_template (prefix already inside)

    # ------------------------------------------------------------ prompts

    def prompt(self, context: str) -> str:
        """The text the engine scores: the persona's prefix in front of ``context`` (blank line between)."""
        if context in self._rendered or not self.persona.prefix:
            return context
        return with_prefix([ChatMessage(role="user", content=context)], self.persona.prefix)[0]["content"]

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        messages = self.persona.apply([ChatMessage(role=m["role"], content=m["content"]) for m in chat_history])
        text = str(
            self.engine.tokenizer.apply_chat_template(
                [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
            )
        )
        self._rendered.add(text)
        return text

    @property
    def tokenizer_name(self) -> str:
        return str(self.engine.model_path).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.engine.tokenizer, "chat_template", None)

    def get_model_info(self) -> dict[str, Any]:
        return {"model_source": "big5", "persona": self.persona.key, "resolved_persona": self.persona.report()}

    # ------------------------------------------------------------ requests

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Per request (context, continuation): summed log-probability and greedy, one engine call per context."""
        by_context: dict[str, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            by_context[request.args[0]].append(index)

        async def score_all() -> list[tuple[float, bool]]:
            out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)

            async def one(context: str, indices: list[int]) -> None:
                scores = await self.score(context, [requests[i].args[1] for i in indices])
                for i, score in zip(indices, scores, strict=True):
                    out[i] = score

            await asyncio.gather(*(one(c, idx) for c, idx in by_context.items()))
            return out

        results = run_sync(score_all())
        for request, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    async def score(self, context: str, continuations: list[str]) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) of each continuation after the persona's prompt for ``context``.

        When every continuation is one token after the same context tokens (letter answers: MMLU,
        CommonsenseQA), one next-token request gives them all (and can reuse the prefix cache);
        otherwise :meth:`PersonaEngine.continuation_logprobs` scores each continuation's tokens.
        """
        prompt = self.prompt(context)
        pairs = [encode_pair(self.engine.tokenizer, prompt, c) for c in continuations]
        head = pairs[0][0]
        if head and all(len(cont) == 1 and ctx == head for ctx, cont in pairs):
            return await self.engine.next_token_logprobs(head, [cont[0] for _, cont in pairs], self.lora)
        scores = await self.engine.continuation_logprobs(prompt, continuations, self.lora)
        return [(s.logprob, s.greedy) for s in scores]

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError("big5: perplexity tasks (loglikelihood_rolling) are not supported")

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when the task asks) generation until a stop string, through the engine."""

        async def generate_all() -> list[str]:
            return list(await asyncio.gather(*(self._generate(r.args[0], dict(r.args[1])) for r in requests)))

        results = run_sync(generate_all())
        for request, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("generate_until", request.args, result)
        return results

    async def _generate(self, context: str, kwargs: dict[str, Any]) -> str:
        until = kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        max_tokens = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        sampled = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0)) if sampled else 0.0
        options = SamplingOptions(max_tokens=max_tokens, temperature=temperature, stop=until or None, seed=0)
        return await generate_text(self.engine, self.prompt(context), options, self.lora)


async def generate_text(
    engine: PersonaEngine, prompt: str, sampling: SamplingOptions, lora: LoraHandle | None = None
) -> str:
    """Generate from raw text (no chat template: lm-eval has rendered it or wants none).

    The context is cut from the left to fit, as lm-eval's HF model does.
    """
    token_ids = engine.encode(prompt)
    room = engine.max_model_len - sampling.max_tokens
    if room < 1:
        raise ValueError(f"max_gen_toks {sampling.max_tokens} leaves no room in context {engine.max_model_len}")
    return (await engine.generate_ids(token_ids[-room:], sampling, lora)).text
