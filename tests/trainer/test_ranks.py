"""One job trained by the processes of `accelerate launch --multi_gpu --num_processes 2`.

The command users run on a multi-GPU machine, here on CPUs: with no CUDA device the ranks' process
group is gloo and DDP runs on the CPU (``accelerate launch --cpu`` would start one process only; it
needs MPI for several). Real launcher, real TRL/PEFT on a tiny random Llama, real PostgreSQL (a
fresh database per test).
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from big5core.db import make_engine, session_factory
from big5core.models import Adapter, JobState, TrainingJob
from big5core.settings import Settings, TrainerSettings
from big5core.training import TrainSpec
from big5engine.modelstore import sha256_tree
from tests.model_support import make_tiny_llama
from trainer.worker import Worker, submit

pytestmark = pytest.mark.slow  # every test launches ranks that train

RANKS = 2
SMALL = dict(per_device_train_batch_size=2, max_length=96, warmup_steps=0, learning_rate=5e-3, eval=False)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, bundled_model_path: Path) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", bundled_model_path)


@pytest.fixture()
def cfg(tmp_path: Path, empty_pg_url: str, data_dir: Path, tiny_model: Path) -> Settings:
    work = tmp_path / "data"
    work.mkdir()
    return Settings(
        data_dir=work,
        database_url=empty_pg_url,
        base_model=str(tiny_model),
        trainer=TrainerSettings(lease_seconds=8, heartbeat_seconds=1, poll_seconds=0.2),
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _launch(cfg: Settings, *args: str) -> subprocess.Popen[str]:
    """`accelerate launch --multi_gpu --num_processes 2 -m big5.cli ARGS` against cfg's database and data dir."""
    env = {
        **os.environ,
        "BIG5_DATA_DIR": str(cfg.data_dir),
        "BIG5_DATABASE_URL": str(cfg.database_url),
        "BIG5_BASE_MODEL": cfg.base_model,
        "BIG5_TRAINER__LEASE_SECONDS": str(cfg.trainer.lease_seconds),
        "BIG5_TRAINER__HEARTBEAT_SECONDS": str(cfg.trainer.heartbeat_seconds),
        "BIG5_TRAINER__POLL_SECONDS": str(cfg.trainer.poll_seconds),
        "OMP_NUM_THREADS": "1",  # two ranks on two cores
    }
    command = [
        str(Path(sys.executable).with_name("accelerate")),
        "launch",
        "--multi_gpu",
        "--num_processes",
        str(RANKS),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "big5.cli",
        *args,
    ]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 240) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"launch did not finish in {timeout} s:\n{out[-6000:]}")
    return out


def _adapters(cfg: Settings, job_id: str) -> list[Adapter]:
    sessions = session_factory(make_engine(str(cfg.database_url)))
    with sessions() as session:
        query = select(Adapter).where(Adapter.hyperparams["job_id"].as_string() == job_id)
        return list(session.scalars(query.order_by(Adapter.name)).all())


def _job(cfg: Settings, job_id: str) -> TrainingJob:
    sessions = session_factory(make_engine(str(cfg.database_url)))
    with sessions() as session:
        job = session.get(TrainingJob, job_id)
        assert job is not None
        session.expunge(job)
        return job


def test_launched_worker_trains_each_job_once_across_ranks(cfg: Settings, tmp_path: Path) -> None:
    """Two ranks, one queue: every job is claimed once, trained data-parallel, published once by rank 0."""
    broken = tmp_path / "broken.csv"
    broken.write_text("original_index,trait,level,train_input\n1,openness,high,hi\n")
    bad = submit(cfg, TrainSpec(dataset=str(broken), max_steps=2, **SMALL))
    sft = submit(
        cfg,
        TrainSpec(
            method="sft", layout="per-trait", conditions=["openness:high", "openness:low"], max_train_rows=16, **SMALL
        ),
    )
    dpo = submit(
        cfg, TrainSpec(method="dpo", layout="unified", conditions=["extraversion:high"], max_train_rows=8, **SMALL)
    )

    out = _finish(_launch(cfg, "worker", "--exit-when-idle"))

    assert "processed 3 job(s)" in out, out[-6000:]
    assert "rank 1: helped train 3 adapter(s)" in out, out[-6000:]  # 2 SFT + 1 DPO; nothing for the bad job
    failed = _job(cfg, bad)
    assert failed.state == JobState.FAILED and failed.attempts == 1 and "train_output" in (failed.error or "")
    owners = set()
    for job_id, names in ((sft, ["sft-openness-high", "sft-openness-low"]), (dpo, ["dpo-unified"])):
        job = _job(cfg, job_id)
        assert job.state == JobState.SUCCEEDED and job.attempts == 1, job.error
        owners.add(job.lease_owner)
        adapters = _adapters(cfg, job_id)
        assert [a.name for a in adapters] == names  # one registration each, not one per rank
        for adapter in adapters:
            hp = adapter.hyperparams
            assert hp["world_size"] == RANKS and hp["global_batch_size"] == 2 * RANKS
            # one epoch over the examples the trainer kept, in global batches of 4: half the steps one process
            # takes (TRL's DPO drops pairs whose prompt alone fills max_length: the unified instruction is long)
            assert 0 < hp["trained_examples"] <= hp["train_examples"]
            assert hp["steps"] == math.ceil(hp["trained_examples"] / (2 * RANKS)), (adapter.name, hp)
            assert adapter.state == "ready" and adapter.sha256 == sha256_tree(Path(adapter.path))
    assert len(owners) == 1  # rank 0 claimed everything
    assert not list(cfg.adapters_dir.glob(".staging-*"))
    assert not (cfg.data_dir / "checkpoints").exists() or not any((cfg.data_dir / "checkpoints").iterdir())


