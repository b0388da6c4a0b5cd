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
from trainer import checkpoints
from trainer import dataset as ds

logger = logging.getLogger(__name__)

ProgressFn = Callable[[dict[str, Any]], None]
StopFn = Callable[[], str | None]  # a reason to stop training now (lease lost, cancelled), or None


@dataclass
class PreparedData:
    train: list[dict[str, Any]]
    test: list[dict[str, Any]]
    dataset_hash: str
    report: str
    pairs: ds.PairReport = field(default_factory=ds.PairReport)
    init_adapter: str | None = None
    """folder of the adapter training starts from (``TrainSpec.init_from``, resolved by the worker)"""


@dataclass
class TrainResult:
    train_loss: float | None
    eval_loss: float | None
    steps: int
    seconds: float
    train_tokens: int
    world_size: int = 1
    metrics: dict[str, float] = field(default_factory=dict)
    stopped: str | None = None  # why training ended early (nothing was evaluated or saved)
    trained_examples: int | None = None  # what the trainer kept: TRL's DPO drops pairs whose prompt fills max_length


def load_dataset_rows(spec: TrainSpec) -> tuple[list[ds.Row], str]:
    """Load, validate and filter the dataset; raises DatasetError before any training."""
    kept, report = ds.load_filtered(spec.dataset)
    return kept, report.format()


def prepare(spec: TrainSpec, rows: list[ds.Row], report: str, target: tuple[Trait, Level] | None) -> PreparedData:
    """The train/test examples of one adapter (split by scenario, so no scenario is on both sides)."""
    wanted = set(spec.parsed_conditions())
    rows = [r for r in rows if (r.trait, r.level) in wanted or spec.method == "dpo"]
    train_rows, test_rows = ds.split_by_scenario(rows, spec.test_fraction, spec.seed)

    mirrored = spec.mirrored_batches()

    def build(part: list[ds.Row]) -> tuple[list[dict[str, Any]], ds.PairReport]:
        if spec.method == "sft":
            chosen = [r for r in part if (r.trait, r.level) in wanted] if target is None else ds.select(part, *target)
            if mirrored:
                chosen = ds.mirror_blocks(chosen, ds.mirror_of, spec.seed)
            examples = ds.sft_examples(chosen, spec.layout, spec.instruction_placement)
            # prompt/completion form: TRL then trains on the reply tokens only
            return [{"prompt": e["messages"][:-1], "completion": e["messages"][-1:]} for e in examples], ds.PairReport()
        pairs: list[dict[str, Any]] = []
        skipped = ds.PairReport()
        targets = [target] if target is not None else sorted(wanted)
        for trait, level in targets:
            got, missing = ds.dpo_pairs(
                ds.select(part, trait),
                spec.layout,
                trait=trait,
                level=level,
                placement=spec.instruction_placement,
                mirror_key=mirrored,
            )
            pairs += got
            skipped += missing
        if mirrored:
            pairs = ds.mirror_blocks(pairs, lambda p: p["mirror"], spec.seed)
            pairs = [{k: v for k, v in p.items() if k != "mirror"} for p in pairs]
        return pairs, skipped

    train, skipped = build(train_rows)
    if skipped.skipped:
        logger.info(
            "%s: %d DPO target row(s) skipped: %d without an opposite-level partner, %d whose partner answers "
            "another Speaker X turn",
            target or "unified",
            skipped.skipped,
            skipped.unpaired,
            skipped.mismatched_speaker_x,
        )
    test, _ = build(test_rows)
    if spec.max_train_rows is not None:
        if not mirrored:  # mirrored: the blocks are in a random order already; keep them whole
            import random

            random.Random(spec.seed).shuffle(train)
        train = train[: spec.max_train_rows]
    if not train:
        raise ds.DatasetError(f"no training examples for {target or 'the unified adapter'} in {spec.dataset!r}")
    return PreparedData(train, test, ds.dataset_hash(train_rows), report, skipped)


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


