"""Prompt formats of the BIG5-CHAT paper: the one source that training and serving share.

- the unified-adapter instruction (``You are a helpful assistant with the following Big Five
  personality traits: Openness - high``), placed in the user turn before Speaker X's words;
- Prompt-Inst (``You are a person with high openness.``) before the user message;
- Prompt-Demo: ten dataset replies of the target trait-level as demonstrations, as the authors wrote it;
- every Prompt-Inst sentence (intensity words included) and the Likert answer-format sentences of
  the questionnaires (the paper's and the wording variants used for framing-robustness runs);
- the built-in questionnaires' instructions and answer labels (BFI, IPIP), built on those sentences.

Every template carries an id that the service reports back, so a client can reproduce a persona.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Literal, TypedDict

from big5core.traits import Level, Trait


class ChatMessage(TypedDict):
    role: str
    content: str


class TemplateId(StrEnum):
    UNIFIED = "big5chat-unified-v1"
    UNIFIED_SYSTEM = "big5chat-unified-system-v1"  # the same instruction, as the system turn
    PROMPT_INST = "big5chat-prompt-inst-v1"
    PROMPT_DEMO = "big5chat-prompt-demo-v2"  # v2: no closing "Now respond as ..." line
    PLAIN = "plain-v1"


def unified_instruction(trait: Trait, level: Level) -> str:
    """The dataset's ``train_instruction`` for one trait-level condition."""
    return f"You are a helpful assistant with the following Big Five personality traits: {trait.title} - {level.value}"


def prompt_inst(trait: Trait, level: Level) -> str:
    """The paper's Prompt-Inst baseline persona line."""
    return f"You are a person with {level.value} {trait.value}."


PROMPT_DEMO_HEADER = (
    "Here are 10 examples of how people like you have responded in different situations. "
    "Pay attention to how they approach communication and problem-solving."
)


def prompt_demo(examples: Sequence[str]) -> str:
    """The paper's Prompt-Demo baseline as the authors wrote it: the header, then ten replies of the
    target trait-level (drawn at random from the filtered data, see :mod:`big5core.demos`), and
    nothing after them: the trait-level is never named."""
    if len(examples) != 10:
        raise ValueError(f"Prompt-Demo takes exactly 10 examples, got {len(examples)}")
    lines = [PROMPT_DEMO_HEADER, ""]
    lines += [f"Example {i}: {text.strip()}" for i, text in enumerate(examples, start=1)]
    return "\n".join(lines)


INTENSITY_WORDS: tuple[tuple[float, str], ...] = (
    (0.875, ""),
    (0.625, "fairly"),
    (0.375, "moderately"),
    (0.0, "slightly"),
)
"""Prompt-Inst for a trait value v: the first word whose threshold |v| reaches ("" = the paper's line)."""


def intensity_word(value: float) -> str:
    """The intensity word of a nonzero trait value in [-1, 1] (see :data:`INTENSITY_WORDS`)."""
    if not 0 < abs(value) <= 1:
        raise ValueError(f"trait value must be nonzero and in [-1, 1], got {value!r}")
    return next(word for threshold, word in INTENSITY_WORDS if abs(value) >= threshold)


def prompt_inst_sentence(trait: Trait, value: float) -> str:
    """One Prompt-Inst sentence for a trait value: the paper's line at |v| >= 0.875, else with an
    intensity word (``You are a person with fairly high openness.``)."""
    level = Level.of(value)
    word = intensity_word(value)
    return prompt_inst(trait, level) if not word else f"You are a person with {word} {level.value} {trait.value}."


def likert_options(anchors: Sequence[str]) -> str:
    """``1 = Very inaccurate, 2 = ...``: how the paper's inventories list a scale's options."""
    return ", ".join(f"{i} = {label}" for i, label in enumerate(anchors, start=1))


def likert_scale_sentence(anchors: Sequence[str]) -> str:
    """The paper's answer-format sentence of a Likert inventory (option wording variant 0)."""
    return (
        f"You can only reply a single number from 1 to {len(anchors)}, where {likert_options(anchors)}. "
        "Provide your score only."
    )


def _options_descending(anchors: Sequence[str]) -> str:
    return ", ".join(f"{i} = {label}" for i, label in reversed(list(enumerate(anchors, start=1))))


OPTION_WORDINGS: tuple[str, ...] = (
    "{paper}",
    "Answer with one number only: {parenthesised}.",
    "Reply with a single digit from {points} down to 1, where {descending}. Give only the number.",
)
"""Answer-format wordings for framing-robustness runs; 0 is the paper's sentence (see :func:`option_wording`)."""


