"""Persona resolution against a real SQLite registry and small random adapters on disk (no engine)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

import big5engine.compose_cache as compose_cache_module
from big5core.models import Adapter, AdapterState
from big5core.prompts import ChatMessage, TemplateId, prompt_inst, unified_instruction
from big5core.settings import EngineSettings
from big5core.traits import Level, Method, Trait
from big5engine.compose import delta_weights
from big5personas.registry import ChecksumMismatch
from big5personas.resolver import AdapterNotReadyError, PersonaNotFound, composed_name
from big5personas.spec import PersonaError, PersonaSpec
from tests.big5personas.support import BASE, Env, spec

# -- keys -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("big5/direct", "big5/direct"),
        ("big5/sft?openness=0.75&neuroticism=-1", "big5/sft?openness=0.75&neuroticism=-1"),
        ("big5/sft?neuroticism=low&O=high", "big5/sft?openness=1&neuroticism=-1"),
        ("BIG5/DPO?Openness=0.8&extraversion=0.1", "big5/dpo?openness=0.75"),
        ("big5/sft?openness=high&adapter=u-sft@3", "big5/sft?openness=1&adapter=u-sft@3"),
        (
            "big5/prompt?agreeableness=-0.5&conscientiousness=0.25",
            "big5/prompt?conscientiousness=0.25&agreeableness=-0.5",
        ),
    ],
)
def test_key_round_trip(text: str, key: str) -> None:
    parsed = PersonaSpec.from_model_name(text)
    assert parsed.to_key() == key
    assert PersonaSpec.from_model_name(key).to_key() == key


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("gpt-4o", "big5/<method>"),
        ("big5/telepathy", "unknown persona method"),
        ("big5/sft?openness=2", r"in \[-1, 1\]"),
        ("big5/sft?openness=nan", r"in \[-1, 1\]"),
        ("big5/sft?charm=1", "unknown trait"),
        ("big5/sft?openness", "needs a value"),
        ("big5/sft?openness=1&O=low", "twice"),
        ("big5/sft?adapter=x@latest", "bad adapter reference"),
    ],
)
def test_model_name_errors(text: str, match: str) -> None:
    with pytest.raises(PersonaError, match=match):
        PersonaSpec.from_model_name(text)


def test_spec_forbids_unknown_fields() -> None:
    with pytest.raises(ValueError, match="extra"):
        PersonaSpec.model_validate({"method": "sft", "trait": {"openness": 1}})


# -- baselines --------------------------------------------------------------------------------


def test_direct(env: Env) -> None:
    resolved = env.resolver().resolve(spec("direct"))
    assert (resolved.prefix, resolved.adapter_name, resolved.key) == (None, None, "big5/direct")
    assert resolved.template_id is TemplateId.PLAIN
    with pytest.raises(PersonaError, match="no traits"):
        env.resolver().resolve(spec("direct", openness=1))


def test_prompt_single_pole_goes_before_the_last_user_turn(env: Env) -> None:
    resolved = env.resolver().resolve(spec("prompt", openness="high"))
    assert resolved.prefix == prompt_inst(Trait.OPENNESS, Level.HIGH) == "You are a person with high openness."
    assert resolved.template_id is TemplateId.PROMPT_INST and resolved.adapter_name is None
    messages = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="Hi."),
        ChatMessage(role="assistant", content="Hello."),
        ChatMessage(role="user", content="How are you?"),
    ]
    out = resolved.apply(messages)
    assert out[-1]["content"] == "You are a person with high openness.\n\nHow are you?"
    assert [m["content"] for m in out[:3]] == ["Be brief.", "Hi.", "Hello."]
    assert messages[-1]["content"] == "How are you?"  # input untouched


def test_prompt_intensities(env: Env) -> None:
    resolved = env.resolver().resolve(spec("prompt", neuroticism=-0.5, openness=0.8, extraversion=1, agreeableness=0.2))
    assert resolved.prefix == (
        "You are a person with fairly high openness. You are a person with high extraversion. "
        "You are a person with slightly high agreeableness. You are a person with moderately low neuroticism."
    )
    assert resolved.traits == {"openness": 0.75, "extraversion": 1.0, "agreeableness": 0.25, "neuroticism": -0.5}
    with pytest.raises(PersonaError, match="nonzero trait"):
        env.resolver().resolve(spec("prompt"))


def test_demo(env: Env) -> None:
    calls: list[tuple[Trait, Level]] = []

    def examples(trait: Trait, level: Level) -> list[str]:
        calls.append((trait, level))
        return [f"{trait.value}-{level.value} reply {i}" for i in range(12)]

    resolver = env.resolver(demo=examples)
    resolved = resolver.resolve(spec("demo", neuroticism="low"))
    assert resolved.template_id is TemplateId.PROMPT_DEMO
    assert resolved.prefix is not None
    assert "Example 10: neuroticism-low reply 9" in resolved.prefix and "reply 10" not in resolved.prefix
    resolver.resolve(spec("demo", neuroticism=-1))
    assert calls == [(Trait.NEUROTICISM, Level.LOW)]  # cached
    with pytest.raises(PersonaError, match="exactly one trait"):
        resolver.resolve(spec("demo", neuroticism=-1, openness=1))
    with pytest.raises(PersonaError, match="exactly one trait"):
        resolver.resolve(spec("demo", openness=0.5))
    with pytest.raises(PersonaError, match="dataset"):
        env.resolver().resolve(spec("demo", openness=1))
    with pytest.raises(PersonaNotFound, match="has 3"):
        env.resolver(demo=lambda t, lv: ["a", "b", "c"]).resolve(spec("demo", openness=1))


# -- adapters chosen by traits ----------------------------------------------------------------


def test_single_pole_uses_the_unified_adapter(env: Env) -> None:
    resolved = env.resolver().resolve(spec("sft", extraversion="low"))
    assert resolved.adapter_name == "u-sft@1"
    assert resolved.template_id is TemplateId.UNIFIED
    assert resolved.prefix == unified_instruction(Trait.EXTRAVERSION, Level.LOW)
    assert resolved.parts == ({"adapter": "u-sft@1", "weight": 1.0},)


def test_single_pole_without_unified_uses_the_per_trait_adapter(env: Env) -> None:
    resolver = env.resolver()
    resolved = resolver.resolve(spec("dpo", neuroticism=-1))
    assert resolved.adapter_name == "dpo-neuroticism-low@1" and resolved.prefix is None
    assert resolved.adapter_path == env.root / "adapters" / "dpo-neuroticism-low"
    assert not resolved.composed and resolver.stats == {"composed_hits": 0, "composed_misses": 0}


def test_mixed_vector_is_composed_exactly(env: Env) -> None:
    resolver = env.resolver()
    resolved = resolver.resolve(spec("sft", neuroticism=-0.5, openness=0.75))
    assert resolved.composed and resolved.template_id is TemplateId.PLAIN and resolved.prefix is None
    assert resolved.key == "big5/sft?openness=0.75&neuroticism=-0.5"
    assert resolved.parts == (
        {"adapter": "sft-openness-high@1", "weight": 0.75},
        {"adapter": "sft-neuroticism-low@1", "weight": 0.5},
    )
    assert resolved.adapter_path == resolver.composed_dir / str(resolved.adapter_name)
    o_high = delta_weights(env.root / "adapters" / "sft-openness-high")
    n_low = delta_weights(env.root / "adapters" / "sft-neuroticism-low")
    got = delta_weights(resolved.adapter_path)
    for module, delta in got.items():
        torch.testing.assert_close(delta, 0.75 * o_high[module] + 0.5 * n_low[module], rtol=1e-5, atol=1e-6)
    report = json.loads(json.dumps(resolved.report()))
    assert report["adapter"] == resolved.adapter_name and report["composed"] is True
    assert report["parts"][1] == {"adapter": "sft-neuroticism-low@1", "weight": 0.5}
    assert report["template_id"] == TemplateId.PLAIN.value and report["method"] == "sft"

    low = resolver.resolve(spec("sft", openness=-0.5))  # one part below weight 1: still composed
    assert low.composed and low.parts == ({"adapter": "sft-openness-low@1", "weight": 0.5},)


def test_missing_per_trait_adapter_is_named(env: Env) -> None:
    with pytest.raises(PersonaNotFound, match="extraversion=high"):
        env.resolver().resolve(spec("dpo", openness=1, extraversion=0.5))
    with pytest.raises(PersonaNotFound, match=r"conscientiousness=low \(and no unified adapter\)"):
        env.resolver().resolve(spec("dpo", conscientiousness=-1))


def test_adapter_methods_need_traits(env: Env) -> None:
    with pytest.raises(PersonaError, match="nonzero trait"):
        env.resolver().resolve(spec("sft"))
    with pytest.raises(PersonaError, match="quantisation"):
        env.resolver().resolve(spec("sft", openness=0.1))


def test_composed_rank_over_the_engine_limit(env: Env) -> None:
    settings = env.settings.model_copy(update={"engine": EngineSettings(max_lora_rank=2)})
    with pytest.raises(PersonaError, match="max_lora_rank 2"):
        env.resolver(settings).resolve(spec("sft", openness=1, neuroticism=-1))


def test_composed_adapter_built_once_under_concurrency(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    builds: list[Path] = []
    real = compose_cache_module.compose_adapters

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        builds.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(compose_cache_module, "compose_adapters", counting)
    resolver = env.resolver()
    barrier = threading.Barrier(8)
    results, errors = [], []

    def worker() -> None:
        try:
            barrier.wait()
            results.append(resolver.resolve(spec("sft", openness=0.5, extraversion=0.25)))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len({r.adapter_name for r in results}) == 1 and len(builds) == 1
    assert resolver.stats == {"composed_hits": 7, "composed_misses": 1}
    name = results[0].adapter_name
    with env.sessions() as session:
        shas = [session.get(Adapter, i).sha256 for i in (2, 5)]  # type: ignore[union-attr]
    assert name == composed_name([(shas[0], 0.5), (shas[1], 0.25)])
    # A fresh resolver (a restart) finds the folder on disk and reuses it under the same name.
    again = env.resolver()
    assert again.resolve(spec("sft", extraversion=0.25, openness=0.5)).adapter_name == name
    assert again.stats == {"composed_hits": 1, "composed_misses": 0} and len(builds) == 1


def test_lru_eviction(env: Env) -> None:
    resolver = env.resolver()  # budget 2

    def use(value: float) -> Path | None:
        """Resolve, then release as the service does once the engine unloads it (held folders stay)."""
        resolved = resolver.resolve(spec("sft", openness=value))
        assert resolved.adapter_name is not None
        resolver.release_composed(resolved.adapter_name)
        return resolved.adapter_path

    a = use(0.5)
    b = use(0.25)
    assert a is not None and b is not None
    use(0.5)  # a is now the most recently used
    c = use(0.75)
    assert a.is_dir() and c is not None and c.is_dir() and not b.exists()
    use(0.25)  # b again: rebuilt, evicting a (older than c)
    assert b.is_dir() and c.is_dir() and not a.exists()
    assert resolver.stats == {"composed_hits": 1, "composed_misses": 4}
    assert sorted(p.name for p in resolver.composed_dir.iterdir() if not p.name.startswith(".")) == sorted(
        [b.name, c.name]
    )


def test_corrupted_adapter_is_refused(env: Env) -> None:
    folder = env.root / "adapters" / "dpo-openness-high"
    (folder / "adapter_model.safetensors").write_bytes(b"not the trained weights")
    with pytest.raises(ChecksumMismatch, match="dpo-openness-high@1"):
        env.resolver().resolve(spec("dpo", openness=1))
    with pytest.raises(ChecksumMismatch):
        env.resolver().resolve(spec("dpo", openness=0.5, neuroticism=-1))


# -- explicit adapters ------------------------------------------------------------------------


def test_explicit_unified_adapter(env: Env) -> None:
    resolved = env.resolver().resolve(PersonaSpec(adapter="u-sft@1", traits={"agreeableness": "low"}))  # type: ignore[arg-type]
    assert resolved.adapter_name == "u-sft@1" and resolved.template_id is TemplateId.UNIFIED
    assert resolved.prefix == unified_instruction(Trait.AGREEABLENESS, Level.LOW)
    assert resolved.key == "big5/sft?agreeableness=-1&adapter=u-sft@1"
    with pytest.raises(PersonaError, match="unified adapter"):
        env.resolver().resolve(PersonaSpec(adapter="u-sft", traits={"agreeableness": 0.5}))  # type: ignore[arg-type]


def test_explicit_per_trait_adapter(env: Env) -> None:
    resolver = env.resolver()
    resolved = resolver.resolve(PersonaSpec(adapter="dpo-agreeableness-high"))
    assert resolved.method is Method.DPO  # method left at its default: the adapter's
    assert resolved.adapter_name == "dpo-agreeableness-high@1" and resolved.prefix is None
    assert resolved.traits == {"agreeableness": 1.0}
    assert resolved.key == "big5/dpo?agreeableness=1&adapter=dpo-agreeableness-high@1"
    assert resolver.resolve(PersonaSpec.from_model_name(resolved.key)) == resolved
    with pytest.raises(PersonaError, match="trained with dpo"):
        resolver.resolve(PersonaSpec(method=Method.SFT, adapter="dpo-agreeableness-high"))
    with pytest.raises(PersonaError, match="differ"):
        resolver.resolve(PersonaSpec(adapter="dpo-agreeableness-high", traits={"openness": 1}))  # type: ignore[arg-type]
    with pytest.raises(PersonaError, match="sft or dpo"):
        resolver.resolve(PersonaSpec(method=Method.PROMPT, adapter="dpo-agreeableness-high"))


def test_explicit_adapter_errors(env: Env) -> None:
    env.add("foreign", traits={"openness": "high"}, base="other/base-8b")
    env.add("unfinished", traits={"openness": "high"}, state=AdapterState.PENDING)
    resolver = env.resolver()
    with pytest.raises(PersonaError, match=r"'other/base-8b'.*'tiny/llama-test'"):
        resolver.resolve(PersonaSpec(adapter="foreign@1"))
    with pytest.raises(AdapterNotReadyError, match="pending"):
        resolver.resolve(PersonaSpec(adapter="unfinished@1"))
    with pytest.raises(PersonaNotFound, match="nope"):
        resolver.resolve(PersonaSpec(adapter="nope@2"))


def test_no_traits_and_no_method_is_direct(env: Env) -> None:
    """The design's default: a request that asks for nothing gets no persona (not a 400)."""
    for nothing in (PersonaSpec(), PersonaSpec(traits=None), PersonaSpec.model_validate({"traits": {"openness": 0}})):
        resolved = env.resolver().resolve(nothing)
        assert resolved.method is Method.DIRECT and resolved.key == "big5/direct" and resolved.adapter_name is None
    with pytest.raises(PersonaError, match="nonzero trait"):  # a method named without traits still says why
        env.resolver().resolve(PersonaSpec(method=Method.SFT))
    assert env.resolver().resolve(PersonaSpec.model_validate({"traits": {"openness": 1}})).method is Method.SFT


