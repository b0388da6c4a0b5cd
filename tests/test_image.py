"""The image: what its build context takes (.dockerignore), and what the Dockerfile gives the Compose services.

No Docker engine runs here or in CI, so nothing is built. Instead, two small models of what Docker
does, each checked against Docker's documented behaviour first:

- :class:`DockerIgnore` applies ``.dockerignore`` with Docker's rules (moby's ``patternmatcher``:
  patterns relative to the context root, ``*``/``?`` within one path element, ``**`` across any,
  a matching folder excludes what is under it, ``!`` re-includes, the last matching line wins),
  which are not git's (``.env`` there is only ``./.env``).
- :class:`ImageFiles` replays a build target's ``RUN`` lines (``useradd``, ``mkdir``, ``chown``,
  ``ln``) and ``USER``/``WORKDIR`` to know which folders exist in the image and who owns them.

The Compose side is the file as ``docker-compose config`` renders it (tests/test_deploy.py's helper).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest

from big5core.settings import Settings
from tests.test_deploy import KEYS, ROOT, compose

DOCKERFILE = ROOT / "Dockerfile"
IMAGE_UID = 10001
IMAGE_USER = "big5"
SOURCES = (
    "big5",
    "big5core",
    "big5engine",
    "big5personas",
    "trainer",
    "service",
    "evaluator",
    "migrations",
)  # pyproject's packages


# ---------------------------------------------------------------------------------------------- .dockerignore
def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """moby patternmatcher's translation of one cleaned pattern to a regular expression (Unix separators)."""
    out, i = "^", 0
    while i < len(pattern):
        ch = pattern[i]
        i += 1
        if ch == "*":
            if i < len(pattern) and pattern[i] == "*":
                i += 1
                if i < len(pattern) and pattern[i] == "/":
                    i += 1  # "**/" is "**"
                out += ".*" if i == len(pattern) else "(.*/)?"
            else:
                out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        elif ch in ".+()|{}$":
            out += "\\" + ch
        elif ch == "\\":
            out += "\\" + pattern[i] if i < len(pattern) else "\\\\"
            i += 1
        else:
            out += ch
    return re.compile(out + "$")


@dataclass
class DockerIgnore:
    patterns: list[tuple[bool, re.Pattern[str]]] = field(default_factory=list)  # (exclusion "!", regex)

    @classmethod
    def parse(cls, text: str) -> DockerIgnore:
        """moby's ``dockerignore.ReadAll``: ``#`` lines are comments, lines trimmed, paths cleaned, ``/`` dropped."""
        ignore = cls()
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            pattern = line.strip()
            exclusion = pattern.startswith("!")
            pattern = posixpath.normpath(pattern[1:].strip() if exclusion else pattern)
            if len(pattern) > 1 and pattern.startswith("/"):
                pattern = pattern.lstrip("/")
            ignore.patterns.append((exclusion, _pattern_regex(pattern)))
        return ignore

    @property
    def has_exceptions(self) -> bool:
        return any(exclusion for exclusion, _ in self.patterns)

    def excludes(self, path: str) -> bool:
        """moby's ``MatchesOrParentMatches``: the last pattern matching the path or a folder above it decides."""
        parents = posixpath.dirname(path).split("/") if "/" in path else []
        matched = False
        for exclusion, regex in self.patterns:
            if exclusion != matched:
                continue  # only an exception can undo a match, only an exclusion can make one
            hit = bool(regex.match(path)) or any(regex.match("/".join(parents[: n + 1])) for n in range(len(parents)))
            if hit:
                matched = not exclusion
        return matched

    def context(self, root: Path) -> Iterator[str]:
        """The files ``docker build root`` sends (relative, ``/``-separated); an excluded folder is not entered
        when no ``!`` line could bring something inside it back (as BuildKit does)."""
        for folder, dirs, files in os.walk(root):
            rel = Path(folder).relative_to(root).as_posix()
            prefix = "" if rel == "." else f"{rel}/"
            if not self.has_exceptions:
                dirs[:] = [d for d in dirs if not self.excludes(prefix + d)]
            for name in files:
                if not self.excludes(prefix + name):
                    yield prefix + name


def _dockerignore() -> DockerIgnore:
    path = ROOT / ".dockerignore"
    if not path.is_file():
        pytest.fail("no .dockerignore: `COPY . .` would take .env, .git, .venv and big5-data into the image")
    return DockerIgnore.parse(path.read_text())


