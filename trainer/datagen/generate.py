"""The generation run: scenarios x conditions -> BIG5-CHAT rows, gated, written crash-safely.

Rows are produced in a fixed order (condition-major, then scenario), batch by batch; row ``i``
samples with seed ``spec.seed + i``. Each batch is appended to the part file (fsynced) before the
next starts, so a killed run resumes after the last batch written. Speaker X's turn is taken from
the scenario when given, else written once per scenario by the base model (turn-0 template,
unsteered) and reused for every condition (and, after a crash, read back from the part file).

Quality gates, the first failing one named in the row's ``gate`` column: ``null`` (empty text),
``refusal`` and ``stage_direction`` (the dataset's artifact filter on the reply), ``refusal_turn0``
(the generated Speaker X turn is a refusal), ``length`` (longer than ``max_reply_chars``, or cut off
at ``max_new_tokens`` when ``drop_unfinished``), ``judge`` (P(target level) below ``min_judge``).
At the end the artifact filter runs once more over all survivors for duplicates (``duplicate``).
Kept rows go to the output, the others to ``<stem>.rejected<suffix>``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from big5core.datagen import DatagenSpec, TraitScorer
from big5core.dataset import Row, filter_artifacts
from big5core.prompts import (
    DatagenTemplate,
    datagen_expert,
    datagen_turn0,
    datagen_turn1,
    unified_instruction,
)
from big5core.traits import Level, Trait
from trainer.datagen.dexperts import DExperts, Sampling
from trainer.datagen.io import KEPT, PartFile, Scenario
from trainer.datagen.steering import ExpertSource, SteeringModels

logger = logging.getLogger(__name__)

ProgressFn = Callable[[dict[str, Any]], None]
Task = tuple[int, "Condition", Scenario]
"""(row index, condition, scenario)"""


@dataclass(frozen=True)
class Condition:
    trait: Trait
    level: Level
    expert: ExpertSource
    antiexpert: ExpertSource | None = None


@dataclass
class Summary:
    output: Path
    rejected_output: Path
    total: int
    kept: int
    gates: dict[str, int]
    generated_now: int
    seconds: float
    filter_report: dict[str, Any] = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        return self.generated_now / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "rejected_output": str(self.rejected_output),
            "rows": self.total,
            "kept": self.kept,
            "gates": self.gates,
            "generated_now": self.generated_now,
            "seconds": round(self.seconds, 2),
            "rows_per_s": round(self.rows_per_s, 3),
            "filter": self.filter_report,
        }


def fingerprint(spec: DatagenSpec, base_model: str, conditions: Sequence[Condition]) -> str:
    """What makes a part file resumable by this run: the spec (less output), base model and experts' hashes."""
    payload = {
        "spec": spec.model_dump(mode="json", exclude={"output"}),
        "base": base_model,
        "experts": [
            [c.expert.name, c.expert.sha256, c.antiexpert and c.antiexpert.name, c.antiexpert and c.antiexpert.sha256]
            for c in conditions
        ],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _reject_reason(row: Row) -> str | None:
    """The artifact filter's verdict on one row (null, refusal, stage_direction), or None."""
    kept, report = filter_artifacts([row])
    if kept:
        return None
    return next(reason for reason in ("null", "refusal", "stage_direction") if getattr(report, reason))


def _clean(text: str) -> str:
    """Drop one pair of quotes around the whole reply (the prompt quotes X's words; models echo the style)."""
    text = text.strip()
    if len(text) > 1 and text[0] == text[-1] == '"' and '"' not in text[1:-1]:
        text = text[1:-1].strip()
    return text


class Generator:
    """Runs one spec over scenarios with loaded models; see the module docstring."""

    def __init__(
        self,
        spec: DatagenSpec,
        models: SteeringModels,
        conditions: Sequence[Condition],
        *,
        base_model: str,
        judge: TraitScorer | None = None,
    ) -> None:
        self.spec = spec
        self.models = models
        self.conditions = list(conditions)
        self.base_model = base_model
        self.judge = judge
        sources = [c.expert for c in conditions] + [c.antiexpert for c in conditions if c.antiexpert]
        models.prepare(sources)
        self.sampling = Sampling(spec.temperature, spec.top_p, spec.max_new_tokens)
        self.turn0_sampling = Sampling(spec.temperature, spec.top_p, spec.turn0_max_new_tokens)
        self.plain = DExperts(models.tokenizer, models.base, device=models.device)

    def tasks(self, scenarios: Sequence[Scenario]) -> list[Task]:
        pairs = [(c, s) for c in self.conditions for s in scenarios]
        return [(i, c, s) for i, (c, s) in enumerate(pairs)]

    def run(
        self,
        scenarios: Sequence[Scenario],
        part: PartFile,
        *,
        progress: ProgressFn | None = None,
        check: Callable[[], None] | None = None,
        show_progress_bar: bool = False,
    ) -> Summary:
        """Generate every missing row (resuming from ``part``), then write the output files."""
        from tqdm.auto import tqdm

        tasks = self.tasks(scenarios)
        done = part.resume()
        if len(done) > len(tasks):
            raise RuntimeError(f"{part.path} holds {len(done)} rows, more than the {len(tasks)} of this run")
        turn0 = {r["original_index"]: r["train_input"] for r in done if r["turn0_template_id"] == DatagenTemplate.TURN0}
        if done:
            logger.info("resuming after %d of %d rows written to %s", len(done), len(tasks), part.path)
        started = time.perf_counter()
        bar = tqdm(total=len(tasks), initial=len(done), unit="row", disable=not show_progress_bar)
        todo = tasks[len(done) :]
        generated = 0
        try:
            for batch in self._batches(todo):
                rows = self._generate(batch, turn0)
                part.append(rows)
                done.extend(rows)
                generated += len(rows)
                bar.update(len(rows))
                rate = generated / max(time.perf_counter() - started, 1e-9)
                bar.set_postfix(rows_per_s=f"{rate:.2f}")
                logger.info("datagen: %d/%d rows, %.3f rows/s", len(done), len(tasks), rate)
                if progress is not None:
                    progress(
                        {
                            "phase": "generating",
                            "rows_done": len(done),
                            "rows_total": len(tasks),
                            "rows_per_s": round(rate, 3),
                        }
                    )
                if check is not None:
                    check()
        finally:
            bar.close()
        seconds = time.perf_counter() - started
        return self._finish(part, done, generated, seconds)

    def _batches(self, todo: Sequence[Task]) -> list[list[Task]]:
        batches: list[list[Task]] = []
        for task in todo:
            if batches and len(batches[-1]) < self.spec.batch_size and batches[-1][0][1] is task[1]:
                batches[-1].append(task)
            else:
                batches.append([task])
        return batches

    # ------------------------------------------------------------------ one batch
    def _speaker_x(self, batch: Sequence[Task], turn0: dict[str, str]) -> None:
        missing: dict[str, tuple[int, Scenario]] = {}
        for _, _, s in batch:
            if s.speaker_x is None and s.original_index not in turn0 and s.original_index not in missing:
                missing[s.original_index] = (len(missing), s)
        if not missing:
            return
        scenarios = [s for _, s in missing.values()]
        messages = [datagen_turn0(s.x, s.y, s.text) for s in scenarios]
        seeds = [self.spec.seed + 1_000_000_007 + hash_index(s.original_index) for s in scenarios]
        for s, out in zip(
            scenarios, self.plain.generate(messages, sampling=self.turn0_sampling, seeds=seeds), strict=True
        ):
            turn0[s.original_index] = _clean(out.text)

    def _generate(self, batch: Sequence[Task], turn0: dict[str, str]) -> list[dict[str, Any]]:
        self._speaker_x(batch, turn0)
        condition = batch[0][1]
        trait, level = condition.trait, condition.level
        x_turns = [s.speaker_x or turn0[s.original_index] for _, _, s in batch]
        base_msgs = [
            datagen_turn1(s.x, s.y, s.text, x, trait, level) for (_, _, s), x in zip(batch, x_turns, strict=True)
        ]
        expert_msgs = [datagen_expert(condition.expert.template, x, trait, level) for x in x_turns]
        anti = condition.antiexpert
        anti_msgs = [datagen_expert(anti.template, x, trait, level.opposite) for x in x_turns] if anti else None
        engine = DExperts(
            self.models.tokenizer,
            self.models.base,
            self.models.member(condition.expert),
            self.models.member(anti) if anti else None,
            device=self.models.device,
        )
        seeds = [self.spec.seed + i for i, _, _ in batch]
        outs = engine.generate(
            base_msgs,
            alpha=self.spec.alpha,
            expert_messages=expert_msgs,
            antiexpert_messages=anti_msgs,
            sampling=self.sampling,
            seeds=seeds,
        )
        replies = [_clean(o.text) for o in outs]
        p_high = self.judge(replies)[trait.value] if self.judge is not None and replies else None
        rows = []
        for k, ((index, _, s), x, out, reply) in enumerate(zip(batch, x_turns, outs, replies, strict=True)):
            p_target = None
            if p_high is not None:
                p_target = float(p_high[k]) if level is Level.HIGH else 1.0 - float(p_high[k])
            row = {
                "original_index": s.original_index,
                "env_idx": index,
                "trait": trait.value,
                "level": level.value,
                **s.fields,
                "train_instruction": unified_instruction(trait, level),
                "train_input": x,
                "train_output": reply,
                "base_model": self.base_model,
                "expert": condition.expert.name,
                "expert_sha256": condition.expert.sha256,
                "antiexpert": anti.name if anti else None,
                "antiexpert_sha256": anti.sha256 if anti else None,
                "alpha": self.spec.alpha,
                "temperature": self.spec.temperature,
                "top_p": self.spec.top_p,
                "seed": seeds[k],
                "template_id": DatagenTemplate.TURN1.value,
                "expert_template_id": condition.expert.template.value,
                "turn0_template_id": (DatagenTemplate.GIVEN if s.speaker_x else DatagenTemplate.TURN0).value,
                "reply_tokens": len(out.ids),
                "finished": out.finished,
                "judge_p_target": None if p_target is None else round(p_target, 6),
            }
            row["gate"] = self._gate(row, s, out.finished, p_target)
            rows.append(row)
        return rows

    def _gate(self, row: dict[str, Any], scenario: Scenario, finished: bool, p_target: float | None) -> str:
        trait, level = Trait(row["trait"]), Level(row["level"])
        reason = _reject_reason(
            Row(scenario.original_index, trait, level, row["train_input"], row["train_output"], None)
        )
        if reason is not None:
            return reason
        if scenario.speaker_x is None and _reject_reason(
            Row(scenario.original_index, trait, level, "x", row["train_input"], None)
        ):
            return "refusal_turn0"
        if len(row["train_output"]) > self.spec.max_reply_chars or (self.spec.drop_unfinished and not finished):
            return "length"
        if self.spec.min_judge is not None and p_target is not None and p_target < self.spec.min_judge:
            return "judge"
        return KEPT

    # ------------------------------------------------------------------ the end
    def _finish(self, part: PartFile, rows: list[dict[str, Any]], generated: int, seconds: float) -> Summary:
        survivors = [r for r in rows if r["gate"] == KEPT]
        as_rows = [
            Row(r["original_index"], Trait(r["trait"]), Level(r["level"]), r["train_input"], r["train_output"], None)
            for r in survivors
        ]
        kept_rows, report = filter_artifacts(as_rows)
        kept_ids = {id(r) for r in kept_rows}
        kept: list[dict[str, Any]] = []
        rejected: list[dict[str, Any]] = []
        for row, as_row in zip(survivors, as_rows, strict=True):
            (kept if id(as_row) in kept_ids else rejected).append(
                row if id(as_row) in kept_ids else {**row, "gate": "duplicate"}
            )
        rejected = [r for r in rows if r["gate"] != KEPT] + rejected
        gates: dict[str, int] = {}
        for r in kept + rejected:
            gates[r["gate"]] = gates.get(r["gate"], 0) + 1
        output, rejected_path = part.finalize(kept, rejected)
        return Summary(
            output=output,
            rejected_output=rejected_path,
            total=len(rows),
            kept=len(kept),
            gates=gates,
            generated_now=generated,
            seconds=seconds,
            filter_report=report.as_dict(),
        )


def hash_index(original_index: str) -> int:
    """A stable small integer for a scenario id (turn-0 seeds do not depend on the scenario's position)."""
    return int.from_bytes(hashlib.sha256(original_index.encode()).digest()[:4], "big")
