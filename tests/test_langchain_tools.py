"""Tool calling and structured output through ChatGemmaLocal, on both backends.

A tiny random-weight model follows no prompt, so every guarantee checked here
comes from core's constrained decoding: each call parses, names a bound tool and
carries arguments that validate (``jsonschema``) against that tool's schema;
``tool_choice`` is respected; structured output always parses into the schema.
Greedy decoding makes every run deterministic. Schemas use enums, booleans and
bounded numbers so that replies finish well within ``max_tokens`` (a random
model never ends a free string by itself).

The fast tier at the top needs no model: ``tool_choice`` mapping, what the
runnables bind, the errors raised before anything loads, and the mapping of
core's deltas onto LangChain messages (a scripted client).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import jsonschema
import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.runnables import RunnableBinding
from langchain_core.tools import BaseTool, tool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from pydantic import BaseModel, Field
from test_langchain_integration import SpyDeltas
from typing_extensions import TypedDict

from core import BaseGemmaChatCompletion, Delta, SamplingParams, ToolCall
from core.constrained import format_call
from langchain_gemma_local import ChatGemmaLocal, convert_messages_to_dicts
from langchain_gemma_local.chat_models import convert_to_response_format, convert_tool_choice

# ---------------------------------------------------------------- tools and schemas


@tool
def get_weather(
    city: Literal["Paris", "Rome", "Oslo"],
    days: Annotated[int, Field(ge=1, le=7)],
    unit: Literal["celsius", "fahrenheit"] = "celsius",
) -> str:
    """Current weather of a city for the next days."""
    return f"Sunny in {city} for {days} days ({unit})."


class Time(BaseModel):
    hour: int = Field(ge=0, le=23)
    minute: int = Field(ge=0, le=59)


class SetAlarm(BaseModel):
    """Set an alarm."""

    time: Time
    days: list[Literal["mon", "tue", "wed"]] = Field(max_length=2)
    loud: bool


@tool
def ping() -> str:
    """Check the connection."""
    return "pong"


TOOLS: list[Any] = [get_weather, SetAlarm, ping]
SCHEMAS = {
    t["function"]["name"]: t["function"]["parameters"]
    for t in (convert_to_openai_tool(x) for x in TOOLS)
}
ASK = "What is the weather in Paris for three days?"
MAX_TOKENS = 100  # room for two calls (the tiny tokenizer spends ~1 token per character)
#: Room for a whole Household; closed objects and bounded values end the reply
#: well before (~130 tokens as a forced call), so a larger limit costs nothing.
STRUCTURED_MAX_TOKENS = 200


class Pet(BaseModel):
    kind: Literal["cat", "dog"]
    legs: int = Field(ge=0, le=4)


class Home(BaseModel):
    floor: int = Field(ge=0, le=9)
    garden: bool


class Household(BaseModel):
    """A household."""

    city: Literal["Paris", "Rome"]
    home: Home
    pets: list[Pet] = Field(min_length=1, max_length=2)
    nick: Literal["ace", "bo"] | None = None


class PetDict(TypedDict):
    """A pet."""

    kind: Literal["cat", "dog"]
    legs: Literal[0, 2, 4]


class HomeDict(TypedDict):
    """A home."""

    floor: Literal[0, 1, 2]
    garden: bool


class HouseholdDict(TypedDict):
    """A household."""

    city: Literal["Paris", "Rome"]
    home: HomeDict
    pets: list[PetDict]


PET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["cat", "dog"]},
        "legs": {"type": "integer", "minimum": 0, "maximum": 4},
    },
    "required": ["kind", "legs"],
}
HOUSEHOLD_SCHEMA: dict[str, Any] = {
    "title": "Household",
    "description": "A household.",
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Rome"]},
        "home": {
            "type": "object",
            "properties": {
                "floor": {"type": "integer", "minimum": 0, "maximum": 9},
                "garden": {"type": "boolean"},
            },
            "required": ["floor", "garden"],
        },
        "pets": {"type": "array", "items": PET_SCHEMA, "minItems": 1, "maxItems": 2},
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
    },
    "required": ["city", "home", "pets", "zip"],
}
STRUCTURED: dict[str, Any] = {
    "pydantic": Household,
    "typeddict": HouseholdDict,
    "json_schema": HOUSEHOLD_SCHEMA,
}


def check_calls(message: AIMessage, schemas: dict[str, Any] = SCHEMAS) -> list[dict[str, Any]]:
    """Every call names a bound tool, has an id and schema-valid args; returns the calls."""
    assert isinstance(message, AIMessage)
    if message.response_metadata["finish_reason"] == "length":  # a last call may be cut off
        assert len(message.invalid_tool_calls) <= 1
        for bad in message.invalid_tool_calls:
            assert str(bad["error"]).startswith("the reply was cut off by max_tokens=")
    else:
        assert message.invalid_tool_calls == []
    for call in message.tool_calls:
        assert call["name"] in schemas
        assert call["id"] and call["id"].startswith("call_")
        assert call.get("type") == "tool_call"
        jsonschema.validate(call["args"], schemas[call["name"]])
    if message.tool_calls:
        assert message.content == ""
        assert message.response_metadata["finish_reason"] in ("tool_calls", "length")
    return list(message.tool_calls)


def name_args(calls: Sequence[Any]) -> list[tuple[str, Any]]:
    return [(c["name"], c["args"]) for c in calls]


# ------------------------------------------------------- fast tier: tool_choice mapping

FORMATTED = [convert_to_openai_tool(t) for t in TOOLS]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (None, None),
        (False, None),
        (True, "required"),
        ("any", "required"),
        ("required", "required"),
        ("auto", "auto"),
        ("none", "none"),
        ("get_weather", NAMED),
        (NAMED, NAMED),
        ({"type": "tool", "name": "get_weather"}, NAMED),
        ({"type": "any"}, "required"),
        ({"type": "auto"}, "auto"),
    ],
)
def test_tool_choice_forms_map_to_core(choice: Any, expected: Any) -> None:
    assert convert_tool_choice(choice, FORMATTED) == expected


def test_a_tool_name_wins_over_a_mode_of_the_same_name() -> None:
    tools = [{"type": "function", "function": {"name": "auto", "parameters": {}}}]
    assert convert_tool_choice("auto", tools) == {"type": "function", "function": {"name": "auto"}}


@pytest.mark.parametrize(
    ("choice", "error", "match"),
    [
        (
            "get_wether",
            ValueError,
            r"'get_wether' is neither one of 'auto', 'none', 'required', 'any' nor the name "
            r"of a bound tool; the tools are: 'get_weather', 'SetAlarm', 'ping'",
        ),
        ({"type": "web_search"}, ValueError, "tool_choice dicts are"),
        (3, TypeError, "tool_choice must be a string, a bool, a dict or None, got int"),
    ],
)
def test_bad_tool_choice_names_the_problem(choice: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        convert_tool_choice(choice, FORMATTED)


# --------------------------------------------------- fast tier: what the runnables bind


@pytest.fixture
def cold(gemma3_path: Path) -> ChatGemmaLocal:
    """A ChatGemmaLocal on a client of its own that nothing has loaded."""
    return ChatGemmaLocal(
        model=str(gemma3_path), backend="transformers", client_kwargs={"torch_dtype": "float32"}
    )


def test_bind_tools_binds_openai_tools_and_core_options(cold: ChatGemmaLocal) -> None:
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    class Mood(TypedDict):
        """Pick a mood."""

        mood: Literal["happy", "sad"]

    bound = cold.bind_tools(
        [get_weather, SetAlarm, add, Mood, HOUSEHOLD_SCHEMA],
        tool_choice="any",
        parallel_tool_calls=False,
        temperature=0,
    )
    assert isinstance(bound, RunnableBinding)
    kwargs = bound.kwargs
    assert [t["function"]["name"] for t in kwargs["tools"]] == [
        "get_weather",
        "SetAlarm",
        "add",
        "Mood",
        "Household",
    ]
    assert kwargs["tools"][0] == convert_to_openai_tool(get_weather)
    assert (kwargs["tool_choice"], kwargs["parallel_tool_calls"], kwargs["temperature"]) == (
        "required",
        False,
        0,
    )
    assert "tool_choice" not in cold.bind_tools([ping]).kwargs  # None: core's default, auto
    assert not cold.client.is_loaded  # type: ignore[union-attr]


def test_with_structured_output_binds_each_method(cold: ChatGemmaLocal) -> None:
    def binding(runnable: Any) -> RunnableBinding:
        first = runnable.first
        assert isinstance(first, RunnableBinding)
        return first

    schema_way = binding(cold.with_structured_output(Household))
    spec = schema_way.kwargs["response_format"]["json_schema"]
    assert schema_way.kwargs["response_format"]["type"] == "json_schema"
    assert (spec["name"], spec["schema"], spec["strict"]) == (
        "Household",
        Household.model_json_schema(),
        True,  # objects closed: a reply has exactly the schema's keys
    )
    assert schema_way.kwargs["ls_structured_output_format"]["schema"] is Household
    open_ = binding(cold.with_structured_output(HOUSEHOLD_SCHEMA, strict=False))
    assert open_.kwargs["response_format"]["json_schema"]["strict"] is False
    tool_way = binding(cold.with_structured_output(Household, method="function_calling"))
    assert tool_way.kwargs["tool_choice"] == {"type": "function", "function": {"name": "Household"}}
    assert tool_way.kwargs["parallel_tool_calls"] is False
    assert [t["function"]["name"] for t in tool_way.kwargs["tools"]] == ["Household"]
    json_way = binding(cold.with_structured_output(Household, method="json_mode"))
    assert json_way.kwargs["response_format"] == {"type": "json_object"}
    schemaless = binding(cold.with_structured_output(None, method="json_mode"))
    assert "ls_structured_output_format" not in schemaless.kwargs
    assert not cold.client.is_loaded  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("schema", "name", "expected"),
    [
        (Household, "Household", Household.model_json_schema()),
        (HouseholdDict, "HouseholdDict", convert_to_json_schema(HouseholdDict)),
        (HOUSEHOLD_SCHEMA, "Household", HOUSEHOLD_SCHEMA),
        ({"type": "object", "properties": {}}, "response", {"type": "object", "properties": {}}),
        (convert_to_openai_tool(SetAlarm), "SetAlarm", SCHEMAS["SetAlarm"]),
        ({"name": "n", "schema": HOUSEHOLD_SCHEMA}, "n", HOUSEHOLD_SCHEMA),
        (
            {"type": "json_schema", "json_schema": {"name": "n", "schema": HOUSEHOLD_SCHEMA}},
            "n",
            HOUSEHOLD_SCHEMA,
        ),
    ],
)
def test_schemas_become_json_schema_response_formats(
    schema: Any, name: str, expected: dict[str, Any]
) -> None:
    out = convert_to_response_format(schema)
    assert out == {"type": "json_schema", "json_schema": {"name": name, "schema": expected}}


NOT_A_SCHEMA = {"type": "object", "properties": {"x": {"type": "strin"}}, "title": "Broken"}


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (
            lambda m: m.bind_tools([get_weather], tool_choice="get_wether"),
            ValueError,
            "'get_wether' is neither",
        ),
        (
            lambda m: m.bind_tools(
                [get_weather], tool_choice={"type": "function", "function": {"name": "nope"}}
            ),
            ValueError,
            "unknown tool 'nope'; the tools are: 'get_weather'",
        ),
        (
            lambda m: m.bind_tools([NOT_A_SCHEMA]),
            ValueError,
            r"tools\[0\] \(Broken\) parameters is not a JSON schema .*Invalid type: strin",
        ),
        (
            lambda m: m.with_structured_output(NOT_A_SCHEMA),
            ValueError,
            "'Broken' schema is not a JSON schema .*Invalid type: strin",
        ),
        (
            lambda m: m.with_structured_output(NOT_A_SCHEMA, method="function_calling"),
            ValueError,
            r"tools\[0\] \(Broken\) parameters",
        ),
        (
            lambda m: m.with_structured_output(Household, method="xml"),  # type: ignore[arg-type]
            ValueError,
            "method must be 'json_schema', 'function_calling' or 'json_mode', got 'xml'",
        ),
        (
            lambda m: m.with_structured_output(None),
            ValueError,
            "method='json_schema' needs a schema",
        ),
        (
            lambda m: m.with_structured_output(Household, temperature=0),
            ValueError,
            r"unsupported arguments \['temperature'\]",
        ),
        (lambda m: m.with_structured_output(42), TypeError, "schema must be a pydantic class"),
    ],
)
def test_bad_tools_and_schemas_fail_before_any_load(
    cold: ChatGemmaLocal, make: Any, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        make(cold)
    assert not cold.client.is_loaded  # type: ignore[union-attr]


def test_per_call_tool_options_are_checked_before_any_load(cold: ChatGemmaLocal) -> None:
    tools = [convert_to_openai_tool(get_weather)]
    with pytest.raises(ValueError, match="tool_choice='required' needs tools"):
        cold.invoke("hi", tool_choice="required")
    with pytest.raises(ValueError, match="cannot both apply"):
        cold.invoke("hi", tools=tools, response_format={"type": "json_object"})
    with pytest.raises(ValueError, match="used twice"):  # bind_tools lets this through
        cold.bind_tools([get_weather, get_weather]).invoke("hi")
    assert not cold.client.is_loaded  # type: ignore[union-attr]


# ------------------------------------------------ fast tier: deltas → LangChain (scripted)


class ScriptedCalls(BaseGemmaChatCompletion):
    """A constraining core client whose deltas are scripted per row (nothing loads)."""

    implementation = "scripted"
    supports_constraints = True

    def __init__(self, rows: list[list[Delta]]) -> None:
        super().__init__("scripted/gemma")
        self.rows = rows
        self.requests: list[tuple[int, SamplingParams]] = []

    def load(self) -> ScriptedCalls:
        self._loaded = True
        return self

    def _deltas(self, conversations: Sequence[Any], params: SamplingParams) -> list[Delta]:
        self.requests.append((len(conversations), params))
        self.load()
        out = []
        for row in range(len(conversations)):
            out += [
                Delta(
                    row, d.text, d.finish_reason, d.prompt_tokens, d.completion_tokens, d.tool_calls
                )
                for d in self.rows[row % len(self.rows)]
            ]
        return out

    def stream_deltas(
        self, conversations: Sequence[Any], params: SamplingParams
    ) -> Iterator[Delta]:
        yield from self._deltas(conversations, params)

    async def astream_deltas(  # type: ignore[override]
        self, conversations: Sequence[Any], params: SamplingParams
    ) -> AsyncIterator[Delta]:
        for delta in self._deltas(conversations, params):
            yield delta


class ScriptedText(ScriptedCalls):
    """A client that cannot constrain decoding (like a custom core backend)."""

    supports_constraints = False


def call(index: int, name: str, arguments: str) -> ToolCall:
    return ToolCall(index, f"call_{index:024d}", name, arguments)


WEATHER_ARGS = '{"city": "Rome", "days": 2}'
SCRIPT = [
    Delta(0, ""),
    Delta(0, "", tool_calls=(call(0, "get_weather", WEATHER_ARGS),)),
    Delta(0, "", tool_calls=(call(1, "ping", "{}"), call(2, "get_weather", "oops"))),
    Delta(0, "", "tool_calls", 7, 30),
]


def test_deltas_become_tool_calls_and_chunks() -> None:
    model = ChatGemmaLocal(client=ScriptedCalls([SCRIPT]))
    bound = model.bind_tools([get_weather, ping])
    message = bound.invoke("hi")
    assert name_args(message.tool_calls) == [
        ("get_weather", {"city": "Rome", "days": 2}),
        ("ping", {}),
    ]
    assert [c["id"] for c in message.tool_calls] == [f"call_{i:024d}" for i in (0, 1)]
    # a call core could not parse (never happens under the grammar) is reported, not dropped
    [invalid] = message.invalid_tool_calls
    assert (invalid["name"], invalid["args"], invalid["id"]) == (
        "get_weather",
        "oops",
        f"call_{2:024d}",
    )
    assert message.response_metadata["finish_reason"] == "tool_calls"
    assert message.usage_metadata == {"input_tokens": 7, "output_tokens": 30, "total_tokens": 37}
    chunks = list(bound.stream("hi"))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    parts = [p for c in chunks for p in c.tool_call_chunks]
    assert parts == [
        {
            "name": "get_weather",
            "args": WEATHER_ARGS,
            "id": f"call_{0:024d}",
            "index": 0,
            "type": "tool_call_chunk",
        },
        {
            "name": "ping",
            "args": "{}",
            "id": f"call_{1:024d}",
            "index": 1,
            "type": "tool_call_chunk",
        },
        {
            "name": "get_weather",
            "args": "oops",
            "id": f"call_{2:024d}",
            "index": 2,
            "type": "tool_call_chunk",
        },
    ]
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    assert total.tool_calls == message.tool_calls
    assert total.invalid_tool_calls == message.invalid_tool_calls


async def test_async_deltas_become_the_same_tool_calls() -> None:
    model = ChatGemmaLocal(client=ScriptedCalls([SCRIPT])).bind_tools([get_weather, ping])
    sync = model.invoke("hi")
    message = await model.ainvoke("hi")
    assert message.tool_calls == sync.tool_calls
    total = None
    async for chunk in model.astream("hi"):
        total = chunk if total is None else total + chunk
    assert isinstance(total, AIMessageChunk) and total.tool_calls == sync.tool_calls


class Listener(BaseCallbackHandler):
    """A callback handler that takes every piece of text (so invoke streams internally)."""

    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


TEXT_SCRIPT = [Delta(0, "Hel"), Delta(0, "lo"), Delta(0, " there", "length", 5, 3)]


@pytest.mark.parametrize("script", [SCRIPT, TEXT_SCRIPT], ids=["tool_calls", "text"])
async def test_invoke_folds_deltas_into_the_message_streaming_builds(
    script: list[Delta], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without listeners invoke folds the deltas (core's fold_deltas) instead of building a
    chunk per token; the message is the one the chunk-by-chunk path builds."""
    chunks: list[Delta] = []
    to_chunk = ChatGemmaLocal._chunk

    def counted(self: ChatGemmaLocal, delta: Delta, params: SamplingParams) -> Any:
        chunks.append(delta)
        return to_chunk(self, delta, params)

    monkeypatch.setattr(ChatGemmaLocal, "_chunk", counted)
    model = ChatGemmaLocal(client=ScriptedCalls([script])).bind_tools([get_weather, ping])
    listener = Listener()
    streamed = model.invoke("hi", config={"callbacks": [listener]})
    assert len(listener.tokens) == len(chunks) == len(script)
    for folded in (model.invoke("hi"), await model.ainvoke("hi")):
        for field in (
            "content",
            "tool_calls",
            "invalid_tool_calls",
            "usage_metadata",
            "response_metadata",
        ):
            assert getattr(folded, field) == getattr(streamed, field), field
        assert type(folded) is type(streamed) is AIMessage
    assert len(chunks) == len(script) + 2  # one chunk for each folded reply


