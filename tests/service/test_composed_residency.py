"""Composed adapters stay loaded in the real engine up to a bound; the least recently used idle one goes."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from big5core.settings import Settings
from big5engine.compose_cache import COMPOSED_PREFIX
from big5engine.engine import PersonaEngine
from big5personas.stack import Stack
from service.app import create_app
from service.serving import GenerationService
from tests.service.conftest import with_service
from tests.service.support import generate_body

pytestmark = pytest.mark.slow  # the real engine


def _composed(client: TestClient, vector: tuple[float, float]) -> str:
    openness, extraversion = vector
    body = generate_body(traits={"openness": openness, "extraversion": extraversion}, max_tokens=1)
    response = client.post("/v1/generate", json=body)
    assert response.status_code == 200, response.text
    name = response.json()["persona"]["adapter"]
    assert name.startswith(COMPOSED_PREFIX)
    return str(name)


def test_composed_adapters_beyond_the_bound_are_unloaded(
    service_settings: Settings, service_stack: Stack, engine: PersonaEngine, published: dict[str, str]
) -> None:
    app = create_app(with_service(service_settings, composed_cache_size=1), stack=service_stack, engine=engine)
    with TestClient(app) as client:
        _check(client, engine)


def _check(client: TestClient, engine: PersonaEngine) -> None:
    serving: GenerationService = client.app.state.service.serving  # type: ignore[attr-defined]
    cache = serving.resolver._cache
    capacity = serving.resident.capacity
    assert capacity == engine.settings.max_loras  # never below a full batch, even with composed_cache_size=1
    # published has openness high and extraversion low: each vector composes those two at weights of its own,
    # distinct on the 0.25 grid that requests are quantised to
    weights = [(o, e) for e in (-1.0, -0.75, -0.5, -0.25) for o in (0.25, 0.5, 0.75)][: capacity + 2]
    assert len(weights) == capacity + 2
    names = [_composed(client, w) for w in weights]
    assert len(set(names)) == len(names)

    loaded = [n for n in names if n in engine.loras]
    assert loaded == names[-capacity:]  # the most recently used stay loaded ...
    gone = names[:-capacity]
    assert gone and not set(gone) & set(engine.loras)  # ... the others were unloaded
    assert cache.held() == []  # on disk a folder is held only while a request uses it (issue 28)

    again = _composed(client, weights[0])  # an unloaded vector is simply loaded again
    assert again == names[0] and again in engine.loras
