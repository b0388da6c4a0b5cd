"""Does a unified adapter condition on its instruction? Variants trained side by side, measured two ways.

The paper's main method is one adapter for all ten trait-level conditions, chosen by the
instruction. This bench trains short unified SFT adapters that differ in one thing (where the
instruction goes, the steps, the rank, ...) on the bundled real data and measures, on the
held-out scenarios:

- the level margin: for a held-out reply at level L, mean per-token log-likelihood under the
  instruction for L minus under the opposite level (averaged over both levels and all traits).
  Zero means the adapter ignores the level word; the teacher-forced measure needs no sampling;
- the judge gap: greedy replies (``--reply-tokens``) to held-out Speaker X turns under the high
  and the low instruction, scored by the trait judge; the mean P(high) difference per trait.

    python bench/unified_conditioning.py --variants user,system --steps 60
    python bench/unified_conditioning.py --variants "user,user:dpo:from=user:steps30" --learning-rate 1e-3

A variant is ``placement[:mod...]``: ``dpo`` (DPO instead of SFT), ``from=<variant>`` (start from that
variant's adapter, trained earlier in the same run), ``mirror`` / ``random`` (batches of twin
examples, the unified default, or the old random order), ``nll<w>`` (DPO plus an NLL term of weight
w), ``lc<w>`` (SFT plus the level-contrast term of weight w, trainer/level_contrast.py), ``beta<x>``,
``r<rank>``, ``steps<n>``, ``lr<x>``, ``save<n>`` (keep a checkpoint every n steps under
``--work``/ckpt, measurable afterwards with ``--adapter``).

Prints a table and writes JSON to ``--out``. Uses HF transformers + PEFT (no vLLM), float32, on the GPU
when there is one (training then runs in bfloat16, as ``big5 train`` does there); the greedy replies
are generated in batches of ``--replies-per-trait`` (left-padded).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def parse_variant(text: str) -> dict[str, Any]:
    """``system`` / ``user`` / ``system:r16`` / ``user:steps120`` / ``user:dpo:nll1:beta0.1:from=user`` ->
    TrainSpec overrides (``from=<variant>``: start from that variant's adapter, trained earlier in the run)."""
    name, *mods = text.split(":")
    out: dict[str, Any] = {"instruction_placement": name}
    for mod in mods:
        if mod == "dpo":
            out["method"] = "dpo"
        elif mod.startswith("nll"):
            out["sft_weight"] = float(mod[3:])
        elif mod.startswith("beta"):
            out["beta"] = float(mod[4:])
        elif mod in ("mirror", "random"):
            out["mirror_batches"] = mod == "mirror"
        elif mod.startswith("from="):
            out["_from"] = mod[5:]
        elif mod.startswith("r"):
            out["lora"] = {"r": int(mod[1:]), "alpha": 2 * int(mod[1:])}
        elif mod.startswith("steps"):
            out["max_steps"] = int(mod[5:])
        elif mod.startswith("lc"):
            out["level_contrast"] = float(mod[2:])
        elif mod.startswith("save"):
            out["save_steps"] = int(mod[4:])
        elif mod.startswith("lr"):
            out["learning_rate"] = float(mod[2:])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="user,system")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--pairs-per-trait", type=int, default=12, help="held-out scenarios per trait measured")
    parser.add_argument("--replies-per-trait", type=int, default=6, help="greedy replies per trait and level")
    parser.add_argument("--reply-tokens", type=int, default=48)
    parser.add_argument("--work", type=Path, default=Path("big5-data/bench/unified"))
    parser.add_argument("--out", type=Path, default=Path("big5-data/bench/unified_conditioning.json"))
    parser.add_argument("--adapter", action="append", default=[], help="measure an existing adapter folder too")
    args = parser.parse_args()

    import torch

    from big5core.dataset import BUNDLED_REAL, heldout_split, load_filtered
    from big5core.prompts import training_messages, unified_instruction
    from big5core.settings import get_settings
    from big5core.training import TrainSpec
    from big5core.traits import TRAITS, Level
    from big5engine.modelstore import resolve_base_model
    from evaluator.judge import JudgeStore
    from trainer.train import prepare, train_adapter

    settings = get_settings()
    base_path = resolve_base_model(settings)
    rows, report = load_filtered(BUNDLED_REAL)
    _, held = heldout_split(rows)
    judge = JudgeStore(settings.data_dir / "judges").get()

    variants: list[tuple[str, Path, str]] = []
    results: dict[str, Any] = {}
    for text in [v for v in args.variants.split(",") if v]:
        overrides = parse_variant(text)
        init_from = overrides.pop("_from", None)
        spec = TrainSpec.model_validate(
            {
                "method": "sft",
                "layout": "unified",
                "max_steps": args.steps,
                "learning_rate": args.learning_rate,
                "per_device_train_batch_size": 4,
                "max_length": 160,
                "warmup_steps": 2,
                "save_steps": 10_000,
                "eval": False,
                **overrides,
            }
        )
        out_dir = args.work / text.replace(":", "_")
        t0 = time.monotonic()
        if not (out_dir / "adapter_config.json").is_file():
            data = prepare(spec, rows, report.format(), None)
            if init_from is not None:
                data.init_adapter = str(args.work / init_from.replace(":", "_"))

            def progress(info: dict[str, Any], label: str = text) -> None:
                if "loss" in info and info.get("step", 0) % 10 == 0:
                    extra = {k: round(v, 3) for k, v in info.items() if k.startswith(("rewards/", "level/"))}
                    print(f"  {label} step {info['step']} loss {info['loss']:.3f} {extra}", flush=True)

            train_adapter(
                spec,
                data,
                base_path,
                out_dir,
                args.work / "ckpt" / text,
                resume=None,
                show_progress_bar=False,
                progress=progress,
            )
        results[text] = {"train_seconds": round(time.monotonic() - t0, 1), "spec": spec.model_dump(mode="json")}
        variants.append((text, out_dir, spec.instruction_placement))
    for folder in args.adapter:
        config = json.loads((Path(folder) / "adapter_config.json").read_text())
        placement = config.get("big5_instruction_placement", "user")
        variants.append((f"adapter:{Path(folder).name}", Path(folder), placement))
        results[f"adapter:{Path(folder).name}"] = {}

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)

    def encode(messages: list[Any], reply: str | None) -> tuple[list[int], int]:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if reply is None:
            return ids, len(ids)
        reply_ids = tokenizer(reply.strip() + "<|im_end|>", add_special_tokens=False)["input_ids"]
        return ids + reply_ids, len(ids)

    def greedy(model: Any, prompts: list[list[int]]) -> list[str]:
        """Greedy replies to ``prompts`` in one left-padded batch."""
        width = max(len(p) for p in prompts)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=mask, max_new_tokens=args.reply_tokens, do_sample=False, pad_token_id=pad
            )
        return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]

    for label, folder, placement in variants:
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(folder)).to(device).eval()
        margins: dict[str, float] = {}
        gaps: dict[str, float] = {}
        samples: dict[str, list[str]] = {}
        t0 = time.monotonic()
        for trait in TRAITS:
            by_scenario: dict[str, dict[Level, Any]] = {}
            for row in held:
                if row.trait is trait:
                    by_scenario.setdefault(row.scenario, {})[row.level] = row
            pairs = [p for p in by_scenario.values() if len(p) == 2][: args.pairs_per_trait]
            diffs = []
            for pair in pairs:
                for level in (Level.HIGH, Level.LOW):
                    row = pair[level]
                    lps = []
                    for cond in (level, level.opposite):
                        messages = training_messages(unified_instruction(trait, cond), row.speaker_x, None, placement)
                        ids, start = encode(messages, row.speaker_y)
                        with torch.no_grad():
                            logits = model(torch.tensor([ids], device=device)).logits[0, :-1]
                        logp = torch.log_softmax(logits.float(), -1)
                        target = torch.tensor(ids[1:], device=device)
                        token_lp = logp[torch.arange(len(target), device=device), target][start - 1 :]
                        lps.append(float(token_lp.mean()))
                    diffs.append(lps[0] - lps[1])
            margins[trait.value] = sum(diffs) / len(diffs) if diffs else float("nan")
            replies: dict[Level, list[str]] = {}
            for level in (Level.HIGH, Level.LOW):
                prompts = [
                    encode(
                        training_messages(unified_instruction(trait, level), pair[level].speaker_x, None, placement),
                        None,
                    )[0]
                    for pair in pairs[: args.replies_per_trait]
                ]
                replies[level] = greedy(model, prompts)
            scores_high = judge.score(replies[Level.HIGH])[trait.value]
            scores_low = judge.score(replies[Level.LOW])[trait.value]
            gaps[trait.value] = sum(scores_high) / len(scores_high) - sum(scores_low) / len(scores_low)
            identical = sum(a == b for a, b in zip(replies[Level.HIGH], replies[Level.LOW], strict=True))
            samples[trait.value] = [replies[Level.HIGH][0], replies[Level.LOW][0], f"identical {identical}"]
        results[label].update(
            {
                "level_margin": margins,
                "level_margin_mean": sum(margins.values()) / len(margins),
                "judge_gap": gaps,
                "judge_gap_mean": sum(gaps.values()) / len(gaps),
                "samples": samples,
                "measure_seconds": round(time.monotonic() - t0, 1),
            }
        )
        print(
            f"{label:<24} margin "
            + " ".join(f"{t[:4]} {v:+.3f}" for t, v in margins.items())
            + "  | judge gap "
            + " ".join(f"{t[:4]} {v:+.2f}" for t, v in gaps.items()),
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
