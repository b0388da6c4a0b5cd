"""Activation steering inside vLLM's forward pass, per request, batched with LoRA.

Installed by the engine plugin (:func:`big5engine.vllm_plugin.register`) in every vLLM process:

- ``WorkerLoRAManager._load_adapter``: after vLLM loads an adapter folder, a ``big5-steer.safetensors``
  in it (:mod:`big5engine.steering`) is read, checked against the model's layer count and width, and
  kept on the loaded adapter; a corrupt file fails the load, so the request fails and nothing is served;
- ``LoRAModelManager.activate_adapter``: when vLLM puts an adapter into a slot, that slot's row of the
  steer table becomes the adapter's vectors (zero for an adapter without them);
- a forward hook on every decoder layer: after layer ``l``, each token gets its slot's row ``l`` added to
  the residual stream (vLLM's decoder layers return ``(mlp_out, residual)``, summed by the next norm, so
  adding to the first adds to the stream). Tokens of requests without an adapter (slot -1) get nothing;
  a layer no active slot steers is skipped with one set lookup.

The token-to-slot map is the one vLLM's punica wrapper already builds for LoRA (``token_lora_indices``),
so steered, LoRA and plain requests run in one batch. It needs eager execution (the engine's default,
``enforce_eager``): a compiled or CUDA-graph forward would freeze the hook's branches.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from big5engine.steering import STEER_FILE, read_steer_file

logger = logging.getLogger(__name__)

_PATCHED: set[str] = set()


class SteerTable:
    """The per-slot steering rows of one LoRA model manager: ``[slots + 1, layers, hidden]``, last row zero."""

    def __init__(self, slots: int, layers: int, hidden: int) -> None:
        self.slots = slots
        self.rows = torch.zeros(slots + 1, layers, hidden)
        self.slot_layers: list[frozenset[int]] = [frozenset()] * slots
        self.steered: frozenset[int] = frozenset()
        self.hook_calls = 0
        """forward passes in which a hook added a vector (read by tests)"""

    def set_slot(self, slot: int, rows: torch.Tensor | None) -> None:
        if rows is None:
            self.rows[slot].zero_()
            self.slot_layers[slot] = frozenset()
        else:
            self.rows[slot].copy_(rows)
            self.slot_layers[slot] = frozenset(int(i) for i in torch.nonzero(rows.abs().sum(dim=1)).flatten())
        self.steered = frozenset().union(*self.slot_layers)

    def add(self, layer: int, hidden: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
        n = hidden.shape[0]
        if layer not in self.steered or token_slots.shape[0] < n:
            return hidden
        slots = token_slots[:n]
        index = torch.where(slots < 0, torch.full_like(slots, self.slots), slots)
        if self.rows.device != hidden.device or self.rows.dtype != hidden.dtype:
            self.rows = self.rows.to(device=hidden.device, dtype=hidden.dtype)
        self.hook_calls += 1
        return hidden + self.rows[:, layer].index_select(0, index)


def _decoder_layers(model: Any) -> list[torch.nn.Module]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise RuntimeError(f"steering needs a model with .model.layers; {type(model).__name__} has none")
    return list(layers)


def _table(manager: Any) -> SteerTable:
    """The manager's steer table, with the decoder-layer hooks installed on first use."""
    table: SteerTable | None = getattr(manager, "_big5_steer", None)
    if table is not None:
        return table
    from vllm.lora.model_manager import DEFAULT_LANGUAGE_WRAPPER_KEY

    layers = _decoder_layers(manager.model)
    config = manager.model.config
    table = SteerTable(manager.lora_slots, len(layers), int(config.hidden_size))
    punica = manager.punica_wrapper_mapping.get(DEFAULT_LANGUAGE_WRAPPER_KEY) or next(
        iter(manager.punica_wrapper_mapping.values())
    )

    def hook_for(index: int) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            if index not in table.steered or not isinstance(output, tuple):
                return None
            hidden = table.add(index, output[0], punica.token_lora_indices)
            return (hidden, *output[1:])

        return hook

    for index, layer in enumerate(layers):
        layer.register_forward_hook(hook_for(index))
    manager._big5_steer = table
    return table


def _loading_steer(original: Any) -> Any:
    def _load_adapter(self: Any, lora_request: Any) -> Any:
        lora = original(self, lora_request)
        path = Path(lora_request.lora_path) / STEER_FILE
        if path.is_file():
            config = self._adapter_manager.model.config
            lora._big5_steer = read_steer_file(path, int(config.num_hidden_layers), int(config.hidden_size))
        return lora

    return _load_adapter


def _activating_steer(original: Any) -> Any:
    def activate_adapter(self: Any, lora_id: int) -> bool:
        written = bool(original(self, lora_id))
        if lora_id not in self.lora_index_to_id:
            return written
        rows = getattr(self._registered_adapters[lora_id], "_big5_steer", None)
        table = getattr(self, "_big5_steer", None)
        if rows is None and table is None:
            return written  # nothing steers yet: no table, no hooks
        _table(self).set_slot(self.lora_index_to_id.index(lora_id), rows)
        return written

    return activate_adapter


def install() -> bool:
    """Patch vLLM's LoRA managers for steering (idempotent). False when this vLLM lacks the hooks used."""
    try:
        from vllm.lora.model_manager import LoRAModelManager
        from vllm.lora.worker_manager import WorkerLoRAManager
    except ImportError as exc:
        logger.warning("big5 steering not installed: %s", exc)
        return False
    for owner, name, make in (
        (WorkerLoRAManager, "_load_adapter", _loading_steer),
        (LoRAModelManager, "activate_adapter", _activating_steer),
    ):
        key = f"{owner.__name__}.{name}"
        if key in _PATCHED:
            continue
        setattr(owner, name, make(getattr(owner, name)))
        _PATCHED.add(key)
    return True
