"""Helpers for the service tests: random PEFT adapters on the bundled model, publishing, SSE parsing."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from big5core.db import transaction
from big5engine.lora import LLAMA_TARGET_MODULES
from big5personas import registry
from big5personas.stack import Stack
from service.errors import PROBLEM_BASE

QUESTION = "Describe your ideal weekend in two sentences."


@contextlib.contextmanager
def serve_over_http(app: Any, *, start_timeout: float = 120.0) -> Iterator[str]:
    """Run ``app`` (its lifespan included) with uvicorn on a free local port; yields its base URL."""
    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True  # the lifespan's exit cancels what the requests started
        thread.join(timeout=120)


def build_random_loras(model_path: Path, out_root: Path, seeds: Sequence[int]) -> dict[int, Path]:
    """Rank-8 PEFT adapters on all seven projections with random, NONZERO A and B (one per seed).

    The base model is loaded once; each seed re-draws the LoRA weights and saves a folder.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=list(LLAMA_TARGET_MODULES), init_lora_weights=False, bias="none"
    )
    model = get_peft_model(base, config)
    folders: dict[int, Path] = {}
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_A" in name:
                    bound = 1.0 / math.sqrt(param.shape[1])
                    param.copy_((torch.rand(param.shape, generator=generator) * 2 - 1) * bound)
                elif "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.08)
        folder = out_root / f"seed-{seed}"
        model.save_pretrained(folder)
        folders[seed] = folder
    return folders


@dataclass
class Loras:
    folders: dict[int, Path]

    def publish(
        self,
        stack: Stack,
        name: str,
        traits: dict[str, Any],
        seed: int,
        *,
        method: str = "sft",
        layout: str = "per-trait",
    ) -> str:
        """Copy the seed's adapter into staging and publish it as ready; returns name@version."""
        staged = registry.staging_dir(stack.settings.adapters_dir)
        shutil.copytree(self.folders[seed], staged, dirs_exist_ok=True)
        with transaction(stack.sessions) as session:
            row = registry.publish(
                session,
                staged,
                stack.settings.adapters_dir,
                name=name,
                base_model=stack.base_model_id,
                method=method,
                layout=layout,
                traits=traits,
                max_rank=stack.settings.engine.max_lora_rank,
            )
            return row.ref


def sse_events(lines: Iterable[str]) -> list[tuple[str, str]]:
    """(event name, data) pairs of a text/event-stream; unnamed events are "message"."""
    events: list[tuple[str, str]] = []
    name, data = "message", []
    for line in lines:
        if line == "":
            if data:
                events.append((name, "\n".join(data)))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[len("event:") :].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:") :].strip())
    if data:
        events.append((name, "\n".join(data)))
    return events


def sse_from_text(text: str) -> list[tuple[str, Any]]:
    """Parsed events; JSON data decoded (``[DONE]`` stays a string)."""
    out: list[tuple[str, Any]] = []
    for name, data in sse_events(text.splitlines()):
        out.append((name, data if data == "[DONE]" else json.loads(data)))
    return out


def generate_body(**fields: Any) -> dict[str, Any]:
    """A greedy /v1/generate body for QUESTION (fields override)."""
    return {"prompt": QUESTION, "temperature": 0.0, "max_tokens": 24, **fields}


def assert_problem(response: Any, status: int, slug: str) -> dict[str, Any]:
    """``response`` is an RFC 9457 problem of ``status`` and type ``slug``; returns its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["type"] == PROBLEM_BASE + slug
    assert body["status"] == status
    assert body["title"] and body["detail"] and body["instance"]
    return body
