"""The answer-format term (issue 25): probes in a questionnaire's shape with no inventory's statements; its
two targets, a KL to the base model that is zero for an untrained adapter and -log of the option numbers'
probability; training with either keeps the probes' answers nearer the format than training without it
(real TRL + PEFT on a tiny random Llama)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from big5core.prompts import FORMAT_PROBE_STATEMENTS, format_probe_scale, format_probe_text, unified_instruction
from big5core.training import TrainSpec
from big5core.traits import Level, Trait
from evaluator.inventories import builtin_inventories
from tests.model_support import make_tiny_llama
from trainer.answer_format import AnswerFormatTerm, answer_format_trainer, option_token_ids, probe_prompts
from trainer.train import load_dataset_rows, prepare, train_adapter


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, bundled_model_path: Path) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", bundled_model_path)


def test_probe_statements_are_no_inventorys() -> None:
    items = {i.text.lower().rstrip(".") for inv in builtin_inventories().values() for i in inv.items}
    for statement in FORMAT_PROBE_STATEMENTS:
        assert statement.lower().rstrip(".") not in items
    texts = [format_probe_text(i) for i in range(120)]
    assert len(set(texts)) == 120 and all("Statement: " in t and "number" in t for t in texts)


def test_unified_probes_carry_every_condition_and_end_at_the_answer(bundled_model_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path)
    unified = [tokenizer.decode(p) for p in probe_prompts(tokenizer, "unified", "user", n=10)]
    for trait in Trait:
        for level in Level:
            assert sum(unified_instruction(trait, level) in text for text in unified) == 1
    plain = [tokenizer.decode(p) for p in probe_prompts(tokenizer, "per-trait", "user", n=10)]
    assert not any("Big Five" in text for text in plain)
    assert all(text.endswith("<|im_start|>assistant\n") for text in unified + plain)


def _peft(tiny_model: Path):  # type: ignore[no-untyped-def]
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    return get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))


def test_the_term_is_zero_for_an_untrained_adapter_and_moves_lora_only(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = _peft(tiny_model)
    term = AnswerFormatTerm(probe_prompts(tokenizer, "unified", "user", n=8), 2.0, pad_id=0, per_step=4)
    loss, kl = term.loss(model, model)
    assert abs(kl) < 1e-6  # LoRA B starts at zero: the adapter is the base model
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    loss, kl = term.loss(model, model)
    assert kl > 1e-3 and abs(float(loss) - 2.0 * kl) < 1e-5
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all("lora_" in n for n in grads)


def test_option_ids_are_each_probes_scale_numbers(bundled_model_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path)
    ids = option_token_ids(tokenizer, 30)
    assert {len(row) for row in ids} == {4, 5, 7}
    for i, row in enumerate(ids):
        assert [tokenizer.decode([t]) for t in row] == [str(k) for k in range(1, len(format_probe_scale(i)) + 1)]


def test_the_options_term_is_minus_log_the_option_mass(tiny_model: Path) -> None:
    """No base distribution is computed; the value is -log p(any option number) from the full logits, and
    its gradient reaches the LoRA weights only."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = _peft(tiny_model)
    rows, options = probe_prompts(tokenizer, "unified", "user", n=6), option_token_ids(tokenizer, 6)
    with pytest.raises(ValueError, match="option token ids"):
        AnswerFormatTerm(rows, 1.0, pad_id=0, target="options")
    term = AnswerFormatTerm(rows, 3.0, pad_id=0, per_step=6, target="options", options=options)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
        probs = [torch.softmax(model(input_ids=torch.tensor([r])).logits[0, -1].float(), dim=-1) for r in rows]
    expected = -sum(float(torch.log(p[o].sum())) for p, o in zip(probs, options, strict=True)) / len(rows)
    loss, value = term.loss(model, model)
    assert term._base is None and term.metric == "format/option_nll"
    assert abs(value - expected) < 1e-4 and abs(float(loss) - 3.0 * value) < 1e-4
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all("lora_" in n for n in grads)


def test_the_answer_log_probs_are_those_of_the_full_logits(tiny_model: Path) -> None:
    """Only the last positions' logits are computed; the answer position's log-probs are unchanged by it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = _peft(tiny_model).eval()
    rows = probe_prompts(tokenizer, "unified", "user", n=6)
    assert len({len(r) for r in rows}) > 1  # probes of different lengths: the right padding varies
    term = AnswerFormatTerm(rows, 1.0, pad_id=0)
    with torch.no_grad():
        kept = term._answer_logp(model, rows)
        full = torch.stack(
            [torch.log_softmax(model(input_ids=torch.tensor([r])).logits[0, -1].float(), dim=-1) for r in rows]
        )
    assert torch.allclose(kept, full, atol=1e-4)


def test_wrapped_trainer_adds_the_term_only_in_training() -> None:
    class Base:
        def __init__(self) -> None:
            self._metrics = {"train": {"format/kl": []}}
            self.accelerator = type("A", (), {"unwrap_model": staticmethod(lambda m: m)})()

        def compute_loss(self, model, inputs, return_outputs=False, **kw):  # type: ignore[no-untyped-def]
            return (1.0, "out") if return_outputs else 1.0

    class Term:
        metric = "format/kl"

        def loss(self, model, peft_model):  # type: ignore[no-untyped-def]
            return 0.5, 0.25

    trainer = answer_format_trainer(Base, Term())()  # type: ignore[arg-type]
    training, evaluating = type("M", (), {"training": True})(), type("M", (), {"training": False})()
    assert trainer.compute_loss(training, {}) == 1.5
    assert trainer.compute_loss(training, {}, return_outputs=True) == (1.5, "out")
    assert trainer.compute_loss(evaluating, {}) == 1.0
    assert trainer._metrics["train"]["format/kl"] == [0.25, 0.25]


def _probe_term(tiny_model: Path, adapter: Path, layout: str, target: str = "base") -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), adapter)
    model.eval()
    probes = probe_prompts(tokenizer, layout, "user")  # type: ignore[arg-type]
    options = option_token_ids(tokenizer, len(probes))
    term = AnswerFormatTerm(probes, 1.0, pad_id=0, per_step=len(probes), target=target, options=options)  # type: ignore[arg-type]
    with torch.no_grad():
        return term.loss(model, model)[1]


@pytest.mark.slow  # trains three times (DPO: the same wrapper, tested above without training)
def test_training_with_the_term_keeps_the_answer_format(tiny_model: Path, tmp_path: Path) -> None:
    """Against the same training without the term: the base target keeps the probes' answer distribution
    nearer the base model's, the options target keeps more probability on the option numbers."""
    runs = {"none": (0.0, "base"), "base": (20.0, "base"), "options": (20.0, "options")}
    adapters = {}
    for label, (weight, target) in runs.items():
        spec = TrainSpec(
            method="sft", layout="unified", max_steps=6, per_device_train_batch_size=2, max_length=160,
            warmup_steps=0, learning_rate=2e-2, save_steps=50, eval=False, answer_format=weight,
            answer_format_target=target,
        )  # fmt: skip
        rows, report = load_dataset_rows(spec)
        data = prepare(spec, rows, report, None)
        out = tmp_path / label
        result = train_adapter(spec, data, str(tiny_model), out, tmp_path / f"ckpt-{label}", show_progress_bar=False)
        assert result.steps == 6
        adapters[label] = out
    kl = {k: _probe_term(tiny_model, adapters[k], "unified", "base") for k in ("none", "base")}
    nll = {k: _probe_term(tiny_model, adapters[k], "unified", "options") for k in ("none", "options")}
    assert kl["base"] < kl["none"], kl
    assert nll["options"] < nll["none"], nll
