"""Steering vectors on disk: a published vector set, and the folder one steered persona is served from.

Activation steering adds a vector to the residual stream after chosen decoder layers. One vector per
trait and layer (trait-high mean activation minus trait-low, :mod:`trainer.steering` extracts them) is
a **vector set**, a versioned registry artefact like an adapter:

- ``vectors.safetensors``: one tensor per trait, ``[num_layers, hidden]``, the raw difference of means
  after decoder layer ``l`` (row ``l``);
- ``vectors.json``: base model, shapes, the default layers and the calibrated scale per trait, the
  norms, the data hash and how the vectors were made.

A persona's steering is ``sum_t value_t * scale_t * vector_t[l]`` for each chosen layer ``l``
(:func:`steer_rows`). vLLM serves it through a LoRA slot: the persona's **steer folder** is a PEFT
LoRA folder (a rank-1 zero adapter, or the composition of the adapters it is combined with) plus
``big5-steer.safetensors`` (tensor ``steer``, ``[num_layers, hidden]``), written by
:func:`big5engine.compose.compose_adapters` and kept by the composed cache. The engine plugin
(:mod:`big5engine.steering_hook`) reads that file when vLLM loads the adapter and adds the row of the
slot each token maps to after every steered layer, so steered, LoRA and plain requests share one batch,
and the prefix cache keeps them apart (it keys on the adapter).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from big5core.errors import Invalid
from big5core.traits import TRAITS, Trait

if TYPE_CHECKING:  # torch is imported where tensors are made: importing the resolver stays light
    import torch

VECTORS_FILE = "vectors.safetensors"
VECTORS_META = "vectors.json"
STEER_FILE = "big5-steer.safetensors"
STEER_TENSOR = "steer"
FORMAT = "big5-steering-vectors/1"
STEER_LAYOUT = "vectors"
"""The registry layout of a published vector set (method ``steer``)."""


class SteeringError(Invalid):
    """A vector set or steer file that cannot be used (missing, corrupt, or for another model)."""

    code, title = "invalid-steering-vectors", "The steering vectors cannot be used"


@dataclass(frozen=True)
class VectorSet:
    """A published vector set, read back and checked."""

    folder: Path
    vectors: dict[Trait, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.meta["num_layers"])

    @property
    def hidden(self) -> int:
        return int(self.meta["hidden_size"])

    @property
    def layers(self) -> list[int]:
        """The calibrated default layers."""
        return [int(layer) for layer in self.meta["layers"]]

    @property
    def model(self) -> dict[str, int]:
        """The base model's shape (:func:`model_shape`), which a null LoRA for it needs."""
        return {k: int(v) for k, v in self.meta["model"].items()}

    def scale(self, trait: Trait) -> float:
        return float(self.meta["scales"][trait.value])


