"""Activation steering in the real vLLM engine: per request, batched with plain and LoRA requests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from big5core.generation import SamplingOptions
from big5core.prompts import ChatMessage
from big5engine.engine import PersonaEngine
from big5engine.steering import STEER_FILE, write_steer_folder
from tests.engine_support import engine_model_path, start_test_engine

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
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PersonaEngine]:
    started = start_test_engine(tmp_path_factory.mktemp("steer-engine"))
    yield started
    started.shutdown()


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("steer")
    made = {}
    for name, rows in {
        "zero": torch.zeros_like(_rows(0, [], 0.0)),
        "strong": _rows(1, [8, 9, 10], 40.0),
        "other": _rows(2, [12], 40.0),
    }.items():
        write_steer_folder(root / name, rows, _config(), None)
        made[name] = root / name
    corrupt = root / "corrupt"
    write_steer_folder(corrupt, _rows(3, [5], 1.0), _config(), None)
    (corrupt / STEER_FILE).write_bytes((corrupt / STEER_FILE).read_bytes()[:40])
    made["corrupt"] = corrupt
    return made


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


def test_corrupt_steer_file_is_refused(engine: PersonaEngine, folders: dict[str, Path]) -> None:
    async def run() -> None:
        handle = await engine.register_lora("steer-corrupt", folders["corrupt"])
        await engine.generate(PROMPTS[0], GREEDY, lora=handle)

    with pytest.raises(Exception, match="safetensors|steer"):
        asyncio.run(run())
    base = _texts(engine, [engine.generate(PROMPTS[0], GREEDY)])  # the engine still serves
    assert base and base[0]