@pytest.mark.parametrize(
    ("patterns", "path", "excluded"),
    [
        # the examples of Docker's documentation (Dockerfile reference, ".dockerignore file")
        ("*/temp*", "somedir/temporary.txt", True),
        ("*/temp*", "somedir/temp", True),
        ("*/temp*", "temporary.txt", False),
        ("*/temp*", "a/b/temp.txt", False),
        ("*/*/temp*", "somedir/subdir/temporary.txt", True),
        ("temp?", "tempa", True),
        ("temp?", "temp", False),
        ("temp?", "tempab", False),
        ("**/*.go", "a/b/c.go", True),
        ("**/*.go", "c.go", True),
        ("*.md\n!README.md", "README.md", False),
        ("*.md\n!README.md", "CHANGES.md", True),
        ("*.md\n!README*.md\nREADME-secret.md", "README-secret.md", True),
        ("*.md\n!README*.md\nREADME-secret.md", "README-public.md", False),
        # anchored at the root, unlike .gitignore; a folder takes its contents; paths are cleaned
        (".env", "service/.env", False),
        ("**/.env", "service/.env", True),
        ("**/.env", ".env", True),
        (".git", ".git/objects/ab/cdef", True),
        ("big5-data/", "big5-data/adapters/x/adapter_model.safetensors", True),
        ("/.whl", ".whl/torch.whl", True),
        ("**/__pycache__", "service/routes/__pycache__/app.cpython-311.pyc", True),
        ("*.py", "service/app.py", False),
        ("# *.py", "app.py", False),
        ("**/*.egg-info", "big5chat.egg-info/PKG-INFO", True),
        ("a.b", "aXb", False),
        ("data\n!data/keep", "data/keep/x", False),
    ],
)
def test_dockerignore_model_follows_dockers_rules(patterns: str, path: str, excluded: bool) -> None:
    assert DockerIgnore.parse(patterns).excludes(path) is excluded


SECRETS_AND_STATE = [
    ".env",
    ".env.production",
    "service/.env",
    "deploy/.env",
    ".git/config",
    ".git/objects/ab/cdef",
    ".venv/bin/python",
    ".venv/lib/python3.11/site-packages/torch/__init__.py",
    "big5-data/big5.sqlite3",
    "big5-data/adapters/sft/adapter_model.safetensors",
    "big5-data/judges/big5chat-judge/model.npz",
    "big5-data/datasets/datagen-1.csv",
    "big5chat.egg-info/PKG-INFO",
    "service/__pycache__/app.cpython-311.pyc",
    "tls/server.key",
    "big5.sqlite3",
]


def _sources() -> list[str]:
    """The files the image installs: the packages (code and package data), pyproject and README."""
    found = ["pyproject.toml", "README.md", "Dockerfile", "docker-compose.yml"]
    for package in SOURCES:
        for path in sorted((ROOT / package).rglob("*")):
            rel = path.relative_to(ROOT).as_posix()
            if path.is_file() and "__pycache__" not in rel and not rel.endswith(".pyc"):
                found.append(rel)
    return found


def test_build_context_leaves_out_secrets_and_local_state_and_keeps_the_sources(tmp_path: Path) -> None:
    """A checkout as an operator has it (an .env beside the compose file, a data dir, a venv), then the context."""
    sources = _sources()
    assert len([s for s in sources if s.endswith(".py")]) > 100
    for rel in [*sources, *SECRETS_AND_STATE]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    context = set(_dockerignore().context(tmp_path))
    assert sorted(context & set(SECRETS_AND_STATE)) == []
    assert sorted(set(sources) - context) == []


def test_build_context_of_this_checkout() -> None:
    """The real tree here (with its .venv and big5-data, where present): nothing of either goes in."""
    context = list(_dockerignore().context(ROOT))
    top = {PurePosixPath(p).parts[0] for p in context}
    assert not top & {".git", ".venv", "big5-data", "big5chat.egg-info"}, sorted(top)
    assert not [p for p in context if PurePosixPath(p).name.startswith(".env") or "__pycache__" in p]
    assert {"pyproject.toml", "README.md", "big5/cli.py", "service/app.py", "migrations/env.py"} <= set(context)


# ------------------------------------------------------------------------------------------------ Dockerfile
@dataclass
class Stage:
    name: str
    parent: str | None  # the stage it is FROM, when it is one of this file's
    instructions: list[tuple[str, str]] = field(default_factory=list)


