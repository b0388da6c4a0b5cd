"""Loading a base model and its experts for DExperts: one PEFT model carrying every expert adapter.

An :class:`ExpertSource` is what a spec's ``expert`` names after resolution: a registry adapter (a
LoRA folder on the same base, loaded into the one PEFT model under its own adapter name), another
model folder (loaded separately; it must share the base's tokenizer), or the base model itself,
prompted with the trait-level (``prompt``). Registry lookup happens in :mod:`trainer.datagen.job`;
this module only loads what it is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from big5core.datagen import DatagenError
from big5core.prompts import DatagenTemplate
from trainer.datagen.dexperts import Member

SourceKind = Literal["adapter", "model", "prompt"]


@dataclass(frozen=True)
class ExpertSource:
    kind: SourceKind
    name: str
    """adapter ref (name@version), model folder, or ``prompt``; recorded in the output rows"""
    path: str | None = None
    sha256: str | None = None
    layout: str | None = None
    """an adapter's layout (per-trait or unified): decides the expert's own messages"""

    @property
    def template(self) -> DatagenTemplate:
        if self.kind == "prompt":
            return DatagenTemplate.EXPERT_INST
        if self.layout == "unified":
            return DatagenTemplate.EXPERT_UNIFIED
        return DatagenTemplate.EXPERT_PLAIN


def device_and_dtype() -> tuple[torch.device, torch.dtype]:
    """CUDA in bfloat16 when present, else the CPU in float32 (bf16 is slow on most CPUs)."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


class SteeringModels:
    """The base model (as a PEFT model once an adapter is added), its tokenizer, and the experts' members."""

    def __init__(self, base_path: str, *, device: torch.device | None = None, dtype: torch.dtype | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        default_device, default_dtype = device_and_dtype()
        self.device = device or default_device
        self.dtype = dtype or default_dtype
        self.base_path = base_path
        self.tokenizer = AutoTokenizer.from_pretrained(base_path)
        self.model: Any = AutoModelForCausalLM.from_pretrained(base_path, dtype=self.dtype).to(self.device).eval()
        self._adapters: dict[str, str] = {}  # adapter folder -> PEFT adapter name
        self._models: dict[str, Any] = {}  # model folder -> loaded model

    def prepare(self, sources: list[ExpertSource]) -> None:
        """Load every source's weights. Call before taking members: adding the first adapter wraps the model."""
        for source in sources:
            if source.kind == "model" and source.path and source.path not in self._models:
                self._models[source.path] = self._load_model(source.path)
            elif source.kind == "adapter" and source.path and source.path not in self._adapters:
                self._add_adapter(source.path)

    @property
    def base(self) -> Member:
        return Member(self.model, None)

    def member(self, source: ExpertSource) -> Member:
        """The member that runs ``source``'s passes (after :meth:`prepare` loaded it)."""
        if source.kind == "prompt":
            return self.base
        if source.path is None:
            raise DatagenError(f"expert {source.name} has no path")
        if source.kind == "model":
            return Member(self._models[source.path], None)
        return Member(self.model, self._adapters[source.path])

    def _add_adapter(self, path: str) -> None:
        from peft import PeftModel

        name = f"expert{len(self._adapters)}"
        if not self._adapters:
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name).eval()
        else:
            self.model.load_adapter(path, adapter_name=name)
        self._adapters[path] = name

    def _load_model(self, path: str) -> Any:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not Path(path).is_dir():
            raise DatagenError(f"expert model folder {path} does not exist")
        theirs = AutoTokenizer.from_pretrained(path)
        if theirs.get_vocab() != self.tokenizer.get_vocab():
            raise DatagenError(f"expert model {path} does not share the base model's tokenizer")
        return AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype).to(self.device).eval()
