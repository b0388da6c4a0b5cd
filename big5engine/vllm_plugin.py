"""A vLLM general plugin: grouped LoRA ops for vLLM's CPU backend.

vLLM's CPU LoRA path (``vllm/lora/ops/torch_ops/lora_ops.py``, used by ``punica_cpu``) computes
every token's LoRA product by first gathering that token's whole adapter matrix
(``lora_b_weights[lora_indices_tensor]``): for a prefill of T tokens it copies T matrices of
``out x rank`` floats for every projection of every layer. On 2 cores that made an adapter request
several times slower than a base request, and log-prob questionnaire scoring (one prefill per item)
about 20x slower. The ops here compute the same products grouped by adapter -- one matrix product
per distinct adapter in the batch, usually one or two -- and give rows with index -1 ("no
adapter") a zero delta, which is also the correct meaning of -1 (upstream, -1 reads the last slot:
vllm-project/vllm PRs #49656 and #48421). Without the plugin :mod:`big5engine.lora` falls back to
sending an explicit zero adapter with every base request.

vLLM loads general plugins in every process it starts (API, engine core, workers) through the
``vllm.general_plugins`` entry point declared in ``pyproject.toml``. :func:`register` patches only
on the CPU platform; ``BIG5_VLLM_GROUPED_LORA=0`` turns it off (the serving bench compares both).

On top of the three ops, the plugin replaces the CPU punica wrapper's ``add_lora_linear`` -- the call
every LoRA linear layer makes -- with the segmented path of :mod:`big5engine.sgmv`: one shrink and one
expand product per projection per batch, fused slices, ranks trimmed, base rows skipped. The wrapper's
``update_metadata`` builds the per-step row plan, and ``LoRAModelManager.activate_adapter`` marks the
slot it writes so packed weights are rebuilt for it. ``BIG5_VLLM_SGMV_LORA=0`` keeps the grouped ops
alone (for comparison). ``add_lora_logits`` skips the LM-head delta when no loaded adapter has one
(prompt log-probs in a batch of several adapters crashed the engine otherwise).

On every platform it also installs activation steering (:mod:`big5engine.steering_hook`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from big5engine import sgmv, steering_hook

logger = logging.getLogger(__name__)

ENV_SWITCH = "BIG5_VLLM_GROUPED_LORA"
SGMV_SWITCH = "BIG5_VLLM_SGMV_LORA"


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


SLOT_VERSIONS = sgmv.SlotVersions()
"""Loads into each adapter slot in this process (bumped by the patched ``activate_adapter``)."""

_ORIGINALS: dict[str, Any] = {}


def _plan_after(original: Any) -> Any:
    def update_metadata(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self._big5_plan = sgmv.plan_rows(self.token_lora_indices)

    update_metadata._big5 = True  # type: ignore[attr-defined]
    return update_metadata


def _segmented_linear(original: Any) -> Any:
    def add_lora_linear(
        self: Any,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: tuple[torch.Tensor, ...],
        lora_b_stacked: tuple[torch.Tensor, ...],
        scale: float,
        output_slices: tuple[int, ...],
        **kwargs: Any,
    ) -> Any:
        plan: sgmv.RowPlan | None = getattr(self, "_big5_plan", None)
        rows = x.reshape(-1, x.shape[-1])
        usual = (
            plan is not None
            and plan.num_rows == rows.shape[0] == y.shape[0]
            and y.dim() == 2
            and kwargs.get("add_inputs", True)
            and tuple(int(b.shape[2]) for b in lora_b_stacked) == tuple(output_slices)
            and sum(output_slices) <= y.shape[1]
        )
        if not usual:
            return original(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, **kwargs)
        assert plan is not None
        layers: dict[int, sgmv.PackedLayer] = self.__dict__.setdefault("_big5_layers", {})
        packed = layers.get(id(lora_a_stacked[0]))
        if packed is None or packed.a_stacked[0] is not lora_a_stacked[0]:
            packed = layers[id(lora_a_stacked[0])] = sgmv.PackedLayer(tuple(lora_a_stacked), tuple(lora_b_stacked))
        packed.apply(y, rows, plan, SLOT_VERSIONS, scale)
        return None

    add_lora_linear._big5 = True  # type: ignore[attr-defined]
    return add_lora_linear


def _logits_guard(original: Any) -> Any:
    def add_lora_logits(
        self: Any,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: torch.Tensor,
        lora_b_stacked: torch.Tensor,
        scale: float,
        **kwargs: Any,
    ) -> Any:
        # vLLM computes prompt log-probs (lm-eval's loglikelihood) with the logits layer over one
        # request's prompt rows while ``sampler_indices`` holds one entry per sampled request of the
        # whole batch; with two adapters in the batch the rows and indices no longer line up and
        # the op indexed past the input, killing the engine. No adapter here trains the LM head, so
        # the delta is exactly zero: skip it. An adapter that does train it gets a clear error.
        if not bool(torch.any(lora_a_stacked)):
            return None
        rows = x.reshape(-1, x.shape[-1]).shape[0]
        indices = self.sampler_indices
        if indices.shape[0] != rows and torch.unique(indices).numel() > 1:
            raise NotImplementedError(
                f"LM-head LoRA logits for {rows} rows with {indices.shape[0]} sampler indices of "
                "several adapters (prompt log-probs in a mixed batch): not supported on the CPU path"
            )
        return original(self, y, x, lora_a_stacked, lora_b_stacked, scale, **kwargs)

    add_lora_logits._big5 = True  # type: ignore[attr-defined]
    return add_lora_logits


def _versioned_activation(original: Any) -> Any:
    def activate_adapter(self: Any, lora_id: int) -> bool:
        written = bool(original(self, lora_id))
        if written and lora_id in self.lora_index_to_id:
            SLOT_VERSIONS.changed(self.lora_index_to_id.index(lora_id))
        return written

    activate_adapter._big5 = True  # type: ignore[attr-defined]
    return activate_adapter


def _without_cpu_rewinds(original: Any) -> Any:
    """vLLM rewinds the generator of a seeded request whose sampled token it discards (a prefill cut into
    chunks) with ``set_offset``, which a CPU generator lacks: the engine core died with "CPU Generator does
    not use offset" (seen 2026-12-07 under ``bench/dialogue_quality.py``: seeded sampled replies beside long
    questionnaire prompts). Those generators are set aside for the bookkeeping step and put back after it;
    the CPU generator's state then stays where the discarded sample left it (still deterministic)."""

    def bookkeeping(self: Any, *args: Any, **kwargs: Any) -> Any:
        batch = self.input_batch
        held = set_aside_cpu_generators(batch.generators, self.discard_request_mask.np[: batch.num_reqs])
        try:
            return original(self, *args, **kwargs)
        finally:
            batch.generators.update(held)

    bookkeeping._big5 = True  # type: ignore[attr-defined]
    return bookkeeping


