"""The answer-format term: a persona trained on dialogue still answers a questionnaire (issue 25).

Trained on replies alone, the bundled model's unified adapters stopped answering BFI-44 items: the
probability of any option number as the first answer token fell below 1% (coverage 0), since every
user turn it saw in training asked for a conversational reply. The term keeps that one behaviour of
the base model. Its probes are rating questions in a questionnaire's shape whose statements are no
inventory's and say nothing of a personality (:data:`big5core.prompts.FORMAT_PROBE_STATEMENTS`, on
4-, 5- and 7-point scales and every answer-format wording), each under a condition's instruction for
a unified adapter (rotating through the conditions) and bare for a per-trait one. At the first answer
position of each probe the term is one of two (``TrainSpec.answer_format_target``):

    options:  term = -log sum_k p_adapter(k)     over the scale's option numbers k = 1..points
    base:     term = KL(p_base || p_adapter)     over the whole vocabulary

``options`` keeps the format alone: the adapter must answer with a number, and which number is left to
what it learned from the dialogues. ``base`` keeps the base model's whole distribution, computed once (the
adapter switched off) before the first step, and with it the base model's choice of number: with it the
bundled model's trained personas answered BFI-44 like the base model (the same scores at high and low,
issue 25). The term is added, times its weight, to the trainer's own loss on a few probes per step
(``PROBES_PER_STEP``, cycling). The probes' statements are no real inventory's.
"""

from __future__ import annotations

from typing import Any

from big5core.prompts import (
    InstructionPlacement,
    format_probe_scale,
    format_probe_text,
    training_messages,
    unified_instruction,
)
from big5core.training import ALL_CONDITIONS, AnswerFormatTarget, Layout, parse_conditions

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


def option_token_ids(tokenizer: Any, n: int = N_PROBES) -> list[list[int]]:
    """The first token of each option number ``1..points`` of probe ``i``'s scale, for ``i < n``."""
    first = {k: tokenizer.encode(str(k), add_special_tokens=False)[0] for k in range(1, 10)}
    return [[first[k] for k in range(1, len(format_probe_scale(i)) + 1)] for i in range(n)]


class AnswerFormatTerm:
    """The term over ``prompts`` (:func:`probe_prompts`), ``weight`` times, ``per_step`` probes a step:
    ``target`` "options" needs ``options`` (:func:`option_token_ids`, one list per probe)."""

    def __init__(
        self,
        prompts: list[list[int]],
        weight: float,
        pad_id: int,
        per_step: int = PROBES_PER_STEP,
        *,
        target: AnswerFormatTarget = "base",
        options: list[list[int]] | None = None,
    ) -> None:
        if not prompts:
            raise ValueError("the answer-format term needs at least one probe")
        if target == "options" and (options is None or len(options) != len(prompts)):
            raise ValueError("the 'options' answer-format term needs the option token ids of every probe")
        self.prompts, self.weight, self.pad_id = prompts, weight, pad_id
        self.target, self.options = target, options
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

    @property
    def metric(self) -> str:
        """The name the term's value is logged under: ``format/kl`` or ``format/option_nll``."""
        return "format/kl" if self.target == "base" else "format/option_nll"

    def loss(self, model: Any, peft_model: Any) -> tuple[Any, float]:
        """``weight`` x the mean term on this step's probes, and the term itself (for the logs). ``model`` is
        the trainer's (maybe wrapped for several processes), ``peft_model`` the PEFT model inside it."""
        import torch

        base = self.base_logp(peft_model) if self.target == "base" else None
        picked = [(self._next + k) % len(self.prompts) for k in range(self.per_step)]
        self._next = (self._next + self.per_step) % len(self.prompts)
        own = self._answer_logp(model, [self.prompts[i] for i in picked])
        if base is None:
            assert self.options is not None
            mass = [torch.logsumexp(own[j, self.options[i]], dim=0) for j, i in enumerate(picked)]
            value = -torch.stack(mass).mean()
        else:
            target = base[picked]
            value = (target.exp() * (target - own)).sum(dim=-1).mean()
        return self.weight * value, float(value.detach())


def answer_format_trainer(base: type, term: AnswerFormatTerm) -> type:
    """``base`` (an SFT or DPO trainer class) with ``term`` added to its loss in training; its value is
    logged under ``term.metric``. Evaluation losses stay the trainer's own."""

    class AnswerFormatTrainer(base):  # type: ignore[misc, valid-type]
        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, **kw: Any) -> Any:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kw)
            if not model.training:
                return result
            extra, value = term.loss(model, self.accelerator.unwrap_model(model))
            self._metrics["train"][term.metric].append(value)
            if return_outputs:
                loss, outputs = result
                return loss + extra, outputs
            return result + extra

    return AnswerFormatTrainer
