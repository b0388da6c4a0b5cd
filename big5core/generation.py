"""What a generation or scoring request asks and gets back: the engine's value types.

Plain dataclasses with no vLLM import, shared by the engine, the service's schemas, the evaluator and
the benches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass
class SamplingOptions:
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None
    ignore_eos: bool = False  # generate max_tokens whatever the model says (benchmarks: equal work per mode)
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # vLLM's: > 1 makes tokens already in the prompt or the reply less likely
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0


@dataclass(frozen=True)
class Decoding:
    """How replies are sampled, apart from length, seed and stops: what ``bench/decoding.py`` compares."""

    temperature: float = 0.0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    def sampling(self, max_tokens: int, seed: int | None = None, **extra: object) -> SamplingOptions:
        return SamplingOptions(max_tokens=max_tokens, seed=seed, **asdict(self), **extra)  # type: ignore[arg-type]


DEFAULT_DECODING = Decoding(temperature=0.7, frequency_penalty=0.5, presence_penalty=0.3)
"""The service's and the dialogue assessment's decoding when a request leaves it unset, chosen by
``bench/dialogue_quality.py`` (docs/RESULTS.md, 2026-12-07): greedy loops (22-23% of a reply's word 3-grams
repeat, per-trait SFT); T=0.7 alone leaves ~1%; vLLM's repetition penalty also penalises the user's words and
cuts relevance to 0.1-0.15x the real replies'; frequency and presence penalties count only the reply's own
tokens: repetition ~0, relevance at the real replies' level, the judge gap kept. A request may still ask for
greedy (temperature 0, penalties 0)."""

GREEDY = Decoding()


@dataclass
class GenerationResult:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass
class GenerationChunk:
    delta_text: str
    finish_reason: str | None
    completion_tokens: int  # generated so far (cumulative)


@dataclass
class OptionScores:
    probs: list[float] | None  # next-token probabilities normalised over the options; None: no option has any
    raw: list[float]  # the unnormalised next-token probabilities
    mass: float  # sum(raw): how much of the next-token distribution falls on the options

    @classmethod
    def from_logprobs(cls, logprobs: Sequence[float]) -> OptionScores:
        """Normalise in log space (a softmax over the options), so that a tiny mass still has a
        distribution; only when every option has probability exactly zero is there none."""
        raw = [math.exp(lp) for lp in logprobs]
        finite = [lp for lp in logprobs if lp > -math.inf]
        if not finite:
            return cls(probs=None, raw=raw, mass=0.0)
        top = max(finite)
        weights = [math.exp(lp - top) for lp in logprobs]
        total = sum(weights)
        return cls(probs=[w / total for w in weights], raw=raw, mass=sum(raw))


@dataclass(frozen=True)
class ContinuationScore:
    """Log-likelihood of one continuation after a prompt (lm-evaluation-harness ``loglikelihood``)."""

    logprob: float  # sum of the continuation tokens' log-probabilities
    n_tokens: int  # tokens in the continuation (as tokenised after the prompt)
    n_chars: int  # characters in the continuation string (lm-eval's ``acc_norm`` divides by this)
    greedy: bool  # every continuation token is the argmax at its position
