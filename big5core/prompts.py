"""Prompt formats of the BIG5-CHAT paper: the one source that training and serving share.

- the unified-adapter instruction (``You are a helpful assistant with the following Big Five
  personality traits: Openness - high``), placed in the user turn before Speaker X's words;
- Prompt-Inst (``You are a person with high openness.``) before the user message;
- Prompt-Demo: ten dataset replies of the target trait-level as demonstrations.

Every template carries an id that the service reports back, so a client can reproduce a persona.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import TypedDict

from big5core.traits import Level, Trait


class ChatMessage(TypedDict):
    role: str
    content: str


class TemplateId(StrEnum):
    UNIFIED = "big5chat-unified-v1"
    PROMPT_INST = "big5chat-prompt-inst-v1"
    PROMPT_DEMO = "big5chat-prompt-demo-v1"
    PLAIN = "plain-v1"


def unified_instruction(trait: Trait, level: Level) -> str:
    """The dataset's ``train_instruction`` for one trait-level condition."""
    return f"You are a helpful assistant with the following Big Five personality traits: {trait.title} - {level.value}"


def prompt_inst(trait: Trait, level: Level) -> str:
    """The paper's Prompt-Inst baseline persona line."""
    return f"You are a person with {level.value} {trait.value}."


def prompt_demo(trait: Trait, level: Level, examples: Sequence[str]) -> str:
    """The paper's Prompt-Demo baseline: ten replies of the target trait-level."""
    lines = [
        "Here are 10 examples of how people like you have responded in different situations. "
        "Pay attention to how they approach communication and problem-solving.",
        "",
    ]
    lines += [f"Example {i}: {text.strip()}" for i, text in enumerate(examples[:10], start=1)]
    lines += ["", f"Now respond as a person with {level.value} {trait.value} would."]
    return "\n".join(lines)


def with_prefix(messages: Sequence[ChatMessage], prefix: str | None) -> list[ChatMessage]:
    """Put ``prefix`` in front of the last user turn (the paper's placement), blank line between."""
    out = [ChatMessage(role=m["role"], content=m["content"]) for m in messages]
    if not prefix:
        return out
    for message in reversed(out):
        if message["role"] == "user":
            message["content"] = f"{prefix}\n\n{message['content']}"
            return out
    out.append(ChatMessage(role="user", content=prefix))
    return out


def training_messages(instruction: str | None, speaker_x: str, speaker_y: str | None) -> list[ChatMessage]:
    """A BIG5-CHAT row as chat turns: user = instruction + Speaker X, assistant = Speaker Y."""
    messages = with_prefix([ChatMessage(role="user", content=speaker_x.strip())], instruction)
    if speaker_y is not None:
        messages.append(ChatMessage(role="assistant", content=speaker_y.strip()))
    return messages
