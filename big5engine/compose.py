"""Exact LoRA composition on the adapter files alone: no base model is loaded, so it scales to 8B.

The result equals PEFT's ``add_weighted_adapter(..., combination_type="cat")`` (peft 0.21.2,
``peft/tuners/lora/model.py``). For every target module PEFT builds

    A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]   (rows, i.e. along the rank)
    B = [B_1, B_2, ...]                   (columns)

with ``s_i = lora_alpha_i / r_i``, rank ``r = sum r_i`` and ``lora_alpha = r`` (scaling 1), so that
``B @ A = sum_i w_i s_i B_i A_i``: the weighted sum of the parts' deltas, exactly. In ``cat`` mode
PEFT puts the whole weight, sign included, on ``A``; the ``sqrt(|w s|)`` split with the sign on
``A`` belongs to the ``linear``/``ties`` modes, which are not exact. We do the same as ``cat``.

Target modules: the union. A module that only some parts adapt gets the rows of those parts, packed
first, and zero rows up to the full rank -- what PEFT's ``cat`` does too (it skips an adapter that
lacks the module and leaves the rest of the zero-initialised tensor). The delta of a missing part is
zero, so the sum stays exact.

Refused with :class:`CompositionError`: rsLoRA (PEFT's ``cat`` copies ``use_rslora`` from the first
adapter, which makes the result inexact), DoRA, trained biases, ``modules_to_save``,
``rank_pattern``/``alpha_pattern``, embedding LoRA, and parts whose shapes for one module disagree
(adapters trained on different base models).

The folders it writes are kept, shared and bounded by :mod:`big5engine.compose_cache`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from big5core.errors import Conflict
from big5engine.steering import STEER_FILE, STEER_TENSOR, Steer, null_lora

if TYPE_CHECKING:  # torch is imported when composing, so importing big5personas.resolver stays light
    import torch

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MANIFEST_FILE = "composition.json"
MANIFEST_FORMAT = 1
_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"


class CompositionError(Conflict, ValueError):
    """The parts cannot be composed exactly."""

    code, title = "composition-failed", "The adapters cannot be composed exactly"


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise CompositionError(f"{folder} is not a PEFT LoRA folder ({CONFIG_FILE} + {WEIGHTS_FILE})")
    config: dict[str, Any] = json.loads(path.read_text())
    if config.get("peft_type") != "LORA":
        raise CompositionError(f"{folder}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_rslora"):
        raise CompositionError(f"{folder}: rsLoRA adapters cannot be composed exactly; train without use_rslora")
    if config.get("use_dora"):
        raise CompositionError(f"{folder}: DoRA adapters cannot be composed")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise CompositionError(f"{folder}: adapters with trained biases cannot be composed")
    if config.get("modules_to_save"):
        raise CompositionError(f"{folder}: adapters with modules_to_save cannot be composed")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise CompositionError(f"{folder}: rank_pattern/alpha_pattern are not supported")
    if config.get("target_parameters"):
        raise CompositionError(f"{folder}: LoRA on nn.Parameter (target_parameters) is not supported")
    if int(config.get("r") or 0) < 1:
        raise CompositionError(f"{folder}: rank r must be positive")
    return config


def _scaling(config: Mapping[str, Any]) -> float:
    r = int(config["r"])
    alpha = float(config.get("lora_alpha", r))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _split(tensors: Mapping[str, torch.Tensor], folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``module -> (A, B)`` from a PEFT state dict; anything else is an error."""
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in tensors:
        if key.endswith(_A_SUFFIX):
            module = key[: -len(_A_SUFFIX)]
            b_key = module + _B_SUFFIX
            if b_key not in tensors:
                raise CompositionError(f"{folder}: {key} has no matching lora_B")
            modules[module] = (tensors[key], tensors[b_key])
        elif not key.endswith(_B_SUFFIX):
            raise CompositionError(f"{folder}: unsupported tensor {key} (only lora_A/lora_B of linear layers)")
        elif key[: -len(_B_SUFFIX)] + _A_SUFFIX not in tensors:
            raise CompositionError(f"{folder}: {key} has no matching lora_A")
    return modules


def _union_targets(configs: Sequence[Mapping[str, Any]]) -> list[str] | str:
    targets = [c.get("target_modules") for c in configs]
    if all(isinstance(t, str) for t in targets):
        unique = list(dict.fromkeys(t for t in targets if isinstance(t, str)))
        return unique[0] if len(unique) == 1 else "|".join(f"({t})" for t in unique)
    if all(isinstance(t, list | tuple | set) for t in targets):
        return sorted({str(m) for t in targets for m in t})  # type: ignore[union-attr]
    raise CompositionError("parts mix regex and list target_modules; PEFT cannot combine those either")


