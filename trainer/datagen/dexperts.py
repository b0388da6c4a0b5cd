"""DExperts decoding (Liu et al. 2021) as PsychSteer used it: a base model steered token by token.

Every step runs the base model and each expert on their own messages, each with its own KV cache
(``past_key_values``), combines the next-token logits as

    base + alpha * (expert - antiexpert)     with an anti-expert
    base + alpha * expert                    without one (BIG5-CHAT's formula: a product of experts,
                                             p ~ p_base * p_expert ** alpha)

and samples one token that is appended to every stream. With alpha = 0 the combined logits are
the base logits (the expert passes are skipped), so the text is the base model's own generation
(``transformers``' ``generate`` with the same sampling options and seed). An expert is a LoRA adapter on the same
PEFT model (the adapter switched on with ``set_adapter`` for its pass, off with
``disable_adapter()`` for the base pass: one set of weights), or a separate model with the same
tokenizer. Rows of a batch are left-padded per stream; each row samples with its own seeded
``torch.Generator``, so a row's text depends on its seed, not on its neighbours (up to the float
rounding that padding can change).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase, TemperatureLogitsWarper, TopPLogitsWarper

from big5core.prompts import ChatMessage


@dataclass(frozen=True)
class Sampling:
    """Decoding options. ``temperature`` 0 is greedy (then ``top_p`` is unused)."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256


@dataclass
class Member:
    """One pass per step: a model, and which of its PEFT adapters is on (None: adapters off / plain model)."""

    model: Any
    adapter: str | None = None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        if not hasattr(self.model, "disable_adapter"):  # a plain transformers model
            yield
        elif self.adapter is None:
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(self.adapter)
            yield


@dataclass(frozen=True)
class Generation:
    text: str
    ids: tuple[int, ...]
    """The sampled token ids (the stop token included, when one ended it)."""
    finished: bool
    """True when a stop token ended it; False when ``max_new_tokens`` cut it off."""


@dataclass
class _Stream:
    member: Member
    mask: torch.Tensor
    positions: torch.Tensor
    cache: DynamicCache = field(default_factory=DynamicCache)


class DExperts:
    """Lockstep decoding of a base member and zero, one or two expert members (expert, anti-expert)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        base: Member,
        expert: Member | None = None,
        antiexpert: Member | None = None,
        *,
        device: torch.device | str = "cpu",
    ) -> None:
        if antiexpert is not None and expert is None:
            raise ValueError("an anti-expert needs an expert")
        self.tokenizer = tokenizer
        self.base, self.expert, self.antiexpert = base, expert, antiexpert
        self.device = torch.device(device)
        config = getattr(base.model, "generation_config", None)
        eos = getattr(config, "eos_token_id", None)
        ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
        self.stop_ids = sorted(i for i in ids if i is not None)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.stop_ids[0]

    # ------------------------------------------------------------------ prompts
    def encode(self, conversations: Sequence[Sequence[ChatMessage]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Chat-templated prompts, left-padded: (input_ids, attention_mask)."""
        encoded = [
            self.tokenizer.apply_chat_template(list(c), add_generation_prompt=True, tokenize=True, return_dict=False)
            for c in conversations
        ]
        rows = [list(e["input_ids"]) if isinstance(e, dict) or hasattr(e, "keys") else list(e) for e in encoded]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
        return ids.to(self.device), mask.to(self.device)

    # ------------------------------------------------------------------ decoding
    def _step(self, stream: _Stream, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        with stream.member.active():
            out = stream.member.model(
                input_ids=input_ids,
                attention_mask=stream.mask,
                position_ids=positions,
                past_key_values=stream.cache,
                use_cache=True,
            )
        stream.cache = out.past_key_values
        logits: torch.Tensor = out.logits[:, -1, :].float()
        return logits

    def _prefill(self, member: Member, conversations: Sequence[Sequence[ChatMessage]]) -> tuple[_Stream, torch.Tensor]:
        ids, mask = self.encode(conversations)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        stream = _Stream(member, mask, positions[:, -1])
        return stream, self._step(stream, ids, positions)

    def _advance(self, stream: _Stream, tokens: torch.Tensor) -> torch.Tensor:
        stream.mask = torch.cat([stream.mask, stream.mask.new_ones((stream.mask.shape[0], 1))], dim=-1)
        stream.positions = stream.positions + 1
        return self._step(stream, tokens[:, None], stream.positions[:, None])

    @torch.inference_mode()
    def generate(
        self,
        base_messages: Sequence[Sequence[ChatMessage]],
        *,
        alpha: float = 0.0,
        expert_messages: Sequence[Sequence[ChatMessage]] | None = None,
        antiexpert_messages: Sequence[Sequence[ChatMessage]] | None = None,
        sampling: Sampling = Sampling(),
        seeds: Sequence[int] | None = None,
    ) -> list[Generation]:
        """One reply per row of ``base_messages``; the experts see their own messages for the same row."""
        n = len(base_messages)
        if n == 0:
            return []
        streams = []
        base, logits = self._prefill(self.base, base_messages)
        streams.append(base)
        expert_logits = anti_logits = None
        steered = alpha != 0  # at alpha 0 the experts cannot change a logit: their passes are skipped
        if self.expert is not None and steered:
            if expert_messages is None or len(expert_messages) != n:
                raise ValueError("expert_messages must give one conversation per row")
            expert, expert_logits = self._prefill(self.expert, expert_messages)
            streams.append(expert)
        if self.antiexpert is not None and steered:
            if antiexpert_messages is None or len(antiexpert_messages) != n:
                raise ValueError("antiexpert_messages must give one conversation per row")
            anti, anti_logits = self._prefill(self.antiexpert, antiexpert_messages)
            streams.append(anti)
        warpers: list[Any] = []
        if sampling.temperature > 0:
            warpers.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_p < 1.0:
                warpers.append(TopPLogitsWarper(sampling.top_p))
        generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in (seeds or [0] * n)]
        stop = torch.tensor(self.stop_ids, device=self.device)
        out: list[list[int]] = [[] for _ in range(n)]
        finished = torch.zeros(n, dtype=torch.bool, device=self.device)
        for step in range(sampling.max_new_tokens):
            scores = combine(logits, alpha, expert_logits, anti_logits)
            tokens = self._sample(scores, warpers, generators)
            tokens = torch.where(finished, torch.full_like(tokens, self.pad_id), tokens)
            for i in (~finished).nonzero().flatten().tolist():
                out[i].append(int(tokens[i]))
            finished |= torch.isin(tokens, stop)
            if bool(finished.all()) or step == sampling.max_new_tokens - 1:
                break
            logits = self._advance(streams[0], tokens)
            if expert_logits is not None:
                expert_logits = self._advance(streams[1], tokens)
            if anti_logits is not None:
                anti_logits = self._advance(streams[2], tokens)
        return [self._result(ids) for ids in out]

    @staticmethod
    def _sample(scores: torch.Tensor, warpers: list[Any], generators: list[torch.Generator]) -> torch.Tensor:
        if not warpers:
            return scores.argmax(dim=-1)
        for warper in warpers:
            scores = warper(None, scores)
        probs = torch.softmax(scores, dim=-1)
        picks = [torch.multinomial(probs[i : i + 1], 1, generator=g) for i, g in enumerate(generators)]
        return torch.cat(picks).flatten()

    def _result(self, ids: list[int]) -> Generation:
        done = bool(ids) and ids[-1] in self.stop_ids
        text = self.tokenizer.decode(ids[:-1] if done else ids, skip_special_tokens=True)
        return Generation(text=text.strip(), ids=tuple(ids), finished=done)


def combine(
    base: torch.Tensor, alpha: float, expert: torch.Tensor | None = None, antiexpert: torch.Tensor | None = None
) -> torch.Tensor:
    """``base + alpha * (expert - antiexpert)``, or ``base + alpha * expert`` without an anti-expert."""
    if expert is None or alpha == 0:
        return base
    steer = expert if antiexpert is None else expert - antiexpert
    return base + alpha * steer
