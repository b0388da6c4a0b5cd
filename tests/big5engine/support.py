"""Helpers the engine's tests share."""

from __future__ import annotations

import importlib.util
from types import ModuleType


def fresh_upstream_ops() -> ModuleType:
    """A private copy of vLLM's ops module, untouched even if the plugin patched the imported one."""
    spec = importlib.util.find_spec("vllm.lora.ops.torch_ops.lora_ops")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