def option_wording(anchors: Sequence[str], variant: int) -> str:
    """The answer-format sentence of a Likert scale in wording ``variant`` (0 = the paper's)."""
    if not 0 <= variant < len(OPTION_WORDINGS):
        raise ValueError(f"option wording {variant} out of range 0..{len(OPTION_WORDINGS) - 1}")
    return OPTION_WORDINGS[variant].format(
        paper=likert_scale_sentence(anchors),
        parenthesised=", ".join(f"{i} ({label})" for i, label in enumerate(anchors, start=1)),
        points=len(anchors),
        descending=_options_descending(anchors),
    )


def label_answer_sentence(anchors: Sequence[str]) -> str:
    """The answer-format sentence when the answer is scored as label text (the label-text scoring modes)."""
    return "Reply with exactly one of these answers and nothing else: " + "; ".join(anchors) + "."


# --- the built-in questionnaires' texts (evaluator/inventories.py builds the instruments from them) ---------

BFI_ANCHORS: tuple[str, ...] = (
    "Disagree strongly",
    "Disagree a little",
    "Neither agree nor disagree",
    "Agree a little",
    "Agree strongly",
)
IPIP_ANCHORS: tuple[str, ...] = (
    "Very inaccurate",
    "Moderately inaccurate",
    "Neither accurate nor inaccurate",
    "Moderately accurate",
    "Very accurate",
)
_BFI_SCALE = likert_scale_sentence(BFI_ANCHORS)
_IPIP_SCALE = likert_scale_sentence(IPIP_ANCHORS)

INSTRUCTION_VARIANTS: dict[str, tuple[str, ...]] = {
    "bfi": (
        "Here are a number of characteristics that may or may not apply to you. Please indicate the extent "
        f"to which you agree or disagree with the following statement. {_BFI_SCALE}",
        "The statement below describes a personal characteristic that may or may not fit you. How much do "
        f"you agree or disagree that it describes you? {_BFI_SCALE}",
        f"Rate how well the following statement describes you, as you see yourself. {_BFI_SCALE}",
    ),
    "ipip": (
        "Describe yourself as you generally are now, not as you wish to be in the future. Indicate how "
        f"accurately the following statement describes you. {_IPIP_SCALE}",
        "Think about how you usually are, compared with other people you know of your age. How accurately "
        f"does the following statement describe you? {_IPIP_SCALE}",
        f"Describe yourself honestly, as you really are today. Does the statement below describe you? {_IPIP_SCALE}",
    ),
}
"""Instruction phrasings per scale family: index 0 is the paper's, 1 and 2 are variants for reliability runs."""


def with_prefix(messages: Sequence[ChatMessage], prefix: str | None) -> list[ChatMessage]:
    """Put ``prefix`` in front of the last user turn (the paper's placement), blank line between."""
    out = [ChatMessage(role=m["role"], content=m["content"]) for m in messages]
    if not prefix:
        return out
    for message in reversed(out):
        if message["role"] == "user":
            message["content"] = f"{prefix}\n\n{message['content']}"
            return out
    out.append(ChatMessage(role="user", content=prefix))
    return out


InstructionPlacement = Literal["user", "system"]
"""Where a unified adapter's instruction goes: before Speaker X's words in the user turn (the
paper's layout) or as the system turn (it then replaces the chat template's default system line)."""


def with_system(messages: Sequence[ChatMessage], system: str | None) -> list[ChatMessage]:
    """``system`` as the system turn (replacing one already there); the messages unchanged when None."""
    out = [ChatMessage(role=m["role"], content=m["content"]) for m in messages]
    if not system:
        return out
    return [ChatMessage(role="system", content=system), *(m for m in out if m["role"] != "system")]


def training_messages(
    instruction: str | None, speaker_x: str, speaker_y: str | None, placement: InstructionPlacement = "user"
) -> list[ChatMessage]:
    """A BIG5-CHAT row as chat turns: user = instruction + Speaker X (or system = instruction), assistant = Y."""
    user = [ChatMessage(role="user", content=speaker_x.strip())]
    messages = with_system(user, instruction) if placement == "system" else with_prefix(user, instruction)
    if speaker_y is not None:
        messages.append(ChatMessage(role="assistant", content=speaker_y.strip()))
    return messages


