"""Shared by the persona tests: a SQLite registry of small random PEFT adapters on disk (no engine)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from sqlalchemy.orm import Session, sessionmaker

from big5core.models import Adapter, AdapterState
from big5core.settings import Settings
from big5engine.modelstore import sha256_tree
from big5personas.resolver import PersonaResolver
from big5personas.spec import PersonaSpec

BASE = "tiny/llama-test"
MODULES = ("q_proj", "v_proj")


def write_lora(folder: Path, *, seed: int, r: int = 2, base: str = BASE) -> Path:
    """A PEFT-format LoRA folder (random, nonzero A and B) on a hidden-32 one-layer Llama."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module in MODULES:
        key = f"base_model.model.model.layers.0.self_attn.{module}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(r, 32, generator=generator)
        tensors[f"{key}.lora_B.weight"] = torch.randn(32, r, generator=generator)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": list(MODULES),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@dataclass
class Env:
    root: Path
    settings: Settings
    sessions: sessionmaker[Session]
    seed: int = 100

    def add(
        self,
        name: str,
        *,
        method: str = "sft",
        layout: str = "per-trait",
        traits: dict[str, str] | None = None,
        base: str = BASE,
        state: str = AdapterState.READY,
    ) -> Path:
        self.seed += 1
        folder = write_lora(self.root / "adapters" / name, seed=self.seed)
        with self.sessions() as session, session.begin():
            session.add(
                Adapter(
                    name=name,
                    version=1,
                    base_model=base,
                    method=method,
                    layout=layout,
                    traits=traits or {},
                    rank=2,
                    path=str(folder),
                    sha256=sha256_tree(folder),
                    state=state,
                )
            )
        return folder

    def resolver(self, settings: Settings | None = None, demo: object = None) -> PersonaResolver:
        return PersonaResolver(settings or self.settings, self.sessions, BASE, demo)  # type: ignore[arg-type]


def spec(method: str = "sft", **traits: float | str) -> PersonaSpec:
    return PersonaSpec.model_validate({"method": method, "traits": traits or None})
