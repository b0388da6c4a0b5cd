"""The segmented LoRA path equals vLLM's own CPU ops row by row, fused slices and trimmed ranks included."""

from __future__ import annotations

import pytest
import torch

from big5engine import sgmv
from tests.big5engine.support import fresh_upstream_ops

pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")


upstream = fresh_upstream_ops()

SLOTS, MAX_RANK, HIDDEN = 6, 64, 48
RANKS = {0: 8, 1: 40, 2: 64, 3: 8, 4: 16, 5: 0}  # 40: five composed rank-8 traits; 64: max_lora_rank; 0: empty


def stacked(out_sizes: tuple[int, ...], seed: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """vLLM's layout: per slice ``[slots, 1, max_rank, in]`` and ``[slots, 1, out, max_rank]``, zero past each rank."""
    g = torch.Generator().manual_seed(seed)
    a_all, b_all = [], []
    for out in out_sizes:
        a = torch.zeros(SLOTS, 1, MAX_RANK, HIDDEN)
        b = torch.zeros(SLOTS, 1, out, MAX_RANK)
        for slot, rank in RANKS.items():
            a[slot, 0, :rank] = torch.randn(rank, HIDDEN, generator=g)
            b[slot, 0, :, :rank] = torch.randn(out, rank, generator=g) * 0.1
        a_all.append(a)
        b_all.append(b)
    return tuple(a_all), tuple(b_all)


def upstream_linear(
    y: torch.Tensor, x: torch.Tensor, a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...], idx: torch.Tensor,
    scale: float,
) -> None:  # fmt: skip
    """What ``PunicaWrapperCPU.add_lora_linear`` computes with vLLM's own ops (rows with an adapter only)."""
    offset = 0
    for a_i, b_i in zip(a, b, strict=True):
        buffer = torch.zeros(x.shape[0], MAX_RANK)
        upstream.bgmv_shrink(x, a_i, buffer, idx, scale)
        upstream.bgmv_expand_slice(buffer, b_i, y, idx, offset, b_i.shape[2], True)
        offset += b_i.shape[2]


CASES = {
    "one adapter": [2] * 7,
    "mixed": [0, 3, 3, 1, 0, 4, 3, 2, 2],
    "mixed with base rows": [-1, 1, -1, 0, 1, -1],
    "one adapter and base": [-1, 3, 3, -1],
    "unbalanced (long prefill)": [1] * 40 + [0, 4],
    "empty slot": [5, 0, 5],
}


@pytest.mark.parametrize("indices", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("out_sizes", [(40, 16, 16), (56, 56), (48,)], ids=["qkv", "gate-up", "one"])
def test_rows_equal_upstream_and_base_rows_are_untouched(indices: list[int], out_sizes: tuple[int, ...]) -> None:
    a, b = stacked(out_sizes, seed=len(out_sizes))
    idx = torch.tensor(indices)
    x = torch.randn(len(indices), HIDDEN, generator=torch.Generator().manual_seed(7))
    start = torch.randn(len(indices), sum(out_sizes) + 8, generator=torch.Generator().manual_seed(8))  # padded
    ours = start.clone()
    plan = sgmv.plan_rows(idx)
    sgmv.PackedLayer(a, b).apply(ours, x, plan, sgmv.SlotVersions(), scale=0.5)

    has = idx >= 0
    theirs = start.clone()
    upstream_linear(theirs, x, a, b, idx.clamp_min(0), 0.5)
    torch.testing.assert_close(ours[has], theirs[has])
    assert torch.equal(ours[~has], start[~has])  # no adapter: exactly the base output
    assert torch.equal(ours[:, sum(out_sizes) :], start[:, sum(out_sizes) :])  # beyond the layer's outputs


def test_plans() -> None:
    assert sgmv.plan_rows(torch.tensor([-1, -1])).slots == ()
    assert sgmv.plan_rows(torch.tensor([3, 3])).single
    mixed = sgmv.plan_rows(torch.tensor([2, -1, 0, 2, 2]))
    assert mixed.slots == (0, 2) and mixed.width == 3 and mixed.rows is not None and mixed.pad is not None
    assert mixed.rows.view(2, 3)[1].tolist() == [0, 3, 4] and mixed.pad.view(2, 3)[0].tolist() == [1, 0, 0]
    assert sgmv.plan_rows(torch.tensor([1] * 40 + [0, 2])).groups  # padding 3 x 40 for 42 rows: group by group


def test_a_slot_rewritten_is_repacked_on_its_new_version() -> None:
    a, b = stacked((16,), seed=3)
    layer, versions = sgmv.PackedLayer(a, b), sgmv.SlotVersions()
    x = torch.randn(3, HIDDEN)
    for indices in ([0, 0, 0], [0, 1, -1]):
        plan = sgmv.plan_rows(torch.tensor(indices))
        before = torch.zeros(3, 16)
        layer.apply(before, x, plan, versions)
        a[0][0].mul_(2.0)  # the engine loads another adapter into slot 0
        versions.changed(0)
        after = torch.zeros(3, 16)
        layer.apply(after, x, plan, versions)
        torch.testing.assert_close(after[0], 2 * before[0])