# -- the paper's prompts (issue 12) ----------------------------------------------------------------


def test_prompt_demo_is_the_authors_text_with_nothing_after_the_examples(env: Env) -> None:
    from big5core.demos import demo_examples
    from big5core.prompts import PROMPT_DEMO_HEADER, prompt_demo

    texts = [f"reply {i}" for i in range(10)]
    assert prompt_demo(texts) == PROMPT_DEMO_HEADER + "\n\n" + "\n".join(
        f"Example {i + 1}: reply {i}" for i in range(10)
    )
    assert PROMPT_DEMO_HEADER.startswith("Here are 10 examples of how people like you have responded")
    with pytest.raises(ValueError, match="exactly 10"):
        prompt_demo(texts[:9])
    resolved = env.resolver(demo=demo_examples).resolve(spec("demo", extraversion="high"))
    assert resolved.prefix is not None and "Now respond" not in resolved.prefix
    assert "extraversion" not in resolved.prefix.split("\n")[0]  # the trait-level is never named
    (provenance,) = resolved.report()["parts"]
    assert provenance["demo_seed"] == 0 and provenance["filtered"] is True
    assert len(provenance["demo_scenarios"]) == 10


def test_demos_are_seeded_random_draws_from_the_filtered_data() -> None:
    from big5core.dataset import BUNDLED_REAL, filter_artifacts, load_rows
    from big5core.demos import demo_examples

    kept, _ = filter_artifacts(load_rows(BUNDLED_REAL))
    arm = {r.speaker_y.strip() for r in kept if r.trait is Trait.OPENNESS and r.level is Level.LOW}
    first = demo_examples(Trait.OPENNESS, Level.LOW)
    assert len(first) == 10 and set(first) <= arm  # only filtered rows of the target arm
    assert demo_examples(Trait.OPENNESS, Level.LOW) == first  # seeded: reproducible
    other = demo_examples(Trait.OPENNESS, Level.LOW, seed=1)
    assert other != first and other.provenance[0]["demo_seed"] == 1
    in_file_order = sorted(
        (r for r in kept if r.trait is Trait.OPENNESS and r.level is Level.LOW), key=lambda r: r.scenario
    )
    assert list(first) != [r.speaker_y.strip() for r in in_file_order[:10]]  # random, not the first ten


@pytest.mark.parametrize(
    ("value", "sentence"),
    [
        (1.0, "You are a person with high openness."),
        (-0.9, "You are a person with low openness."),
        (0.75, "You are a person with fairly high openness."),
        (-0.5, "You are a person with moderately low openness."),
        (0.25, "You are a person with slightly high openness."),
    ],
)
def test_every_intensity_sentence_lives_in_prompts(value: float, sentence: str) -> None:
    from big5core.prompts import prompt_inst_sentence

    assert prompt_inst_sentence(Trait.OPENNESS, value) == sentence


def test_resolved_personas_record_their_base_model(env: Env) -> None:
    assert env.resolver().resolve(spec("prompt", openness=1)).report()["base_model"] == BASE