@pytest.mark.parametrize("asynchronous", [False, True], ids=["batch", "abatch"])
async def test_batch_with_tools_submits_each_input_with_the_tools(asynchronous: bool) -> None:
    """One request per input (the core client batches them), each with the bound tools."""
    client = ScriptedCalls([SCRIPT])
    model = ChatGemmaLocal(client=client).bind_tools([get_weather, ping], tool_choice="auto")
    inputs = ["a", "b", "c"]
    results = await model.abatch(inputs) if asynchronous else model.batch(inputs)
    assert [count for count, _ in client.requests] == [1, 1, 1]
    for _, params in client.requests:
        assert [t.name for t in params.tools] == ["get_weather", "ping"]
    assert [len(r.tool_calls) for r in results] == [2, 2, 2]


def test_a_client_that_cannot_constrain_refuses_tools_before_generating() -> None:
    client = ScriptedText([[Delta(0, "Hi", "stop", 1, 1)]])
    model = ChatGemmaLocal(client=client)
    with pytest.raises(NotImplementedError, match="cannot constrain decoding"):
        model.bind_tools([get_weather])
    with pytest.raises(NotImplementedError, match="cannot constrain decoding"):
        model.with_structured_output(Household)
    assert client.requests == []
    model.bind_tools([get_weather], tool_choice="none").invoke("hi")  # nothing to constrain


# ----------------------------------------------------------------- real models: tools


@pytest.fixture
def llm(client: BaseGemmaChatCompletion) -> ChatGemmaLocal:
    return ChatGemmaLocal(client=client, temperature=0, max_tokens=MAX_TOKENS)


FORCED, AUTO = "forced", "auto"


@pytest.mark.parametrize(
    ("choice", "expect"),
    [
        ("any", FORCED),
        ("required", FORCED),
        (True, FORCED),
        ("get_weather", "get_weather"),
        ({"type": "function", "function": {"name": "SetAlarm"}}, "SetAlarm"),
        ({"type": "tool", "name": "ping"}, "ping"),
        ("auto", AUTO),
        (None, AUTO),
    ],
)
def test_tool_choice_is_respected(llm: ChatGemmaLocal, choice: Any, expect: str) -> None:
    message = llm.bind_tools(TOOLS, tool_choice=choice).invoke(ASK)
    calls = check_calls(message)
    if expect == FORCED:
        assert calls
    elif expect == AUTO:
        assert calls or not str(message.content).startswith("{")
    else:  # a named tool: exactly one call of it
        assert [c["name"] for c in calls] == [expect]
        assert message.response_metadata["finish_reason"] == "tool_calls"


def test_auto_reply_that_starts_a_call_is_a_valid_call(
    llm: ChatGemmaLocal, client: BaseGemmaChatCompletion
) -> None:
    """Under auto, a reply whose first character is '{' is a call (the random model's
    greedy reply is prose, so the brace is forced here): it must be a whole, valid one."""
    brace = {client.load().tokenizer.convert_tokens_to_ids("{"): 100.0}
    message = llm.bind_tools(TOOLS, tool_choice="auto", logit_bias=brace).invoke(ASK)
    assert check_calls(message)


