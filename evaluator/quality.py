"""Reply quality: does a persona still converse, beside how strongly it shows its trait?

A trait judge of wording rewards text that a user would not accept (a reply that loops, a stock
opening repeated for every turn, a reply that ignores what was said). These measures sit beside
every trait effect the dialogue assessment reports. Per reply (:func:`reply_quality`, stored with
the reply):

- ``repetition``: the share of the reply's word 3-grams that repeat an earlier 3-gram of the same
  reply, ``(total - distinct) / total`` ("I'm not. I'm not. I'm not." -> 0.5; a real reply ~0);
- ``opening``: the reply's first three words, lower case, punctuation dropped;
- ``relevance``: cosine similarity between the TF-IDF vectors of the user's turn and the reply
  (:class:`Relevance`: word unigrams, English stop words removed, sublinear tf, IDF fitted on every
  Speaker X turn and reply of the dialogue set's source file), so a reply that takes up the user's
  words scores above one that could follow any turn; the real replies of the same scenarios are
  the reference;
- ``perplexity``: exp of the mean negative log-probability per token of the reply under the base
  model with no persona, after the user's turn (the engine's prompt log-probs,
  :func:`base_perplexities`); the real replies' is the reference.

Per set of replies (one trait-level condition, :func:`summarise`): the means with percentile
bootstrap CIs, the share of replies that open with the set's most common opening (collapse), and
distinct-1/2 over the whole set (unique n-grams / all n-grams: a set that says the same things to
every turn scores low).
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from evaluator.stats import bootstrap_ci

REPEAT_N = 3
OPENING_WORDS = 3
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    """Lower-case word tokens (apostrophes kept inside a word: "i'm", "don't")."""
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def repetition(text: str, n: int = REPEAT_N) -> float:
    """Share of the reply's word n-grams that repeat an earlier one of the same reply (0 when it has none)."""
    grams = ngrams(words(text), n)
    if not grams:
        return 0.0
    return (len(grams) - len(set(grams))) / len(grams)


def opening(text: str, k: int = OPENING_WORDS) -> str:
    """The reply's first ``k`` words (lower case, punctuation dropped): what a collapsed set shares."""
    return " ".join(words(text)[:k])


def shared_opening(texts: Sequence[str], k: int = OPENING_WORDS) -> tuple[float | None, str | None]:
    """(share of replies that open with the most common opening, that opening); (None, None) for no replies."""
    openings = [opening(t, k) for t in texts]
    if not openings:
        return None, None
    top, count = Counter(openings).most_common(1)[0]
    return count / len(openings), top


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """Unique word n-grams / all word n-grams over the whole set (None when the set has no n-gram)."""
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else None


class Relevance:
    """TF-IDF cosine between a user's turn and a reply, the IDF fitted once on a reference corpus."""

    def __init__(self, corpus: Sequence[str]) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer

        if not corpus:
            raise ValueError("the relevance model needs a corpus to fit its IDF on")
        self._vectorizer = TfidfVectorizer(stop_words="english", sublinear_tf=True, token_pattern=r"[a-z0-9']{2,}")
        self._vectorizer.fit(list(corpus))

    def scores(self, turns: Sequence[str], replies: Sequence[str]) -> list[float]:
        """Cosine similarity of each (turn, reply) pair, in [0, 1]; 0 when either has no known word."""
        if len(turns) != len(replies):
            raise ValueError(f"{len(turns)} turns but {len(replies)} replies")
        if not turns:
            return []
        a = self._vectorizer.transform(list(turns))
        b = self._vectorizer.transform(list(replies))
        return [float(v) for v in np.asarray(a.multiply(b).sum(axis=1)).ravel()]  # rows are L2-normalised


@functools.lru_cache(maxsize=4)
def relevance_for(source: str) -> Relevance:
    """The relevance model of a dialogue source: IDF over all its Speaker X turns and replies."""
    from big5core.dataset import load_filtered

    rows, _ = load_filtered(source)
    return Relevance([r.speaker_x for r in rows] + [r.speaker_y for r in rows])


