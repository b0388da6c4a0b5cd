"""Data generation through the real queue (PostgreSQL) and registry, on a tiny random Llama with a random LoRA.

The trait judge is replaced by a stand-in scorer (a named fake: the real judge is the evaluator's,
which the trainer must not import, and it has its own tests); what is tested here is that the
injected scorer's P(high) becomes each row's P(target level).
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from big5core.datagen import DatagenSpec
from big5core.dataset import load_rows
from big5core.db import transaction
from big5core.settings import Settings, TrainerSettings
from big5engine.modelstore import base_model_id
from big5personas import registry
from tests.model_support import make_tiny_llama
from trainer.datagen.generate import Generator
from trainer.datagen.io import OUTPUT_COLUMNS, PartFile, read_scenarios
from trainer.datagen.job import resolve_conditions, submit
from trainer.datagen.steering import SteeringModels
from trainer.worker import Worker, job_snapshot

pytestmark = pytest.mark.slow  # generates with tiny models in worker processes


SCENARIOS = (
    "original_index,relation,head,tail,literal,narrative,personx,persony,train_input\n"
    "101,xReact,PersonX helps PersonY,happy,,Ana helps Bo move house.,Ana,Bo,\n"
    "102,xIntent,PersonX calls PersonY,to talk,,Cy calls Di late at night.,Cy,Di,\n"
    '103,xNeed,PersonX cooks,food,,,Ed,Flo,"Flo, dinner is ready, come and eat!"\n'
)


def stand_in_judge(texts: Sequence[str]) -> Mapping[str, Sequence[float]]:
    """FAKE trait judge: P(high) grows with the reply's length (deterministic)."""
    return {"extraversion": [min(1.0, len(t) / 200) for t in texts]}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, bundled_model_path: Path) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", bundled_model_path)


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    folder = tmp_path_factory.mktemp("lora") / "expert"
    get_peft_model(model, config).save_pretrained(folder)
    return folder


@pytest.fixture()
def cfg(settings: Settings, tiny_model: Path, tiny_lora: Path) -> Settings:
    cfg = settings.model_copy(
        update={"base_model": str(tiny_model), "trainer": TrainerSettings(lease_seconds=30, poll_seconds=0.2)}
    )
    worker = Worker(cfg)  # migrates the database
    for level in ("high", "low"):  # a new version per test (the database is the session's)
        staged = registry.staging_dir(cfg.adapters_dir)
        shutil.copytree(tiny_lora, staged, dirs_exist_ok=True)
        with transaction(worker.sessions) as session:
            registry.publish(
                session,
                staged,
                cfg.adapters_dir,
                name=f"dg-extraversion-{level}",
                base_model=base_model_id(cfg),
                method="sft",
                layout="per-trait",
                traits={"extraversion": level},
            )
    return cfg


def _spec(tmp_path: Path, **changes: Any) -> DatagenSpec:
    scenarios = tmp_path / "scenarios.csv"
    scenarios.write_text(SCENARIOS)
    fields: dict[str, Any] = {
        "scenarios": str(scenarios),
        "output": str(tmp_path / "out.csv"),
        "expert": "dg-{trait}-{level}",
        "antiexpert": "dg-{trait}-{opposite}",
        "alpha": 1.0,
        "temperature": 0.7,
        "top_p": 0.9,
        "max_new_tokens": 6,
        "turn0_max_new_tokens": 5,
        "batch_size": 2,
        "drop_unfinished": False,
        "max_reply_chars": 10_000,
    }
    return DatagenSpec(**{**fields, **changes})