def test_tool_choice_none_makes_no_call_and_shows_no_tools(llm: ChatGemmaLocal) -> None:
    message = llm.bind_tools(TOOLS, tool_choice="none").invoke(ASK)
    plain = llm.invoke(ASK)
    assert message.tool_calls == [] and message.invalid_tool_calls == []
    assert message.content == plain.content
    assert message.usage_metadata == plain.usage_metadata  # the prompt describes no tools


def test_parallel_tool_calls_false_makes_one_call(
    llm: ChatGemmaLocal, client: BaseGemmaChatCompletion
) -> None:
    newline = {client.load().tokenizer.convert_tokens_to_ids("\n"): 100.0}
    forced = llm.bind_tools([ping], tool_choice="required", logit_bias=newline)
    assert len(check_calls(forced.invoke(ASK))) >= 2  # a newline always wins: call after call
    one = forced.bind(parallel_tool_calls=False).invoke(ASK)
    assert len(check_calls(one)) == 1
    assert one.response_metadata["finish_reason"] == "tool_calls"


def test_tool_calls_match_core(llm: ChatGemmaLocal, client: BaseGemmaChatCompletion) -> None:
    message = llm.bind_tools(TOOLS, tool_choice="required").invoke(ASK)
    direct = client.create(
        [{"role": "user", "content": ASK}],
        tools=FORMATTED,
        tool_choice="required",
        temperature=0,
        max_tokens=MAX_TOKENS,
    )
    [choice] = direct["choices"]
    expected = [
        (c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in choice["message"]["tool_calls"]
    ]
    assert name_args(message.tool_calls) == expected
    assert message.response_metadata["finish_reason"] == choice["finish_reason"]
    assert message.usage_metadata is not None
    assert message.usage_metadata["output_tokens"] == direct["usage"]["completion_tokens"]


def test_streamed_tool_call_chunks_add_up_to_invoke(llm: ChatGemmaLocal) -> None:
    bound = llm.bind_tools(TOOLS, tool_choice="required")
    message = bound.invoke(ASK)
    chunks = list(bound.stream(ASK))
    parts = [p for c in chunks for p in c.tool_call_chunks]
    assert parts and all(
        isinstance(p["args"], str) and p["id"] and p["name"] in SCHEMAS for p in parts
    )
    assert [p["index"] for p in parts] == list(range(len(parts)))
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    assert name_args(total.tool_calls) == name_args(message.tool_calls)
    assert [c["id"] for c in total.tool_calls] == [p["id"] for p in parts]
    assert total.response_metadata["finish_reason"] == message.response_metadata["finish_reason"]
    assert total.usage_metadata == message.usage_metadata


async def test_async_tool_calls_equal_sync(llm: ChatGemmaLocal) -> None:
    bound = llm.bind_tools(TOOLS, tool_choice="any")
    sync = bound.invoke(ASK)
    message = await bound.ainvoke(ASK)
    assert name_args(check_calls(message)) == name_args(sync.tool_calls)
    total = None
    async for chunk in bound.astream(ASK):
        total = chunk if total is None else total + chunk
    assert isinstance(total, AIMessageChunk)
    assert name_args(total.tool_calls) == name_args(sync.tool_calls)


def test_batch_with_tools_matches_one_by_one(
    llm: ChatGemmaLocal, client: BaseGemmaChatCompletion, monkeypatch: pytest.MonkeyPatch
) -> None:
    bound = llm.bind_tools(TOOLS, tool_choice="required")
    prompts = [ASK, "Wake me at seven on Monday.", "ping?"]
    alone = [bound.invoke(p) for p in prompts]
    spy = SpyDeltas(client, monkeypatch)
    together = bound.batch(prompts)
    assert [count for count, _ in spy.calls] == [1, 1, 1]  # a request per input, batched by core
    for one, batched in zip(alone, together, strict=True):
        check_calls(batched)
        assert name_args(batched.tool_calls) == name_args(one.tool_calls)


def test_tool_message_round_trip(llm: ChatGemmaLocal, client: BaseGemmaChatCompletion) -> None:
    tools = [get_weather]
    first = llm.bind_tools(tools, tool_choice="any", parallel_tool_calls=False).invoke(ASK)
    [call] = check_calls(first)
    result = get_weather.invoke(call)
    assert isinstance(result, ToolMessage) and result.tool_call_id == call["id"]
    history = [HumanMessage(ASK), first, result]
    dicts = convert_messages_to_dicts(history)
    assert dicts[1]["tool_calls"][0]["id"] == call["id"] == dicts[2]["tool_call_id"]
    prompt = client.format_prompt(dicts, tools=[convert_to_openai_tool(t) for t in tools]).text
    assert format_call("get_weather", call["args"]) in prompt  # the call, as the model wrote it
    assert f"```tool_output\n{result.content}\n```" in prompt  # and its result
    second = llm.bind_tools(tools).invoke(history)
    check_calls(second, {"get_weather": SCHEMAS["get_weather"]})
    direct = client.create(
        dicts, tools=[convert_to_openai_tool(get_weather)], temperature=0, max_tokens=MAX_TOKENS
    )
    expected = direct["choices"][0]["message"]
    assert (second.content or None) == expected["content"]
    assert name_args(second.tool_calls) == [
        (c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in expected.get("tool_calls", [])
    ]


# ------------------------------------------------------ real models: structured output

METHODS = ("json_schema", "function_calling", "json_mode")


def expected_schema(kind: str) -> dict[str, Any]:
    schema = STRUCTURED[kind]
    return schema if isinstance(schema, dict) else convert_to_json_schema(schema)


@pytest.mark.parametrize("include_raw", [False, True], ids=["parsed", "raw"])
@pytest.mark.parametrize("kind", list(STRUCTURED))
@pytest.mark.parametrize("method", METHODS)
def test_structured_output(llm: ChatGemmaLocal, method: str, kind: str, include_raw: bool) -> None:
    schema = STRUCTURED[kind]
    llm = llm.model_copy(update={"max_tokens": STRUCTURED_MAX_TOKENS})
    runnable = llm.with_structured_output(schema, method=method, include_raw=include_raw)  # type: ignore[arg-type]
    prompt = "Describe a household in JSON."
    if method == "json_mode":
        # only *a* JSON object is guaranteed: the keys are the model's to choose
        raw = llm.bind(response_format={"type": "json_object"}).invoke(prompt)
        assert isinstance(json.loads(str(raw.content)), dict)
        try:
            jsonschema.validate(json.loads(str(raw.content)), expected_schema(kind))
            fits = True
        except jsonschema.ValidationError:
            fits = False
        if include_raw:
            out = runnable.invoke(prompt)
            assert isinstance(out, dict) and out["raw"].content == raw.content
            if kind == "pydantic":
                assert (out["parsing_error"] is None) == fits
            else:  # a dict schema is not validated by JsonOutputParser
                assert out["parsed"] == json.loads(str(raw.content))
        elif kind == "pydantic" and not fits:
            with pytest.raises(OutputParserException):
                runnable.invoke(prompt)
        else:
            assert runnable.invoke(prompt) is not None
        return
    out = runnable.invoke(prompt)
    if include_raw:
        assert isinstance(out, dict) and set(out) == {"raw", "parsed", "parsing_error"}
        assert out["parsing_error"] is None
        raw, parsed = out["raw"], out["parsed"]
        assert isinstance(raw, AIMessage)
        if method == "function_calling":
            assert len(raw.tool_calls) == 1
            assert raw.response_metadata["finish_reason"] == "tool_calls"
        else:
            assert raw.response_metadata["finish_reason"] == "stop"
            assert raw.tool_calls == []
    else:
        parsed = out
    if kind == "pydantic":
        assert isinstance(parsed, Household)
        value = parsed.model_dump(exclude_none=True)
    else:
        assert isinstance(parsed, dict)
        value = parsed
    jsonschema.validate(value, expected_schema(kind))  # nested objects, arrays, enums, bounds
    assert set(expected_schema(kind)["required"]) <= set(value)
    assert set(value["home"]) == {"floor", "garden"}  # a nested object, closed
    if kind != "typeddict":  # a TypedDict cannot say minItems
        assert value["pets"] and all(set(p) == {"kind", "legs"} for p in value["pets"])


@pytest.mark.parametrize("method", METHODS[:2])
def test_structured_output_streams_to_the_invoke_result(llm: ChatGemmaLocal, method: str) -> None:
    llm = llm.model_copy(update={"max_tokens": STRUCTURED_MAX_TOKENS})
    for schema in (Household, HOUSEHOLD_SCHEMA):
        runnable = llm.with_structured_output(schema, method=method)  # type: ignore[arg-type]
        result = runnable.invoke("A household, please.")
        chunks = list(runnable.stream("A household, please."))
        assert chunks and chunks[-1] == result


def test_structured_output_batch_is_a_request_per_input(
    llm: ChatGemmaLocal, client: BaseGemmaChatCompletion, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = llm.model_copy(update={"max_tokens": STRUCTURED_MAX_TOKENS})
    runnable = llm.with_structured_output(Household)
    prompts = ["One household.", "Another household."]
    alone = [runnable.invoke(p) for p in prompts]
    spy = SpyDeltas(client, monkeypatch)
    assert runnable.batch(prompts) == alone
    assert [count for count, _ in spy.calls] == [1, 1]


# ------------------------------------------------------------ real models: LangGraph agent


def weather_tool(ran: list[tuple[str, int]]) -> BaseTool:
    @tool
    def get_weather(
        city: Literal["Paris", "Rome", "Oslo"], days: Annotated[int, Field(ge=1, le=7)]
    ) -> str:
        """Current weather of a city for the next days."""
        ran.append((city, days))
        return f"Sunny in {city} for {days} days."

    return get_weather


def run_agent(model: Any, tool_: BaseTool) -> list[Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # moved to langchain.agents
        from langgraph.prebuilt import create_react_agent

        agent = create_react_agent(model, [tool_])
    out = agent.invoke(
        {"messages": [("user", "What is the weather in Paris for three days?")]},
        {"recursion_limit": 12},  # GraphRecursionError if the loop never ends
    )
    return list(out["messages"])


def check_agent_run(messages: list[Any], ran: list[tuple[str, int]]) -> list[dict[str, Any]]:
    """Every call named the tool with valid args and really ran; the last reply has no calls."""
    schema = convert_to_openai_tool(weather_tool([]))["function"]["parameters"]
    calls = [c for m in messages if isinstance(m, AIMessage) for c in m.tool_calls]
    for c in calls:
        assert c["name"] == "get_weather"
        jsonschema.validate(c["args"], schema)
    assert ran == [(c["args"]["city"], c["args"]["days"]) for c in calls]
    results = [m for m in messages if isinstance(m, ToolMessage)]
    assert [m.tool_call_id for m in results] == [c["id"] for c in calls]
    assert all(m.status == "success" and m.content.startswith("Sunny") for m in results)
    final = messages[-1]
    assert isinstance(final, AIMessage) and not final.tool_calls and not final.invalid_tool_calls
    return calls


def test_react_agent_runs_to_completion(llm: ChatGemmaLocal) -> None:
    """tool_choice auto: the model may call the tool or answer; either way the loop ends."""
    ran: list[tuple[str, int]] = []
    tool_ = weather_tool(ran)
    check_agent_run(run_agent(llm, tool_), ran)


def test_react_agent_runs_the_tool_and_finishes(llm: ChatGemmaLocal) -> None:
    """The first step must call (required); later steps are auto. The tool really runs."""
    ran: list[tuple[str, int]] = []
    tool_ = weather_tool(ran)

    def model(state: dict[str, Any], runtime: Any) -> Any:
        answered = any(isinstance(m, ToolMessage) for m in state["messages"])
        return llm.bind_tools([tool_], tool_choice="auto" if answered else "required")

    calls = check_agent_run(run_agent(model, tool_), ran)
    assert calls and ran
