"""Helpers shared by the server's test modules: keys, prompts, reading raw SSE."""

from __future__ import annotations

import json
from typing import Any

KEY = "sk-gemma-local-test"
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
#: Gemma 3's end ids (<eos>, <end_of_turn>) can't win: a reply runs to max_tokens.
NO_END = {"1": -100.0, "106": -100.0}


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def sse_events(raw: bytes) -> list[str]:
    """The ``data:`` payloads of an SSE body; every event must be ``data: ...\\n\\n``."""
    assert raw.endswith(b"\n\n"), raw[-200:]
    events = raw.decode("utf-8").split("\n\n")[:-1]
    for event in events:
        assert event.startswith("data: ") and "\n" not in event, event
    return [e.removeprefix("data: ") for e in events]


def assert_error_shape(response: Any, status: int | None = None) -> dict[str, Any]:
    """The response is OpenAI's error JSON (with ``status``, if given); returns ``error``."""
    if status is not None:
        assert response.status_code == status, response.text
    assert 400 <= response.status_code < 600, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    return error


def chunks_of(raw: bytes) -> list[dict[str, Any]]:
    """The JSON chunks of an SSE body that ends with ``data: [DONE]``."""
    events = sse_events(raw)
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]