def compose_adapters(
    parts: Sequence[tuple[Path, float]],
    out_dir: Path,
    *,
    part_meta: Sequence[Mapping[str, Any]] | None = None,
    steer: Steer | None = None,
) -> Path:
    """Write the ``cat`` composition ``sum_i w_i * delta_i`` of ``parts`` as a PEFT LoRA folder.

    ``parts`` are (adapter folder, weight) pairs; weights may be negative or fractional.
    ``part_meta`` (one mapping per part, e.g. ``{"adapter": "name@3", "sha256": ...}``) is recorded
    with the path and weight in ``composition.json``. The folder appears atomically: written in a
    temporary sibling, fsynced, and moved into place with ``os.replace`` (an existing ``out_dir`` is
    replaced); a failure (a full disk) removes the sibling, so no half-written folder is ever visible.

    ``steer`` adds steering vectors (:mod:`big5engine.steering`): its rows go into the folder's steer
    file and its metadata into the manifest; with no parts the LoRA is a rank-1 zero adapter.
    """
    if not parts and steer is None:
        raise CompositionError("nothing to compose: no parts")
    if part_meta is not None and len(part_meta) != len(parts):
        raise CompositionError("part_meta must have one entry per part")
    if parts:
        out, config, names = _cat(parts)
    else:
        assert steer is not None
        out, config = null_lora(steer.model)
        names = sorted({k.rsplit(".lora_", 1)[0] for k in out})
    total_rank = int(config["r"])
    folders = [Path(p) for p, _ in parts]
    weights = [float(w) for _, w in parts]
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "combination_type": "cat",
        "rank": total_rank,
        "parts": [
            {**(dict(part_meta[i]) if part_meta else {}), "path": str(folders[i]), "weight": weights[i]}
            for i in range(len(parts))
        ],
    }
    if steer is not None:
        manifest["steer"] = dict(steer.meta)

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".compose-", dir=out_dir.parent))
    try:
        _save(out, staging / WEIGHTS_FILE)
        if steer is not None:
            _save({STEER_TENSOR: steer.rows.float().contiguous()}, staging / STEER_FILE)
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        _fsync_folder(staging)  # on disk before the folder appears under its name (a crash leaves no torn files)
        if out_dir.exists():  # replace: move the old folder aside first (rename needs an empty target)
            trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=out_dir.parent))
            os.replace(out_dir, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(staging, out_dir)
        _fsync_path(out_dir.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("Composed %d adapters (rank %d, %d modules) into %s", len(parts), total_rank, len(names), out_dir)
    return out_dir


def _cat(parts: Sequence[tuple[Path, float]]) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """The ``cat`` composition's tensors, its adapter config and its module names."""
    import torch
    from safetensors.torch import load_file

    folders = [Path(p) for p, _ in parts]
    weights = [float(w) for _, w in parts]
    if not all(math.isfinite(w) for w in weights):
        raise CompositionError("weights must be finite numbers")
    configs = [_read_config(f) for f in folders]
    for key in ("fan_in_fan_out", "layers_to_transform", "layers_pattern"):
        values = {json.dumps(c.get(key), sort_keys=True) for c in configs}
        if len(values) > 1:
            raise CompositionError(f"parts disagree on {key}: {sorted(values)}")

    total_rank = sum(int(c["r"]) for c in configs)
    per_part: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
    dtype: torch.dtype | None = None
    for folder, config in zip(folders, configs, strict=True):
        modules = _split(load_file(str(folder / WEIGHTS_FILE)), folder)
        for module, (a, b) in modules.items():
            if a.shape[0] != int(config["r"]) or b.shape[1] != int(config["r"]):
                raise CompositionError(f"{folder}: {module} has rank {a.shape[0]}, config says r={config['r']}")
            dtype = a.dtype if dtype is None else torch.promote_types(dtype, a.dtype)
        per_part.append(modules)

    names = sorted({m for modules in per_part for m in modules})
    out: dict[str, torch.Tensor] = {}
    for module in names:
        present = [(i, per_part[i][module]) for i in range(len(parts)) if module in per_part[i]]
        in_features = {a.shape[1] for _, (a, _) in present}
        out_features = {b.shape[0] for _, (_, b) in present}
        if len(in_features) > 1 or len(out_features) > 1:
            raise CompositionError(
                f"parts disagree on the shape of {module} (in {sorted(in_features)}, out {sorted(out_features)}): "
                "were they trained on different base models?"
            )
        fan_in, fan_out = in_features.pop(), out_features.pop()
        a_out = torch.zeros(total_rank, fan_in, dtype=torch.float32)
        b_out = torch.zeros(fan_out, total_rank, dtype=torch.float32)
        row = 0
        for i, (a, b) in present:  # packed first, zero rows after: PEFT's cat layout
            r = a.shape[0]
            a_out[row : row + r] = a.float() * (weights[i] * _scaling(configs[i]))
            b_out[:, row : row + r] = b.float()
            row += r
        assert dtype is not None
        out[module + _A_SUFFIX] = a_out.to(dtype).contiguous()
        out[module + _B_SUFFIX] = b_out.to(dtype).contiguous()

    config = dict(configs[0])
    config.update(
        r=total_rank,
        lora_alpha=total_rank,
        target_modules=_union_targets(configs),
        use_rslora=False,
        use_dora=False,
        bias="none",
        modules_to_save=None,
        rank_pattern={},
        alpha_pattern={},
        inference_mode=True,
    )
    return out, config, names


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' ``save_file``, its I/O failures raised as the OSError they are (a full disk: ENOSPC)."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except Exception as exc:  # safetensors' Rust error carries the OS error only in its text
        found = re.search(r"\(os error (\d+)\)", str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, f"{os.strerror(code)}: writing {path.name}") from exc


def _fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's entries: the names in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """fsync every file of ``folder``, then the folder itself."""
    for path in folder.iterdir():
        if path.is_file():
            _fsync_path(path)
    _fsync_path(folder)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The ``composition.json`` of a composed folder, or None when absent or unreadable."""
    try:
        manifest: dict[str, Any] = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    return manifest


def delta_weights(folder: Path) -> dict[str, torch.Tensor]:
    """``module -> B @ A * scaling`` (float32, transposed for fan_in_fan_out) of a LoRA folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise CompositionError(f"{folder}: rank_pattern/alpha_pattern are not supported")
    scaling = _scaling(config)
    deltas: dict[str, torch.Tensor] = {}
    for module, (a, b) in _split(load_file(str(folder / WEIGHTS_FILE)), folder).items():
        delta = b.float() @ a.float() * scaling
        deltas[module] = delta.T if config.get("fan_in_fan_out") else delta
    return deltas
