"""``big5 train`` options: one parser for the YAML file and the flags; a flag overrides only its own field."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from big5core.training import TrainSpec
from trainer.cli import parse_train_args, register

RUN_YAML = """\
method: dpo
layout: per-trait
conditions: [openness:high, neuroticism:low]
learning_rate: 0.001
lora:
  r: 4
  alpha: 32
  dropout: 0.05
  target_modules: [q_proj, v_proj]
"""


@pytest.fixture()
def run_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(RUN_YAML)
    return path


def test_rank_overrides_only_lora_r(run_yaml: Path) -> None:
    spec = parse_train_args(["--config", str(run_yaml), "--rank", "16"]).spec()
    assert spec.lora.model_dump() == {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
    assert (spec.method, spec.layout, spec.learning_rate) == ("dpo", "per-trait", 0.001)


def test_nested_and_plain_flags_override_their_fields(run_yaml: Path) -> None:
    args = ["--config", str(run_yaml), "--lora.alpha", "8", "--learning-rate", "0.01", "--condition", "openness:low"]
    args += ["--batch-size", "2", "--no-wait"]
    parsed = parse_train_args(args)
    spec = parsed.spec()
    assert spec.lora.model_dump() == {"r": 4, "alpha": 8, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
    assert spec.learning_rate == 0.01 and spec.conditions == ["openness:low"]
    assert spec.per_device_train_batch_size == 2 and parsed.wait is False
    assert spec.method == "dpo"  # from the file


def test_without_a_file_flags_apply_to_the_defaults() -> None:
    spec = parse_train_args(["--method", "sft", "--condition", "openness:high", "--condition", "extraversion:low"])
    assert spec.spec() == TrainSpec(method="sft", conditions=["openness:high", "extraversion:low"])
    assert parse_train_args(["--rank", "16"]).spec().lora.model_dump() == {**TrainSpec().lora.model_dump(), "r": 16}


def test_bad_values_name_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  rr: 3\n")
    with pytest.raises(typer.BadParameter, match=r"lora\.rr"):
        parse_train_args(["--config", str(bad)])
    with pytest.raises(typer.BadParameter, match="condition"):
        parse_train_args(["--condition", "openness"])
    with pytest.raises(typer.BadParameter, match="no such file"):
        parse_train_args(["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(SystemExit):  # argparse: an unknown flag
        parse_train_args(["--no-such-flag", "1"])


def test_help_lists_the_flags() -> None:
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["train", "--help"])
    assert result.exit_code == 0, result.output
    for flag in ("--config", "--rank", "--lora.r", "--lora.alpha", "--condition", "--batch-size", "--no-wait"):
        assert flag in result.output, flag


def test_the_cpu_loss_override_is_for_cpu_only() -> None:
    from trl import SFTTrainer

    from trainer.train import sft_trainer_class

    assert sft_trainer_class(use_cpu=False) is SFTTrainer  # a GPU keeps TRL's (Triton) loss
    cpu = sft_trainer_class(use_cpu=True)
    assert issubclass(cpu, SFTTrainer) and cpu.compute_loss is not SFTTrainer.compute_loss
