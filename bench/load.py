"""Load test: N concurrent clients with mixed personas on POST /v1/generate for a bounded time.

    python bench/load.py                                  # start `big5 serve` here, 200 clients, 60 s
    python bench/load.py --clients 200 --duration 60 --database-url postgresql+psycopg://postgres@127.0.0.1/big5_load
    python bench/load.py --url http://api:8000 --api-key "$BIG5_API_KEY"    # a running service

Without ``--url`` the script starts ``big5 serve`` in a subprocess on a temporary data dir (the
bundled model from ``$BIG5_DATA_DIR/models``; SQLite unless ``--database-url``; every other
``BIG5_*`` setting from the environment, ``--max-queue`` overriding ``BIG5_SERVICE__MAX_QUEUE``),
publishes ``--adapters`` random per-trait SFT adapters (rank 8: speed does not depend on what an
adapter learnt) and stops the service afterwards. Against ``--url`` it uses the ready adapters the
service lists.

Each client is a closed loop: send, wait for the answer, send the next, until ``--duration`` is up;
requests in flight then are waited for (the drain) and counted. Requests cycle through four persona
kinds: direct, Prompt-Inst (one pole), a registry adapter (sft/dpo, one pole) and composed trait
vectors (several per-trait adapters merged exactly by the service). A 503 ``server-busy`` with
Retry-After is the service shedding load on purpose (admission control, ``max_queue``): counted
apart. Any other 5xx, a 503 because the engine or the database is unavailable included, or a
transport error is an error: the script then exits 1. Clients wait Retry-After when one is sent.
Prints throughput, latency percentiles of the answered requests and counts by status and problem
type; a started service's log is kept (its path is printed, its tail too after errors).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from serve_speed import POLES, QUESTIONS, free_port, write_random_adapter  # bench/ is on sys.path as a script

KINDS = ("direct", "prompt", "adapter", "composed")
INTENSITIES = (0.25, 0.5, 0.75, 1.0)


@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {kind: [] for kind in KINDS})
    statuses: Counter[str] = field(default_factory=Counter)  # "200", or status and problem type: "503 server-busy"
    shed: int = 0  # 503 server-busy with Retry-After: admission control turning work away on purpose
    errors: int = 0  # any other 5xx (a 503 because the engine or the database is down too), transport errors
    transport_errors: int = 0
    samples: list[str] = field(default_factory=list)  # the first few unexpected answers
    tokens: int = 0
    window_requests: int = 0  # answered (200) before the duration was up
    window_tokens: int = 0
    wall: float = 0.0

    def note(self, text: str) -> None:
        if len(self.samples) < 5:
            self.samples.append(text)


# ---------------------------------------------------------------- personas


def personas(adapters: list[dict[str, Any]], composed: int, seed: int) -> dict[str, list[dict[str, Any]]]:
    """Request fields per persona kind, from the ready adapters the service lists."""
    rng = random.Random(seed)
    poles = [{trait: level} for trait, level in POLES]
    found: dict[str, list[dict[str, Any]]] = {
        "direct": [{"method": "direct"}],
        "prompt": [{"method": "prompt", "traits": pole} for pole in poles],
        "adapter": [],
        "composed": [],
    }
    per_trait: dict[str, set[tuple[str, str]]] = {}  # method -> (trait, level) with a per-trait adapter
    for row in adapters:
        if row["method"] not in ("sft", "dpo"):
            continue
        if row["layout"] == "unified":
            found["adapter"] += [{"method": row["method"], "traits": pole} for pole in poles]
        elif len(row["traits"]) == 1:
            ((trait, level),) = row["traits"].items()
            found["adapter"].append({"method": row["method"], "traits": {trait: level}})
            per_trait.setdefault(row["method"], set()).add((trait, str(level)))
    for method, available in sorted(per_trait.items()):
        traits = sorted({trait for trait, _ in available})
        if len(traits) < 2:
            continue
        for _ in range(composed):
            vector: dict[str, float] = {}
            for trait in rng.sample(traits, rng.randint(2, min(3, len(traits)))):
                levels = sorted(level for t, level in available if t == trait)
                sign = 1.0 if rng.choice(levels) == "high" else -1.0
                vector[trait] = sign * rng.choice(INTENSITIES[:-1])  # below 1: always a real composition
            found["composed"].append({"method": method, "traits": vector})
    unique = {kind: list({repr(p): p for p in group}.values()) for kind, group in found.items()}
    return {kind: group for kind, group in unique.items() if group}


def body(persona: dict[str, Any], client: int, turn: int, max_tokens: int) -> dict[str, Any]:
    question = QUESTIONS[(client + turn) % len(QUESTIONS)]
    return {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, **persona}


# ---------------------------------------------------------------- the load


async def warm_up(http: httpx.AsyncClient, groups: dict[str, list[dict[str, Any]]]) -> None:
    """One short request per persona, one at a time: composes and loads every adapter once."""
    for group in groups.values():
        for persona in group:
            response = await http.post("/v1/generate", json=body(persona, 0, 0, 1))
            if response.status_code != 200:
                raise SystemExit(f"warm-up {persona}: {response.status_code} {response.text[:300]}")


@dataclass
class Plan:
    groups: dict[str, list[dict[str, Any]]]
    max_tokens: int
    began: float  # event-loop time at which the load started
    duration: float

    @property
    def end(self) -> float:
        return self.began + self.duration


async def one_client(http: httpx.AsyncClient, index: int, plan: Plan, tally: Tally) -> None:
    loop = asyncio.get_running_loop()
    kinds = list(plan.groups)
    turn = 0
    while (now := loop.time()) < plan.end:
        kind = kinds[(index + turn) % len(kinds)]
        group = plan.groups[kind]
        persona = group[(index // len(kinds) + turn) % len(group)]
        turn += 1
        try:
            response = await http.post("/v1/generate", json=body(persona, index, turn, plan.max_tokens))
        except httpx.HTTPError as exc:
            tally.errors += 1
            tally.transport_errors += 1
            tally.note(f"transport: {type(exc).__name__}: {exc}")
            continue
        done = loop.time()
        problem = "" if response.status_code == 200 else problem_type(response)
        tally.statuses[f"{response.status_code} {problem}".strip()] += 1
        if response.status_code == 200:
            tokens = int(response.json()["usage"]["completion_tokens"])
            tally.latencies[kind].append(done - now)
            tally.tokens += tokens
            if done <= plan.end:
                tally.window_requests += 1
                tally.window_tokens += tokens
        else:
            if response.status_code == 503 and problem == "server-busy" and "retry-after" in response.headers:
                tally.shed += 1
            else:
                tally.errors += int(response.status_code >= 500)
                tally.note(f"{response.status_code} {kind} {persona}: {response.text[:200]}")
            if "retry-after" in response.headers:  # a polite client waits before its next request
                pause = float(response.headers["retry-after"])
                await asyncio.sleep(max(0.0, min(pause, plan.end - loop.time())))


async def run_load(args: argparse.Namespace, url: str, headers: dict[str, str]) -> tuple[Tally, dict[str, int]]:
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4)
    timeout = httpx.Timeout(args.timeout, connect=30.0)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, limits=limits) as http:
        listed = await http.get("/v1/adapters", params={"state": "ready"})
        listed.raise_for_status()
        groups = personas(listed.json(), args.composed, args.seed)
        if not args.no_warmup:
            await warm_up(http, groups)
        tally = Tally()
        plan = Plan(groups, args.max_tokens, asyncio.get_running_loop().time(), args.duration)
        await asyncio.gather(*(one_client(http, i, plan, tally) for i in range(args.clients)))
        tally.wall = asyncio.get_running_loop().time() - plan.began
    return tally, {kind: len(group) for kind, group in groups.items()}


# ---------------------------------------------------------------- a service started here


@contextlib.contextmanager
def started_service(args: argparse.Namespace) -> Iterator[tuple[str, str, Path]]:
    """``big5 serve`` on a free port with random per-trait adapters; yields (url, what it runs, its log)."""
    from big5core.db import transaction
    from big5core.settings import get_settings
    from big5personas import registry
    from big5personas.stack import build_stack

    models = Path(os.environ.get("BIG5_DATA_DIR", "./big5-data")).resolve() / "models"
    work = Path(tempfile.mkdtemp(prefix="big5-load-"))
    (work / "models").symlink_to(models, target_is_directory=True)
    os.environ["BIG5_DATA_DIR"] = str(work)  # this script's own environment, inherited by the service
    if args.database_url:
        os.environ["BIG5_DATABASE_URL"] = args.database_url
    else:
        os.environ.pop("BIG5_DATABASE_URL", None)  # SQLite in the temporary data dir
    if args.max_queue:
        os.environ["BIG5_SERVICE__MAX_QUEUE"] = str(args.max_queue)
    settings = get_settings()
    stack = build_stack(settings)
    try:
        for seed, (trait, level) in enumerate(POLES[: args.adapters], start=1):
            staged = registry.staging_dir(settings.adapters_dir)
            write_random_adapter(Path(stack.base_model_path), staged, seed)
            with transaction(stack.sessions) as session:
                registry.publish(
                    session, staged, settings.adapters_dir, name=f"load-{trait}-{level}", method="sft",
                    layout="per-trait", base_model=stack.base_model_id, traits={trait: level},
                    max_rank=settings.engine.max_lora_rank,
                )  # fmt: skip
    finally:
        stack.close()

    port = free_port()
    log_path = Path(tempfile.gettempdir()) / f"big5-load-serve-{port}.log"  # kept: read it after a failure
    log = log_path.open("w")
    command = [sys.executable, "-m", "big5.cli", "serve", "--port", str(port), "--log-level", "warning"]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    engine = settings.engine
    described = (
        f"started here: max_queue {settings.service.max_queue}, request_timeout_s "
        f"{settings.service.request_timeout_s:g}, max_num_seqs {engine.max_num_seqs}, max_loras {engine.max_loras}, "
        f"max_cpu_loras {engine.max_cpu_loras}, dtype {engine.dtype}, "
        f"database {'PostgreSQL' if settings.resolved_database_url.startswith('postgresql') else 'SQLite'}"
    )
    try:
        began = time.perf_counter()
        wait_ready(url, server, args.start_timeout)
        print(f"service ready after {time.perf_counter() - began:.1f} s at {url}", flush=True)
        yield url, described, log_path
    finally:
        server.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown: the lifespan stops the engine
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        shutil.rmtree(work, ignore_errors=True)


def wait_ready(url: str, server: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"big5 serve exited with status {server.returncode} before it was ready")
        with contextlib.suppress(httpx.HTTPError):
            status = httpx.get(f"{url}/health", timeout=5).json().get("status")
            if status == "ready":
                return
            if status == "error":
                raise SystemExit(f"the service's engine failed: {httpx.get(f'{url}/health').text}")
        time.sleep(1)
    raise SystemExit(f"the service was not ready within {timeout:g} s")


# ---------------------------------------------------------------- report


def problem_type(response: httpx.Response) -> str:
    """The slug of a problem response's ``type`` ("server-busy"), "" when the body is not a problem."""
    try:
        return str(response.json().get("type", "")).rsplit("/", 1)[-1]
    except ValueError:
        return ""


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def report(args: argparse.Namespace, url: str, described: str, tally: Tally, kinds: dict[str, int]) -> int:
    answered = [x for group in tally.latencies.values() for x in group]
    window, drain = args.duration, tally.wall - args.duration
    lines = [
        f"Load: {args.clients} clients, {window:g} s (+ {drain:.1f} s drain of the requests then in flight), "
        f"max_tokens {args.max_tokens}, {os.cpu_count()} CPUs",
        f"service: {url} ({described})",
        "personas: " + ", ".join(f"{kind} {n}" for kind, n in kinds.items()),
        f"answered (200): {len(answered)} in {tally.wall:.1f} s -> {len(answered) / tally.wall:.2f} req/s, "
        f"{tally.tokens / tally.wall:.1f} completion tok/s",
        f"  within the {window:g} s window: {tally.window_requests} -> {tally.window_requests / window:.2f} req/s, "
        f"{tally.window_tokens / window:.1f} completion tok/s",
    ]
    if answered:
        p50, p90, p99 = (percentile(answered, q) for q in (50, 90, 99))
        lines.append(f"latency (200s): p50 {p50:.2f} s, p90 {p90:.2f} s, p99 {p99:.2f} s, max {max(answered):.2f} s")
        lines += [
            f"  {kind:<9} {len(group):>6} answered, p50 {percentile(group, 50):.2f} s, "
            f"p99 {percentile(group, 99):.2f} s"
            for kind, group in tally.latencies.items()
            if group
        ]
    statuses = ", ".join(f"{status} x {n}" for status, n in sorted(tally.statuses.items())) or "none"
    lines.append(
        f"status: {statuses}; shed on purpose (503 server-busy + Retry-After): {tally.shed}; "
        f"errors (other 5xx, transport): {tally.errors} ({tally.transport_errors} transport)"
    )
    lines += [f"  e.g. {sample}" for sample in tally.samples]
    print("\n" + "\n".join(lines))
    return 1 if tally.errors else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running service (default: start `big5 serve` here)")
    parser.add_argument("--api-key", default=os.environ.get("BIG5_API_KEY"), help="default: $BIG5_API_KEY")
    parser.add_argument("--clients", type=int, default=200, help="concurrent closed-loop clients")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds during which requests are started")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per reply at most")
    parser.add_argument("--composed", type=int, default=4, help="composed trait vectors per adapter method")
    parser.add_argument("--seed", type=int, default=0, help="seed of the composed vectors")
    parser.add_argument("--timeout", type=float, default=600.0, help="client timeout per request, seconds")
    parser.add_argument("--no-warmup", action="store_true", help="skip one request per persona before the load")
    started = parser.add_argument_group("a service started here (no --url)")
    started.add_argument("--adapters", type=int, default=10, choices=range(0, 11), metavar="0..10",
                         help="random per-trait SFT adapters to publish (trait poles)")  # fmt: skip
    started.add_argument("--database-url", help="default: SQLite in the temporary data dir")
    started.add_argument("--max-queue", type=int, help="BIG5_SERVICE__MAX_QUEUE (default: the service's)")
    started.add_argument("--start-timeout", type=float, default=600.0, help="seconds to wait for /health ready")
    args = parser.parse_args()

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    log: Path | None = None
    with contextlib.ExitStack() as stack:
        if args.url:
            url, described = args.url.rstrip("/"), "running service; its max_queue is not visible to clients"
        else:
            url, described, log = stack.enter_context(started_service(args))
        tally, kinds = asyncio.run(run_load(args, url, headers))
    status = report(args, url, described, tally, kinds)
    if log is not None:
        print(f"service log: {log}")
        if status:
            print("".join(log.read_text().splitlines(keepends=True)[-60:]), file=sys.stderr)
    sys.exit(status)


if __name__ == "__main__":
    main()
