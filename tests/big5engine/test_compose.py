"""Adapter composition: the folder we write equals the weighted sum of deltas and PEFT's own ``cat``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from big5engine.compose import CompositionError, compose_adapters, delta_weights, read_manifest
from big5personas.registry import check_adapter_folder

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL = [*ATTN, "gate_proj", "up_proj", "down_proj"]


def _tiny_llama(intermediate_size: int = 64):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=intermediate_size,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    return LlamaForCausalLM(config)


def _make_adapter(
    folder: Path, *, r: int, alpha: int, targets: list[str], seed: int, intermediate_size: int = 64, **lora: object
) -> Path:
    """A PEFT LoRA on a tiny random Llama with random, nonzero A and B."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        _tiny_llama(intermediate_size),
        LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, **lora),  # type: ignore[arg-type]
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("loras")
    return [
        _make_adapter(root / "a", r=4, alpha=8, targets=ALL, seed=1),
        _make_adapter(root / "b", r=2, alpha=16, targets=ATTN, seed=2),  # fewer modules, other rank/alpha
        _make_adapter(root / "c", r=8, alpha=8, targets=["q_proj", "v_proj", "down_proj"], seed=3),
    ]


WEIGHTS = [0.75, -0.5, -1.0]


def _expected(parts: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for folder, weight in zip(parts, weights, strict=True):
        for module, delta in delta_weights(folder).items():
            total[module] = total.get(module, torch.zeros_like(delta)) + weight * delta
    return total


def test_composed_delta_is_the_weighted_sum(parts: list[Path], tmp_path: Path) -> None:
    out = compose_adapters(list(zip(parts, WEIGHTS, strict=True)), tmp_path / "combo")
    got = delta_weights(out)
    expected = _expected(parts, WEIGHTS)
    assert set(got) == set(expected)
    assert len(got) == len(ALL)
    for module, delta in expected.items():
        assert delta.abs().max() > 0
        torch.testing.assert_close(got[module], delta, rtol=1e-5, atol=1e-6, msg=module)

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 14
    assert sorted(config["target_modules"]) == sorted(ALL)
    assert not config["use_rslora"] and config["bias"] == "none"
    check_adapter_folder(out, max_rank=64)  # servable


def test_matches_peft_add_weighted_adapter_cat(parts: list[Path], tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    model = PeftModel.from_pretrained(_tiny_llama(), parts[0], adapter_name="p0")
    for i, folder in enumerate(parts[1:], start=1):
        model.load_adapter(folder, adapter_name=f"p{i}")
    model.add_weighted_adapter(["p0", "p1", "p2"], WEIGHTS, "combo", combination_type="cat")
    model.save_pretrained(tmp_path / "peft", selected_adapters=["combo"])
    peft_dir = tmp_path / "peft" / "combo"

    ours = compose_adapters(list(zip(parts, WEIGHTS, strict=True)), tmp_path / "ours")
    peft_deltas, our_deltas = delta_weights(peft_dir), delta_weights(ours)
    assert set(peft_deltas) == set(our_deltas)
    for module, delta in peft_deltas.items():
        torch.testing.assert_close(our_deltas[module], delta, rtol=1e-5, atol=1e-6, msg=module)
    # Same factors too, not only the same product: packed rows, zero padding, weight on A.
    peft_tensors, our_tensors = (
        load_file(str(peft_dir / "adapter_model.safetensors")),
        load_file(str(ours / "adapter_model.safetensors")),
    )
    assert set(peft_tensors) == set(our_tensors)
    for key, tensor in peft_tensors.items():
        torch.testing.assert_close(our_tensors[key], tensor, rtol=1e-5, atol=1e-7, msg=key)
    peft_config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert peft_config["r"] == json.loads((ours / "adapter_config.json").read_text())["r"]


def test_single_fractional_part_and_manifest(parts: list[Path], tmp_path: Path) -> None:
    meta = [{"adapter": "a@1", "sha256": "f" * 64}]
    out = compose_adapters([(parts[0], 0.25)], tmp_path / "one", part_meta=meta)
    for module, delta in delta_weights(parts[0]).items():
        torch.testing.assert_close(delta_weights(out)[module], 0.25 * delta, rtol=1e-5, atol=1e-7)
    manifest = read_manifest(out)
    assert manifest is not None
    assert manifest["parts"] == [{"adapter": "a@1", "sha256": "f" * 64, "path": str(parts[0]), "weight": 0.25}]
    assert manifest["rank"] == 4


def test_replaces_an_existing_folder_atomically(parts: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "combo"
    compose_adapters([(parts[0], 1.0), (parts[1], 1.0)], out)
    compose_adapters([(parts[0], -1.0), (parts[1], 0.5)], out)
    expected = _expected(parts[:2], [-1.0, 0.5])
    for module, delta in delta_weights(out).items():
        torch.testing.assert_close(delta, expected[module], rtol=1e-5, atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == ["combo"]  # no staging or trash left behind


@pytest.mark.parametrize("flag", ["use_rslora", "use_dora"])
def test_refuses_rslora_and_dora(parts: list[Path], tmp_path: Path, flag: str) -> None:
    odd = _make_adapter(tmp_path / flag, r=4, alpha=8, targets=ATTN, seed=4, **{flag: True})
    with pytest.raises(CompositionError, match="rsLoRA" if flag == "use_rslora" else "DoRA"):
        compose_adapters([(parts[0], 1.0), (odd, 0.5)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_mismatched_base_shapes(parts: list[Path], tmp_path: Path) -> None:
    other = _make_adapter(tmp_path / "other", r=4, alpha=8, targets=ALL, seed=5, intermediate_size=96)
    with pytest.raises(CompositionError, match="different base models"):
        compose_adapters([(parts[0], 1.0), (other, 1.0)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_empty_and_non_adapters(tmp_path: Path) -> None:
    with pytest.raises(CompositionError, match="no parts"):
        compose_adapters([], tmp_path / "out")
    with pytest.raises(CompositionError, match="not a PEFT LoRA folder"):
        compose_adapters([(tmp_path, 1.0)], tmp_path / "out")