# ----------------------------------------------------------------------------- answer-format probes
# (issue 25; trainer/answer_format.py uses these.) Rating questions in the shape of a questionnaire whose
# statements are no inventory's and say nothing of a personality: mundane facts and everyday first-person
# statements. A persona trained on dialogue alone stops answering such questions (it replies to them as to
# a conversation); the answer-format term keeps its first answer token close to the base model's on these.

FORMAT_PROBE_SCALES: tuple[tuple[str, ...], ...] = (
    ("Disagree strongly", "Disagree a little", "Neither agree nor disagree", "Agree a little", "Agree strongly"),
    ("Very inaccurate", "Moderately inaccurate", "Neither accurate nor inaccurate", "Moderately accurate",
     "Very accurate"),
    ("Never", "Rarely", "Sometimes", "Often", "Always"),
    ("Not at all true", "Slightly true", "Somewhat true", "Mostly true", "Completely true"),
    ("Strongly disagree", "Disagree", "Agree", "Strongly agree"),
    ("Strongly disagree", "Disagree", "Slightly disagree", "Neutral", "Slightly agree", "Agree",
     "Strongly agree"),
)  # fmt: skip
"""Answer scales of the probes: 4, 5 and 7 points, so no one scale is learned."""

FORMAT_PROBE_INSTRUCTIONS: tuple[str, ...] = (
    "Please rate the following statement.",
    "How much do you agree with the statement below?",
    "Read the statement and say how well it fits.",
    "This is a short survey question.",
    "Give your rating of the statement that follows.",
    "How true is the statement below?",
)

FORMAT_PROBE_STATEMENTS: tuple[str, ...] = (
    "Water boils when it is heated enough.",
    "A week has seven days.",
    "The sun rises in the east.",
    "Most cars have four wheels.",
    "Ice is colder than steam.",
    "A triangle has three sides.",
    "Fish live in water.",
    "Bread is made from flour.",
    "Winter is colder than summer in most places.",
    "Two plus two is four.",
    "Paper can be folded.",
    "Trees have leaves or needles.",
    "The moon can be seen at night.",
    "Clocks show the time.",
    "Rain falls from clouds.",
    "Apples grow on trees.",
    "A year has twelve months.",
    "Snow is white.",
    "Shoes are worn on the feet.",
    "Most books have pages.",
    "I know what a chair is.",
    "I can count to ten.",
    "I understand simple English sentences.",
    "I know which day comes after Monday.",
    "I have heard of the ocean.",
    "I know what rain is.",
    "I can tell red from blue.",
    "I know that cats are animals.",
    "I have seen a picture of a mountain.",
    "I know what a spoon is for.",
    "Statements in this survey are written in English.",
    "This question asks for a rating.",
    "A minute is shorter than an hour.",
    "Milk is a drink.",
    "Birds have feathers.",
    "A door can be opened.",
    "Roads are used by cars.",
    "Grass is usually green.",
    "Summer comes after spring.",
    "A circle is round.",
)