def set_aside_cpu_generators(generators: dict[int, Any], discard_mask: Any) -> dict[int, Any]:
    """Remove (and return) the CPU generators of the requests ``discard_mask`` marks."""
    held: dict[int, Any] = {}
    for index, discard in enumerate(discard_mask):
        gen = generators.get(index)
        if discard and gen is not None and gen.device.type == "cpu":
            held[index] = generators.pop(index)
    return held


def _patch_method(owner: type, name: str, make: Any) -> None:
    current = getattr(owner, name)
    if getattr(current, "_big5", False):
        return
    _ORIGINALS[f"{owner.__name__}.{name}"] = current
    setattr(owner, name, make(current))


def _switched_off(name: str, default: str = "1") -> bool:
    return os.environ.get(name, default).strip().lower() in ("0", "false", "no", "off")


def enabled() -> bool:
    """Whether vLLM's engine processes will load this plugin: installed, allowed, not switched off."""
    from importlib.metadata import entry_points

    if _switched_off(ENV_SWITCH):
        return False
    allowed = os.environ.get("VLLM_PLUGINS")  # vLLM's allow-list of plugin names, when set
    if allowed is not None and "big5_cpu_lora" not in [name.strip() for name in allowed.split(",")]:
        return False
    return any(e.value == f"{__name__}:register" for e in entry_points(group="vllm.general_plugins"))


def register() -> None:
    """vLLM general-plugin entry point: install the grouped ops on the CPU platform (idempotent)."""
    if not enabled():
        return
    steering_hook.install()  # on every platform: steering is not a CPU fix
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
    if hasattr(punica_cpu.PunicaWrapperCPU, "add_lora_logits"):
        _patch_method(punica_cpu.PunicaWrapperCPU, "add_lora_logits", _logits_guard)
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # the CPU runner's base class

        _patch_method(GPUModelRunner, "_bookkeeping_sync", _without_cpu_rewinds)
    except (ImportError, AttributeError) as exc:
        logger.warning("big5 seeded-sampling guard not installed: %s", exc)
    logger.debug("big5 grouped LoRA ops installed for vLLM's CPU backend")
    if _switched_off(SGMV_SWITCH):
        return
    try:
        from vllm.lora.model_manager import LoRAModelManager

        wrapper = punica_cpu.PunicaWrapperCPU
        for owner, name in ((wrapper, "update_metadata"), (wrapper, "add_lora_linear")):
            getattr(owner, name)  # fail before patching anything
        LoRAModelManager.activate_adapter  # noqa: B018
    except (ImportError, AttributeError) as exc:
        logger.warning("big5 segmented LoRA path not installed: %s", exc)
        return
    _patch_method(LoRAModelManager, "activate_adapter", _versioned_activation)
    _patch_method(wrapper, "update_metadata", _plan_after)
    _patch_method(wrapper, "add_lora_linear", _segmented_linear)
    logger.debug("big5 segmented LoRA path installed for vLLM's CPU punica wrapper")