@dataclass(frozen=True)
class ReplyQuality:
    repetition: float
    opening: str
    relevance: float | None
    perplexity: float | None
    n_words: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reply_quality(turn: str, reply: str, relevance: Relevance | None, perplexity: float | None) -> ReplyQuality:
    """The per-reply measures of one (turn, reply) pair (relevance and perplexity computed by the caller's models)."""
    rel = relevance.scores([turn], [reply])[0] if relevance is not None else None
    return ReplyQuality(repetition(reply), opening(reply), rel, perplexity, len(words(reply)))


async def base_perplexities(engine: Any, turns: Sequence[str], replies: Sequence[str]) -> list[float | None]:
    """Per-token perplexity of each reply after its user turn, under the base model with no persona.

    One prompt-log-prob request per reply (``engine.continuation_logprobs``, all in flight together),
    the turn rendered with the chat template as a plain user message; None for an empty reply.
    """
    from big5core.prompts import ChatMessage

    async def one(turn: str, reply: str) -> float | None:
        if not reply.strip():
            return None
        prompt = engine.render([ChatMessage(role="user", content=turn)])
        (score,) = await engine.continuation_logprobs(prompt, [reply], lora=None)
        return math.exp(-score.logprob / score.n_tokens) if score.n_tokens else None

    import asyncio

    return list(await asyncio.gather(*(one(t, r) for t, r in zip(turns, replies, strict=True))))


def _mean_ci(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"mean": None, "ci95": None, "n": 0}
    low, high = bootstrap_ci(values)
    return {"mean": float(np.mean(values)), "ci95": [low, high], "n": len(values)}


def summarise(qualities: Sequence[ReplyQuality | dict[str, Any]], texts: Sequence[str]) -> dict[str, Any]:
    """One condition's quality: means with CIs per reply, collapse and distinct-n over its replies.

    ``perplexity`` is summarised in log space (its mean is the geometric mean perplexity, the CI of the
    mean log-perplexity exponentiated), so one reply of perplexity 10^4 does not decide the row.
    """
    rows = [q.to_dict() if isinstance(q, ReplyQuality) else dict(q) for q in qualities]
    rel = [float(r["relevance"]) for r in rows if r.get("relevance") is not None]
    logppl = [math.log(float(r["perplexity"])) for r in rows if r.get("perplexity")]
    ppl = _mean_ci(logppl)
    if ppl["mean"] is not None:
        ppl = {"mean": math.exp(ppl["mean"]), "ci95": [math.exp(v) for v in ppl["ci95"]], "n": ppl["n"]}
    share, top = shared_opening(texts)
    return {
        "n": len(rows),
        "repetition": _mean_ci([float(r["repetition"]) for r in rows]),
        "relevance": _mean_ci(rel),
        "perplexity": ppl,
        "shared_opening": share,
        "top_opening": top,
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "words_mean": float(np.mean([r["n_words"] for r in rows])) if rows else None,
    }


async def real_reply_quality(
    engine: Any, source: str, split: str, scenarios: Sequence[str]
) -> dict[str, tuple[list[str], list[dict[str, Any]]]]:
    """The reference row: every real reply of ``scenarios`` in ``source``, per ``"<trait>|<level>"`` arm,
    measured as the persona's replies are (relevance to its own Speaker X turn, base-model perplexity)."""
    from big5core.dataset import heldout_split, load_filtered

    rows, _ = load_filtered(source)
    if split == "heldout":
        rows = heldout_split(rows)[1]
    wanted = set(scenarios)
    rows = [r for r in rows if r.scenario in wanted and r.speaker_y.strip()]
    model = relevance_for(source)
    ppl = await base_perplexities(engine, [r.speaker_x for r in rows], [r.speaker_y for r in rows])
    out: dict[str, tuple[list[str], list[dict[str, Any]]]] = {}
    for r, p in zip(rows, ppl, strict=True):
        texts, measured = out.setdefault(f"{r.trait.value}|{r.level.value}", ([], []))
        texts.append(r.speaker_y)
        measured.append(reply_quality(r.speaker_x, r.speaker_y, model, p).to_dict())
    return out