def _stages(text: str) -> dict[str, Stage]:
    """The Dockerfile's stages: continuation lines joined, comment lines dropped (as BuildKit does)."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#"):
            continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        lines.append(pending + raw)
        pending = ""
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in filter(str.strip, lines):
        keyword, _, args = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else f"stage-{len(stages)}"
            current = stages[name] = Stage(name, words[0] if words[0] in stages else None)
        elif current is not None:
            current.instructions.append((keyword, args.strip()))
    return stages


def _instructions(stages: dict[str, Stage], target: str) -> list[tuple[str, str]]:
    chain: list[Stage] = []
    name: str | None = target
    while name is not None:
        chain.insert(0, stages[name])
        name = stages[name].parent
    return [instruction for stage in chain for instruction in stage.instructions]


_OPERATORS = {"&&", "||", ";", "|", "(", ")"}


def _commands(shell: str) -> Iterator[list[str]]:
    """The simple commands of a RUN line, each without its leading VAR=value assignments."""
    lexer = shlex.shlex(shell, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    command: list[str] = []
    for token in [*lexer, ";"]:
        if token in _OPERATORS:
            while command and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", command[0]):
                command.pop(0)
            if command:
                yield command
            command = []
        else:
            command.append(token)


@dataclass
class ImageFiles:
    """Who owns each path the build created (and the users it added): a replay of a target's instructions."""

    owners: dict[str, str] = field(default_factory=lambda: {"/": "root", "/home": "root", "/tmp": "root"})
    uids: dict[str, int] = field(default_factory=lambda: {"root": 0})
    env: dict[str, str] = field(default_factory=dict)
    user: str = "root"
    workdir: str = "/"
    cmd: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, target: str) -> ImageFiles:
        image = cls()
        for keyword, args in _instructions(_stages(DOCKERFILE.read_text()), target):
            if keyword == "RUN":
                for command in _commands(args):
                    image.run(command)
            elif keyword == "USER":
                image.user = args.split(":")[0]
            elif keyword == "WORKDIR":
                image.mkdir(args, parents=True)
                image.workdir = image.path(args)
            elif keyword == "ENV":
                image.env.update(word.split("=", 1) for word in shlex.split(args))  # type: ignore[misc]
            elif keyword == "CMD":
                image.cmd = json.loads(args)  # the exec form
        return image

    def path(self, path: str) -> str:
        """``path`` made absolute against the WORKDIR, as the shell of a RUN line sees it."""
        return posixpath.normpath(posixpath.join(self.workdir, path))

    def mkdir(self, path: str, *, parents: bool) -> None:
        missing = [self.path(path)]
        while parents and missing[0] != "/" and posixpath.dirname(missing[0]) not in self.owners:
            missing.insert(0, posixpath.dirname(missing[0]))
        for folder in missing:
            self.owners.setdefault(folder, self.user)

    def run(self, argv: list[str]) -> None:
        program, args = argv[0], argv[1:]
        flags = [a for a in args if a.startswith("-")]
        operands = [a for a in args if not a.startswith("-")]
        if program == "useradd":
            uid_flag = "--uid" if "--uid" in args else "-u"
            name = args[-1]
            self.uids[name] = int(args[args.index(uid_flag) + 1])
            if {"--create-home", "-m"} & set(flags):
                self.owners[f"/home/{name}"] = name
        elif program == "mkdir":
            for path in operands:
                self.mkdir(path, parents=bool({"-p", "--parents"} & set(flags)))
        elif program == "chown":
            owner, paths = operands[0].split(":")[0], [self.path(p) for p in operands[1:]]
            recursive = bool({"-R", "--recursive"} & set(flags))
            for path in paths:
                assert path in self.owners, f"chown of {path}, which the build never created"
                for known in list(self.owners):
                    if known == path or (recursive and known.startswith(path.rstrip("/") + "/")):
                        self.owners[known] = owner
        elif program == "ln":
            self.owners[self.path(operands[-1])] = self.user
        elif program == "python" and args[:2] == ["-m", "venv"]:
            self.mkdir(args[2], parents=True)


def test_image_files_model_replays_the_commands() -> None:
    image = ImageFiles()
    for command in _commands(
        "useradd --create-home --uid 10001 big5 && mkdir -p /data/a /data/b && chown big5 /data"
        " && X=1 mkdir /data/c ; chown -R big5:big5 /data/b"
    ):
        image.run(command)
    assert image.uids["big5"] == 10001 and image.owners["/home/big5"] == "big5"
    assert image.owners["/data"] == "big5" and image.owners["/data/a"] == "root" and image.owners["/data/b"] == "big5"
    assert image.owners["/data/c"] == "root"  # created after the chown
    with pytest.raises(AssertionError, match="never created"):
        image.run(["chown", "big5", "/nowhere"])


def _rendered(*profiles: str) -> dict[str, dict[str, object]]:
    args = [a for p in profiles for a in ("--profile", p)]
    result = compose(*args, "config", "--format", "json", env=KEYS)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["services"]


