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

from big5engine.compose import compose_adapters, read_manifest
from big5engine.compose_cache import ComposedCache, ComposedStorageFull, Hold, Residency, estimate_bytes

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
    from big5engine.compose_cache import ComposedCache

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


# ---------------------------------------------------------------- holds and the disk budget (issue 28)


def _names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("."))


def test_each_use_is_held_until_its_own_release(parts: list[Path], tmp_path: Path) -> None:
    cache = ComposedCache(tmp_path / "composed", budget=1)
    vector = _vector(parts, 0, 1)
    cache.get_or_build("composed-a", vector, _meta(vector))
    cache.get_or_build("composed-a", vector, _meta(vector))  # a second request for the same vector
    hold = Hold(cache, "composed-a")
    hold.release()
    hold.release()  # a Hold ends its one use once, however often it is called
    assert cache.held() == ["composed-a"]  # the other request still uses it
    cache.release("composed-a")
    assert cache.held() == []
    other = _vector(parts, 2, 3)
    cache.get_or_build("composed-b", other, _meta(other))
    assert _names(tmp_path / "composed") == ["composed-b"]  # budget 1: the idle one was evicted


def test_the_size_estimate_bounds_the_folder(parts: list[Path], tmp_path: Path) -> None:
    vector = _vector(parts, 0, 1, 2)
    built = compose_adapters(vector, tmp_path / "built", part_meta=_meta(vector))
    actual = sum(p.stat().st_size for p in built.iterdir())
    estimate = estimate_bytes([p for p, _ in vector])
    assert actual <= estimate <= actual + (64 << 10)


def test_the_disk_budget_holds_and_refuses_cleanly(parts: list[Path], tmp_path: Path) -> None:
    root = tmp_path / "composed"
    pairs = [_vector(parts, 0, 1), _vector(parts, 1, 2), _vector(parts, 2, 3), _vector(parts, 0, 3)]
    cache = ComposedCache(root, budget=10, max_bytes=1 << 30)
    cache.get_or_build("composed-a", pairs[0], _meta(pairs[0]))
    cache.release("composed-a")  # idle: evictable to make room
    size, reserve = cache.usage()[1], estimate_bytes([p for p, _ in pairs[0]])  # all four alike
    cache.max_bytes = size + reserve + size // 2  # two folders and a third's reservation do not fit
    cache.get_or_build("composed-b", pairs[1], _meta(pairs[1]))
    cache.get_or_build("composed-c", pairs[2], _meta(pairs[2]))  # evicts a, although the count budget is 10
    assert _names(root) == ["composed-b", "composed-c"]
    assert cache.usage()[1] <= cache.max_bytes  # type: ignore[operator]
    with pytest.raises(ComposedStorageFull) as refused:
        cache.get_or_build("composed-d", pairs[3], _meta(pairs[3]))  # b and c are in use: no room
    assert "MiB" in str(refused.value) and str(tmp_path) not in str(refused.value)  # no server paths
    assert _names(root) == ["composed-b", "composed-c"]  # nothing written, nothing of d left
    assert not list(root.glob(".compose-*")) and not list((root / ".reservations").iterdir())
    assert cache.held() == ["composed-b", "composed-c"]
    cache.release("composed-b")
    cache.get_or_build("composed-d", pairs[3], _meta(pairs[3]))  # room once b is released
    assert _names(root) == ["composed-c", "composed-d"]


FILE_SIZE_LIMITED = textwrap.dedent(
    """
    import json, resource, signal, sys
    from pathlib import Path
    from big5engine.compose import compose_adapters

    parts = [(Path(p), w) for p, w in json.loads(sys.argv[2])]
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
    try:
        compose_adapters(parts, Path(sys.argv[1]))
    except OSError as exc:
        print("failed", exc.errno)
    """
)


@pytest.mark.slow  # a process started with its own interpreter
def test_a_composition_that_cannot_be_written_leaves_nothing(parts: list[Path], tmp_path: Path) -> None:
    root = tmp_path / "composed"
    root.mkdir()
    vector = _vector(parts, 0, 1, 2)
    payload = json.dumps([[str(p), w] for p, w in vector])
    done = subprocess.run(
        [sys.executable, "-c", FILE_SIZE_LIMITED, str(root / "composed-x"), payload],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.startswith("failed"), done.stdout + done.stderr[-3000:]
    assert list(root.iterdir()) == []  # neither the folder under its name nor its staging sibling
    cache = ComposedCache(root, budget=2)
    assert cache.get_or_build("composed-x", vector, _meta(vector)).is_dir()  # built whole on the next try
    assert read_manifest(root / "composed-x") is not None
