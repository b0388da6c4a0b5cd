"""The answer-format term: a persona trained on dialogue still answers a questionnaire (issue 25).

Trained on replies alone, the bundled model's unified adapters stopped answering BFI-44 items: the
probability of any option number as the first answer token fell below 1% (coverage 0), since every
user turn it saw in training asked for a conversational reply. The term keeps that one behaviour of
the base model. Its probes are rating questions in a questionnaire's shape whose statements are no
inventory's and say nothing of a personality (:data:`big5core.prompts.FORMAT_PROBE_STATEMENTS`, on
4-, 5- and 7-point scales and every answer-format wording), each under a condition's instruction for
a unified adapter (rotating through the conditions) and bare for a per-trait one. At the first answer
position of each probe,

    term = KL(p_base || p_adapter)

over the whole vocabulary, the base model's distribution computed once (the adapter switched off)
before the first step. It is added, times its weight, to the trainer's own loss on a few probes per
step (``PROBES_PER_STEP``, cycling). On the statements of a real inventory the adapter stays free:
what it learns here is to answer with a number, not which number.
"""

from __future__ import annotations

from typing import Any

from big5core.prompts import InstructionPlacement, format_probe_text, training_messages, unified_instruction
from big5core.training import ALL_CONDITIONS, Layout, parse_conditions

N_PROBES = 120
"""Probes per adapter: every statement at least twice, in varying instructions, scales and wordings."""
PROBES_PER_STEP = 4


def probe_prompts(
    tokenizer: Any, layout: Layout, placement: InstructionPlacement, n: int = N_PROBES
) -> list[list[int]]:
    """Token ids of ``n`` probes, each ending where the assistant's answer begins."""
    conditions = parse_conditions(list(ALL_CONDITIONS))
    prompts = []
    for i in range(n):
        trait, level = conditions[i % len(conditions)]
        instruction = unified_instruction(trait, level) if layout == "unified" else None
        messages = training_messages(instruction, format_probe_text(i), None, placement)
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        prompts.append(list(ids))
    return prompts


class AnswerFormatTerm:
    """The KL term over ``prompts`` (:func:`probe_prompts`), ``weight`` times, ``per_step`` probes a step."""

    def __init__(self, prompts: list[list[int]], weight: float, pad_id: int, per_step: int = PROBES_PER_STEP) -> None:
        if not prompts:
            raise ValueError("the answer-format term needs at least one probe")
        self.prompts, self.weight, self.pad_id = prompts, weight, pad_id
        self.per_step = min(per_step, len(prompts))
        self._next = 0
        self._base: Any = None  # [n_probes, vocab] log-probs of the base model at each probe's answer position

    def _answer_logp(self, model: Any, rows: list[list[int]]) -> Any:
        """Log-probs of the first answer token of each prompt in ``rows`` ([len(rows), vocab], float32)."""
        import torch

        device = next(model.parameters()).device
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):  # right-padded: positions stay 0..len-1 as in generation
            ids[i, : len(row)] = torch.tensor(row, device=device)
            mask[i, : len(row)] = 1
        # Output-layer logits only where an answer position can be (``logits_to_keep``): the last positions
        # from the shortest probe's end on, not every prompt token (the output layer is most of the cost).
        keep = width - min(len(r) for r in rows) + 1
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits
        last = torch.tensor([len(r) - 1 - (width - keep) for r in rows], device=device)
        return torch.log_softmax(logits[torch.arange(len(rows), device=device), last].float(), dim=-1)

    def base_logp(self, peft_model: Any) -> Any:
        """The base model's answer distributions (``peft_model``'s adapter switched off), computed on the
        first call."""
        import torch

        if self._base is None:
            with torch.no_grad(), peft_model.disable_adapter():
                chunks = [
                    self._answer_logp(peft_model, self.prompts[i : i + 16]) for i in range(0, len(self.prompts), 16)
                ]
            self._base = torch.cat(chunks)
        return self._base

    def loss(self, model: Any, peft_model: Any) -> tuple[Any, float]:
        """``weight`` x the mean KL on this step's probes, and the KL itself (for the logs). ``model`` is
        the trainer's (maybe wrapped for several processes), ``peft_model`` the PEFT model inside it."""
        base = self.base_logp(peft_model)
        picked = [(self._next + k) % len(self.prompts) for k in range(self.per_step)]
        self._next = (self._next + self.per_step) % len(self.prompts)
        own = self._answer_logp(model, [self.prompts[i] for i in picked])
        target = base[picked]
        kl = (target.exp() * (target - own)).sum(dim=-1).mean()
        return self.weight * kl, float(kl.detach())


def answer_format_trainer(base: type, term: AnswerFormatTerm) -> type:
    """``base`` (an SFT or DPO trainer class) with ``term`` added to its loss in training; the KL is
    logged as ``format/kl``. Evaluation losses stay the trainer's own."""

    class AnswerFormatTrainer(base):  # type: ignore[misc, valid-type]
        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, **kw: Any) -> Any:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kw)
            if not model.training:
                return result
            extra, kl = term.loss(model, self.accelerator.unwrap_model(model))
            self._metrics["train"]["format/kl"].append(kl)
            if return_outputs:
                loss, outputs = result
                return loss + extra, outputs
            return result + extra

    return AnswerFormatTrainer
