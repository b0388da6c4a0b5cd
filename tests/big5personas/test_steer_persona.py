"""Steering personas: vector sets in the registry, the steer method, steering added to an adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from big5core.traits import TRAITS, Trait
from big5engine.compose import read_manifest
from big5engine.steering import (
    STEER_FILE,
    STEER_LAYOUT,
    SteeringError,
    check_vector_folder,
    read_steer_file,
    read_vector_set,
    steer_rows,
    write_vector_set,
)
from big5personas import registry
from big5personas.resolver import PersonaNotFound
from big5personas.spec import PersonaError, PersonaSpec
from tests.big5personas.support import BASE, Env, spec

LAYERS, HIDDEN = 1, 32
MODEL = {"hidden_size": HIDDEN, "num_attention_heads": 4, "head_dim": 8, "num_hidden_layers": LAYERS}


def _vectors(seed: int = 0) -> dict[Trait, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {t: torch.randn(LAYERS, HIDDEN, generator=generator) for t in TRAITS}


def _meta(**extra: object) -> dict[str, object]:
    return {
        "model": MODEL,
        "num_layers": LAYERS,
        "hidden_size": HIDDEN,
        "layers": [0],
        "scales": {t.value: 2.0 for t in TRAITS},
        "depth": LAYERS,
        **extra,
    }


def publish_vectors(env: Env, name: str = "vec", seed: int = 0) -> registry.Adapter:
    staged = env.root / f"staged-{name}-{seed}"
    write_vector_set(staged, _vectors(seed), _meta())
    with env.sessions() as session, session.begin():
        row = registry.publish(
            session,
            staged,
            env.settings.adapters_dir,
            name=name,
            base_model=BASE,
            method="steer",
            layout=STEER_LAYOUT,
            traits={},
            check=check_vector_folder,
        )
        session.expunge(row)
    return row


def test_vector_set_round_trip_and_rows(tmp_path: Path) -> None:
    vectors = _vectors()
    write_vector_set(tmp_path / "set", vectors, _meta())
    read = read_vector_set(tmp_path / "set")
    assert read.layers == [0] and read.model == MODEL
    rows = steer_rows(read, {Trait.EXTRAVERSION: 0.5, Trait.NEUROTICISM: -1.0})
    expected = 0.5 * 2.0 * vectors[Trait.EXTRAVERSION] - 2.0 * vectors[Trait.NEUROTICISM]
    assert torch.allclose(rows, expected)
    assert torch.equal(steer_rows(read, {}), torch.zeros(LAYERS, HIDDEN))


@pytest.mark.parametrize(
    "damage",
    ["truncate", "shape", "nan", "meta"],
)
def test_a_damaged_vector_set_is_refused(tmp_path: Path, damage: str) -> None:
    from safetensors.torch import save_file

    folder = tmp_path / "set"
    vectors = _vectors()
    write_vector_set(folder, vectors, _meta())
    tensors = folder / "vectors.safetensors"
    if damage == "truncate":
        tensors.write_bytes(tensors.read_bytes()[:50])
    elif damage == "shape":
        save_file({t.value: torch.zeros(LAYERS, HIDDEN + 1) for t in TRAITS}, str(tensors))
    elif damage == "nan":
        save_file({t.value: torch.full((LAYERS, HIDDEN), float("nan")) for t in TRAITS}, str(tensors))
    else:
        (folder / "vectors.json").write_text("{not json")
    with pytest.raises(SteeringError):
        read_vector_set(folder)


def test_model_name_grammar_carries_steering() -> None:
    parsed = PersonaSpec.from_model_name("big5/steer?extraversion=0.5")
    assert parsed.method.value == "steer" and parsed.to_key() == "big5/steer?extraversion=0.5"
    combined = PersonaSpec.from_model_name("big5/dpo?extraversion=high&steer.extraversion=0.33")
    assert combined.quantised_steer() == {Trait.EXTRAVERSION: 0.35}
    assert combined.to_key() == "big5/dpo?extraversion=1&steer.extraversion=0.35"
    with pytest.raises(PersonaError):
        PersonaSpec.from_model_name("big5/dpo?steer.extraversion=2")


def test_steer_persona_is_served_from_a_folder_with_the_vectors(env: Env) -> None:
    row = publish_vectors(env)
    resolver = env.resolver()
    with resolver.holding(spec("steer", extraversion=0.5)) as persona:
        assert persona.method.value == "steer" and persona.composed
        assert persona.key == f"big5/steer?extraversion=0.5&adapter={row.ref}"
        assert persona.steering is not None and persona.steering["vectors"] == row.ref
        assert persona.report()["steering"]["layers"] == [0]
        rows = read_steer_file(persona.adapter_path / STEER_FILE, LAYERS, HIDDEN)
        expected = 0.5 * 2.0 * _vectors()[Trait.EXTRAVERSION]
        assert torch.allclose(rows, expected)
        config = json.loads((persona.adapter_path / "adapter_config.json").read_text())
        assert config["r"] == 1  # the null LoRA: a slot, no delta
        assert read_manifest(persona.adapter_path)["steer"]["traits"] == {"extraversion": 0.5}


def test_steering_added_to_an_adapter_keeps_its_weights_and_instruction(env: Env) -> None:
    publish_vectors(env)
    resolver = env.resolver()
    plain = resolver.resolve(spec("sft", openness="high"))
    steered_spec = PersonaSpec.model_validate(
        {"method": "sft", "traits": {"openness": "high"}, "steer": {"openness": 0.25}}
    )
    with resolver.holding(steered_spec) as persona:
        assert persona.prefix == plain.prefix and persona.template_id == plain.template_id
        assert persona.key == plain.key + "&steer.openness=0.25"
        manifest = read_manifest(persona.adapter_path)
        assert [p["adapter"] for p in manifest["parts"]] == [plain.adapter_name]
        assert (persona.adapter_path / STEER_FILE).is_file()
    resolver.release(plain)


def test_no_vectors_and_tampered_vectors_are_refused(env: Env) -> None:
    resolver = env.resolver()
    with pytest.raises(PersonaNotFound, match="steer extract"):
        resolver.resolve(spec("steer", extraversion=1))
    row = publish_vectors(env)
    tensors = Path(row.path) / "vectors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(registry.ChecksumMismatch):
        env.resolver().resolve(spec("steer", extraversion=1))


def test_an_explicit_vector_set_version_is_used(env: Env) -> None:
    first = publish_vectors(env, seed=0)
    publish_vectors(env, seed=1)
    resolver = env.resolver()
    explicit = PersonaSpec.model_validate({"method": "steer", "traits": {"openness": 1}, "adapter": first.ref})
    with resolver.holding(explicit) as persona:
        assert persona.steering is not None and persona.steering["vectors"] == first.ref
        rows = read_steer_file(persona.adapter_path / STEER_FILE)
        assert torch.allclose(rows, 2.0 * _vectors(0)[Trait.OPENNESS])
    with pytest.raises(PersonaError):
        resolver.resolve(
            PersonaSpec.model_validate({"method": "steer", "traits": {"openness": 1}, "adapter": "u-sft@1"})
        )
