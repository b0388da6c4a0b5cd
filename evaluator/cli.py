"""``big5 assess``: one assessment from the shell, on the embedded engine or a running service."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated, Any

import typer


def register(app: typer.Typer) -> None:
    from evaluator.judge_cli import judge_app

    app.command("assess")(assess)
    app.add_typer(judge_app, name="judge")


def _traits(values: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--trait {item!r}: expected trait=value, e.g. openness=0.5 or neuroticism=low")
        try:
            out[key] = float(value)
        except ValueError:
            out[key] = value
    return out


def assess(
    method: Annotated[str, typer.Option(help="direct, prompt, demo, sft or dpo")] = "direct",
    trait: Annotated[list[str] | None, typer.Option(help="trait=value (repeatable), e.g. openness=1")] = None,
    adapter: Annotated[str | None, typer.Option(help="explicit adapter name@version")] = None,
    inventory: Annotated[
        str, typer.Option(help="bfi44, ipip_neo_120, ipip_neo_300, an uploaded one, or big5chat-dialogue")
    ] = "ipip_neo_120",
    scoring: Annotated[
        str | None, typer.Option(help="logprob (default), label, label-norm or generate; the dialogue: judge")
    ] = None,
    runs: Annotated[int | None, typer.Option(min=1, help="default 5 (the dialogue: 1)")] = None,
    max_items: Annotated[int | None, typer.Option(min=1, help="big5chat-dialogue: ask the first N turns")] = None,
    max_tokens: Annotated[int | None, typer.Option(min=1, help="reply length (generate mode, the dialogue)")] = None,
    shuffle: bool = False,
    seed: int = 0,
    url: Annotated[str | None, typer.Option(help="a running service (else the embedded engine)")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="BIG5_API_KEY")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the stored assessment as JSON")] = False,
) -> None:
    """Administer an inventory to a persona and print its Big Five profile."""
    from evaluator.schemas import AssessRequest

    body = {
        "persona": {"method": method, "traits": _traits(trait) or None, "adapter": adapter},
        "inventory": inventory,
        "shuffle": shuffle,
        "seed": seed,
    }
    optional = {"scoring": scoring, "runs": runs, "max_items": max_items, "max_tokens": max_tokens}
    body.update({k: v for k, v in optional.items() if v is not None})
    try:
        request = AssessRequest.model_validate(body)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    started = time.monotonic()
    result = _remote(url, request, api_key) if url else _embedded(request)
    elapsed = time.monotonic() - started
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
    else:
        typer.echo(format_profile(result))
        typer.echo(f"({elapsed:.1f} s)")
    if result.get("state") != "done":
        raise typer.Exit(1)


def format_profile(result: dict[str, Any]) -> str:
    lines = [
        f"assessment {result['id']}: {result['state']}  persona {result.get('resolved_persona', {}).get('key', '')}"
    ]
    if result.get("error"):
        lines.append(f"error: {result['error']}")
    lines.append(f"{'trait':<18}{'mean':>7}{'sd':>7}{'cover':>7}{'z':>7}")
    for name, score in result.get("traits", {}).items():
        lines.append(f"{name:<18}" + "".join(f"{_f(score.get(k)):>7}" for k in ("mean", "sd", "coverage", "z")))
    summary = result.get("summary", {})
    if summary.get("option_mass_mean") is not None:
        lines.append(f"option mass (probability on the answer options): mean {summary['option_mass_mean']:.3f}")
    if summary.get("n_failed"):
        lines.append(f"unparseable answers: {summary['n_failed']} of {summary['n_responses']}")
    return "\n".join(lines)


def _f(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


def _embedded(request: Any) -> dict[str, Any]:
    from tqdm import tqdm

    from big5core.settings import get_settings
    from big5personas.stack import build_stack
    from evaluator import store
    from evaluator.routes import assessment_out
    from evaluator.runner import AssessmentRunner

    stack = build_stack(get_settings())
    engine = stack.make_engine()
    engine.start()
    try:
        runner = AssessmentRunner(stack.sessions, stack.resolver, engine)
        assessment_id, resolved, inventory = runner.prepare(request)
        bar = tqdm(total=len(inventory.items) * request.runs, unit="item", desc="assess")

        def on_progress(info: dict[str, Any]) -> None:
            bar.n = info.get("items_done", bar.n)
            bar.refresh()

        asyncio.run(runner.run(assessment_id, request, resolved, inventory, on_progress))
        bar.close()
        with stack.sessions() as session:
            return assessment_out(store.get(session, assessment_id)).model_dump(mode="json")
    finally:
        engine.shutdown()
        stack.close()


def _remote(url: str, request: Any, api_key: str | None) -> dict[str, Any]:
    import httpx
    from tqdm import tqdm

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        response = client.post("/v1/assess", json=request.model_dump(mode="json", exclude_none=True))
        if response.status_code != 202:
            raise typer.BadParameter(f"service answered {response.status_code}: {response.text}")
        assessment_id = response.json()["id"]
        bar = tqdm(unit="item", desc="assess")
        while True:
            data = client.get(f"/v1/assessments/{assessment_id}").json()
            progress = data.get("progress", {})
            bar.total = progress.get("items")
            bar.n = progress.get("items_done", 0)
            bar.refresh()
            if data["state"] in ("done", "failed"):
                bar.close()
                return dict(data)
            time.sleep(1.0)
