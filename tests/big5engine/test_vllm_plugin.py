"""The plugin's CPU LoRA ops and wrapper path equal vLLM's own wherever an adapter is set; -1 rows get no delta."""

from __future__ import annotations

import importlib.util
from importlib.metadata import entry_points
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch

from big5engine import vllm_plugin
from tests.big5engine.support import fresh_upstream_ops

lora_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")


upstream = fresh_upstream_ops()

SLOTS, RANK, HIDDEN, OUT = 5, 8, 48, 80


def weights(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=[[2, 2, 2, 2, 2, 2], [0, 3, 3, 1, 0, 4, 3], [4], [1, 0, 1, 0]], ids=str)
def indices(request: pytest.FixtureRequest) -> torch.Tensor:
    return torch.tensor(request.param)


@pytest.mark.parametrize("four_d", [True, False])
def test_shrink_matches_upstream(indices: torch.Tensor, four_d: bool) -> None:
    a = weights((SLOTS, 1, RANK, HIDDEN) if four_d else (SLOTS, RANK, HIDDEN), 1)
    x = weights((len(indices), HIDDEN), 2)
    ours, theirs = torch.zeros(len(indices), RANK), torch.zeros(len(indices), RANK)
    vllm_plugin.bgmv_shrink(x, a, ours, indices, 0.5)
    upstream.bgmv_shrink(x, a, theirs, indices, 0.5)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("add_inputs", [True, False])
def test_expand_and_slice_match_upstream(indices: torch.Tensor, add_inputs: bool) -> None:
    b = weights((SLOTS, 1, OUT, RANK), 3)
    x = weights((len(indices), RANK), 4)
    start = weights((len(indices), OUT + 16), 5)  # the model's output is wider (padding)
    ours, theirs = start.clone(), start.clone()
    vllm_plugin.bgmv_expand(x, b, ours, indices, add_inputs)
    upstream.bgmv_expand(x, b, theirs, indices, add_inputs)
    torch.testing.assert_close(ours, theirs)

    ours, theirs = start.clone(), start.clone()
    vllm_plugin.bgmv_expand_slice(x, b, ours, indices, 10, OUT, add_inputs)
    upstream.bgmv_expand_slice(x, b, theirs, indices, 10, OUT, add_inputs)
    torch.testing.assert_close(ours, theirs)


def test_rows_without_adapter_get_no_delta() -> None:
    """Upstream reads index -1 as the last slot (the CPU LoRA bug); here those rows are untouched."""
    b = weights((SLOTS, OUT, RANK), 6)
    x = weights((4, RANK), 7)
    indices = torch.tensor([-1, 2, -1, 0])
    start = weights((4, OUT), 8)
    ours = start.clone()
    vllm_plugin.bgmv_expand(x, b, ours, indices, add_inputs=True)
    torch.testing.assert_close(ours[[0, 2]], start[[0, 2]])
    torch.testing.assert_close(ours[1], start[1] + b[2] @ x[1])
    torch.testing.assert_close(ours[3], start[3] + b[0] @ x[3])

    theirs = start.clone()
    upstream.bgmv_expand(x, b, theirs, indices, add_inputs=True)
    assert not torch.allclose(theirs[0], start[0])  # what the plugin exists to prevent

    shrunk = torch.full((4, RANK), 9.0)
    vllm_plugin.bgmv_shrink(weights((4, HIDDEN), 9), weights((SLOTS, RANK, HIDDEN), 10), shrunk, indices)
    assert torch.count_nonzero(shrunk[[0, 2]]) == 0


def test_registered_for_vllm_and_patches_the_cpu_path(monkeypatch: pytest.MonkeyPatch) -> None:
    names = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert names.get("big5_cpu_lora") == "big5engine.vllm_plugin:register"
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    for module in (lora_ops, punica_cpu):  # start from upstream's ops (an engine may have patched already)
        for name in vllm_plugin.PATCHED:
            monkeypatch.setattr(module, name, getattr(upstream, name))  # restored after the test
    from vllm.lora.model_manager import LoRAModelManager

    wrapper = punica_cpu.PunicaWrapperCPU
    methods = [
        (wrapper, "update_metadata"),
        (wrapper, "add_lora_linear"),
        (wrapper, "add_lora_logits"),
        (LoRAModelManager, "activate_adapter"),
    ]
    for owner, name in methods:  # restored after the test, patched or not
        monkeypatch.setattr(owner, name, vllm_plugin._ORIGINALS.get(f"{owner.__name__}.{name}", getattr(owner, name)))
    monkeypatch.setenv(vllm_plugin.ENV_SWITCH, "0")
    vllm_plugin.register()
    assert punica_cpu.bgmv_shrink is not vllm_plugin.bgmv_shrink
    assert not getattr(wrapper.add_lora_linear, "_big5", False)
    monkeypatch.setenv(vllm_plugin.ENV_SWITCH, "1")
    monkeypatch.setenv(vllm_plugin.SGMV_SWITCH, "0")
    vllm_plugin.register()
    assert punica_cpu.bgmv_shrink is vllm_plugin.bgmv_shrink
    assert lora_ops.bgmv_expand is vllm_plugin.bgmv_expand
    assert not getattr(wrapper.add_lora_linear, "_big5", False)
    monkeypatch.setenv(vllm_plugin.SGMV_SWITCH, "1")
    vllm_plugin.register()
    vllm_plugin.register()  # idempotent: patched once
    for owner, name in methods:
        patched = getattr(owner, name)
        assert getattr(patched, "_big5", False)
        assert not getattr(vllm_plugin._ORIGINALS[f"{owner.__name__}.{name}"], "_big5", False)


