"""DExperts decoding on a tiny random Llama with a random LoRA expert (real transformers + PEFT), and the io."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from big5core.datagen import DatagenError, DatagenSpec
from big5core.prompts import DatagenTemplate, datagen_expert, datagen_turn0, datagen_turn1
from big5core.traits import Level, Trait
from tests.model_support import make_tiny_llama
from trainer.datagen.dexperts import DExperts, Member, Sampling, combine
from trainer.datagen.io import PartFile, read_scenarios

PROMPTS = [
    [{"role": "user", "content": "Hey, I finally finished the garden fence. Want to come and see it?"}],
    [{"role": "user", "content": "Hi"}],
]
EXPERT_PROMPTS = [[{"role": "user", "content": "Be loud."}], [{"role": "user", "content": "Be quiet and brief."}]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, bundled_model_path: Path) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", bundled_model_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=64, target_modules="all-linear", init_lora_weights=False)
    peft = get_peft_model(model, config, adapter_name="expert")
    peft.add_adapter("anti", LoraConfig(r=4, lora_alpha=64, target_modules="all-linear", init_lora_weights=False))
    return tokenizer, peft.eval()


def _reference(tokenizer: Any, model: Any, engine: DExperts, i: int, sampling: Sampling, seed: int) -> list[int]:
    """transformers' own generate on the base model (adapters off), same options and seed."""
    ids, mask = engine.encode(PROMPTS[i : i + 1])
    torch.manual_seed(seed)
    with model.disable_adapter():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=sampling.temperature > 0,
            temperature=sampling.temperature or None,
            top_p=sampling.top_p,
            top_k=None,
            max_new_tokens=sampling.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("sampling", [Sampling(0.0, 1.0, 12), Sampling(0.9, 0.9, 12)], ids=["greedy", "sampled"])
def test_alpha_zero_is_the_base_models_own_generation(tiny: Any, sampling: Sampling) -> None:
    tokenizer, model = tiny
    engine = DExperts(tokenizer, Member(model), Member(model, "expert"), Member(model, "anti"))
    for i, seed in ((0, 7), (1, 8)):
        ours = engine.generate(
            PROMPTS[i : i + 1],
            alpha=0.0,
            expert_messages=EXPERT_PROMPTS[i : i + 1],
            antiexpert_messages=EXPERT_PROMPTS[::-1][i : i + 1],
            sampling=sampling,
            seeds=[seed],
        )[0]
        reference = _reference(tokenizer, model, engine, i, sampling, seed)
        assert list(ours.ids) == reference[: len(ours.ids)] and len(ours.ids) > 0
        if not ours.finished:
            assert len(ours.ids) == sampling.max_new_tokens == len(reference)
    # the experts really steer: a large alpha changes the greedy tokens
    steered = engine.generate(
        PROMPTS, alpha=4.0, expert_messages=EXPERT_PROMPTS, antiexpert_messages=EXPERT_PROMPTS, sampling=sampling
    )
    plain = engine.generate(
        PROMPTS, alpha=0.0, expert_messages=EXPERT_PROMPTS, antiexpert_messages=EXPERT_PROMPTS, sampling=sampling
    )
    assert [g.ids for g in steered] != [g.ids for g in plain]


def test_batched_rows_match_single_rows(tiny: Any) -> None:
    tokenizer, model = tiny
    engine = DExperts(tokenizer, Member(model), Member(model, "expert"))
    sampling = Sampling(0.0, 1.0, 10)
    batch = engine.generate(PROMPTS, alpha=1.0, expert_messages=EXPERT_PROMPTS, sampling=sampling)
    single = [
        engine.generate(PROMPTS[i : i + 1], alpha=1.0, expert_messages=EXPERT_PROMPTS[i : i + 1], sampling=sampling)[0]
        for i in range(2)
    ]
    assert [g.ids for g in batch] == [g.ids for g in single]


def test_combine_formula() -> None:
    base, expert, anti = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0]), torch.tensor([0.5, 0.5])
    assert torch.equal(combine(base, 0.0, expert, anti), base)
    assert torch.allclose(combine(base, 0.5, expert), torch.tensor([2.5, 1.5]))
    assert torch.allclose(combine(base, 2.0, expert, anti), torch.tensor([6.0, -1.0]))
    with pytest.raises(ValueError, match="anti-expert needs an expert"):
        DExperts(None, Member(None), antiexpert=Member(None))  # type: ignore[arg-type]


