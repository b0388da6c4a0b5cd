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