def test_launched_train_queues_one_job(cfg: Settings) -> None:
    """`big5 train` under the launcher: rank 0 queues the job, both ranks train it."""
    out = _finish(
        _launch(
            cfg,
            "train",
            "--method",
            "sft",
            "--layout",
            "unified",
            "--condition",
            "agreeableness:low",
            "--max-steps",
            "3",
            "--batch-size",
            "2",
            "--max-length",
            "96",
        )
    )
    assert out.count("queued job ") == 1, out[-6000:]
    sessions = session_factory(make_engine(str(cfg.database_url)))
    with sessions() as session:
        jobs = session.scalars(select(TrainingJob)).all()
        assert len(jobs) == 1 and jobs[0].state == JobState.SUCCEEDED, out[-6000:]
        job_id = jobs[0].id
    [adapter] = _adapters(cfg, job_id)
    assert adapter.hyperparams["world_size"] == RANKS and adapter.hyperparams["steps"] == 3


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the launched process with RANK=rank: a descendant of the launcher."""
    parents: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            parents[int(proc.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    family, grew = {launcher}, True
    while grew:
        kids = {pid for pid, parent in parents.items() if parent in family} - family
        family |= kids
        grew = bool(kids)
    for pid in family - {launcher}:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    return None


def test_killed_rank_ends_the_launch_and_job_resumes(cfg: Settings) -> None:
    """SIGKILL rank 1 mid-job: the launch ends, nothing is published, a later worker resumes the job."""
    spec = TrainSpec(
        method="sft",
        layout="per-trait",
        conditions=["neuroticism:high"],
        **{**SMALL, "max_steps": 40, "save_steps": 2},
    )
    job_id = submit(cfg, spec)
    proc = _launch(cfg, "worker", "--once")
    checkpoints = cfg.data_dir / "checkpoints" / job_id
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "launch ended before a rank could be killed"
            if any(checkpoints.rglob("checkpoint-*")) and _job(cfg, job_id).progress.get("step", 0) >= 3:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the launch never reached step 3")
        follower = _rank_pid(proc.pid, 1)
        assert follower is not None, "rank 1 not found"
        os.kill(follower, signal.SIGKILL)
        out = _finish(proc, timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, out[-4000:]

    job = _job(cfg, job_id)
    assert job.state in (JobState.RUNNING, JobState.QUEUED) and job.attempts == 1, (job.state, job.error)
    assert _adapters(cfg, job_id) == []  # nothing half-published
    saved = max(int(c.name.split("-")[-1]) for c in checkpoints.rglob("checkpoint-*"))

    worker = Worker(cfg)  # one process this time; the launch's checkpoints are a plain Trainer's
    deadline = time.monotonic() + 60
    while worker.run(once=True) == 0:  # claimable once the dead launch's lease expires
        assert time.monotonic() < deadline, "job never became claimable"
        time.sleep(0.5)
    job = _job(cfg, job_id)
    assert job.state == JobState.SUCCEEDED and job.attempts == 2, job.error
    assert 2 <= job.progress["resumed_from_step"] <= saved
    [adapter] = _adapters(cfg, job_id)
    assert adapter.hyperparams["steps"] == 40 and adapter.hyperparams["world_size"] == 1
    assert adapter.sha256 == sha256_tree(Path(adapter.path))
    assert not list(cfg.adapters_dir.glob(".staging-*"))
