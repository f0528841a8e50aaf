"""Bad input caught at ``create()``'s boundary, before any load, and cut-off constrained replies.

Every bad value here is refused by a client that never loads (``fresh_client``
asserts it), with an error naming what was wrong and what is allowed: a
``stream`` that is not a bool, a lone surrogate anywhere the tokenizer or the
grammar would read text, tool results that answer no call. The ``developer``
role is a system message. A constrained reply that ``max_tokens`` cuts off
says so on the ``gemma_local`` logger (greedy, ``max_tokens=3``: deterministic).
"""

from __future__ import annotations

import logging
import re

import pytest
from conftest import BACKENDS, make_client
from test_core_support import USER, content

CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
TOOL = {
    "type": "function",
    "function": {
        "name": "f",
        "description": "A function.",
        "parameters": {
            "type": "object",
            "properties": {"x": {"type": "integer"}},
            "required": ["x"],
        },
    },
}
SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "point",
        "schema": {
            "type": "object",
            "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
            "required": ["x", "y"],
        },
    },
}
BAD = "bad \udc80 x"
#: A tool whose only call a random model finishes quickly (a bounded argument).
FLAG_TOOL = {
    "type": "function",
    "function": {
        "name": "flag",
        "parameters": {
            "type": "object",
            "properties": {"on": {"type": "boolean"}},
            "required": ["on"],
        },
    },
}


@pytest.fixture(params=BACKENDS)
def fresh_client(request, gemma3_path):
    """A client that is never loaded (constructing one is cheap)."""
    client = make_client(request.param, gemma3_path)
    yield client
    assert not client.is_loaded, "validation must happen before the model loads"
    client.close()


# ------------------------------------------------------------------- stream


@pytest.mark.parametrize("stream", ["no", "false", 1, 0, [], "True"])
async def test_stream_must_be_a_bool(fresh_client, stream) -> None:
    with pytest.raises(TypeError, match=re.escape(f"stream must be True or False, got {stream!r}")):
        fresh_client.create(USER, stream=stream)
    with pytest.raises(TypeError, match="stream must be True or False"):
        await fresh_client.acreate(USER, stream=stream)


async def test_stream_none_and_false_are_not_streamed(client) -> None:
    for stream in (None, False):
        out = client.create(USER, stream=stream, temperature=0, max_tokens=2)
        assert isinstance(out, dict) and out["usage"]["completion_tokens"] == 2
        out = await client.acreate(USER, stream=stream, temperature=0, max_tokens=2)
        assert isinstance(out, dict) and out["object"] == "chat.completion"
    chunks = list(client.create(USER, stream=True, temperature=0, max_tokens=2))
    assert chunks[-1]["usage"]["completion_tokens"] == 2


# --------------------------------------------------------- lone surrogates


@pytest.mark.parametrize(
    ("messages", "options", "where"),
    [
        ([{"role": "user", "content": BAD}], {}, r"messages\[0\]\['content'\]"),
        (
            [
                {"role": "system", "content": "ok"},
                {"role": "user", "content": [{"type": "text", "text": BAD}]},
            ],
            {},
            r"messages\[1\]\['content'\]\[0\]\['text'\]",
        ),
        (USER, {"stop": ["ok", BAD]}, r"stop\[1\]"),
        (USER, {"stop": BAD}, "stop"),
        (
            USER,
            {"tools": [{**TOOL, "function": {**TOOL["function"], "description": BAD}}]},
            r"tools\[0\]\['function'\]\['description'\]",
        ),
        (
            USER,
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "p",
                        "schema": {"type": "object", "properties": {"k": {"enum": [BAD]}}},
                    },
                }
            },
            r"response_format\['json_schema'\]\['schema'\]\['properties'\]\['k'\]\['enum'\]\[0\]",
        ),
    ],
    ids=["content", "text-part", "stop-list", "stop-str", "tool-description", "schema-enum"],
)
async def test_lone_surrogate_is_refused_before_load(fresh_client, messages, options, where):
    match = rf"{where} holds a lone surrogate '\\udc80' at index 4; text must be valid Unicode"
    with pytest.raises(ValueError, match=match):
        fresh_client.create(messages, **options)
    with pytest.raises(ValueError, match=match):
        fresh_client.create(messages, stream=True, **options)
    with pytest.raises(ValueError, match=match):
        fresh_client.create_batch([USER, messages], **options)
    with pytest.raises(ValueError, match=match):
        await fresh_client.acreate(messages, **options)


