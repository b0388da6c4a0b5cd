"""The reasoning tasks: lm-eval's stock prompts and metrics on local JSONL files, or the stock tasks.

Each local task is a YAML next to this module (``tasks/big5_<name>.yaml``) that mirrors the stock
lm-eval 0.4.13 config field by field; only the data source differs (``dataset_path: json`` with
``data_files``) and the field names follow the local schema (``../shared/data/reasoning/README.md``).
Data files are looked up in the configured folder (``BIG5_REASONING__DATA_DIR``) first, then among
the copies bundled in ``data/`` (the tasks whose licences allow it, see ``data/README.md``).
With ``BIG5_REASONING__SOURCE=stock`` the same names run lm-eval's stock tasks instead (network).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from big5core.settings import ReasoningSettings
from evaluator.reasoning.errors import TaskDataMissing, UnknownTask

TASKS_DIR = Path(__file__).parent / "tasks"
BUNDLED_DATA = Path(__file__).parent / "data"
LOCAL_PREFIX = "big5_"

Kind = Literal["acc", "mc2", "generate"]


@dataclass(frozen=True)
class TaskInfo:
    name: str  # our name = the stock lm-eval task name
    data_file: str  # file name, without .gz
    kind: Kind  # how an item's score and correctness are read
    title: str
    primary: str = "acc"  # lm-eval's per-item metric the table reports (metric,filter for generation)

    @property
    def lm_task(self) -> str:
        return LOCAL_PREFIX + self.name

    @property
    def yaml_path(self) -> Path:
        return TASKS_DIR / f"{self.lm_task}.yaml"


TASKS: dict[str, TaskInfo] = {
    t.name: t
    for t in (
        TaskInfo("social_iqa", "socialiqa_dev.jsonl", "acc", "SocialIQA"),
        TaskInfo("commonsense_qa", "commonsenseqa_dev.jsonl", "acc", "CommonsenseQA"),
        TaskInfo("piqa", "piqa_valid.jsonl", "acc", "PIQA"),
        TaskInfo("truthfulqa_mc1", "truthfulqa_mc1.jsonl", "acc", "TruthfulQA mc1"),
        TaskInfo("truthfulqa_mc2", "truthfulqa_mc2.jsonl", "mc2", "TruthfulQA mc2"),
        TaskInfo("arc_easy", "arc_easy_test.jsonl", "acc", "ARC-Easy"),
        TaskInfo("arc_challenge", "arc_challenge_test.jsonl", "acc", "ARC-Challenge"),
        TaskInfo("mmlu", "mmlu_test.jsonl", "acc", "MMLU"),
        TaskInfo("gsm8k", "gsm8k_test.jsonl", "generate", "GSM8K", "exact_match,flexible-extract"),
    )
}
ALIASES = {"siqa": "social_iqa", "csqa": "commonsense_qa", "tqa_mc2": "truthfulqa_mc2", "tqa_mc1": "truthfulqa_mc1"}


def task_info(name: str) -> TaskInfo:
    """The task named ``name`` (stock lm-eval names, or an alias such as siqa); :class:`UnknownTask` else."""
    key = name.strip().lower().removeprefix(LOCAL_PREFIX)
    key = ALIASES.get(key, key)
    if key not in TASKS:
        raise UnknownTask(f"unknown reasoning task {name!r}; known: {', '.join(TASKS)} (aliases {', '.join(ALIASES)})")
    return TASKS[key]


def data_path(info: TaskInfo, settings: ReasoningSettings) -> Path:
    """The task's data file: the configured folder first (.jsonl, then .jsonl.gz), then the bundled copy."""
    folders = ([settings.data_dir] if settings.data_dir is not None else []) + [BUNDLED_DATA]
    for folder in folders:
        for name in (info.data_file, info.data_file + ".gz"):
            path = Path(folder).expanduser() / name
            if path.is_file():
                return path.resolve()
    where = f"{settings.data_dir}" if settings.data_dir is not None else "no folder configured"
    raise TaskDataMissing(
        f"task {info.name} needs {info.data_file}, which is not bundled (licence) and not in the data folder "
        f"({where}); set BIG5_REASONING__DATA_DIR to a folder holding it (e.g. ../shared/data/reasoning)"
    )


