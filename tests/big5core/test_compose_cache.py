"""The composed-adapter cache shared by processes (API replicas on one volume), and engine residency."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from big5core.compose import compose_adapters, read_manifest
from big5core.compose_cache import ComposedCache, Residency

MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj")


def _part(folder: Path, seed: int, r: int = 4) -> Path:
    """A PEFT-format LoRA folder with random A and B (hidden size 32)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module in MODULES:
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, 32, generator=generator)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(32, r, generator=generator)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj"], "bias": "none"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("parts")
    return [_part(root / f"p{i}", seed=i) for i in range(4)]


def _vector(parts: list[Path], *indices: int) -> list[tuple[Path, float]]:
    return [(parts[i], 0.5 + 0.25 * i) for i in indices]


def _meta(vector: list[tuple[Path, float]]) -> list[dict[str, str]]:
    return [{"adapter": f"{path.name}@1"} for path, _ in vector]


REPLICA = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from big5core.compose_cache import ComposedCache

    root, name, parts, start, hold = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
    vector = [(Path(p), w) for p, w in parts]
    meta = [{"adapter": f"{Path(p).name}@1"} for p, _ in parts]
    import torch, safetensors.torch  # imported before the start, so both replicas race on the composition
    cache = ComposedCache(Path(root), budget=8)
    time.sleep(max(0.0, start - time.time()))
    folder = cache.get_or_build(name, vector, meta)
    print(json.dumps({"folder": str(folder), **cache.stats}), flush=True)
    if hold == "hold":  # keep using it (as while loaded in an engine) until told to stop
        sys.stdin.readline()
        cache.release(name)
    """
)


def _replica(root: Path, name: str, vector: list[tuple[Path, float]], start: float, hold: bool = False):  # type: ignore[no-untyped-def]
    args = [str(root), name, json.dumps([[str(p), w] for p, w in vector]), str(start), "hold" if hold else "no"]
    return subprocess.Popen(
        [sys.executable, "-c", REPLICA, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow  # real processes started with their own interpreter
def test_two_processes_composing_one_vector_leave_one_valid_folder(parts: list[Path], tmp_path: Path) -> None:
    root = tmp_path / "composed"
    vector = _vector(parts, 0, 1, 2)
    start = time.time() + 6
    procs = [_replica(root, "composed-abc", vector, start) for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out))
    assert sorted((r["composed_misses"], r["composed_hits"]) for r in results) == [(0, 1), (1, 0)]  # built once
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["composed-abc"]
    assert not list(root.glob(".compose-*")) and not list(root.glob(".trash-*"))
    folder = root / "composed-abc"
    manifest = read_manifest(folder)
    assert manifest is not None and [p["path"] for p in manifest["parts"]] == [str(p) for p, _ in vector]
    reference = compose_adapters(vector, tmp_path / "reference", part_meta=_meta(vector))
    built, expected = (
        load_file(folder / "adapter_model.safetensors"),
        load_file(reference / "adapter_model.safetensors"),
    )
    assert built.keys() == expected.keys()
    assert all(torch.equal(built[k], expected[k]) for k in expected)


@pytest.mark.slow  # real processes started with their own interpreter
def test_a_folder_another_process_uses_is_never_evicted(parts: list[Path], tmp_path: Path) -> None:
    """A replica holds composed-x (loaded in its engine); another replica with budget 1 evicts around it."""
    root = tmp_path / "composed"
    other = _replica(root, "composed-x", _vector(parts, 0, 1), time.time())
    try:
        line = other.stdout.readline()  # type: ignore[union-attr]
        assert line, other.stderr.read()  # type: ignore[union-attr]
        cache = ComposedCache(root, budget=1)
        cache.get_or_build("composed-y", _vector(parts, 1, 2), _meta(_vector(parts, 1, 2)))
        cache.release("composed-y")
        cache.get_or_build("composed-z", _vector(parts, 2, 3), _meta(_vector(parts, 2, 3)))
        assert (root / "composed-x").is_dir(), "evicted a folder another process holds"
        assert not (root / "composed-y").exists()  # released here and least recently used: evicted
        assert (root / "composed-z").is_dir()
    finally:
        other.communicate("done\n", timeout=60)
    assert other.returncode == 0
    cache.release("composed-z")
    cache.get_or_build("composed-y", _vector(parts, 1, 2), _meta(_vector(parts, 1, 2)))
    assert not (root / "composed-x").exists()  # released by its process: evictable like any other
    assert cache.held() == ["composed-y"]


def test_residency_unloads_the_least_recently_used_idle_adapters() -> None:
    loaded = Residency(capacity=2)
    assert loaded.acquire("a") == [] and loaded.acquire("b") == []
    loaded.release("a")
    loaded.release("b")
    assert loaded.acquire("c") == ["a"]  # a is the least recently used and idle
    assert "a" not in loaded and len(loaded) == 2
    assert loaded.acquire("b") == []  # b is in use again (and now the most recent)
    assert loaded.acquire("d") == []  # b and c are in use: over capacity rather than unload them
    loaded.release("c")
    assert len(loaded) == 3
    assert loaded.acquire("e") == ["c"]  # c idle now; b and d still in use
    loaded.release("b")
    loaded.release("d")
    loaded.release("e")
    assert loaded.acquire("f") == ["b", "d"]
    assert list(loaded._in_use) == ["e", "f"]
    with pytest.raises(ValueError):
        Residency(0)
