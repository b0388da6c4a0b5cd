"""How a tokenizer spells answer options and continuations: checked per tokenizer, never assumed.

Pure functions of a Hugging Face tokenizer: the engine checks the option ids once at start
(:func:`check_option_tokens`), and the reasoning harness splits context and continuation as
lm-evaluation-harness does (:func:`encode_pair`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from big5core.errors import Invalid


@dataclass(frozen=True)
class OptionTokenCheck:
    """How one tokenizer spells answer options as the first token of a reply (see :func:`check_option_tokens`)."""

    options: tuple[str, ...]
    bare: tuple[tuple[int, ...], ...]  # token ids of each option right after a newline
    spaced: tuple[tuple[int, ...], ...]  # token ids of " " + option after a newline

    @property
    def single_tokens(self) -> bool:
        """Each bare option is exactly one token and no two options share it."""
        return all(len(t) == 1 for t in self.bare) and len({t[0] for t in self.bare}) == len(self.bare)

    @property
    def ids(self) -> list[int]:
        """One token id per option; :class:`OptionTokensUnavailable` unless :attr:`single_tokens`."""
        if not self.single_tokens:
            raise OptionTokensUnavailable(self)
        return [t[0] for t in self.bare]


class OptionTokensUnavailable(Invalid):
    """The answer options are not distinct single tokens for this tokenizer: next-token scoring cannot
    read their probabilities (score the label texts as continuations instead)."""

    code, title = "option-tokens-unavailable", "The answer options are not single tokens for this model"

    def __init__(self, check: OptionTokenCheck) -> None:
        super().__init__(
            f"answer options {list(check.options)!r} are not distinct single tokens for this tokenizer "
            f"(they tokenise as {[list(t) for t in check.bare]}; with a leading space as "
            f"{[list(t) for t in check.spaced]}); use the label-text scoring mode instead"
        )
        self.check = check


def _ids_after(tokenizer: Any, anchor: str, text: str) -> tuple[int, ...]:
    """Token ids that ``text`` adds after ``anchor`` (how it tokenises in that context)."""
    before = list(tokenizer.encode(anchor, add_special_tokens=False))
    whole = list(tokenizer.encode(anchor + text, add_special_tokens=False))
    if whole[: len(before)] != before:  # the boundary merged: no clean split in this context
        return tuple(tokenizer.encode(text, add_special_tokens=False))
    return tuple(whole[len(before) :])


def check_option_tokens(tokenizer: Any, options: Sequence[str] = ("1", "2", "3", "4", "5")) -> OptionTokenCheck:
    """Token ids of each option as the first token of a reply, with and without a leading space.

    Options are tokenised in context (after a newline, as they follow a chat template's generation
    prompt), so a SentencePiece tokenizer's implicit prefix space does not masquerade as part of the
    option. A pure function of the tokenizer; the engine runs it once at start.
    """
    opts = tuple(options)
    return OptionTokenCheck(
        options=opts,
        bare=tuple(_ids_after(tokenizer, "\n", o) for o in opts),
        spaced=tuple(_ids_after(tokenizer, "\n", " " + o) for o in opts),
    )


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's ``_encode_pair``: trailing spaces of the context move to the continuation,
    the whole string is tokenised once and the continuation is what follows the context's tokens."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
    whole = list(tokenizer.encode(context + continuation, add_special_tokens=False))
    context_ids = list(tokenizer.encode(context, add_special_tokens=False))
    return context_ids, whole[len(context_ids) :]
