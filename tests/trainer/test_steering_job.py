"""Steering-vector extraction as a queued job (real queue on PostgreSQL, real registry, tiny random Llama)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from big5core import jobs
from big5core.dataset import BUNDLED_REAL, heldout_split, load_filtered
from big5core.settings import Settings, TrainerSettings
from big5core.training import SteerSpec
from big5core.traits import TRAITS, Method
from big5engine.modelstore import base_model_id
from big5engine.steering import STEER_LAYOUT, read_vector_set
from big5personas import registry
from tests.model_support import make_tiny_llama
from trainer.steering import extract_vectors, training_rows
from trainer.worker import Worker, job_snapshot, submit

pytestmark = pytest.mark.slow  # runs a model (tiny) in the worker


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, bundled_model_path: Path) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", bundled_model_path)


@pytest.fixture()
def cfg(settings: Settings, tiny_model: Path) -> Settings:
    return settings.model_copy(
        update={"base_model": str(tiny_model), "trainer": TrainerSettings(lease_seconds=30, poll_seconds=0.2)}
    )


def test_extraction_reads_only_the_training_side(tiny_model: Path) -> None:
    rows, _ = load_filtered(BUNDLED_REAL)
    train, held = heldout_split(rows)
    assert {r.scenario for r in training_rows(BUNDLED_REAL)} == {r.scenario for r in train}
    assert not {r.scenario for r in training_rows(BUNDLED_REAL)} & {r.scenario for r in held}
    extraction = extract_vectors(str(tiny_model), train, rows_per_arm=3, depth=1)
    assert extraction.meta["rows"]["openness"] == {"high": 3, "low": 3}
    assert extraction.meta["depth"] == 1 and extraction.meta["layers"] == [0]
    for trait in TRAITS:
        vector = extraction.vectors[trait]
        assert vector.shape == (2, 64) and bool(vector[0].abs().sum() > 0) and bool(torch.all(vector[1] == 0))


def test_the_queued_job_publishes_a_verified_vector_set(cfg: Settings) -> None:
    worker = Worker(cfg)
    try:
        job_id = submit(cfg, SteerSpec(rows_per_arm=3, depth=1, name="job-vectors"), db=worker.db)
        worker.run_job(job_id)
        job = job_snapshot(worker.sessions, job_id)
        assert job.state == "succeeded", job.error
        ref = job.result["adapters"]["job-vectors"]
        with worker.sessions() as session:
            row = registry.get(session, ref)
            assert (row.method, row.layout, row.base_model) == (Method.STEER.value, STEER_LAYOUT, base_model_id(cfg))
            assert row.hyperparams["job_id"] == job_id and row.dataset_hash
            registry.verify(row)
            vectors = read_vector_set(Path(row.path))
        assert vectors.num_layers == 2 and vectors.hidden == 64
    finally:
        worker.close()


def test_a_failure_at_publish_leaves_no_vectors_and_no_success(cfg: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    worker = Worker(
        cfg.model_copy(update={"trainer": TrainerSettings(lease_seconds=30, poll_seconds=0.2, max_attempts=1)})
    )
    try:
        job_id = submit(worker.settings, SteerSpec(rows_per_arm=3, depth=1, name="broken-vectors"), db=worker.db)
        monkeypatch.setattr(jobs, "succeed", lambda *a, **k: False)  # the success cannot be recorded
        worker.run_job(job_id)
        job = job_snapshot(worker.sessions, job_id)
        assert job.state == "failed" and "could not record success" in (job.error or "")
        with worker.sessions() as session, pytest.raises(registry.AdapterNotFound):
            registry.get(session, "broken-vectors")
        assert not (cfg.adapters_dir / "broken-vectors" / "v1").exists()
    finally:
        worker.close()
