"""``PersonaEngine.continuation_logprobs`` on the real vLLM engine against Hugging Face transformers.

The reference is the bundled model run by ``transformers`` in float32 on the same token ids: the
sum of ``log_softmax`` over the continuation positions and whether each token is the argmax.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from big5core.generation import ContinuationScore
from big5core.prompts import ChatMessage
from big5engine.engine import PersonaEngine
from big5engine.option_tokens import encode_pair

LABELS = [
    "Very inaccurate",
    "Moderately inaccurate",
    "Neither accurate nor inaccurate",
    "Moderately accurate",
    "Very accurate",
]


def reference(model_path: Path, context_ids: list[int], cont_ids: list[int]) -> tuple[float, bool]:
    import torch

    model = _hf_model(str(model_path))
    ids = torch.tensor([context_ids + cont_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    total, greedy = 0.0, True
    for position, token in enumerate(cont_ids, start=len(context_ids)):
        row = logprobs[position - 1]
        total += float(row[token])
        greedy = greedy and int(row.argmax()) == token
    return total, greedy


_MODELS: dict[str, Any] = {}


def _hf_model(path: str) -> Any:
    if path not in _MODELS:
        import torch
        from transformers import AutoModelForCausalLM

        _MODELS[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return _MODELS[path]


@pytest.mark.slow
def test_continuation_logprobs_match_transformers(engine: PersonaEngine, bundled_model_path: Path) -> None:
    item = "Rate how accurately this describes you: 'I am the life of the party.'"
    prompt = engine.render([ChatMessage(role="user", content=item)])
    continuations = [*LABELS, "The capital of France is Paris."]
    scores = asyncio.run(engine.continuation_logprobs(prompt, continuations))
    assert len(scores) == len(continuations) and all(isinstance(s, ContinuationScore) for s in scores)
    for continuation, score in zip(continuations, scores, strict=True):
        context_ids, cont_ids = encode_pair(engine.tokenizer, prompt, continuation)
        expected, greedy = reference(bundled_model_path, context_ids, cont_ids)
        assert score.n_tokens == len(cont_ids) and score.n_chars == len(continuation)
        assert score.logprob == pytest.approx(expected, abs=2e-3 * max(1, len(cont_ids)))
        assert score.greedy == greedy
        assert score.logprob < 0


@pytest.mark.slow
def test_continuation_logprobs_with_token_prompt_and_greedy(engine: PersonaEngine, bundled_model_path: Path) -> None:
    prompt_ids = engine.encode("One, two, three, four, five, six, seven,")
    # " eight" is what the model continues with (greedy); " banana" is not
    scores = asyncio.run(engine.continuation_logprobs(prompt_ids, [" eight", " banana"]))
    for continuation, score in zip([" eight", " banana"], scores, strict=True):
        expected, greedy = reference(bundled_model_path, prompt_ids, engine.encode(continuation))
        assert score.logprob == pytest.approx(expected, abs=2e-3 * max(1, score.n_tokens))
        assert score.greedy == greedy
    assert scores[0].greedy and not scores[1].greedy
    assert scores[0].logprob > scores[1].logprob


@pytest.mark.slow
def test_continuation_logprobs_empty_prompt_and_errors(engine: PersonaEngine) -> None:
    (score,) = asyncio.run(engine.continuation_logprobs("", ["Hello"]))
    assert score.n_tokens == len(engine.encode("Hello")) and score.logprob < 0
    with pytest.raises(ValueError, match="no tokens"):
        asyncio.run(engine.continuation_logprobs("Hello", [""]))


@pytest.mark.slow
def test_continuation_logprobs_reuse_the_prefix_cache_and_rerun_when_it_reaches_the_continuation(
    engine: PersonaEngine, bundled_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A context scored again is read from the prefix cache (its log-probs still match transformers); a
    request whose cached prefix covers part of the continuation (the same pair scored twice) is rerun
    without the cache, since vLLM returns no log-probs for positions it did not compute."""
    turn = " ".join(["I spent the whole weekend repainting the fence, and the neighbours kept stopping by."] * 4)
    prompt = engine.render([ChatMessage(role="user", content=turn)])
    continuations = [
        "That sounds like a lot of work, but also a nice way to meet the people who live around you, and a "
        "fence that looks new again is worth a weekend.",
        "Why bother?",
    ]
    seen: list[tuple[int, int, bool]] = []  # (prompt tokens, cached tokens, cache read)
    original = engine._final_on_loop

    async def spy(prepared: Any) -> Any:
        output = await original(prepared)
        seen.append(
            (len(prepared.token_ids), output.num_cached_tokens or 0, not prepared.params.skip_reading_prefix_cache)
        )
        return output

    monkeypatch.setattr(engine, "_final_on_loop", spy)
    context_len = len(encode_pair(engine.tokenizer, prompt, continuations[0])[0])
    assert context_len > 2 * 32  # two KV blocks of the context can be cached
    expected = [reference(bundled_model_path, *encode_pair(engine.tokenizer, prompt, c)) for c in continuations]
    for attempt in range(3):
        seen.clear()
        scores = asyncio.run(engine.continuation_logprobs(prompt, continuations))
        for score, (logprob, greedy) in zip(scores, expected, strict=True):
            assert score.logprob == pytest.approx(logprob, abs=2e-3 * score.n_tokens), attempt
            assert score.greedy == greedy
        reads = [(cached, read) for _, cached, read in seen]
        reruns = sum(1 for _, read in reads if not read)
        # a rerun follows exactly the cache reads that reached the continuation
        assert reruns == sum(1 for cached, read in reads if read and cached >= context_len)
        if attempt:  # warm: the long pair's full KV blocks reach into its reply, so it is rerun
            assert reruns >= 1 and all(cached > 0 for cached, read in reads if read)
    seen.clear()
    (score,) = asyncio.run(engine.continuation_logprobs(prompt, ["A new reply that was never scored before."]))
    assert len(seen) == 1 and 0 < seen[0][1] < context_len  # the context's blocks read, the reply computed
    logprob, _ = reference(
        bundled_model_path, *encode_pair(engine.tokenizer, prompt, "A new reply that was never scored before.")
    )
    assert score.logprob == pytest.approx(logprob, abs=2e-3 * score.n_tokens)
