"""Log-probability scoring: answer options after a chat (questionnaires), next tokens and whole
continuations after raw token ids (the reasoning harness, lm-eval's ``loglikelihood``)."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Sequence

from big5core.generation import ContinuationScore, OptionScores, SamplingOptions
from big5core.prompts import ChatMessage
from big5engine.base import EngineBase, Prepared
from big5engine.errors import PromptTooLong
from big5engine.lora import LoraHandle
from big5engine.option_tokens import encode_pair


class LogprobScoring(EngineBase):
    """The engine's scoring requests (one greedy step with ``logprob_token_ids``, or ``prompt_logprobs``)."""

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
        One vLLM request per continuation, all in flight together, each with ``prompt_logprobs``.

        The requests read the prefix cache (vLLM would skip it for prompt log-probs by default): a
        context scored before (the same question under several answers, the same user turn under
        several replies) is not computed again. vLLM returns log-probs only for the positions it
        computed, so a request whose cached prefix reaches into the continuation (``num_cached_tokens``
        at least the context's length) is run again without the cache. Nothing is detokenised: the
        scores need token ids only.
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
        cached = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=0,
            detokenize=False,
            skip_reading_prefix_cache=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        uncached = cached.clone()
        uncached.skip_reading_prefix_cache = True
        lora_request = self._lora_request(lora)

        async def one(context_ids: list[int], cont_ids: list[int]) -> ContinuationScore:
            prepared = Prepared(context_ids + cont_ids, cached, lora_request, uuid.uuid4().hex)
            output = await self._final_on_loop(prepared)
            if (output.num_cached_tokens or 0) >= len(context_ids):  # a continuation position was not computed
                prepared = Prepared(prepared.token_ids, uncached, lora_request, uuid.uuid4().hex)
                output = await self._final_on_loop(prepared)
            rows = output.prompt_logprobs
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