def test_client_answers_after_a_surrogate_was_refused(client) -> None:
    with pytest.raises(ValueError, match="lone surrogate"):
        client.create([{"role": "user", "content": BAD}], temperature=0, max_tokens=2)
    out = client.create(USER, temperature=0, max_tokens=2)
    assert out["usage"]["completion_tokens"] == 2 and isinstance(content(out), str)


# ------------------------------------------------------- roles and tool results


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        (
            [{"role": "tool", "tool_call_id": "c1", "content": "r"}],
            r"messages\[0\] is a tool result .*no assistant tool call before it",
        ),
        (
            [*USER, {"role": "tool", "tool_call_id": "c1", "content": "r"}],
            r"messages\[1\] is a tool result",
        ),
        (
            [
                *USER,
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "c2", "content": "r"},
            ],
            r"messages\[2\] has tool_call_id 'c2', which matches no call .*\['c1'\]",
        ),
        ([{"role": "user", "content": ["hi"]}], r"must be a text part .*got str"),
    ],
    ids=["tool-first", "tool-after-user", "unknown-call-id", "bare-string-part"],
)
def test_bad_tool_results_and_parts_are_refused_before_load(fresh_client, messages, match):
    with pytest.raises(ValueError, match=match):
        fresh_client.create(messages)
    with pytest.raises(ValueError, match=match):
        fresh_client.create_batch([messages])


def test_developer_role_is_a_system_message(client) -> None:
    developer = [{"role": "developer", "content": "Answer briefly."}, *USER]
    system = [{"role": "system", "content": "Answer briefly."}, *USER]
    assert client.format_prompt(developer).text == client.format_prompt(system).text
    assert "Answer briefly." in client.format_prompt(developer).text
    a = client.create(developer, temperature=0, max_tokens=4)
    b = client.create(system, temperature=0, max_tokens=4)
    assert content(a) == content(b) and a["usage"] == b["usage"]


def test_tool_results_that_answer_the_calls_are_accepted(client) -> None:
    history = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [CALL, {**CALL, "id": "c2"}]},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
    ]
    out = client.create(history, temperature=0, max_tokens=2)
    assert out["usage"]["completion_tokens"] == 2


# ------------------------------------------------- cut-off constrained replies


def cut_off_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "gemma_local" and r.levelno == logging.WARNING and "cut off" in r.getMessage()
    ]


@pytest.mark.parametrize(
    ("options", "what"),
    [
        ({"response_format": SCHEMA_FORMAT}, "JSON reply"),
        ({"response_format": {"type": "json_object"}, "max_tokens": 1}, "JSON reply"),
        ({"tools": [TOOL], "tool_choice": "required"}, "tool call"),
        (
            {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "f"}}},
            "tool call",
        ),
    ],
    ids=["json_schema", "json_object", "required", "named"],
)
def test_cut_off_constrained_reply_is_logged(client, caplog, options, what) -> None:
    options = {"temperature": 0, "max_tokens": 3, **options}
    limit = options["max_tokens"]
    with caplog.at_level(logging.WARNING, logger="gemma_local"):
        out = client.create(USER, **options)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == limit
    assert "tool_calls" not in choice["message"]  # an unfinished call is no call
    [message] = cut_off_warnings(caplog)
    assert message.startswith(f"a constrained {what} was cut off after {limit} tokens")
    assert f"token limit of {limit}" in message and "raise max_tokens" in message


def test_complete_or_unconstrained_replies_log_no_cut_off(client, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="gemma_local"):
        text = client.create(USER, temperature=0, max_tokens=3)  # plain text cut off: fine
        call = client.create(
            USER,
            temperature=0,
            max_tokens=60,
            tools=[FLAG_TOOL],
            tool_choice="required",
            parallel_tool_calls=False,
        )
    assert text["choices"][0]["finish_reason"] == "length"
    assert call["choices"][0]["finish_reason"] == "tool_calls"
    assert cut_off_warnings(caplog) == []