def test_prompt_templates_carry_the_scenario_and_level() -> None:
    turn0 = datagen_turn0("Sharif", "Karis", "Sharif helps Karis.")[0]["content"]
    assert "Sharif helps Karis." in turn0 and "Karis" in turn0
    turn1 = datagen_turn1("Sharif", "Karis", "Sharif helps Karis.", "Hey!", Trait.NEUROTICISM, Level.LOW)[0]
    assert "low neuroticism" in turn1["content"] and '"Hey!"' in turn1["content"]
    plain = datagen_expert(DatagenTemplate.EXPERT_PLAIN, "Hey!", Trait.OPENNESS, Level.HIGH)
    assert plain == [{"role": "user", "content": "Hey!"}]
    unified = datagen_expert(DatagenTemplate.EXPERT_UNIFIED, "Hey!", Trait.OPENNESS, Level.HIGH)[0]["content"]
    assert unified.startswith("You are a helpful assistant") and unified.endswith("Openness - high\n\nHey!")


# ----------------------------------------------------------------------------- io


def test_read_scenarios(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text(
        "original_index,relation,head,personx,persony,narrative,train_input\n"
        "7.0,xReact,PersonX helps PersonY,Ana,Bo,,\n"
        "7,xReact,PersonX helps PersonY,Ana,Bo,,\n"
        "8,,,Cy,Di,Cy and Di meet.,Hello Di\n"
    )
    scenarios = read_scenarios(path)
    assert [s.original_index for s in scenarios] == ["7", "8"]
    assert scenarios[0].text == "Ana helps Bo" and scenarios[0].speaker_x is None
    assert scenarios[1].text == "Cy and Di meet." and scenarios[1].speaker_x == "Hello Di"
    assert len(read_scenarios(path, limit=1)) == 1

    jsonl = tmp_path / "s.jsonl"
    jsonl.write_text(json.dumps({"original_index": 1, "train_input": "Hi"}) + "\n\n")
    assert read_scenarios(jsonl)[0].speaker_x == "Hi"

    for name, text, message in [
        ("missing.csv", None, "no such scenarios file"),
        ("s.txt", "x", "unsupported scenarios file type"),
        ("nocol.csv", "head\nPersonX sings\n", "missing required column original_index"),
        ("empty.csv", "original_index,head\n,PersonX sings\n", "null original_index"),
        ("bare.csv", "original_index,head\n3,\n", "has no narrative, literal, head or train_input"),
        ("bad.jsonl", "{not json\n", "line 1 is not valid JSON"),
        ("list.jsonl", "\n[1]\n", "line 2 is not a JSON object"),
        ("zero.csv", "", "empty file"),
        ("header.csv", "original_index,head\n", "no scenarios in"),
    ]:
        target = tmp_path / name
        if text is not None:
            target.write_text(text)
        with pytest.raises(DatagenError, match=message):
            read_scenarios(target)


def test_part_file_resumes_after_the_last_complete_row(tmp_path: Path) -> None:
    part = PartFile(tmp_path / "out.csv", "fp1")
    assert part.resume() == []
    part.append([{"i": 0}, {"i": 1}])
    with part.path.open("ab") as handle:
        handle.write(b'{"i": 2, "torn')  # a kill mid-write
    assert part.resume() == [{"i": 0}, {"i": 1}]
    assert part.path.read_bytes().endswith(b'{"i": 1}\n')  # the torn line is gone
    part.append([{"i": 2}])
    assert [r["i"] for r in part.resume()] == [0, 1, 2]
    assert PartFile(tmp_path / "out.csv", "another run").resume() == []  # not ours: discarded
    assert not part.path.exists()


def test_spec_validation() -> None:
    spec = DatagenSpec(scenarios="s.csv", conditions=["Extraversion:HIGH", "extraversion:high"])
    assert spec.conditions == ["extraversion:high"] and spec.kind == "datagen"
    with pytest.raises(ValueError, match="trait:level"):
        DatagenSpec(scenarios="s.csv", conditions=["extraversion"])
    with pytest.raises(ValueError):
        DatagenSpec(scenarios="s.csv", alpha=-1)
    with pytest.raises(ValueError):
        DatagenSpec.model_validate({"scenarios": "s.csv", "alfa": 1})
