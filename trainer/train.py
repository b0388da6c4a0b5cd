"""One adapter from one spec: BIG5-CHAT rows -> TRL SFTTrainer / DPOTrainer with a PEFT LoRA.

Heavy imports (torch, transformers, trl, peft) happen inside the functions.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from big5core.training import TrainSpec
from big5core.traits import Level, Trait
from trainer import dataset as ds

logger = logging.getLogger(__name__)

ProgressFn = Callable[[dict[str, Any]], None]


@dataclass
class PreparedData:
    train: list[dict[str, Any]]
    test: list[dict[str, Any]]
    dataset_hash: str
    report: str
    unpaired: int = 0


@dataclass
class TrainResult:
    train_loss: float | None
    eval_loss: float | None
    steps: int
    seconds: float
    train_tokens: int
    world_size: int = 1
    metrics: dict[str, float] = field(default_factory=dict)


def load_dataset_rows(spec: TrainSpec) -> tuple[list[ds.Row], str]:
    """Load, validate and filter the dataset; raises DatasetError before any training."""
    rows = ds.load_rows(spec.dataset)
    kept, report = ds.filter_artifacts(rows)
    if not kept:
        raise ds.DatasetError(f"dataset {spec.dataset!r}: no rows left after filtering\n{report.format()}")
    return kept, report.format()


def prepare(spec: TrainSpec, rows: list[ds.Row], report: str, target: tuple[Trait, Level] | None) -> PreparedData:
    """The train/test examples of one adapter (split by scenario, so no scenario is on both sides)."""
    wanted = set(spec.parsed_conditions())
    rows = [r for r in rows if (r.trait, r.level) in wanted or spec.method == "dpo"]
    train_rows, test_rows = ds.split_by_scenario(rows, spec.test_fraction, spec.seed)

    def build(part: list[ds.Row]) -> tuple[list[dict[str, Any]], int]:
        if spec.method == "sft":
            chosen = [r for r in part if (r.trait, r.level) in wanted] if target is None else ds.select(part, *target)
            examples = ds.sft_examples(chosen, spec.layout)
            # prompt/completion form: TRL then trains on the reply tokens only
            return [{"prompt": e["messages"][:-1], "completion": e["messages"][-1:]} for e in examples], 0
        pairs: list[dict[str, Any]] = []
        unpaired = 0
        targets = [target] if target is not None else sorted(wanted)
        for trait, level in targets:
            got, missing = ds.dpo_pairs(ds.select(part, trait), spec.layout, trait=trait, level=level)
            pairs += got
            unpaired += missing
        return pairs, unpaired

    train, unpaired = build(train_rows)
    test, _ = build(test_rows)
    if spec.max_train_rows is not None:
        import random

        random.Random(spec.seed).shuffle(train)
        train = train[: spec.max_train_rows]
    if not train:
        raise ds.DatasetError(f"no training examples for {target or 'the unified adapter'} in {spec.dataset!r}")
    return PreparedData(train, test, ds.dataset_hash(train_rows), report, unpaired)


def _peft_config(spec: TrainSpec) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=spec.lora.target_modules,
        bias="none",
        use_rslora=False,  # rsLoRA breaks the exactness of "cat" composition
        use_dora=False,  # vLLM cannot serve DoRA
        task_type="CAUSAL_LM",
    )


def _progress_callback(progress: ProgressFn | None) -> Any:
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.started = time.monotonic()
            self.first_step: int | None = None

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
            self._report(state, logs or {})

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._report(state, {})

        def _report(self, state: Any, logs: dict[str, float]) -> None:
            if progress is None:
                return
            if self.first_step is None:
                self.first_step = state.global_step - 1
            done = max(state.global_step - self.first_step, 1)
            elapsed = time.monotonic() - self.started
            remaining = max(state.max_steps - state.global_step, 0)
            info: dict[str, Any] = {
                "step": state.global_step,
                "total_steps": state.max_steps,
                "eta_s": round(elapsed / done * remaining, 1),
            }
            if "loss" in logs:
                info["loss"] = float(logs["loss"])
            progress(info)

    return _Progress()


def _fast_sft_trainer() -> Any:
    from trl import SFTTrainer

    class FastSFTTrainer(SFTTrainer):  # type: ignore[misc]
        """SFTTrainer whose loss is the model's own cross-entropy.

        TRL 1.16 patches in a chunked "fused LM head" loss that is ~1.5x slower without Triton (CPU);
        the values are the same. Token accuracy metrics are dropped.
        """

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, **kw: Any) -> Any:
            inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "labels", "position_ids")}
            outputs = model(**inputs, use_cache=False)
            return (outputs.loss, outputs) if return_outputs else outputs.loss

    return FastSFTTrainer


def latest_checkpoint(checkpoint_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(checkpoint_dir)) if checkpoint_dir.is_dir() else None


def train_adapter(
    spec: TrainSpec,
    data: PreparedData,
    base_model_path: str,
    output_dir: Path | None,
    checkpoint_dir: Path,
    *,
    resume: str | None | Literal["auto"] = "auto",
    progress: ProgressFn | None = None,
    use_cpu: bool | None = None,
    show_progress_bar: bool = True,
) -> TrainResult:
    """Train one LoRA adapter and save its files to ``output_dir`` (None: do not save).

    Checkpoints go to ``checkpoint_dir`` every ``spec.save_steps`` steps. ``resume="auto"`` resumes
    from the newest checkpoint there; a path resumes from that one, None starts afresh. Under a
    launcher with several processes (``trainer.ranks``) every rank calls this with the same
    arguments, the main one's resume point, and only the main one an ``output_dir``.
    """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if use_cpu is None:
        use_cpu = not torch.cuda.is_available()
    dtype = torch.float32 if use_cpu else torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(base_model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=dtype)

    common: dict[str, Any] = dict(
        output_dir=str(checkpoint_dir),
        learning_rate=spec.learning_rate,
        num_train_epochs=spec.num_train_epochs,
        max_steps=spec.max_steps,
        per_device_train_batch_size=spec.per_device_train_batch_size,
        per_device_eval_batch_size=spec.per_device_train_batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        warmup_steps=spec.warmup_steps,
        lr_scheduler_type=spec.lr_scheduler_type,
        seed=spec.seed,
        max_length=spec.max_length,
        logging_steps=1,
        save_strategy="steps",
        save_steps=spec.save_steps,
        save_total_limit=2,
        report_to=[],
        use_cpu=use_cpu,
        bf16=not use_cpu,
        disable_tqdm=not show_progress_bar,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
    )
    train_ds = Dataset.from_list(data.train)
    eval_ds = Dataset.from_list(data.test) if (spec.eval and data.test) else None
    callbacks = [_progress_callback(progress)]
    if spec.method == "sft":
        from trl import SFTConfig

        trainer_cls = _fast_sft_trainer()
        args = SFTConfig(**common, completion_only_loss=True, packing=False)
    else:
        from trl import DPOConfig, DPOTrainer

        trainer_cls = DPOTrainer
        args = DPOConfig(**common, beta=spec.beta, loss_type=["sigmoid"])
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=_peft_config(spec),
        callbacks=callbacks,
    )

    if resume == "auto":
        resume = latest_checkpoint(checkpoint_dir)
    if resume:
        logger.info("Resuming from %s", resume)
        if progress is not None:
            progress({"resumed_from_step": int(Path(resume).name.split("-")[-1])})
    started = time.monotonic()
    output = trainer.train(resume_from_checkpoint=resume)
    seconds = time.monotonic() - started
    eval_loss: float | None = None
    if eval_ds is not None:
        metrics = trainer.evaluate()
        eval_loss = float(metrics.get("eval_loss", math.nan))
    if output_dir is not None:
        trainer.model.save_pretrained(str(output_dir))
    tokens = int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0)
    train_loss = float(output.training_loss) if output.training_loss is not None else None
    return TrainResult(
        train_loss=train_loss,
        eval_loss=eval_loss,
        steps=int(trainer.state.global_step),
        seconds=seconds,
        train_tokens=tokens,
        world_size=int(trainer.args.world_size),
        metrics={k: float(v) for k, v in output.metrics.items() if isinstance(v, int | float)},
    )
