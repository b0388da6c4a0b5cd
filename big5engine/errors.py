"""The engine's own errors (domain categories, no HTTP) and how a dead vLLM engine core is recognised."""

from __future__ import annotations

from big5core.errors import Invalid, Unavailable


class EngineNotReady(Unavailable, RuntimeError):
    """The engine is not started, still starting, restarting, failed, or shut down."""

    code, title = "engine-not-ready", "The generation engine is not ready"


class PromptTooLong(Invalid):
    """Prompt tokens plus ``max_tokens`` exceed the engine's context length."""

    code, title = "prompt-too-long", "Prompt and max_tokens exceed the context length"

    def __init__(self, prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
        super().__init__(
            f"prompt has {prompt_tokens} tokens and max_tokens is {max_tokens} "
            f"({prompt_tokens + max_tokens} in all), but the context length is {max_model_len}"
        )
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len


def engine_died(exc: BaseException) -> bool:
    """Whether ``exc`` is vLLM's EngineDeadError (its engine core process is gone)."""
    try:
        from vllm.v1.engine.exceptions import EngineDeadError
    except ImportError:  # another vLLM layout: nothing to translate
        return False
    return isinstance(exc, EngineDeadError)
