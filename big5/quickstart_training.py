"""The quickstart's training: queue and run each planned job on the stack's database, with a progress bar
fed from the job's recorded progress."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import typer

from big5.quickstart_plan import COMMON_TRAINING


def train_all(stack: Any, plan: dict[str, dict[str, Any]], times: dict[str, float] | None = None) -> None:
    """Queue and run each planned job here, skipping adapters the registry already has; each job's wall
    time goes into ``times`` (the quickstart's stage times) when given."""
    from big5core.training import TrainSpec
    from big5personas import registry
    from trainer.worker import Worker, submit

    database = stack.database  # the worker and the queue share the stack's: one process, one database
    worker = Worker(stack.settings, db=database)
    for label, options in plan.items():
        spec = TrainSpec.model_validate({**COMMON_TRAINING, **options})
        with stack.sessions() as session:
            missing = []
            for target in spec.targets():
                traits = None if target is None else {target[0].value: target[1].value}
                found = registry.find(
                    session, method=spec.method, layout=spec.layout, base_model=stack.base_model_id, traits=traits
                )
                if found is None:
                    missing.append(target)
        if not missing:
            typer.echo(f"[train] {label}: already trained, reused")
            continue
        if spec.layout == "per-trait":
            spec = spec.model_copy(update={"conditions": [f"{t.value}:{lv.value}" for t, lv in missing]})
        t0 = time.monotonic()
        typer.echo(f"[train] {label}: {len(missing)} adapter(s), {spec.max_steps} steps each")
        job_id = submit(stack.settings, spec, db=database)
        with _job_bar(stack, job_id, label):
            worker.run(max_jobs=1, exit_when_idle=True)
        with stack.sessions() as session:
            from big5core.jobs import get_job

            job = get_job(session, job_id)
            if job.state != "succeeded":
                raise typer.Exit(f"training job {job_id} {job.state}: {job.error}")  # type: ignore[arg-type]
        seconds = time.monotonic() - t0
        if times is not None:
            times[f"  train {label}"] = seconds
        typer.echo(f"[train] {label}: done in {seconds:.0f} s")


def _conditioning(progress: dict[str, Any]) -> str | None:
    """The training batch's own sign that the adapter uses its condition, from a job's progress:
    DPO's share of chosen replies over rejected ones, or the level-contrast SFT's share of replies
    more likely under their own level (trainer.train.CONDITIONING_METRICS)."""
    if "rewards/accuracies" in progress:
        return f"chosen>rejected {float(progress['rewards/accuracies']):.2f}"
    if "level/accuracy" in progress:
        return f"own level {float(progress['level/accuracy']):.2f}"
    return None


@contextlib.contextmanager
def _job_bar(stack: Any, job_id: str, label: str) -> Iterator[None]:
    """Progress fed from the job's recorded progress (adapter, step, loss) while the worker trains.

    On a terminal: one bar per adapter (reset when the worker moves on, so its rate is the adapter's).
    Elsewhere (a log file, CI): one plain line per adapter when it ends, never a redrawn bar.
    """
    import sys
    import threading

    from tqdm import tqdm

    from big5core.jobs import get_job

    stop = threading.Event()
    live = sys.stderr.isatty()
    bar = tqdm(total=1, desc=label, unit="step", leave=False, disable=not live)
    seen: dict[str, Any] = {}

    def metrics() -> list[str]:
        """The latest loss and conditioning accuracy, as far as recorded: ``["loss 2.283", "own level 1.00"]``."""
        loss = [f"loss {seen['loss']:.3f}"] if seen.get("loss") is not None else []
        return loss + ([seen["accuracy"]] if seen.get("accuracy") else [])

    def finished_line() -> None:
        if not live and seen.get("adapter"):
            parts = [f"step {seen['step']}/{seen['total']}", *metrics(), f"{time.monotonic() - seen['since']:.0f} s"]
            typer.echo(f"[train] {label} {seen['name']}: {', '.join(parts)}")

    def poll() -> None:
        try:
            with stack.sessions() as session:
                progress = dict(get_job(session, job_id).progress or {})
        except Exception:  # the database may be busy for a moment
            return
        adapter = progress.get("adapter")
        if adapter and adapter != seen.get("adapter"):
            finished_line()
            index, total = progress.get("adapter_index", 0), progress.get("adapters", 1)
            name = f"{adapter} ({index + 1}/{total})"
            seen.update(adapter=adapter, name=name, since=time.monotonic(), step=0, total=0, loss=None, accuracy=None)
            bar.reset(total=1)
            bar.set_description(f"{label} {name}", refresh=False)
        if "total_steps" in progress:
            seen.update(step=int(progress.get("step", 0)), total=int(progress["total_steps"]))
            if "loss" in progress:
                seen["loss"] = float(progress["loss"])
                seen["accuracy"] = _conditioning(progress)
                bar.set_postfix_str(", ".join(metrics()), refresh=False)
            bar.total = seen["total"]
            bar.update(seen["step"] - bar.n)

    def watch() -> None:
        while not stop.wait(1.0):
            poll()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        poll()  # the job's last recorded step, which the 1 s poll may not have seen
        finished_line()
        bar.close()


def ensure_vectors(stack: Any) -> None:
    """Extract and publish the steering vectors (the queued job of ``big5 steer extract``) unless the
    registry has a set for this base model; a fresh set uses the calibrated defaults of trainer.steering."""
    from big5core.jobs import get_job
    from big5core.training import SteerSpec
    from big5core.traits import Method
    from big5engine.steering import STEER_LAYOUT
    from big5personas import registry
    from trainer.worker import Worker, submit

    with stack.sessions() as session:
        found = registry.find(session, method=Method.STEER.value, layout=STEER_LAYOUT, base_model=stack.base_model_id)
    if found is not None:
        typer.echo(f"[steer] vectors {found.ref}: already extracted, reused")
        return
    job_id = submit(stack.settings, SteerSpec(), db=stack.database)
    Worker(stack.settings, db=stack.database).run_job(job_id)
    with stack.sessions() as session:
        job = get_job(session, job_id)
        if job.state != "succeeded":
            raise typer.BadParameter(f"steering vectors: job {job_id} {job.state}: {job.error}")
        typer.echo(f"[steer] vectors {job.result['adapters']}: {job.result['seconds']:.0f} s")
