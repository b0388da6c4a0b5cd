"""The import rule of docs/ARCHITECTURE.md, enforced: import-linter's contracts in pyproject.toml must hold.

Run by hand with ``lint-imports``. The contracts: the layers (edges -> personas -> engine -> core, the
three edges independent), the vocabulary (big5core imports no vLLM, torch, PEFT, transformers or TRL,
not even inside a function) and no import cycles between the modules of a package.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"


def test_the_contracts_are_configured() -> None:
    config = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]
    contracts = {c["id"]: c for c in config["contracts"]}
    assert set(contracts) == {"layers", "vocabulary", "acyclic"}
    assert contracts["layers"]["layers"][-3:] == ["big5personas", "big5engine", "big5core"]
    assert set(contracts["vocabulary"]["forbidden_modules"]) == {"vllm", "torch", "peft", "transformers", "trl"}
    assert config["include_external_packages"] is True  # without it the vocabulary contract sees no vllm at all


def test_imports_follow_the_contracts() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint), "--no-cache", "--config", str(PYPROJECT)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout
