"""SFT with a level-contrast term: a unified adapter whose replies must tell their level apart.

Plain SFT on the unified layout learns what the replies of both levels of a trait share and not
the part that depends on the level word: measured on the bundled model, its replies for "high" and
"low" come out the same (``bench/unified_conditioning.py``, docs/RESULTS.md). Maximum likelihood
gives the level word little to do: the reply is mostly predicted by Speaker X's turn, and the
level's share of the loss is small beside it.

The term asks for that share directly. For a training example (x, L, y), the same reply is scored
under the opposite level's instruction too (the level word swapped, nothing else), and

    loss = NLL(y | x, L) + w * softplus(-(log p(y | x, L) - log p(y | x, L')))

with log p summed over the reply's tokens. The second part is the cross-entropy of the level the
adapter itself infers from the reply (its posterior over {L, L'} with equal priors): zero once the
adapter tells the levels apart, never a push without end, and an example's twin (same turn, the
opposite level and its reply) asks the opposite of it, so a reply cannot win by getting generally
unlikely. It costs a second forward pass over the batch (one pass of twice the batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from big5core.prompts import InstructionPlacement, training_messages, unified_instruction
from big5core.traits import TRAITS, Level


@dataclass(frozen=True)
class LevelSwap:
    """Where the level word sits in a tokenised unified prompt, and what it turns into."""

    anchor: int
    """the token just before the level word (the `` -`` of ``Openness - high``)"""
    swap: dict[int, int]
    """level token -> the opposite level's token"""

    def flip(self, input_ids: Any, labels: Any) -> Any:
        """A copy of ``input_ids`` with each row's instruction level swapped.

        The level word is the first ``anchor, level`` pair in the row's prompt (the positions whose
        label is ignored): the instruction comes before Speaker X's words in either placement. A row
        without one is an error, not a row scored twice under the same level.
        """
        import torch

        flipped = input_ids.clone()
        prompt = labels == -100
        is_level = torch.zeros_like(prompt)
        for token in self.swap:
            is_level |= input_ids == token
        after_anchor = torch.zeros_like(prompt)
        after_anchor[:, 1:] = input_ids[:, :-1] == self.anchor
        candidates = is_level & after_anchor & prompt
        if not bool(candidates.any(dim=1).all()):
            missing = (~candidates.any(dim=1)).nonzero().flatten().tolist()
            raise ValueError(f"level contrast: no level word in the prompt of batch row(s) {missing}")
        position = candidates.float().argmax(dim=1)  # the first candidate of each row
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        current = input_ids[rows, position]
        opposite = current.clone()
        for token, other in self.swap.items():
            opposite[current == token] = other
        flipped[rows, position] = opposite
        return flipped


def level_swap(tokenizer: Any, placement: InstructionPlacement) -> LevelSwap:
    """The :class:`LevelSwap` of ``tokenizer``'s chat template, found by tokenising every trait's
    instruction at both levels; raises ValueError when the two differ by more than one token."""
    anchors: set[int] = set()
    swap: dict[int, int] = {}
    for trait in TRAITS:
        high, low = (
            list(
                tokenizer.apply_chat_template(
                    training_messages(unified_instruction(trait, level), "Hello.", None, placement),
                    tokenize=True,
                    add_generation_prompt=True,
                    return_dict=False,
                )
            )
            for level in (Level.HIGH, Level.LOW)
        )
        diff = [i for i, (a, b) in enumerate(zip(high, low, strict=False)) if a != b]
        if len(high) != len(low) or len(diff) != 1 or diff[0] == 0:
            raise ValueError(
                f"level contrast needs the level words to be one token each in the instruction; in this "
                f"tokenizer {trait.value}'s high and low prompts differ at {len(diff)} position(s) "
                f"({len(high)} vs {len(low)} tokens)"
            )
        at = diff[0]
        anchors.add(high[at - 1])
        swap[high[at]], swap[low[at]] = low[at], high[at]
    if len(anchors) != 1 or len(swap) != 2:
        raise ValueError(f"level contrast: the level word's context differs between traits ({sorted(anchors)})")
    return LevelSwap(anchor=anchors.pop(), swap=swap)


def contrast_loss(model: Any, inputs: dict[str, Any], swap: LevelSwap, weight: float) -> tuple[Any, dict[str, float]]:
    """NLL of the batch's replies plus ``weight`` times the level-contrast term, and its metrics:
    ``level/contrast`` (the term), ``level/accuracy`` (share of replies more likely under their own
    level) and ``level/margin`` (mean summed log-likelihood difference)."""
    import torch
    import torch.nn.functional as F

    ids, labels = inputs["input_ids"], inputs["labels"]
    batch = {"input_ids": torch.cat([ids, swap.flip(ids, labels)]), "use_cache": False}
    for key in ("attention_mask", "position_ids"):
        if inputs.get(key) is not None:
            batch[key] = torch.cat([inputs[key], inputs[key]])
    # Only the positions that predict a reply token need the output layer: its logits (vocabulary-wide,
    # twice the batch, in float32 below) are what a long-vocabulary model spends this pass's memory on.
    # The replies end every row, so the last `keep` positions hold them all (`logits_to_keep`).
    first = max(int((labels != -100).any(dim=0).float().argmax()), 1)  # the batch's earliest reply token
    keep = labels.shape[1] - (first - 1)
    logits = model(**batch, logits_to_keep=keep).logits[:, :-1]
    target = torch.cat([labels, labels])[:, first:]
    token_logp = -F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=-100, reduction="none"
    ).view(target.shape)
    n = ids.shape[0]
    own, other = token_logp[:n].sum(dim=1), token_logp[n:].sum(dim=1)
    nll = -own.sum() / (target[:n] != -100).sum().clamp(min=1)  # the mean over reply tokens, as plain SFT
    margin = own - other
    contrast = F.softplus(-margin).mean()
    metrics = {
        "level/contrast": float(contrast.detach()),
        "level/accuracy": float((margin > 0).float().mean()),
        "level/margin": float(margin.detach().mean()),
    }
    return nll + weight * contrast, metrics


def level_contrast_trainer(base: type, weight: float, swap: LevelSwap) -> type:
    """``base`` (an SFTTrainer class) whose loss adds the level-contrast term of ``weight``, the level
    word turned by ``swap`` (:func:`level_swap` of the trainer's tokenizer); the metrics of
    :func:`contrast_loss` are logged beside the loss (``eval_``-prefixed in evaluation)."""

    class LevelContrastSFTTrainer(base):  # type: ignore[misc, valid-type]
        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, **kw: Any) -> Any:
            loss, metrics = contrast_loss(model, inputs, swap, weight)
            mode = "train" if model.training else "eval"
            for key, value in metrics.items():
                self._metrics[mode][key].append(value)
            return (loss, {"loss": loss}) if return_outputs else loss

    return LevelContrastSFTTrainer
