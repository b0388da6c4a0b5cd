"""The grouped CPU LoRA ops equal vLLM's own ops wherever an adapter is set, and give -1 rows no delta."""

from __future__ import annotations

import importlib.util
from importlib.metadata import entry_points
from types import ModuleType

import pytest
import torch

from big5core import vllm_plugin

lora_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")


def _fresh_upstream() -> ModuleType:
    """A private copy of vLLM's ops module, untouched even if the plugin patched the imported one."""
    spec = importlib.util.find_spec("vllm.lora.ops.torch_ops.lora_ops")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


upstream = _fresh_upstream()

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
    assert names.get("big5_cpu_lora") == "big5core.vllm_plugin:register"
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    for module in (lora_ops, punica_cpu):  # start from upstream's ops (an engine may have patched already)
        for name in vllm_plugin.PATCHED:
            monkeypatch.setattr(module, name, getattr(upstream, name))  # restored after the test
    monkeypatch.setenv(vllm_plugin.ENV_SWITCH, "0")
    vllm_plugin.register()
    assert punica_cpu.bgmv_shrink is not vllm_plugin.bgmv_shrink
    monkeypatch.setenv(vllm_plugin.ENV_SWITCH, "1")
    vllm_plugin.register()
    assert punica_cpu.bgmv_shrink is vllm_plugin.bgmv_shrink
    assert lora_ops.bgmv_expand is vllm_plugin.bgmv_expand
