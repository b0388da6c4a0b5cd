"""A vLLM general plugin: grouped LoRA ops for vLLM's CPU backend.

vLLM's CPU LoRA path (``vllm/lora/ops/torch_ops/lora_ops.py``, used by ``punica_cpu``) computes
every token's LoRA product by first gathering that token's whole adapter matrix
(``lora_b_weights[lora_indices_tensor]``): for a prefill of T tokens it copies T matrices of
``out x rank`` floats for every projection of every layer. On 2 cores that made an adapter request
several times slower than a base request, and log-prob questionnaire scoring (one prefill per item)
about 20x slower. The ops here compute the same products grouped by adapter -- one matrix product
per distinct adapter in the batch, usually one or two -- and give rows with index -1 ("no
adapter") a zero delta, which is also the correct meaning of -1 (upstream, -1 reads the last slot:
vllm-project/vllm PRs #49656 and #48421). Without the plugin :mod:`big5core.lora` falls back to
sending an explicit zero adapter with every base request.

vLLM loads general plugins in every process it starts (API, engine core, workers) through the
``vllm.general_plugins`` entry point declared in ``pyproject.toml``. :func:`register` patches only
on the CPU platform; ``BIG5_VLLM_GROUPED_LORA=0`` turns it off (the serving bench compares both).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

logger = logging.getLogger(__name__)

ENV_SWITCH = "BIG5_VLLM_GROUPED_LORA"


def _delta(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Row t of the result is ``weights[indices[t]] @ inputs[t]``, or zeros where ``indices[t] < 0``."""
    stacked = weights.squeeze(1) if weights.dim() == 4 else weights  # [slots, out, in]
    x = inputs.to(dtype)
    out = x.new_zeros((x.shape[0], stacked.shape[1]))
    if x.shape[0] == 0:
        return out
    present = torch.unique(indices).tolist()
    if len(present) == 1 and present[0] >= 0:  # the common case: the whole batch uses one adapter
        return x @ stacked[present[0]].to(dtype).T
    for slot in present:
        if slot < 0:
            continue
        rows = (indices == slot).nonzero(as_tuple=True)[0]
        out.index_copy_(0, rows, x.index_select(0, rows) @ stacked[slot].to(dtype).T)
    return out


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    outputs = _delta(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    outputs = _delta(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common = min(outputs.shape[1], output_tensor.shape[1])  # adapter and model may pad differently
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    outputs = _delta(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs


PATCHED: dict[str, Any] = {
    "bgmv_shrink": bgmv_shrink,
    "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
}


def enabled() -> bool:
    """Whether vLLM's engine processes will load this plugin: installed, allowed, not switched off."""
    from importlib.metadata import entry_points

    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    allowed = os.environ.get("VLLM_PLUGINS")  # vLLM's allow-list of plugin names, when set
    if allowed is not None and "big5_cpu_lora" not in [name.strip() for name in allowed.split(",")]:
        return False
    return any(e.value == f"{__name__}:register" for e in entry_points(group="vllm.general_plugins"))


def register() -> None:
    """vLLM general-plugin entry point: install the grouped ops on the CPU platform (idempotent)."""
    if not enabled():
        return
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return
        import vllm.lora.ops.torch_ops as torch_ops
        import vllm.lora.ops.torch_ops.lora_ops as lora_ops
        import vllm.lora.punica_wrapper.punica_cpu as punica_cpu
    except ImportError as exc:  # a vLLM without these modules: leave it alone
        logger.warning("big5 grouped LoRA ops not installed: %s", exc)
        return
    for module in (lora_ops, torch_ops, punica_cpu):
        for name, function in PATCHED.items():
            if hasattr(module, name):
                setattr(module, name, function)
    logger.debug("big5 grouped LoRA ops installed for vLLM's CPU backend")
