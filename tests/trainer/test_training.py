"""Real TRL + PEFT training on a tiny random Llama, the job queue on the real PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy import select

from big5core.db import make_engine, session_factory
from big5core.models import Adapter, JobState, TrainingJob
from big5core.settings import Settings, TrainerSettings
from big5core.training import TrainSpec
from big5engine.modelstore import sha256_file, sha256_tree
from big5personas.registry import check_adapter_folder
from tests.model_support import make_tiny_llama
from trainer.train import load_dataset_rows, prepare, train_adapter
from trainer.worker import Worker, submit

FAST = dict(max_steps=3, per_device_train_batch_size=2, max_length=96, warmup_steps=0, learning_rate=5e-3, save_steps=2)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, bundled_model_path: Path) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", bundled_model_path)


def _tiny_settings(settings: Settings, tiny_model: Path, **trainer: object) -> Settings:
    return settings.model_copy(
        update={"base_model": str(tiny_model), "trainer": TrainerSettings(**{"lease_seconds": 30, **trainer})}
    )


@pytest.mark.slow  # trains
@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_training_changes_lora_only(method: str, tiny_model: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_digest = sha256_file(tiny_model / "model.safetensors")
    spec = TrainSpec(method=method, layout="per-trait", conditions=["extraversion:high"], **FAST)
    rows, report = load_dataset_rows(spec)
    data = prepare(spec, rows, report, spec.targets()[0])
    result = train_adapter(spec, data, str(tiny_model), tmp_path / "out", tmp_path / "ckpt", show_progress_bar=False)
    assert result.steps == 3 and result.train_loss is not None

    config = check_adapter_folder(tmp_path / "out")
    assert config["r"] == 8 and config["lora_alpha"] == 16 and not config.get("use_dora")
    weights = load_file(tmp_path / "out" / "adapter_model.safetensors")
    lora_b = [t for k, t in weights.items() if "lora_B" in k]
    assert len(lora_b) == 2 * 7, sorted(weights)  # 2 layers x 7 projections, as "all-linear" targets
    assert all(t.abs().sum() > 0 for t in lora_b), "LoRA B starts at zero; training must have moved it"

    # the base weights are untouched: on disk and inside the adapted model
    assert sha256_file(tiny_model / "model.safetensors") == base_digest
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), tmp_path / "out"
    )
    base_params = dict(fresh.named_parameters())
    for name, param in adapted.get_base_model().named_parameters():
        if "lora_" in name:
            continue
        clean = name.replace(".base_layer", "")
        assert torch.equal(param, base_params[clean]), name


@pytest.mark.slow  # trains
def test_worker_registers_ready_adapter(settings: Settings, tiny_model: Path) -> None:
    cfg = _tiny_settings(settings, tiny_model)
    spec = TrainSpec(method="sft", layout="per-trait", conditions=["openness:high", "openness:low"], **FAST)
    job_id = submit(cfg, spec)
    worker = Worker(cfg)
    assert worker.run(once=True) == 1
    with worker.sessions() as session:
        job = session.get(TrainingJob, job_id)
        assert job is not None and job.state == JobState.SUCCEEDED, job.error
        assert job.progress["step"] == 3 and "loss" in job.progress
        adapters = session.scalars(select(Adapter).where(Adapter.hyperparams["job_id"].as_string() == job_id)).all()
    assert sorted(a.ref for a in adapters) == ["sft-openness-high@1", "sft-openness-low@1"]
    for adapter in adapters:
        assert adapter.state == "ready" and adapter.layout == "per-trait" and adapter.rank == 8
        assert adapter.sha256 == sha256_tree(Path(adapter.path))
        assert adapter.train_loss is not None and adapter.dataset_hash
    assert not list(cfg.adapters_dir.glob(".staging-*"))
    assert not (cfg.data_dir / "checkpoints" / job_id).exists()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("original_index,trait,level,train_input\n1,openness,high,hi\n", "train_output"),
        (
            "original_index,trait,level,train_input,train_output\n1,opennness,high,hi,hello\n",
            "opennness",
        ),
        ("original_index,trait,level,train_input,train_output\n1,openness,medium,hi,hello\n", "medium"),
        ("", "empty"),
    ],
    ids=["missing-column", "unknown-trait", "bad-level", "empty-file"],
)
def test_malformed_dataset_fails_before_training(
    settings: Settings, tiny_model: Path, tmp_path: Path, content: str, expected: str
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    cfg = _tiny_settings(settings, tiny_model)
    job_id = submit(cfg, TrainSpec(dataset=str(path), layout="unified", **FAST))
    worker = Worker(cfg)
    worker.run(once=True)
    with worker.sessions() as session:
        job = session.get(TrainingJob, job_id)
        assert job is not None
        assert job.state == JobState.FAILED and job.attempts == 1, (job.state, job.error)
        assert job.error and expected in job.error.lower(), job.error
        assert "step" not in job.progress
    assert not (cfg.data_dir / "checkpoints" / job_id).exists()


@pytest.mark.slow  # trains
def test_killed_worker_job_is_reclaimed_and_resumed(settings: Settings, tiny_model: Path) -> None:
    """SIGKILL a real worker process mid-job; a second worker reclaims it after the lease and finishes it."""
    cfg = _tiny_settings(settings, tiny_model, lease_seconds=6, heartbeat_seconds=1, poll_seconds=0.2)
    spec = TrainSpec(
        method="sft",
        layout="per-trait",
        conditions=["agreeableness:low"],
        **{**FAST, "max_steps": 40, "save_steps": 2, "learning_rate": 1e-3},
    )
    job_id = submit(cfg, spec)
    env = {
        **os.environ,
        "BIG5_DATA_DIR": str(cfg.data_dir),
        "BIG5_DATABASE_URL": str(cfg.database_url),
        "BIG5_BASE_MODEL": str(tiny_model),
        "BIG5_TRAINER__LEASE_SECONDS": "6",
        "BIG5_TRAINER__HEARTBEAT_SECONDS": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "big5.cli", "worker", "--once"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    engine = make_engine(str(cfg.database_url))
    sessions = session_factory(engine)
    checkpoints = cfg.data_dir / "checkpoints" / job_id
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline:
            with sessions() as session:
                job = session.get(TrainingJob, job_id)
                step = (job.progress or {}).get("step", 0) if job else 0
            if step >= 5 and any(checkpoints.rglob("checkpoint-*")):
                break
            assert proc.poll() is None, "worker exited before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("worker never reached step 5")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()

    with sessions() as session:
        job = session.get(TrainingJob, job_id)
        assert job is not None and job.state == JobState.RUNNING and job.attempts == 1
        killed_at = job.progress["step"]
    # the progress row is written on a heartbeat, so it can lag the newest checkpoint on disk
    saved = max(int(c.name.split("-")[-1]) for c in checkpoints.rglob("checkpoint-*"))

    second = Worker(cfg)
    deadline = time.monotonic() + 60
    while second.run(once=True) == 0:  # nothing claimable until the dead worker's lease expires
        assert time.monotonic() < deadline, "job never became claimable"
        time.sleep(0.5)

    with sessions() as session:
        job = session.get(TrainingJob, job_id)
        assert job is not None and job.state == JobState.SUCCEEDED and job.attempts == 2, job.error
        ready = session.scalars(select(Adapter).where(Adapter.name == "sft-agreeableness-low")).all()
    assert [a.state for a in ready] == ["ready"]
    assert ready[0].hyperparams["steps"] == 40
    assert 2 <= job.progress["resumed_from_step"] <= saved, job.progress  # resumed, not restarted
    assert max(killed_at, saved) < 40
    assert sha256_tree(Path(ready[0].path)) == ready[0].sha256
    # no stray files: no staging folders, no checkpoints, one version folder
    assert not list(cfg.adapters_dir.glob(".staging-*"))
    assert not checkpoints.exists()
    assert [p.name for p in (cfg.adapters_dir / "sft-agreeableness-low").iterdir()] == ["v1"]
    engine.dispose()


@pytest.mark.slow  # trains
def test_dpo_after_sft_starts_from_the_sft_adapter(settings: Settings, tiny_model: Path) -> None:
    """``init_from: sft``: the DPO adapter continues the registry's SFT adapter of the same condition."""
    tiny = _tiny_settings(settings, tiny_model)
    worker = Worker(tiny)
    sft = TrainSpec(method="sft", layout="per-trait", conditions=["extraversion:high"], eval=False, **FAST)
    worker.run_job(submit(tiny, sft))
    # a vanishing learning rate: the DPO adapter then equals where it started
    still = {**FAST, "learning_rate": 1e-12, "max_steps": 1}
    dpo = TrainSpec(method="dpo", layout="per-trait", conditions=["extraversion:high"], init_from="sft", **still)
    worker.run_job(submit(tiny, dpo))
    fresh = TrainSpec(method="dpo", layout="per-trait", conditions=["extraversion:high"], name="fresh", **still)
    worker.run_job(submit(tiny, fresh))
    with session_factory(make_engine(tiny.resolved_database_url))() as session:
        rows = {a.name: a for a in session.scalars(select(Adapter))}
    assert rows["dpo-extraversion-high"].hyperparams["init_from"] == "sft"

    def lora_b(name: str) -> dict[str, torch.Tensor]:
        weights = load_file(Path(rows[name].path) / "adapter_model.safetensors")
        return {k: t for k, t in weights.items() if "lora_B" in k}

    started, sft_b, fresh_b = (
        lora_b("dpo-extraversion-high"),
        lora_b("sft-extraversion-high"),
        lora_b("fresh-extraversion-high"),
    )
    assert started.keys() == sft_b.keys()
    assert all(torch.allclose(started[k], sft_b[k], atol=1e-6) and sft_b[k].abs().sum() > 0 for k in sft_b)
    assert all(t.abs().sum() < 1e-6 for t in fresh_b.values())  # a fresh LoRA starts with B = 0