def test_worker_runs_a_datagen_job_to_a_trainable_dataset(cfg: Settings, tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    job_id = submit(cfg, spec)
    worker = Worker(cfg)
    worker.judge = stand_in_judge
    worker.run_job(job_id)
    job = job_snapshot(worker.sessions, job_id)
    assert job.state == "succeeded", job.error
    assert job.result["rows"] == 6 and job.result["rows_per_s"] > 0
    assert not (tmp_path / "out.csv.part").exists()

    with (tmp_path / "out.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    with (tmp_path / "out.rejected.csv").open() as handle:
        rejected = list(csv.DictReader(handle))
    assert len(rows) + len(rejected) == 6 and job.result["kept"] == len(rows)
    assert all(r["gate"] != "kept" for r in rejected)
    both = rows + rejected
    assert set(OUTPUT_COLUMNS) <= set(both[0])
    assert {(r["trait"], r["level"]) for r in both} == {("extraversion", "high"), ("extraversion", "low")}
    by_id = {(r["original_index"], r["level"]): r for r in both}
    given = by_id[("103", "high")]
    assert given["train_input"] == "Flo, dinner is ready, come and eat!" and given["turn0_template_id"] == "given"
    made = by_id[("101", "high")]
    assert made["turn0_template_id"] == "psychsteer-turn0-v1"
    assert made["train_input"] == by_id[("101", "low")]["train_input"]  # one Speaker X turn per scenario
    assert made["expert"].startswith("dg-extraversion-high@") and made["antiexpert"].startswith("dg-extraversion-low@")
    assert len(made["expert_sha256"]) == 64 and made["alpha"] == "1.0" and made["template_id"] == "psychsteer-turn1-v1"
    for r in both:
        p_high = stand_in_judge([r["train_output"]])["extraversion"][0]
        expected = p_high if r["level"] == "high" else 1 - p_high
        assert float(r["judge_p_target"]) == pytest.approx(expected, abs=1e-6)
    if rows:  # the project's loader reads the output (extra columns ignored)
        loaded = load_rows(tmp_path / "out.csv")
        assert [r.speaker_y for r in loaded] == [r["train_output"] for r in rows]


def test_a_killed_run_resumes_after_the_last_written_row(cfg: Settings, tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    scenarios = read_scenarios(spec.scenarios)
    with Worker(cfg).sessions() as session:
        conditions = resolve_conditions(session, spec, base_model=base_model_id(cfg))
    models = SteeringModels(cfg.base_model)
    generator = Generator(spec, models, conditions, base_model="tiny")

    whole = PartFile(tmp_path / "whole.csv", "fp")
    generator.run(scenarios, whole)

    class Killed(Exception):
        pass

    batches = []

    def die_after_two() -> None:
        batches.append(1)
        if len(batches) == 2:
            raise Killed

    part = PartFile(tmp_path / "resumed.csv", "fp")
    with pytest.raises(Killed):
        generator.run(scenarios, part, check=die_after_two)
    assert not (tmp_path / "resumed.csv").exists()  # nothing final before the end
    assert len(part.resume()) == 3  # batches never mix conditions: [101, 102], [103] of the first, durable
    summary = generator.run(scenarios, part)
    assert summary.generated_now == 3 and summary.total == 6
    assert (tmp_path / "resumed.csv").read_text() == (tmp_path / "whole.csv").read_text()
    assert (tmp_path / "resumed.rejected.csv").read_text() == (tmp_path / "whole.rejected.csv").read_text()


def test_bad_input_fails_the_job_at_once(cfg: Settings, tmp_path: Path) -> None:
    worker = Worker(cfg)
    missing = submit(cfg, _spec(tmp_path, scenarios=str(tmp_path / "nope.csv")))
    unknown = submit(cfg, _spec(tmp_path, expert="no-such-adapter"))
    for job_id, message in ((missing, "no such scenarios file"), (unknown, "unknown adapter")):
        worker.run_job(job_id)
        job = job_snapshot(worker.sessions, job_id)
        assert job.state == "failed" and job.attempts == 1 and message in (job.error or ""), job.error


def test_admin_route_queues_a_datagen_job(cfg: Settings, tmp_path: Path) -> None:
    from service import errors
    from service.deps import get_session, get_state, require_admin
    from service.routes import datagen

    worker = Worker(cfg)
    app = FastAPI()
    errors.install(app)
    app.include_router(datagen.router)

    def session() -> Any:
        with worker.sessions() as s:
            yield s

    # FAKE service state: only the settings are read; the real app needs the vLLM engine to start.
    app.dependency_overrides[get_state] = lambda: SimpleNamespace(settings=cfg)
    app.dependency_overrides[get_session] = session
    app.dependency_overrides[require_admin] = lambda: None
    spec = _spec(tmp_path).model_dump(mode="json")
    with TestClient(app) as client:
        created = client.post("/v1/datagen-jobs", json=spec)
        assert created.status_code == 201, created.text
        assert created.headers["location"] == f"/v1/training-jobs/{created.json()['id']}"
        job = job_snapshot(worker.sessions, created.json()["id"])
        assert job.state == "queued" and job.spec["kind"] == "datagen" and job.spec["alpha"] == 1.0
        bad = client.post("/v1/datagen-jobs", json={**spec, "conditions": ["extraversion:medium"]})
        assert bad.status_code == 422 and bad.headers["content-type"].startswith("application/problem+json")
        missing = client.post("/v1/datagen-jobs", json={**spec, "scenarios": str(tmp_path / "nope.csv")})
        assert missing.status_code == 400 and "no such scenarios file" in missing.json()["detail"]
    with transaction(worker.sessions) as s:  # leave the queue empty for the other tests
        from big5core import jobs

        jobs.cancel(s, created.json()["id"])
