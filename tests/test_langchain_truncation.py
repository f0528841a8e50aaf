"""Structured output and forced tool calls that ``max_tokens`` cuts off say so, in LangChain.

Under the grammar a complete reply always parses; a reply cut off by
``max_tokens`` (``finish_reason == "length"``) is not complete, and
``with_structured_output`` must report that (the token count, ``max_tokens``,
the partial output) instead of a schema error about an auto-closed object or
``None``. Greedy decoding with ``max_tokens=3`` on the tiny checkpoints makes
every cut deterministic. The fast tier at the bottom checks what counts as
complete at the limit, without a model.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Literal

import pytest
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage
from langchain_core.outputs import ChatGeneration
from pydantic import BaseModel

from core import BaseGemmaChatCompletion
from langchain_gemma_local import ChatGemmaLocal
from langchain_gemma_local.structured import _cut_off_error


class Pet(BaseModel):
    """A pet."""

    kind: Literal["cat", "dog"]
    age: int


PET_SCHEMA: dict[str, Any] = {
    "title": "Pet",
    "description": "A pet.",
    "type": "object",
    "properties": {"kind": {"enum": ["cat", "dog"]}, "age": {"type": "integer"}},
    "required": ["kind", "age"],
}
LIMIT = 3
ASK = "Describe a pet."


@pytest.fixture
def llm(client: BaseGemmaChatCompletion) -> ChatGemmaLocal:
    return ChatGemmaLocal(client=client, temperature=0, max_tokens=LIMIT)


def cut_message(subject: str, limit: int = LIMIT) -> str:
    return (
        rf"{subject} was cut off after {limit} tokens, before it was complete \(max_tokens, "
        r"or what the context window left after the prompt\); raise max_tokens"
    )


CASES = [
    pytest.param("json_schema", Pet, "the Pet JSON", id="json_schema-pydantic"),
    pytest.param("json_schema", PET_SCHEMA, "the Pet JSON", id="json_schema-dict"),
    pytest.param("function_calling", Pet, "the call of Pet", id="function_calling-pydantic"),
    pytest.param("function_calling", PET_SCHEMA, "the call of Pet", id="function_calling-dict"),
]


@pytest.mark.parametrize(("method", "schema", "subject"), CASES)
def test_cut_off_structured_output_raises_naming_max_tokens(llm, method, schema, subject) -> None:
    runnable = llm.with_structured_output(schema, method=method)
    with pytest.raises(OutputParserException, match=cut_message(subject)) as info:
        runnable.invoke(ASK)
    assert "Partial output: " in str(info.value)


@pytest.mark.parametrize(("method", "schema", "subject"), CASES)
def test_cut_off_with_include_raw_sets_parsing_error(llm, method, schema, subject) -> None:
    out = llm.with_structured_output(schema, method=method, include_raw=True).invoke(ASK)
    raw = out["raw"]
    assert isinstance(raw, AIMessage)
    assert raw.response_metadata["finish_reason"] == "length"
    assert raw.usage_metadata is not None and raw.usage_metadata["output_tokens"] == LIMIT
    assert out["parsed"] is None
    assert isinstance(out["parsing_error"], OutputParserException)
    assert re.search(cut_message(subject), str(out["parsing_error"]))
    if method == "json_schema":
        assert f"Partial output: {raw.content!r}" in str(out["parsing_error"])
        assert str(raw.content).startswith("{")
    else:
        assert raw.tool_calls == [] and raw.content == ""


def test_cut_off_json_mode_raises(client) -> None:
    llm = ChatGemmaLocal(client=client, temperature=0, max_tokens=1)
    with pytest.raises(OutputParserException, match=cut_message("the json_mode JSON", 1)):
        llm.with_structured_output(method="json_mode").invoke(ASK)


async def test_cut_off_is_reported_by_ainvoke_and_streams(llm) -> None:
    runnable = llm.with_structured_output(Pet)
    with pytest.raises(OutputParserException, match=cut_message("the Pet JSON")):
        await runnable.ainvoke(ASK)
    with pytest.raises(OutputParserException, match=cut_message("the Pet JSON")):
        list(runnable.stream(ASK))
    calls = llm.with_structured_output(PET_SCHEMA, method="function_calling")
    with pytest.raises(OutputParserException, match=cut_message("the call of Pet")):
        [chunk async for chunk in calls.astream(ASK)]


def test_forced_tool_call_cut_off_says_length_and_logs(llm, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="gemma_local"):
        message = llm.bind_tools([Pet], tool_choice="required").invoke(ASK)
    assert message.tool_calls == [] and message.content == ""
    assert message.response_metadata["finish_reason"] == "length"
    assert message.usage_metadata is not None and message.usage_metadata["output_tokens"] == LIMIT
    # the cut-off call says so: Gemma 3's call text so far, the only tool's name, the limit
    [bad] = message.invalid_tool_calls
    assert bad["name"] == "Pet" and bad["id"] is None
    assert bad["error"] == (
        f"the reply was cut off by max_tokens={LIMIT} after {LIMIT} tokens before the tool "
        "call was complete; raise max_tokens"
    )
    head = '{"name": "Pet", "parameters": {'
    assert bad["args"] and (head.startswith(bad["args"]) or bad["args"].startswith(head))
    warnings = [r.getMessage() for r in caplog.records if r.name == "gemma_local"]
    assert any(
        w.startswith(f"a constrained tool call was cut off after {LIMIT} tokens") for w in warnings
    )


def test_enough_tokens_still_parse(client) -> None:
    llm = ChatGemmaLocal(client=client, temperature=0, max_tokens=40)

    class Flag(BaseModel):
        on: bool

    for method in ("json_schema", "function_calling"):
        out = llm.with_structured_output(Flag, method=method, include_raw=True).invoke(ASK)
        assert out["parsing_error"] is None and isinstance(out["parsed"], Flag)


# ------------------------------------------------- fast tier: what counts as complete


def generation(content: str, finish: str, calls: list[dict[str, Any]] | None = None):
    message = AIMessage(
        content=content,
        tool_calls=calls or [],
        response_metadata={"finish_reason": finish},
        usage_metadata={"input_tokens": 5, "output_tokens": 7, "total_tokens": 12},
    )
    return [ChatGeneration(message=message)]


CALL = {"name": "Pet", "args": {"kind": "cat", "age": 2}, "id": "c1"}


@pytest.mark.parametrize(
    ("result", "call"),
    [
        (generation('{"kind": "cat"', "stop"), False),  # not cut: the parser's own error
        (generation('{"kind": "cat", "age": 2}', "length"), False),  # complete at the limit
        (generation("", "length", [CALL]), True),  # the call was finished
        (generation("", "tool_calls", [CALL]), True),
    ],
    ids=["stopped", "json-complete-at-limit", "call-complete-at-limit", "called"],
)
def test_complete_replies_are_not_reported(result, call) -> None:
    _cut_off_error(result, "Pet", call=call)  # raises nothing


@pytest.mark.parametrize(
    ("result", "call", "subject"),
    [
        (generation('{"kind": "ca', "length"), False, "the Pet JSON"),
        (generation("", "length"), True, "the call of Pet"),
    ],
    ids=["json", "call"],
)
def test_incomplete_replies_at_the_limit_are_reported(result, call, subject) -> None:
    with pytest.raises(OutputParserException, match=cut_message(subject, 7)):
        _cut_off_error(result, "Pet", call=call)