CONDITIONING_METRICS = (
    "rewards/margins",  # DPO's own view of whether the adapter uses its condition (chosen over rejected)
    "rewards/accuracies",
    "level/accuracy",  # the level-contrast SFT's: each reply more likely under its own level than the opposite
    "level/margin",
    "format/kl",  # the answer-format term on rating questions (trainer/answer_format.py): KL from the base model
    "format/option_nll",  # or -log of the option numbers' probability
)
"""Training metrics passed on to the progress callback beside the loss."""


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
            info.update({k: float(v) for k, v in logs.items() if k in CONDITIONING_METRICS})
            progress(info)

    return _Progress()


def _stop_callback(should_stop: StopFn | None) -> Any:
    """Ends training at the end of the step during which ``should_stop`` starts giving a reason.

    The step's checkpoint and evaluation are skipped: a worker that lost its lease must not write
    where the new owner reads. Under a launcher with several ranks, rank 0's answer is broadcast
    every step, so all ranks stop at the same step (a rank that stopped alone would hang the others
    in their next collective).
    """
    from transformers import TrainerCallback

    class _StopWhen(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.reason: str | None = None
            self.step: int | None = None

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            reason = should_stop() if should_stop is not None else None
            if int(getattr(args, "world_size", 1)) > 1:
                import torch
                import torch.distributed as dist

                if dist.is_available() and dist.is_initialized():
                    flag = torch.tensor([1 if reason else 0], device=args.device)
                    dist.broadcast(flag, src=0)
                    if flag.item() and reason is None:
                        reason = "stopped by rank 0"
            if reason and self.reason is None:
                self.reason, self.step = reason, int(state.global_step)
                logger.warning("Stopping training at step %d of %d: %s", state.global_step, state.max_steps, reason)
            if self.reason:
                control.should_training_stop = True
                control.should_save = False
                control.should_evaluate = False

    return _StopWhen()


def _fast_sft_trainer() -> Any:
    from trl import SFTTrainer

    class FastSFTTrainer(SFTTrainer):  # type: ignore[misc]
        """SFTTrainer whose loss is the model's own cross-entropy.

        TRL 1.16 patches in a chunked "fused LM head" loss that is ~1.5x slower without Triton (CPU);
        the values are the same. Token accuracy metrics are dropped. Used on CPU only: on a GPU TRL's
        own loss (with Triton) stays.
        """

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, **kw: Any) -> Any:
            inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "labels", "position_ids")}
            outputs = model(**inputs, use_cache=False)
            return (outputs.loss, outputs) if return_outputs else outputs.loss

    return FastSFTTrainer


def dpo_losses(spec: TrainSpec) -> dict[str, Any]:
    """TRL's DPO loss terms for ``spec``: the sigmoid loss, plus an NLL term on the chosen reply when
    ``sft_weight`` > 0 (TRL's ``"sft"`` loss type, combined by ``loss_weights``)."""
    if spec.sft_weight > 0:
        return {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, spec.sft_weight]}
    return {"loss_type": ["sigmoid"], "loss_weights": None}


def sft_trainer_class(use_cpu: bool) -> Any:
    """The SFT trainer: on CPU with the plain cross-entropy loss (measured faster there), else TRL's own."""
    from trl import SFTTrainer

    return _fast_sft_trainer() if use_cpu else SFTTrainer


