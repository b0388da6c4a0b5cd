"""McDonald's omega is None for an improper one-factor fit (a Heywood case), never a spurious ~1."""

from __future__ import annotations

import numpy as np

from evaluator.scoring import mcdonald_omega, reliability


def test_omega_of_a_proper_fit_is_a_number() -> None:
    rng = np.random.default_rng(0)
    factor = rng.normal(size=40)
    items = np.column_stack([factor + rng.normal(scale=0.8, size=40) for _ in range(4)])
    omega = mcdonald_omega(items)
    assert omega is not None and 0.6 < omega < 0.9


def test_omega_of_a_heywood_case_is_none_and_said_so() -> None:
    rng = np.random.default_rng(0)
    factor = rng.normal(size=40)
    items = np.column_stack([factor, factor, rng.normal(size=40), rng.normal(size=40)])  # two identical items
    assert mcdonald_omega(items) is None
    result = reliability(items)
    assert result.omega is None and result.alpha is not None
    assert result.note is not None and "proper one-factor fit" in result.note
