"""Option token ids per tokenizer (with and without a leading space), lm-eval's pair encoding, and the
normalisation of option scores: pure functions on the bundled tokenizer and tokenizers built in-process."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from big5core.generation import OptionScores
from big5engine.option_tokens import OptionTokensUnavailable, check_option_tokens, encode_pair

DIGITS = ("1", "2", "3", "4", "5")


def _sentencepiece_like() -> Any:
    """A Metaspace BPE tokenizer (as SentencePiece/Llama-2 spell words): "1" alone encodes as "▁1"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<unk>", "▁", "\n", *DIGITS, "a", "b"])}
    merges = []
    for d in DIGITS:
        vocab["▁" + d] = len(vocab)
        merges.append(("▁", d))
    vocab["▁\n"] = len(vocab)
    merges.append(("▁", "\n"))
    model = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    model.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    return PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>")


def _missing_digits() -> Any:
    """A word-level tokenizer that lacks "4" and "5": both become <unk> (one id for two options)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "\n", "1", "2", "3"])}
    model = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Split("\n", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>")


def _char_level() -> Any:
    """A character-level tokenizer: two-digit options are two tokens each."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<unk>", "\n", " ", *"0123456789"])}
    model = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>")


def test_bundled_tokenizer_digits_are_single_tokens(bundled_model_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bundled_model_path))
    check = check_option_tokens(tokenizer, DIGITS)
    assert check.single_tokens
    assert check.ids == tokenizer.convert_tokens_to_ids(list(DIGITS))
    assert all(check.spaced) and [list(t) for t in check.spaced] != [[i] for i in check.ids]  # " 1" differs


def test_sentencepiece_prefix_space_is_not_taken_for_the_option() -> None:
    tokenizer = _sentencepiece_like()
    naive = [tokenizer.encode(d, add_special_tokens=False) for d in DIGITS]
    assert tokenizer.convert_ids_to_tokens([t[0] for t in naive]) == [f"▁{d}" for d in DIGITS]  # the old bug
    check = check_option_tokens(tokenizer, DIGITS)
    assert tokenizer.convert_ids_to_tokens(check.ids) == list(DIGITS)  # in context: the digit itself
    assert [tokenizer.convert_ids_to_tokens(list(t)) for t in check.spaced] == [[f"▁{d}"] for d in DIGITS]


@pytest.mark.parametrize(("make", "options"), [(_missing_digits, DIGITS), (_char_level, ("10", "20", "30"))])
def test_options_that_are_not_distinct_single_tokens_get_a_clear_error(make: Any, options: tuple[str, ...]) -> None:
    check = check_option_tokens(make(), options)
    assert not check.single_tokens
    with pytest.raises(OptionTokensUnavailable, match="label-text scoring mode") as info:
        check.ids  # noqa: B018
    assert isinstance(info.value, ValueError) and str(list(options)) in str(info.value)


def test_encode_pair_moves_trailing_space_to_the_continuation(bundled_model_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bundled_model_path))
    context, continuation = encode_pair(tokenizer, "The answer is ", "Very accurate")
    assert context == tokenizer.encode("The answer is", add_special_tokens=False)
    assert context + continuation == tokenizer.encode("The answer is Very accurate", add_special_tokens=False)
    assert tokenizer.decode(continuation) == " Very accurate"


@pytest.mark.parametrize(
    ("logprobs", "probs", "mass"),
    [
        ([math.log(0.5), math.log(0.25), -math.inf], [2 / 3, 1 / 3, 0.0], 0.75),
        ([-800.0, -801.0], [1 / (1 + math.exp(-1)), math.exp(-1) / (1 + math.exp(-1))], 0.0),  # underflow
        ([-math.inf, -math.inf], None, 0.0),  # no distribution: never the uniform "3"
    ],
)
def test_option_scores_normalise_in_log_space(logprobs: list[float], probs: list[float] | None, mass: float) -> None:
    scores = OptionScores.from_logprobs(logprobs)
    assert scores.mass == pytest.approx(mass)
    if probs is None:
        assert scores.probs is None
    else:
        assert scores.probs == pytest.approx(probs)