def _image_services() -> dict[str, dict[str, object]]:
    """Every service of every profile that runs the image, with its build target."""
    services = _rendered("gpu", "multi-gpu")
    return {name: s for name, s in services.items() if isinstance(s.get("build"), dict)}


def test_every_mounted_path_exists_in_the_image_owned_by_its_user() -> None:
    images = {target: ImageFiles.build(target) for target in ("cpu", "gpu")}
    for target, image in images.items():
        assert image.uids.get(IMAGE_USER) == IMAGE_UID, target
        assert image.user == IMAGE_USER, f"the {target} image must not run as root"
    services = _image_services()
    assert set(services) >= {"migrate", "api", "worker", "api-gpu", "worker-gpu", "worker-gpus"}
    checked = 0
    for name, service in services.items():
        image = images[service["build"]["target"]]  # type: ignore[index]
        for volume in service.get("volumes", []):  # type: ignore[attr-defined]
            target = volume["target"]
            assert target in image.owners, f"{name} mounts {target}, which the image lacks (root-owned at mount)"
            assert image.owners[target] == IMAGE_USER, f"{name} mounts {target}, owned by {image.owners[target]}"
            checked += 1
    assert checked >= 20


def test_data_folders_the_services_write_are_volumes() -> None:
    """Adapters, checkpoints, datasets and judges outlive a container and are shared by the API and the workers."""
    data = Settings(data_dir=Path("/data"))
    shared = {str(data.adapters_dir), str(data.data_dir / "checkpoints"), str(data.datasets_dir), "/data/judges"}
    for name, service in _image_services().items():
        if name == "migrate":
            continue
        mounts = {v["target"]: v for v in service["volumes"]}  # type: ignore[attr-defined]
        assert shared <= set(mounts), (name, sorted(mounts))
        assert all(mounts[path]["type"] == "volume" for path in shared), name


def _is_worker(service: dict[str, object]) -> bool:
    return "worker" in service["command"]  # type: ignore[operator]


def test_workers_have_a_healthcheck_of_their_own() -> None:
    """The image's HEALTHCHECK asks the API's port; a worker has none, so it reports its own heartbeat."""
    services = _image_services()
    workers = {name for name, s in services.items() if _is_worker(s)}
    assert workers == {"worker", "worker-gpu", "worker-gpus"}
    for name in workers:
        command: list[str] = services[name]["command"]  # type: ignore[assignment]
        health = services[name].get("healthcheck")
        assert isinstance(health, dict) and not health.get("disable"), name
        test = health["test"]
        assert test[0] == "CMD" and test[1:5] == ["big5", "worker", "--check-health", "--liveness-file"], (name, test)
        assert not {"curl", "8000"} & set(test) and not any("/health" in word for word in test), (name, test)
        liveness = command[command.index("--liveness-file") + 1]
        assert test[5] == liveness and liveness.startswith("/tmp/"), name  # its own file, on no shared volume
    assert services["migrate"]["healthcheck"] == {"disable": True}
    for name in {"api", "api-gpu"}:  # the image's HEALTHCHECK: /health ready on port 8000
        assert "healthcheck" not in services[name], name
    dockerfile = DOCKERFILE.read_text()
    assert dockerfile.count("HEALTHCHECK") == 2 and "127.0.0.1:8000/health" in dockerfile


def test_the_api_is_never_started_with_auth_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """No --insecure-no-auth and no BIG5_SERVICE__INSECURE_NO_AUTH anywhere; the keys are required (test_deploy)."""
    for target in ("cpu", "gpu"):
        image = ImageFiles.build(target)
        assert image.cmd[:2] == ["big5", "serve"] and "--insecure-no-auth" not in image.cmd, target
        assert not [k for k in image.env if "INSECURE" in k.upper()], target
        assert image.env.get("BIG5_REQUIRE_DATABASE_URL") == "1", target  # no SQLite file inside a container
    for name, service in _rendered("gpu", "multi-gpu").items():
        assert not [w for w in service.get("command") or [] if "insecure" in w.lower()], name  # type: ignore[attr-defined]
        environment: dict[str, str] = service.get("environment") or {}  # type: ignore[assignment]
        assert not [k for k in environment if "INSECURE" in k.upper()], name
        if name == "postgres":
            continue
        for key in [k for k in os.environ if k.startswith("BIG5_")]:
            monkeypatch.delenv(key)
        for key, value in {**ImageFiles.build("cpu").env, **environment}.items():
            monkeypatch.setenv(key, value)
        settings = Settings()
        assert settings.service.auth_enabled and not settings.service.insecure_no_auth, name
        assert settings.require_database_url and settings.resolved_database_url.startswith("postgresql"), name