def test_logits_of_prompt_rows_in_a_mixed_batch() -> None:
    """Prompt log-probs: the logits layer sees one request's prompt rows while the sampler indices
    cover the whole batch. Without an LM-head LoRA the delta is zero and nothing is indexed (this
    crashed the engine in bench/reasoning.py); with one, a clear error, never a wrong row."""
    calls: list[int] = []

    def original(self: Any, y: torch.Tensor, x: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        calls.append(x.shape[0])
        y += 1.0

    guard = vllm_plugin._logits_guard(original)
    wrapper = SimpleNamespace(sampler_indices=torch.tensor([0, 1, 1, 0]))
    x, y = weights((7, HIDDEN), 1), torch.zeros(7, 32)
    zero_a, zero_b = torch.zeros(SLOTS, 1, RANK, HIDDEN), torch.zeros(SLOTS, 1, 32, RANK)
    guard(wrapper, y, x, zero_a, zero_b, 1.0)
    assert calls == [] and torch.count_nonzero(y) == 0
    some_a = weights((SLOTS, 1, RANK, HIDDEN), 2)
    with pytest.raises(NotImplementedError, match="7 rows with 4 sampler indices"):
        guard(wrapper, y, x, some_a, zero_b, 1.0)
    wrapper.sampler_indices = torch.tensor([1] * 7)
    guard(wrapper, y, x, some_a, zero_b, 1.0)
    assert calls == [7]


def _fresh_punica_cpu(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """A private copy of vLLM's CPU punica wrapper module running vLLM's own ops (never the plugin's)."""
    spec = importlib.util.find_spec("vllm.lora.punica_wrapper.punica_cpu")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice"):
        monkeypatch.setattr(module, name, getattr(upstream, name))
    return module


def _lora_stacks(
    out_sizes: tuple[int, ...], ranks: list[int], max_rank: int
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    a_all, b_all = [], []
    for i, out in enumerate(out_sizes):
        a, b = torch.zeros(len(ranks), 1, max_rank, HIDDEN), torch.zeros(len(ranks), 1, out, max_rank)
        for slot, rank in enumerate(ranks):
            a[slot, 0, :rank] = weights((rank, HIDDEN), 100 + 10 * i + slot)
            b[slot, 0, :, :rank] = weights((out, rank), 200 + 10 * i + slot) * 0.1
        a_all.append(a)
        b_all.append(b)
    return tuple(a_all), tuple(b_all)


@pytest.mark.parametrize("is_prefill", [True, False], ids=["prefill", "decode"])
@pytest.mark.parametrize(
    "lora_ids", [[11] * 5, [11, 12, 13, 11, 14, 12], [0, 12, 0, 13, 13, 0], [0, 0, 0]], ids=str
)  # fmt: skip
def test_wrapper_linear_equals_vllm_wrapper(
    monkeypatch: pytest.MonkeyPatch, lora_ids: list[int], is_prefill: bool
) -> None:
    """The patched ``add_lora_linear`` of the CPU punica wrapper against vLLM's own, on a fused q/k/v layer.

    Slots hold ranks 8, 40 (five composed traits) and 64 (``max_lora_rank``) in a rank-64 buffer, as
    vLLM pads them; id 0 is "no adapter" (slot -1), whose rows must keep the base output exactly.
    """
    fresh = _fresh_punica_cpu(monkeypatch)
    from vllm.lora.layers import LoRAMapping

    class Segmented(fresh.PunicaWrapperCPU):  # type: ignore[name-defined,misc]
        update_metadata = vllm_plugin._plan_after(fresh.PunicaWrapperCPU.update_metadata)
        add_lora_linear = vllm_plugin._segmented_linear(fresh.PunicaWrapperCPU.add_lora_linear)

    out_sizes = (40, 16, 16)
    a, b = _lora_stacks(out_sizes, ranks=[8, 40, 64, 8], max_rank=64)
    slot_ids: list[int | None] = [11, 12, 13, 14]
    mapping = LoRAMapping(tuple(lora_ids), tuple(lora_ids), is_prefill=is_prefill)
    x = weights((len(lora_ids), HIDDEN), 11)
    start = weights((len(lora_ids), sum(out_sizes)), 12)
    results = []
    for cls in (fresh.PunicaWrapperCPU, Segmented):
        wrapper = cls(64, 8, device="cpu")
        wrapper.update_metadata(mapping, slot_ids, 5, 1000)
        y = start.clone()
        wrapper.add_lora_linear(y, x, a, b, 1.0, out_sizes)
        results.append(y)
    theirs, ours = results
    has = torch.tensor(lora_ids) > 0
    torch.testing.assert_close(ours[has], theirs[has])
    assert torch.equal(ours[~has], start[~has])


def test_seeded_cpu_generators_of_discarded_requests_are_set_aside() -> None:
    """vLLM's rewind of a discarded sample (``set_offset``) does not exist for CPU generators; the plugin
    sets those generators aside for the bookkeeping step (the engine core died without it)."""
    import numpy as np
    import torch

    from big5engine.vllm_plugin import set_aside_cpu_generators

    cpu = torch.Generator(device="cpu")
    with pytest.raises(RuntimeError, match="offset"):
        cpu.set_offset(cpu.get_offset() - 4)  # what vLLM calls: the bug itself
    generators = {0: cpu, 2: torch.Generator(device="cpu")}
    held = set_aside_cpu_generators(generators, np.array([True, True, False]))
    assert held == {0: cpu} and set(generators) == {2}


def test_the_plugin_guards_the_bookkeeping_step() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from big5engine import vllm_plugin

    if not vllm_plugin.enabled():
        pytest.skip("plugin switched off")
    vllm_plugin.register()
    assert getattr(GPUModelRunner._bookkeeping_sync, "_big5", False)
