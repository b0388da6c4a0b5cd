"""``big5 judge``: build and inspect the trait judge of the dialogue assessment."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from evaluator.judge import JudgeStore, TraitJudge

judge_app = typer.Typer(no_args_is_help=True, help="The trait judge (P(high | reply) per trait).")


def _get(store: JudgeStore, name: str = "big5chat-judge") -> TraitJudge:
    """The judge, or its error (unknown, files not matching the card, a pickle of an older version) and exit 1."""
    from big5core.errors import DomainError

    try:
        return store.get(name)
    except DomainError as exc:
        typer.echo(f"big5 judge: {exc}", err=True)
        raise typer.Exit(1) from None


def _store(dataset: str | None = None) -> JudgeStore:
    from big5core.settings import get_settings
    from evaluator.judge import JudgeStore

    settings = get_settings()
    return JudgeStore(settings.data_dir / "judges", dataset or settings.evaluator.judge_dataset)


@judge_app.command("train")
def train(
    dataset: Annotated[str | None, typer.Option(help="BIG5-CHAT source (default: the bundled real excerpt)")] = None,
    name: Annotated[str, typer.Option(help="judge name")] = "big5chat-judge",
) -> None:
    """Train the judge on the training scenarios of DATASET, measure it on the held-out ones, save it."""
    judge = _store(dataset).train(name, dataset=dataset)
    typer.echo(judge.card.format())
    typer.echo(f"saved, sha256 {judge.card.sha256}")


@judge_app.command("show")
def show(
    name: Annotated[str, typer.Option(help="judge name")] = "big5chat-judge",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Print the judge's card (held-out accuracy and the real replies' gap per trait); builds the default one."""
    judge = _get(_store(), name)
    typer.echo(json.dumps(judge.card.to_json(), indent=2) if as_json else judge.card.format())


@judge_app.command("score")
def score(text: Annotated[list[str], typer.Argument(help="replies to score")]) -> None:
    """P(high | reply) per trait for each TEXT."""
    judge = _get(_store())
    scores = judge.score(text)
    for i, reply in enumerate(text):
        cells = "  ".join(f"{t[:4]} {values[i]:.2f}" for t, values in scores.items())
        typer.echo(f"{cells}  | {reply[:60]}")
