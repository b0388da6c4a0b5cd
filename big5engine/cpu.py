"""vLLM-CPU environment defaults, set before an engine's processes are spawned."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def cpu_env_defaults(*, kv_cache_bytes: int | None = None, tensor_parallel_size: int = 1) -> dict[str, str]:
    """Set vLLM-CPU environment defaults (only those not already set); return what was set.

    Per ``/work/shared/CPU_NOTES.md``: bind OpenMP threads to every CPU this process may use and
    reserve none (+60-75 % over vLLM's default of reserving one), and cap the KV cache at 1 GiB when
    no explicit size is configured (otherwise the CPU backend claims most of the machine's RAM).
    Call before the engine is created: the spawned engine processes inherit ``os.environ``.
    """
    wanted: dict[str, str] = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    if tensor_parallel_size == 1 and hasattr(os, "sched_getaffinity"):  # TP > 1: one list per rank
        wanted["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    if kv_cache_bytes is None:
        wanted["VLLM_CPU_KVCACHE_SPACE"] = "1"  # GiB
    applied = {key: value for key, value in wanted.items() if not os.environ.get(key)}
    os.environ.update(applied)
    if applied:
        logger.info("vLLM CPU defaults: %s", applied)
    return applied