def _quiet_logs(trainer: Any, show_progress_bar: bool) -> None:
    """A progress bar (or nothing), never the raw log dicts the Trainer prints; losses still reach ``progress``."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class _BarOnly(ProgressCallback):  # type: ignore[misc]
        def on_log(self, *args: Any, **kwargs: Any) -> None:
            pass

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if show_progress_bar:
        trainer.add_callback(_BarOnly())


def latest_checkpoint(checkpoint_dir: Path) -> str | None:
    """The newest complete checkpoint in ``checkpoint_dir`` (:mod:`trainer.checkpoints`), or None."""
    newest = checkpoints.newest_complete(checkpoint_dir)
    return str(newest) if newest is not None else None


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
    should_stop: StopFn | None = None,
) -> TrainResult:
    """Train one LoRA adapter and save its files to ``output_dir`` (None: do not save).

    Checkpoints go to ``checkpoint_dir`` every ``spec.save_steps`` steps, each marked complete once
    written (:mod:`trainer.checkpoints`). ``resume="auto"`` resumes from the newest complete
    checkpoint there (an incomplete newer one is skipped); a path resumes from that one, None starts
    afresh. Under a
    launcher with several processes (``trainer.ranks``) every rank calls this with the same
    arguments, the main one's resume point, and only the main one an ``output_dir``.

    ``should_stop`` is asked after every step; once it gives a reason, training ends after that step
    without evaluating or saving anything, and the result's ``stopped`` carries the reason.
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
    peft_config = _peft_config(spec)
    if data.init_adapter is not None:  # continue from a trained adapter (e.g. DPO after SFT); ref = base
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, data.init_adapter, is_trainable=True)
        peft_config = None

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
        # TRL turns it on by default; on a CPU it costs a third more compute for memory a small model does not need
        gradient_checkpointing=(not use_cpu) if spec.gradient_checkpointing is None else spec.gradient_checkpointing,
        # mirrored batches (a unified adapter): `prepare` laid the examples out in twin blocks, keep that order
        train_sampling_strategy="sequential" if spec.mirrored_batches() else "random",
    )
    train_ds = Dataset.from_list(data.train)
    eval_ds = Dataset.from_list(data.test) if (spec.eval and data.test) else None
    stopper = _stop_callback(should_stop)
    callbacks = [_progress_callback(progress), stopper, checkpoints.marker_callback()]
    if spec.method == "sft":
        from trl import SFTConfig

        trainer_cls = sft_trainer_class(use_cpu)
        if spec.level_contrast > 0:
            from trainer.level_contrast import level_contrast_trainer, level_swap

            # found before any training: a tokenizer whose level words are not one token each fails here
            swap = level_swap(tokenizer, spec.instruction_placement)
            trainer_cls = level_contrast_trainer(trainer_cls, spec.level_contrast, swap)
        args = SFTConfig(**common, completion_only_loss=True, packing=False)
    else:
        from trl import DPOConfig, DPOTrainer

        trainer_cls = DPOTrainer
        args = DPOConfig(**common, beta=spec.beta, **dpo_losses(spec))
    if spec.answer_format > 0:
        from trainer.answer_format import AnswerFormatTerm, answer_format_trainer, option_token_ids, probe_prompts

        probes = probe_prompts(tokenizer, spec.layout, spec.instruction_placement)
        term = AnswerFormatTerm(
            probes,
            spec.answer_format,
            pad_id=int(tokenizer.pad_token_id),
            target=spec.answer_format_target,
            options=option_token_ids(tokenizer, len(probes)),
        )
        trainer_cls = answer_format_trainer(trainer_cls, term)
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    _quiet_logs(trainer, show_progress_bar)
    kept = len(trainer.train_dataset)
    if kept < len(train_ds):
        logger.warning(
            "%d of %d training examples dropped by the trainer: their prompt alone fills max_length=%d%s",
            len(train_ds) - kept, len(train_ds), spec.max_length,
            " (a mirrored batch may then miss its twin)" if spec.mirrored_batches() else "",
        )  # fmt: skip

    if resume == "auto":
        resume = latest_checkpoint(checkpoint_dir)
    if resume:
        logger.info("Resuming from %s", resume)
        if progress is not None:
            progress({"resumed_from_step": int(Path(resume).name.split("-")[-1])})
    started = time.monotonic()
    output = trainer.train(resume_from_checkpoint=resume)
    seconds = time.monotonic() - started
    if stopper.reason is not None:
        return TrainResult(
            train_loss=None,
            eval_loss=None,
            steps=int(trainer.state.global_step),
            seconds=seconds,
            train_tokens=int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0),
            world_size=int(trainer.args.world_size),
            stopped=stopper.reason,
            trained_examples=kept,
        )
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
        trained_examples=kept,
    )