def load_local_config(info: TaskInfo, settings: ReasoningSettings) -> dict[str, Any]:
    """The task's lm-eval config (include and ``!function`` resolved) with an absolute data file."""
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(info.yaml_path, resolve_func=True, recursive=True)
    config["dataset_kwargs"] = {"data_files": {"test": str(data_path(info, settings))}}
    return config


def lm_task_spec(
    info: TaskInfo, settings: ReasoningSettings, *, max_gen_toks: int | None = None
) -> str | dict[str, Any]:
    """What to hand lm-eval: the local config dict, or the stock task name (source=stock)."""
    if settings.source == "stock":
        return info.name
    config = load_local_config(info, settings)
    if info.kind == "generate":
        config["generation_kwargs"] = {
            **config.get("generation_kwargs", {}),
            "max_gen_toks": max_gen_toks or settings.max_gen_toks,
        }
    return config


def lm_task_name(info: TaskInfo, settings: ReasoningSettings) -> str:
    return info.name if settings.source == "stock" else info.lm_task


@lru_cache(maxsize=64)
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    stat = path.stat()
    return _file_digest(str(path), stat.st_mtime_ns, stat.st_size)


def _jsonable(value: Any) -> Any:
    if callable(value):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}"
    return str(value)


def config_for_hash(config: dict[str, Any]) -> dict[str, Any]:
    """The task config as JSON data, with each local data file named by its sha256 instead of its path."""
    data: dict[str, Any] = json.loads(json.dumps(config, default=_jsonable, sort_keys=True))
    files = (data.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        data["dataset_kwargs"]["data_files"] = {
            split: ("sha256:" + file_digest(Path(p))) if Path(p).is_file() else p for split, p in files.items()
        }
    return data


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of :func:`config_for_hash` (the same config and data give the same hash on any machine)."""
    payload = json.dumps(config_for_hash(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def _read_jsonl(path: Path) -> Iterable[dict[str, Any]]:
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
        for line in fh:
            if line.strip():
                yield json.loads(line)


def item_indices(info: TaskInfo, settings: ReasoningSettings, limit: int | None) -> list[int] | None:
    """Which items of the split to run (None: all). MMLU: a stratified slice (round robin over subjects in
    alphabetical order, items in source order); every other task: the first ``limit``, as lm-eval's limit."""
    if limit is None:
        return None
    if limit < 1:
        raise ValueError("limit must be at least 1")
    if info.name != "mmlu" or settings.source == "stock":
        return list(range(limit))
    by_subject: dict[str, list[int]] = {}
    for index, doc in enumerate(_read_jsonl(data_path(info, settings))):
        by_subject.setdefault(str((doc.get("meta") or {}).get("subject", "")), []).append(index)
    chosen: list[int] = []
    queues = [by_subject[s] for s in sorted(by_subject)]
    depth = 0
    while len(chosen) < limit and any(depth < len(q) for q in queues):
        chosen += [q[depth] for q in queues if depth < len(q)][: limit - len(chosen)]
        depth += 1
    return sorted(chosen)


def resolve_tasks(names: Sequence[str], settings: ReasoningSettings) -> list[TaskInfo]:
    """Validate task names (and, for local tasks, that their data exists); duplicates dropped, order kept."""
    out: list[TaskInfo] = []
    for name in names:
        info = task_info(name)
        if settings.source == "local":
            data_path(info, settings)
        if info not in out:
            out.append(info)
    if not out:
        raise UnknownTask("no task given")
    return out


def write_include_dir(folder: Path, settings: ReasoningSettings) -> list[str]:
    """YAMLs for lm-eval's CLI (``--include_path folder``): each includes the packaged config and sets the
    absolute data file. Tasks whose data is missing are left out. Returns the task names written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for info in TASKS.values():
        try:
            path = data_path(info, settings)
        except TaskDataMissing:
            continue
        text = (
            f"include: {json.dumps(str(info.yaml_path))}\n"
            f"task: {info.lm_task}\n"
            f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(path))}\n"
        )
        (folder / f"{info.lm_task}.yaml").write_text(text)
        written.append(info.lm_task)
    return written
