"""Residual-stream activations of a chat reply under the base model (transformers, forward passes only).

Used to extract steering vectors (:mod:`trainer.steering`) and to read a reply's trait from its
projection on them (the monitor, ``bench/steer_monitor.py``). The chat is ``[user: turn, assistant:
reply]`` in the model's template; the turn is cut to its last :data:`PROMPT_TOKENS` tokens and the
reply to its first :data:`REPLY_TOKENS`; a reply's activation after layer ``l`` is the mean over its
tokens. The decoder runs only up to the deepest layer asked for, without the LM head.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

PROMPT_TOKENS = 48
"""Speaker X's turn is cut to its last 48 tokens, the reply to its first 64: the means need the reply's
wording, not all of it, and extraction stays near two minutes on 2 cores."""
REPLY_TOKENS = 64


class _Enough(Exception):
    """Raised by the last hooked layer: the layers above it are not needed."""


def _encode(tokenizer: Any, turn: str, reply: str) -> tuple[list[int], int]:
    """The chat's token ids (prompt and reply each cut to their budget) and where the reply starts."""
    x = tokenizer(turn, add_special_tokens=False).input_ids[-PROMPT_TOKENS:]
    y = tokenizer(reply, add_special_tokens=False).input_ids[:REPLY_TOKENS]
    prompt = [{"role": "user", "content": tokenizer.decode(x)}]
    head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    chat = [*prompt, {"role": "assistant", "content": tokenizer.decode(y)}]
    full = tokenizer.apply_chat_template(chat, tokenize=False)
    ids = list(tokenizer(full, add_special_tokens=False).input_ids)
    return ids, min(len(tokenizer(head, add_special_tokens=False).input_ids), len(ids) - 1)


def reply_means(
    model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]], depth: int, batch_size: int = 16
) -> torch.Tensor:
    """``[pairs, depth, hidden]``: each (turn, reply) pair's residual stream after decoder layers
    ``0..depth-1``, averaged over the reply's tokens. Runs the decoder up to layer ``depth - 1`` only."""
    encoded = [_encode(tokenizer, turn, reply) for turn, reply in pairs]
    out = torch.zeros(len(pairs), depth, int(model.config.hidden_size))
    captured: dict[int, torch.Tensor] = {}

    def capture(index: int) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            captured[index] = output[0] if isinstance(output, tuple) else output
            if index == depth - 1:
                raise _Enough

        return hook

    layers = model.model.layers
    handles = [layers[i].register_forward_hook(capture(i)) for i in range(depth)]
    order = sorted(range(len(pairs)), key=lambda i: len(encoded[i][0]))  # similar lengths share a batch
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    try:
        with torch.inference_mode():
            for at in range(0, len(order), batch_size):
                chunk = order[at : at + batch_size]
                width = max(len(encoded[i][0]) for i in chunk)
                ids = torch.full((len(chunk), width), pad)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                reply = torch.zeros((len(chunk), width))
                for j, i in enumerate(chunk):
                    tokens, start = encoded[i]
                    ids[j, : len(tokens)] = torch.tensor(tokens)
                    mask[j, : len(tokens)] = 1
                    reply[j, start : len(tokens)] = 1.0
                captured.clear()
                with contextlib.suppress(_Enough):
                    model.model(input_ids=ids, attention_mask=mask)
                stacked = torch.stack([captured[i] for i in range(depth)], dim=1).float()  # [b, depth, t, h]
                weights = reply / reply.sum(dim=1, keepdim=True)
                out[chunk] = torch.einsum("blth,bt->blh", stacked, weights)
    finally:
        for handle in handles:
            handle.remove()
    return out
