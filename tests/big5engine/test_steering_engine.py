"""Activation steering in the real vLLM engine (the session's): per request, batched with plain requests."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from big5core.generation import SamplingOptions
from big5core.prompts import ChatMessage
from big5engine.compose import compose_adapters
from big5engine.engine import PersonaEngine
from big5engine.steering import STEER_FILE, Steer, model_shape
from tests.engine_support import engine_model_path

GREEDY = SamplingOptions(max_tokens=24)
PROMPTS = [
    [ChatMessage(role="user", content="How do you feel about meeting new people?")],
    [ChatMessage(role="user", content="What did you do last weekend?")],
]


def _config() -> dict:
    return json.loads((Path(engine_model_path()) / "config.json").read_text())


def _rows(seed: int, layers: list[int], norm: float) -> torch.Tensor:
    config = _config()
    rows = torch.zeros(config["num_hidden_layers"], config["hidden_size"])
    generator = torch.Generator().manual_seed(seed)
    for layer in layers:
        vector = torch.randn(config["hidden_size"], generator=generator)
        rows[layer] = vector / vector.norm() * norm
    return rows


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("steer")
    made = {}
    for name, rows in {
        "zero": torch.zeros_like(_rows(0, [], 0.0)),
        "strong": _rows(1, [8, 9, 10], 40.0),
        "other": _rows(2, [12], 40.0),
    }.items():
        compose_adapters([], root / name, steer=Steer(rows, {"test": name}, model_shape(_config())))
        made[name] = root / name
    made["lora"] = _random_lora(root / "lora")
    steer = Steer(_rows(4, [10], 40.0), {"test": "lora+steer"}, model_shape(_config()))
    compose_adapters([(made["lora"], 1.0)], root / "lora-steer", steer=steer)
    made["lora-steer"] = root / "lora-steer"
    corrupt = root / "corrupt"
    compose_adapters([], corrupt, steer=Steer(_rows(3, [5], 1.0), {"test": "corrupt"}, model_shape(_config())))
    (corrupt / STEER_FILE).write_bytes((corrupt / STEER_FILE).read_bytes()[:40])
    made["corrupt"] = corrupt
    return made


def _random_lora(folder: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(engine_model_path(), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], bias="none"))
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    model.save_pretrained(str(folder))
    return folder


def _texts(engine: PersonaEngine, calls: list) -> list[str]:
    async def run() -> list[str]:
        return [r.text for r in await asyncio.gather(*calls)]

    return asyncio.run(run())


def test_zero_vector_gives_exactly_the_base_output(engine: PersonaEngine, folders: dict[str, Path]) -> None:
    async def run() -> tuple[list[str], list[str]]:
        zero = await engine.register_lora("steer-zero", folders["zero"])
        base = [(await engine.generate(p, GREEDY)).text for p in PROMPTS]
        steered = [(await engine.generate(p, GREEDY, lora=zero)).text for p in PROMPTS]
        return base, steered

    base, steered = asyncio.run(run())
    assert steered == base


def test_steering_changes_the_reply_and_batches_with_plain_requests(
    engine: PersonaEngine, folders: dict[str, Path]
) -> None:
    async def run() -> tuple[list[str], list[str], list[str]]:
        strong = await engine.register_lora("steer-strong", folders["strong"])
        other = await engine.register_lora("steer-other", folders["other"])
        alone = []
        for handle in (None, strong, other):
            alone += [(await engine.generate(p, GREEDY, lora=handle)).text for p in PROMPTS]
        together = await asyncio.gather(
            *(engine.generate(p, GREEDY, lora=h) for h in (None, strong, other) for p in PROMPTS)
        )
        again = await asyncio.gather(
            *(engine.generate(p, GREEDY, lora=h) for h in (other, None, strong) for p in PROMPTS)
        )
        return alone, [r.text for r in together], [r.text for r in again]

    alone, together, again = asyncio.run(run())
    n = len(PROMPTS)
    base, strong, other = alone[:n], alone[n : 2 * n], alone[2 * n :]
    assert strong != base and other != base and strong != other  # a vector of norm 40 moves the text
    assert together == alone  # each request in a mixed batch decodes as it does alone
    assert again == other + base + strong


def test_steering_combines_with_an_adapter_in_one_request_and_batches_with_it(
    engine: PersonaEngine, folders: dict[str, Path]
) -> None:
    async def run() -> tuple[list[str], list[str]]:
        handles = [
            None,
            await engine.register_lora("plain-lora", folders["lora"]),
            await engine.register_lora("lora-steer", folders["lora-steer"]),
            await engine.register_lora("steer-strong", folders["strong"]),
        ]
        alone = [(await engine.generate(p, GREEDY, lora=h)).text for h in handles for p in PROMPTS]
        together = await asyncio.gather(*(engine.generate(p, GREEDY, lora=h) for h in handles for p in PROMPTS))
        return alone, [r.text for r in together]

    alone, together = asyncio.run(run())
    n = len(PROMPTS)
    base, lora, lora_steer = alone[:n], alone[n : 2 * n], alone[2 * n : 3 * n]
    assert lora != base and lora_steer != lora  # the adapter moves the text, and the vector moves it further
    assert together == alone  # base, adapter, adapter + vector and vector alone in one batch


def test_corrupt_steer_file_is_refused(engine: PersonaEngine, folders: dict[str, Path]) -> None:
    async def run() -> None:
        handle = await engine.register_lora("steer-corrupt", folders["corrupt"])
        await engine.generate(PROMPTS[0], GREEDY, lora=handle)

    with pytest.raises(Exception, match="safetensors|steer"):
        asyncio.run(run())
    base = _texts(engine, [engine.generate(PROMPTS[0], GREEDY)])  # the engine still serves
    assert base and base[0]