def test_dpo_losses_add_an_nll_term_only_when_asked() -> None:
    from trainer.train import dpo_losses

    assert dpo_losses(TrainSpec(method="dpo")) == {"loss_type": ["sigmoid"], "loss_weights": None}
    assert dpo_losses(TrainSpec(method="dpo", sft_weight=0.5)) == {
        "loss_type": ["sigmoid", "sft"],
        "loss_weights": [1.0, 0.5],
    }
    with pytest.raises(ValueError):
        TrainSpec(method="dpo", sft_weight=-1)
    assert TrainSpec(method="dpo", layout="unified").mirrored_batches()
    assert not TrainSpec(method="dpo", layout="per-trait", conditions=["extraversion:high"]).mirrored_batches()
    assert not TrainSpec(method="sft", layout="unified", mirror_batches=False).mirrored_batches()


@pytest.mark.slow  # trains
def test_unified_dpo_in_twin_blocks_with_an_nll_term_trains(tiny_model: Path, tmp_path: Path) -> None:
    """The unified recipe's options reach TRL for real: sequential twin batches, sigmoid + sft losses."""
    spec = TrainSpec(method="dpo", layout="unified", sft_weight=1.0, **FAST)
    rows, report = load_dataset_rows(spec)
    data = prepare(spec, rows, report, None)
    result = train_adapter(spec, data, str(tiny_model), tmp_path / "out", tmp_path / "ckpt", show_progress_bar=False)
    assert result.steps == 3 and result.train_loss is not None and result.train_loss > 0
    check_adapter_folder(tmp_path / "out")
