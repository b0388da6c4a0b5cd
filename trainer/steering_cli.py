"""``big5 steer extract|show|set``: steering vector sets in the registry (issue 27)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from big5core.traits import TRAITS, Method, Trait

steer_app = typer.Typer(no_args_is_help=True, help="Activation steering vectors: extract, show, set defaults.")

DEFAULT_NAME = "steer-vectors"


def register(app: typer.Typer) -> None:
    app.add_typer(steer_app, name="steer")


@steer_app.command("extract")
def extract(
    data: Annotated[str, typer.Option(help="BIG5-CHAT source; its held-out scenarios are left out")] = (
        "bundled:big5chat-real"
    ),
    name: Annotated[str, typer.Option(help="Registry name of the vector set")] = DEFAULT_NAME,
    rows_per_arm: Annotated[int, typer.Option(help="Rows per trait-level at most (0: all)")] = 64,
    depth: Annotated[int, typer.Option(help="Decoder layers that get a vector (0: two thirds)")] = 0,
    wait: Annotated[bool, typer.Option(help="Run a worker here until the job ends")] = True,
) -> None:
    """Queue a job that extracts one vector per trait and layer (high mean minus low mean) and publishes
    them; by default run it here. Forward passes only: about two minutes on 2 CPU cores."""
    from big5core.jobs import get_job
    from big5core.migrate import open_database
    from big5core.settings import get_settings
    from big5core.training import SteerSpec
    from trainer.worker import Worker, submit

    settings = get_settings()
    spec = SteerSpec(dataset=data, name=name, rows_per_arm=rows_per_arm or None, depth=depth or None)
    with open_database(settings) as db:
        job_id = submit(settings, spec, db=db)
        typer.echo(f"queued steering job {job_id}")
        if not wait:
            return
        Worker(settings, db=db).run_job(job_id)
        with db.sessions() as session:
            job = get_job(session, job_id)
            state, result, error = job.state, job.result, job.error
    typer.echo(json.dumps({"job": job_id, "state": state, "result": result, "error": error}))
    if state != "succeeded":
        raise typer.Exit(1)


@steer_app.command("show")
def show() -> None:
    """The newest ready vector set: its ref, layers, scales and norms."""
    from big5core.migrate import open_database
    from big5core.settings import get_settings
    from big5engine.modelstore import base_model_id
    from big5engine.steering import STEER_LAYOUT, read_vector_set
    from big5personas import registry

    settings = get_settings()
    with open_database(settings) as db, db.sessions() as session:
        row = registry.find(session, method=Method.STEER.value, layout=STEER_LAYOUT, base_model=base_model_id(settings))
        if row is None:
            typer.echo("no steering vectors; run 'big5 steer extract'", err=True)
            raise typer.Exit(1)
        registry.verify(row)
        meta = read_vector_set(Path(row.path)).meta
        typer.echo(json.dumps({"vectors": row.ref, **{k: v for k, v in meta.items() if k != "stream_norms"}}, indent=2))


def parse_scales(values: list[str]) -> dict[Trait, float]:
    """``trait=value`` pairs (or one bare number for every trait)."""
    out: dict[Trait, float] = {}
    for item in values:
        trait, sep, value = item.partition("=")
        if not sep:
            out.update(dict.fromkeys(TRAITS, float(item)))
            continue
        out[Trait.parse(trait)] = float(value)
    return out


def republish(
    settings: Any, *, layers: list[int] | None, scales: dict[Trait, float], extra: dict[str, Any] | None = None
) -> str:
    """Publish the newest vector set again with new default layers/scales (a new version; the old stays)."""
    from big5core.migrate import open_database
    from big5engine.modelstore import base_model_id
    from big5engine.steering import STEER_LAYOUT, read_vector_set
    from big5personas import registry
    from trainer.steering import Extraction, publish_extraction

    with open_database(settings) as db, db.sessions() as session, session.begin():
        row = registry.find(session, method=Method.STEER.value, layout=STEER_LAYOUT, base_model=base_model_id(settings))
        if row is None:
            raise typer.BadParameter("no steering vectors; run 'big5 steer extract' first")
        registry.verify(row)
        current = read_vector_set(Path(row.path))
        meta = {k: v for k, v in current.meta.items() if k not in ("format", "base_model")}
        if layers is not None:
            bad = [layer for layer in layers if not 0 <= layer < int(meta.get("depth", current.num_layers))]
            if bad:
                raise typer.BadParameter(f"layers {bad} have no vector (extracted: 0..{meta.get('depth')})")
            meta["layers"] = list(layers)
        meta["scales"] = {t.value: float(scales.get(t, current.scale(t))) for t in TRAITS}
        meta["calibrated"] = True
        meta.update(extra or {})
        new = publish_extraction(
            session,
            Extraction(current.vectors, meta),
            settings.adapters_dir,
            name=row.name,
            base_model=row.base_model,
            source=str((row.hyperparams or {}).get("source", "")),
        )
        return str(new.ref)


@steer_app.command("set")
def set_defaults(
    layer: Annotated[list[int] | None, typer.Option(help="Default layer (repeatable)")] = None,
    scale: Annotated[list[str] | None, typer.Option(help="trait=scale, or one number for all (repeatable)")] = None,
) -> None:
    """Publish the newest vector set again with other default layers or scales (what calibration does)."""
    from big5core.settings import get_settings

    typer.echo(republish(get_settings(), layers=layer, scales=parse_scales(scale or [])))
