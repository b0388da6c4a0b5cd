"""The official ``openai`` client against a real uvicorn server (127.0.0.1, a free port, a thread)."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from pydantic import SecretStr

from big5core.settings import Settings
from big5engine.engine import PersonaEngine
from big5personas.stack import Stack
from service.app import create_app
from tests.service.conftest import with_service
from tests.service.support import QUESTION, serve_over_http

pytestmark = pytest.mark.slow

API_KEY = "sk-test-key"


@pytest.fixture(scope="module")
def base_url(
    service_settings: Settings, service_stack: Stack, engine: PersonaEngine, published: dict[str, str]
) -> Iterator[str]:
    settings = with_service(service_settings, api_keys=[SecretStr(API_KEY)])
    app = create_app(settings, stack=service_stack, engine=engine)
    with serve_over_http(app, start_timeout=60) as url:
        yield f"{url}/v1"


@pytest.fixture()
def oai(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=300)


@pytest.mark.parametrize("model", ["big5/sft?openness=1", "big5/direct"])
def test_chat_completion_whole_and_streamed(oai: openai.OpenAI, model: str, published: dict[str, str]) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    whole = oai.chat.completions.create(model=model, messages=messages, max_tokens=32, temperature=0)  # type: ignore[arg-type]
    text = whole.choices[0].message.content or ""
    assert text.strip() and whole.model == model
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage is not None and 0 < whole.usage.completion_tokens <= 32
    persona = (whole.model_extra or {}).get("persona") or {}
    assert persona.get("adapter") == (published["openness"] if "openness" in model else None)

    stream = oai.chat.completions.create(
        model=model,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=32,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces) == text
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_persona_changes_the_reply(oai: openai.OpenAI, published: dict[str, str]) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    replies = {
        model: oai.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)  # type: ignore[arg-type]
        .choices[0]
        .message.content
        for model in ("big5/direct", "big5/sft?openness=1", "big5/sft?extraversion=-1")
    }
    assert len(set(replies.values())) == 3


def test_models_and_errors(oai: openai.OpenAI, base_url: str, published: dict[str, str]) -> None:
    ids = {m.id for m in oai.models.list()}
    assert {"big5/direct", "big5/prompt?openness=1", "big5/sft?openness=1"} <= ids
    assert f"big5/sft?openness=1&adapter={published['openness']}" in ids
    with pytest.raises(openai.BadRequestError) as bad:
        oai.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert bad.value.status_code == 400
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(
            model="big5/sft?agreeableness=-1", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    wrong = openai.OpenAI(base_url=base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
