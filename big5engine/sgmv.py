"""Segmented LoRA products for a batch whose rows use different adapters (the SGMV idea, in torch ops).

Punica and S-LoRA serve many adapters at once with one "segmented gather matrix-vector" kernel per
projection: the rows of a batch are grouped by adapter, and every group is multiplied by its own
adapter in the same launch. On a CPU the cost of a LoRA product for a small model is mostly per-call
overhead, so what matters is the number of tensor operations per projection, not the arithmetic
(rank 8 on all seven projections of SmolLM2-135M is ~2 % of the base model's multiply-adds). Here
every LoRA layer costs a fixed handful of operations per batch, however many adapters it holds:

- the slices of a fused projection (q/k/v, gate/up) are one product: their A matrices are stacked
  into one ``[slices x rank, in]`` matrix, their B matrices into one block-diagonal
  ``[slices x rank, out]`` matrix, so shrink and expand are one matrix product each;
- each slot's matrices are trimmed to the rank actually in use (vLLM pads every adapter to
  ``max_lora_rank``; rows beyond an adapter's rank are zero, so trimming is exact);
- a batch that uses one adapter on every row is two matrix products; a mixed batch gathers its rows
  grouped by adapter (padded to the longest group), multiplies every group by its adapter with one
  batched product for shrink and one for expand, and adds the result back with one ``index_add_``;
- rows without an adapter (index -1) are not in any group: they get no delta and cost nothing.

Weights are packed lazily, once per (layer, adapter slot, slot version): :class:`SlotVersions`
counts the loads into each slot (the vLLM plugin bumps it whenever the engine writes a slot).
This module has no vLLM dependency; :mod:`big5engine.vllm_plugin` wires it into vLLM's CPU wrapper.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

PAD_LIMIT = 2.0
"""A mixed batch whose padded groups would hold more than this many times its rows (one long prefill
next to short ones) is computed one group at a time instead of as one padded batched product."""


@dataclass(frozen=True)
class RowPlan:
    """How the rows of one batch map to adapter slots; built once per step from the token indices."""

    num_rows: int
    slots: tuple[int, ...] = ()
    """Distinct slots used by at least one row, ascending (empty: no row has an adapter)."""
    rows: torch.Tensor | None = None
    """Mixed batches: row indices grouped by slot, each group padded to ``width`` (``[len(slots) * width]``)."""
    pad: torch.Tensor | None = None
    """``[len(slots), width, 1]``: 1 for real rows, 0 for padding; None when no group is padded."""
    width: int = 0
    groups: tuple[torch.Tensor, ...] = ()
    """Unbalanced mixed batches: the rows of each slot, computed group by group."""

    @property
    def single(self) -> bool:
        """Every row uses the same adapter: no gather, no scatter."""
        return len(self.slots) == 1 and self.rows is None and not self.groups


def plan_rows(indices: torch.Tensor) -> RowPlan:
    """The :class:`RowPlan` for per-row slot ``indices`` (``-1`` = no adapter)."""
    indices = indices.to("cpu", torch.long).view(-1)
    total = int(indices.numel())
    slots_t, counts_t = torch.unique(indices, sorted=True, return_counts=True)
    slots, counts = slots_t.tolist(), counts_t.tolist()
    base = counts[0] if slots and slots[0] < 0 else 0
    if base:
        slots, counts = slots[1:], counts[1:]
    if not slots:
        return RowPlan(total)
    if len(slots) == 1 and base == 0:
        return RowPlan(total, (slots[0],))
    order = torch.argsort(indices, stable=True)[base:]  # rows with an adapter, grouped by slot
    width, active = max(counts), total - base
    if len(slots) * width > PAD_LIMIT * active:
        return RowPlan(total, tuple(slots), groups=tuple(torch.split(order, counts)))
    counts_g = torch.tensor(counts)
    starts = torch.cumsum(counts_g, 0) - counts_g
    group = torch.repeat_interleave(torch.arange(len(slots)), counts_g)
    flat = group * width + (torch.arange(active) - starts[group])
    rows = torch.full((len(slots) * width,), int(order[0]), dtype=torch.long)
    rows[flat] = order
    pad = None
    if active != len(slots) * width:
        pad = torch.zeros(len(slots) * width, 1)
        pad[flat] = 1.0
        pad = pad.view(len(slots), width, 1)
    return RowPlan(total, tuple(slots), rows=rows, pad=pad, width=width)


@dataclass
class SlotVersions:
    """How often each adapter slot has been (re)written; packed weights are valid for one version."""

    versions: dict[int, int] = field(default_factory=dict)

    def changed(self, slot: int) -> None:
        self.versions[slot] = self.versions.get(slot, 0) + 1

    def of(self, slot: int) -> int:
        return self.versions.get(slot, 0)


@dataclass
class _Packed:
    version: int
    rank: int
    shrink: torch.Tensor | None  # [slices * rank, in]: F.linear(x, shrink) is the fused shrink
    expand: torch.Tensor | None  # [slices * rank, out]: block-diagonal over the slices


@dataclass
class _Batch:
    key: tuple[tuple[int, int], ...]
    shrink: torch.Tensor  # [slots, in, slices * rank]
    expand: torch.Tensor  # [slots, slices * rank, out]


class PackedLayer:
    """One LoRA layer's adapter weights, fused over its slices and trimmed per slot.

    ``a_stacked[i]`` is ``[max_loras, 1, max_rank, in]`` and ``b_stacked[i]`` ``[max_loras, 1, out_i,
    max_rank]`` for slice ``i`` (vLLM's layout); the packed copies follow a slot's version.
    """

    def __init__(self, a_stacked: tuple[torch.Tensor, ...], b_stacked: tuple[torch.Tensor, ...]) -> None:
        self.a_stacked = a_stacked
        self.b_stacked = b_stacked
        self.out_sizes = [int(b.shape[2]) for b in b_stacked]
        self._slots: dict[int, _Packed] = {}
        self._batch: _Batch | None = None

    def _rank(self, slot: int) -> int:
        """The rank in use in ``slot``: rows of A beyond it are zero in every slice."""
        used = torch.zeros(self.a_stacked[0].shape[2], dtype=torch.bool)
        for a in self.a_stacked:
            used |= (a[slot, 0] != 0).any(dim=-1)
        nonzero = torch.nonzero(used)
        return int(nonzero[-1]) + 1 if nonzero.numel() else 0

    def _blocks(self, slot: int, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.a_stacked)
        shrink = torch.cat([a[slot, 0, :rank] for a in self.a_stacked]).to(dtype)  # [n * rank, in]
        expand = torch.zeros(n * rank, sum(self.out_sizes), dtype=dtype)
        offset = 0
        for i, b in enumerate(self.b_stacked):
            expand[i * rank : (i + 1) * rank, offset : offset + self.out_sizes[i]] = b[slot, 0, :, :rank].T
            offset += self.out_sizes[i]
        return shrink, expand

    def slot(self, slot: int, version: int, dtype: torch.dtype) -> _Packed:
        packed = self._slots.get(slot)
        if packed is None or packed.version != version or (packed.shrink is not None and packed.shrink.dtype != dtype):
            rank = self._rank(slot)
            shrink, expand = self._blocks(slot, rank, dtype) if rank else (None, None)
            packed = _Packed(version, rank, shrink, expand)
            self._slots[slot] = packed
        return packed

    def batch(self, plan: RowPlan, versions: SlotVersions, dtype: torch.dtype) -> _Batch | None:
        """Shrink and expand weights of ``plan.slots`` stacked for one batched product each."""
        key = tuple((s, versions.of(s)) for s in plan.slots)
        if self._batch is not None and self._batch.key == key and self._batch.shrink.dtype == dtype:
            return self._batch
        rank = max(self.slot(s, v, dtype).rank for s, v in key)
        if rank == 0:
            return None
        shrinks, expands = zip(*(self._blocks(s, rank, dtype) for s in plan.slots), strict=True)
        self._batch = _Batch(key, torch.stack(shrinks).transpose(1, 2).contiguous(), torch.stack(expands))
        return self._batch

    def apply(
        self, y: torch.Tensor, x: torch.Tensor, plan: RowPlan, versions: SlotVersions, scale: float = 1.0
    ) -> None:
        """``y[t, :out] += scale * (x[t] @ A[s_t]^T) @ B[s_t]^T`` for every row ``t`` with a slot ``s_t``."""
        if not plan.slots:
            return
        out = y[:, : sum(self.out_sizes)] if y.shape[1] != sum(self.out_sizes) else y
        x = x.to(y.dtype)
        if plan.single:
            packed = self.slot(plan.slots[0], versions.of(plan.slots[0]), y.dtype)
            if packed.shrink is not None and packed.expand is not None:
                hidden = F.linear(x, packed.shrink)
                out.addmm_(hidden, packed.expand, alpha=scale)
            return
        if plan.groups:
            for slot, rows in zip(plan.slots, plan.groups, strict=True):
                packed = self.slot(slot, versions.of(slot), y.dtype)
                if packed.shrink is not None and packed.expand is not None:
                    hidden = F.linear(x.index_select(0, rows), packed.shrink)
                    out.index_add_(0, rows, hidden @ packed.expand, alpha=scale)
            return
        batch = self.batch(plan, versions, y.dtype)
        if batch is None or plan.rows is None:
            return
        gathered = x.index_select(0, plan.rows).view(len(plan.slots), plan.width, x.shape[1])
        hidden = torch.bmm(gathered, batch.shrink)
        if plan.pad is not None:
            hidden.mul_(plan.pad)  # padding rows add exact zeros
        delta = torch.bmm(hidden, batch.expand).view(-1, out.shape[1])
        out.index_add_(0, plan.rows, delta, alpha=scale)