def write_vector_set(folder: Path, vectors: Mapping[Trait, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Write a vector set into ``folder`` (a staging folder: the registry publishes it)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {t.value: vectors[t].detach().to(torch.float32).contiguous() for t in TRAITS if t in vectors}
    save_file(tensors, str(folder / VECTORS_FILE))
    (folder / VECTORS_META).write_text(json.dumps({"format": FORMAT, **meta}, indent=2, sort_keys=True))


def check_vector_folder(folder: Path, max_rank: int | None = None) -> dict[str, Any]:
    """The registry's check of a vector set before publishing (the shape of ``check_adapter_folder``)."""
    read_vector_set(folder)
    return {"r": 0}


def read_vector_set(folder: Path) -> VectorSet:
    """Read and check a vector set: every trait present, shapes as declared, finite values."""
    import torch

    meta_path, tensor_path = folder / VECTORS_META, folder / VECTORS_FILE
    if not meta_path.is_file() or not tensor_path.is_file():
        raise SteeringError(f"vector set {folder} lacks {VECTORS_META} or {VECTORS_FILE}")
    try:
        meta = json.loads(meta_path.read_text())
        layers, hidden = int(meta["num_layers"]), int(meta["hidden_size"])
        scales = {t: float(meta["scales"][t.value]) for t in TRAITS}
        chosen = [int(layer) for layer in meta["layers"]]
        shape = {k: int(meta["model"][k]) for k in MODEL_KEYS}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SteeringError(f"vector set {folder}: unreadable {VECTORS_META} ({exc})") from None
    if meta.get("format") != FORMAT:
        raise SteeringError(f"vector set {folder}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if shape["num_hidden_layers"] != layers or shape["hidden_size"] != hidden:
        raise SteeringError(f"vector set {folder}: its model shape {shape} disagrees with {(layers, hidden)}")
    if not chosen or any(not 0 <= layer < layers for layer in chosen):
        raise SteeringError(f"vector set {folder}: layers {chosen} outside 0..{layers - 1}")
    if any(not math.isfinite(s) for s in scales.values()):
        raise SteeringError(f"vector set {folder}: a scale is not finite")
    tensors = _load_tensors(tensor_path)
    vectors: dict[Trait, torch.Tensor] = {}
    for trait in TRAITS:
        tensor = tensors.get(trait.value)
        if tensor is None or tuple(tensor.shape) != (layers, hidden):
            shape = None if tensor is None else tuple(tensor.shape)
            raise SteeringError(f"vector set {folder}: {trait.value} has shape {shape}, expected {(layers, hidden)}")
        if not bool(torch.isfinite(tensor).all()):
            raise SteeringError(f"vector set {folder}: {trait.value} has non-finite values")
        vectors[trait] = tensor.to(torch.float32)
    return VectorSet(folder, vectors, meta)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise SteeringError(f"{path}: not a readable safetensors file ({exc})") from None


def steer_rows(
    vectors: VectorSet,
    traits: Mapping[Trait, float],
    *,
    layers: Sequence[int] | None = None,
    scales: Mapping[Trait, float] | None = None,
) -> torch.Tensor:
    """``[num_layers, hidden]``: ``sum_t value_t * scale_t * vector_t[l]`` on the chosen layers, zero elsewhere."""
    import torch

    chosen = list(vectors.layers if layers is None else layers)
    if any(not 0 <= layer < vectors.num_layers for layer in chosen):
        raise SteeringError(f"layers {chosen} outside 0..{vectors.num_layers - 1}")
    rows = torch.zeros(vectors.num_layers, vectors.hidden, dtype=torch.float32)
    for trait, value in traits.items():
        scale = vectors.scale(trait) if scales is None or trait not in scales else float(scales[trait])
        rows[chosen] += float(value) * scale * vectors.vectors[trait][chosen]
    return rows


def rows_digest(rows: torch.Tensor) -> str:
    """A short digest of a steer tensor (part of the served folder's name)."""
    import torch

    return hashlib.sha256(rows.to(torch.float32).contiguous().numpy().tobytes()).hexdigest()[:16]


def read_steer_file(path: Path, num_layers: int | None = None, hidden: int | None = None) -> torch.Tensor:
    """The ``steer`` tensor of a steer folder's file, checked (shape, finite); raises :class:`SteeringError`."""
    import torch

    tensors = _load_tensors(path)
    rows = tensors.get(STEER_TENSOR)
    if rows is None or rows.dim() != 2:
        raise SteeringError(f"{path}: no 2-D {STEER_TENSOR!r} tensor")
    expected = (num_layers or rows.shape[0], hidden or rows.shape[1])
    if tuple(rows.shape) != expected:
        raise SteeringError(f"{path}: steer shape {tuple(rows.shape)}, the model needs {expected}")
    if not bool(torch.isfinite(rows).all()):
        raise SteeringError(f"{path}: steer has non-finite values")
    return rows.to(torch.float32)


@dataclass(frozen=True)
class Steer:
    """Steering for one served folder: ``rows`` ``[num_layers, hidden]``, what made them, and the model's shape."""

    rows: torch.Tensor
    meta: Mapping[str, Any]
    """recorded in the folder's manifest (vector set, traits, layers, scales, digest of the rows)"""
    model: Mapping[str, Any]
    """``hidden_size``, ``num_attention_heads``, ``head_dim``, ``num_hidden_layers`` of the base model"""


MODEL_KEYS = ("hidden_size", "num_attention_heads", "head_dim", "num_hidden_layers")


def model_shape(config: Mapping[str, Any]) -> dict[str, int]:
    """The base-model numbers a null LoRA needs, from its ``config.json``."""
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    return {
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "head_dim": int(config.get("head_dim") or hidden // heads),
        "num_hidden_layers": int(config["num_hidden_layers"]),
    }


def null_lora(model: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A rank-1 LoRA on every ``o_proj`` whose matrices are zero (tensors, adapter config): it gets a
    steered persona a LoRA slot in vLLM and changes nothing else."""
    import torch

    width = int(model["num_attention_heads"]) * int(model["head_dim"])
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(int(model["num_hidden_layers"])):
        key = f"base_model.model.model.layers.{layer}.self_attn.o_proj"
        tensors[f"{key}.lora_A.weight"] = torch.zeros(1, width)
        tensors[f"{key}.lora_B.weight"] = torch.zeros(int(model["hidden_size"]), 1)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 1,
        "lora_alpha": 1,
        "lora_dropout": 0.0,
        "target_modules": ["o_proj"],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
    return tensors, config