def format_probe_scale(index: int) -> tuple[str, ...]:
    """The answer scale of probe ``index`` (its options are the numbers 1..len)."""
    return FORMAT_PROBE_SCALES[(index // 3) % len(FORMAT_PROBE_SCALES)]


def format_probe_text(index: int) -> str:
    """The user message of probe ``index``: an instruction, an answer-format sentence (one of the option
    wordings, on one of the scales) and a statement, the combination cycling with ``index``."""
    statement = FORMAT_PROBE_STATEMENTS[index % len(FORMAT_PROBE_STATEMENTS)]
    instruction = FORMAT_PROBE_INSTRUCTIONS[(index // 2) % len(FORMAT_PROBE_INSTRUCTIONS)]
    anchors = format_probe_scale(index)
    wording = option_wording(anchors, (index // 5) % len(OPTION_WORDINGS))
    return f"{instruction} {wording}\n\nStatement: {statement}"


# ----------------------------------------------------------------------------- PsychSteer data generation
# (issue 16; trainer/datagen uses these. Kept at the end of the file as one block.)
#
# How they relate to the authors' prompts (wenkai-li/Big5-Chat, ``eval_set`` ``prompt`` fields, not
# shipped here): the same two shapes, in our own words. Turn 0 asks the base model to speak as
# Speaker X from the SODA scenario and the two names, one turn, about 50 words. Turn 1 asks it to
# answer as Speaker Y, with a line naming Y's trait and level, a short description of that
# trait-level, and X's words quoted. What differs: our wording; descriptions written here from the
# Big Five facet definitions (the authors' are longer, and they had none for neuroticism); and the
# expert's own messages, which follow how its adapter was trained (per-trait: Speaker X's words
# alone; unified: the dataset instruction first), since the paper's expert sees only its trait
# prompt and the reply so far.


class DatagenTemplate(StrEnum):
    TURN0 = "psychsteer-turn0-v1"
    TURN1 = "psychsteer-turn1-v1"
    EXPERT_PLAIN = "psychsteer-expert-plain-v1"
    EXPERT_UNIFIED = "psychsteer-expert-unified-v1"
    EXPERT_INST = "psychsteer-expert-inst-v1"
    GIVEN = "given"
    """Speaker X's turn came with the scenario (not generated)."""


TRAIT_LEVEL_DESCRIPTIONS: dict[tuple[Trait, Level], str] = {
    (Trait.OPENNESS, Level.HIGH): "Curious and imaginative, drawn to art, ideas and the unfamiliar, "
    "quick to try something new and to say what you feel.",
    (Trait.OPENNESS, Level.LOW): "Practical and conventional, happiest with the familiar, wary of "
    "abstract ideas and of change, keeping feelings to yourself.",
    (Trait.CONSCIENTIOUSNESS, Level.HIGH): "Organised, dependable and hard-working, planning ahead, "
    "keeping promises and thinking before acting.",
    (Trait.CONSCIENTIOUSNESS, Level.LOW): "Easy-going and disorganised, acting on impulse, putting "
    "things off and not worrying much about duties or plans.",
    (Trait.EXTRAVERSION, Level.HIGH): "Outgoing, talkative and energetic, seeking company and "
    "excitement, confident and cheerful with people.",
    (Trait.EXTRAVERSION, Level.LOW): "Reserved and quiet, preferring solitude or a few people, "
    "calm, brief in speech and glad to stay out of the spotlight.",
    (Trait.AGREEABLENESS, Level.HIGH): "Warm, trusting and kind, quick to help, modest, and keen "
    "to cooperate and keep the peace.",
    (Trait.AGREEABLENESS, Level.LOW): "Blunt, sceptical and competitive, putting yourself first, "
    "quick to argue and slow to sympathise.",
    (Trait.NEUROTICISM, Level.HIGH): "Easily worried, tense and moody, often anxious or upset, "
    "taking setbacks hard and doubting yourself.",
    (Trait.NEUROTICISM, Level.LOW): "Calm, steady and relaxed, rarely upset, taking setbacks in "
    "stride and confident under pressure.",
}
"""One sentence per trait-level, written for this project (Speaker Y's persona in turn 1)."""


def datagen_turn0(x: str, y: str, scenario: str) -> list[ChatMessage]:
    """Base-model messages that write Speaker X's opening turn from a scenario."""
    text = (
        f"Play {x} in the situation below and speak as {x} would: one turn that pursues what {x} wants "
        "here, natural and true to life.\n\n"
        f"Situation: {scenario}\nPeople: {x} and {y}\n\n"
        f"Write {x}'s opening words to {y} directly, in at most 50 words."
    )
    return [ChatMessage(role="user", content=text)]


def datagen_turn1(x: str, y: str, scenario: str, x_turn: str, trait: Trait, level: Level) -> list[ChatMessage]:
    """Base-model messages for Speaker Y's reply, with the target trait-level described."""
    text = (
        f"Play {y} in the situation below and answer as {y} would: one turn that pursues what {y} wants "
        "here, natural and true to life.\n\n"
        f"Situation: {scenario}\nPeople: {x} and {y}\n"
        f"{y}'s personality: {level.value} {trait.value}. {TRAIT_LEVEL_DESCRIPTIONS[(trait, level)]}\n\n"
        f'{x} said: "{x_turn.strip()}"\n\n'
        f"Write {y}'s reply directly, in at most 50 words."
    )
    return [ChatMessage(role="user", content=text)]


def datagen_expert(template: DatagenTemplate, x_turn: str, trait: Trait, level: Level) -> list[ChatMessage]:
    """An expert's (or anti-expert's) own messages: how its adapter saw a prompt in training."""
    if template is DatagenTemplate.EXPERT_PLAIN:
        return training_messages(None, x_turn, None)
    if template is DatagenTemplate.EXPERT_UNIFIED:
        return training_messages(unified_instruction(trait, level), x_turn, None)
    if template is DatagenTemplate.EXPERT_INST:
        return training_messages(prompt_inst(trait, level), x_turn, None)
    raise ValueError(f"{template} is not an expert template")
