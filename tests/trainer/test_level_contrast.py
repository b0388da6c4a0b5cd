"""SFT's level-contrast term: the level word swapped in real tokenised prompts, the loss against a
hand computation on a tiny random Llama, and a real TRL run with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from big5core.prompts import training_messages, unified_instruction
from big5core.training import TrainSpec
from big5core.traits import TRAITS, Level, Method
from big5personas.registry import check_adapter_folder
from tests.model_support import make_tiny_llama
from tests.trainer.test_training import FAST
from trainer.level_contrast import contrast_loss, level_swap
from trainer.train import load_dataset_rows, prepare, train_adapter

SPEAKER_X = "My boss said it's a high - high priority, and the bar is set high - low effort won't do."
REPLY = "Then let's plan it together tonight, step by step."


@pytest.fixture(scope="module")
def tokenizer(bundled_model_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_model_path)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, bundled_model_path: Path) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", bundled_model_path)


def _encode(tokenizer: Any, trait: Any, level: Level, placement: str) -> tuple[list[int], list[int]]:
    """Prompt + reply ids and SFT labels (the prompt ignored), as the trainer sees them."""
    messages = training_messages(unified_instruction(trait, level), SPEAKER_X, None, placement)  # type: ignore[arg-type]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    reply_ids = tokenizer(REPLY + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return prompt_ids + reply_ids, [-100] * len(prompt_ids) + reply_ids


def _batch(rows: list[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    return {
        "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
        "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows]),
    }


@pytest.mark.parametrize("placement", ["user", "system"])
def test_the_flip_is_the_opposite_levels_prompt_and_nothing_else(tokenizer: Any, placement: str) -> None:
    """Speaker X's own "- high" / "- low" stay; only the instruction's level word turns."""
    swap = level_swap(tokenizer, placement)  # type: ignore[arg-type]
    conditions = [(t, lv) for t in TRAITS for lv in (Level.HIGH, Level.LOW)]
    rows = [_encode(tokenizer, t, lv, placement) for t, lv in conditions]
    batch = _batch(rows, tokenizer.pad_token_id)
    flipped = swap.flip(batch["input_ids"], batch["labels"])
    for i, (trait, level) in enumerate(conditions):
        expected, _ = _encode(tokenizer, trait, level.opposite, placement)
        assert flipped[i, : len(expected)].tolist() == expected, (trait, level)
        assert int((flipped[i] != batch["input_ids"][i]).sum()) == 1
    assert torch.equal(swap.flip(flipped, batch["labels"]), batch["input_ids"])


def test_a_prompt_without_the_level_word_is_an_error(tokenizer: Any) -> None:
    swap = level_swap(tokenizer, "user")
    messages = training_messages(None, SPEAKER_X.replace("high", "tall").replace("low", "short"), None, "user")
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt + REPLY, add_special_tokens=False)["input_ids"]
    labels = [-100] * (len(ids) - 3) + ids[-3:]
    good = _encode(tokenizer, TRAITS[0], Level.HIGH, "user")
    batch = _batch([good, (ids, labels)], tokenizer.pad_token_id)
    with pytest.raises(ValueError, match=r"no level word in the prompt of batch row\(s\) \[1\]"):
        swap.flip(batch["input_ids"], batch["labels"])


def test_contrast_loss_is_nll_plus_the_cross_entropy_of_the_implied_level(tokenizer: Any, tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    swap = level_swap(tokenizer, "user")
    trait = TRAITS[2]
    rows = [_encode(tokenizer, trait, Level.HIGH, "user"), _encode(tokenizer, TRAITS[4], Level.LOW, "user")]
    batch = _batch(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        loss, metrics = contrast_loss(model, batch, swap, weight=0.7)

    def reply_logp(ids: list[int], labels: list[int]) -> tuple[float, int]:
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
        targets = labels[1:]
        picked = [float(logp[i, t]) for i, t in enumerate(targets) if t != -100]
        return sum(picked), len(picked)

    own = [reply_logp(*row) for row in rows]
    other = [
        reply_logp(*_encode(tokenizer, trait, Level.LOW, "user")),
        reply_logp(*_encode(tokenizer, TRAITS[4], Level.HIGH, "user")),
    ]
    nll = -sum(lp for lp, _ in own) / sum(n for _, n in own)
    margins = [a[0] - b[0] for a, b in zip(own, other, strict=True)]
    contrast = sum(float(torch.nn.functional.softplus(torch.tensor(-m))) for m in margins) / 2
    assert float(loss) == pytest.approx(nll + 0.7 * contrast, rel=1e-4)
    assert metrics["level/contrast"] == pytest.approx(contrast, rel=1e-4)
    assert metrics["level/margin"] == pytest.approx(sum(margins) / 2, rel=1e-3, abs=1e-4)
    assert metrics["level/accuracy"] == sum(m > 0 for m in margins) / 2


def test_level_contrast_is_for_unified_sft_only() -> None:
    assert TrainSpec(level_contrast=0.5).level_contrast == 0.5
    with pytest.raises(ValueError, match="level_contrast needs method sft and the unified layout"):
        TrainSpec(method=Method.DPO, level_contrast=0.5)
    with pytest.raises(ValueError, match="level_contrast needs"):
        TrainSpec(layout="per-trait", conditions=["extraversion:high"], level_contrast=0.5)
    with pytest.raises(ValueError):
        TrainSpec(level_contrast=-1)


@pytest.mark.slow  # trains
def test_unified_sft_with_level_contrast_trains_and_reports_it(tiny_model: Path, tmp_path: Path) -> None:
    spec = TrainSpec(layout="unified", level_contrast=1.0, eval=True, **FAST)
    rows, report = load_dataset_rows(spec)
    data = prepare(spec, rows, report, None)
    seen: list[dict[str, Any]] = []
    result = train_adapter(
        spec, data, str(tiny_model), tmp_path / "out", tmp_path / "ckpt", show_progress_bar=False, progress=seen.append
    )
    assert result.steps == 3 and result.train_loss is not None and result.train_loss > 0
    assert result.eval_loss is not None and result.eval_loss > 0  # evaluation goes through the same loss
    logged = [info for info in seen if "loss" in info]
    assert logged and all("level/accuracy" in info and "level/margin" in info for info in logged)
    check_adapter_folder(tmp_path / "out")
