"""ChatGemmaLocal on Gemma 4: reasoning, tools, structured output, agents, cut-off calls.

Two tiers. The fast one scripts core's :class:`~core.Delta` stream (nothing
loads) and checks how deltas become LangChain messages: reasoning in
``additional_kwargs["reasoning_content"]`` and ``content_blocks``, reasoning
chunks before the answer, ``output_token_details["reasoning"]``, a tool call
cut off by ``max_tokens`` as an ``invalid_tool_calls`` entry. The real one
runs the tiny random-weight Gemma 4 checkpoint (``gemma4_text``) on both
backends through the real loading code, with greedy decoding; ``logit_bias``
steers the random model where a test needs a given shape (opening or closing
the thinking channel, closing strings, ending the turn), never the values
the tests check, which come from the grammar.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import jsonschema
import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import BaseTool, tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, Field, ValidationError

from core import BaseGemmaChatCompletion, Delta, SamplingParams
from core.constrained import ToolCall
from langchain_gemma_local import ChatGemmaLocal, convert_messages_to_dicts

# Token ids of the tiny Gemma 4 tokenizer (core/tiny.py: the control tokens sit at
# their real ids): '"' closes a JSON string, <|"|> a call's string, <turn|> ends
# the reply, <|channel> / <channel|> open and close the thinking channel.
QUOTE, STRING_DELIM, TURN_END, CHANNEL_START, CHANNEL_END = 9, 52, 106, 100, 101
#: Tokens a closed-at-once thought takes: <|channel>, "thought" (6 tokens in the
#: tiny vocabulary), "\n", <channel|>.
EMPTY_THOUGHT_TOKENS = 9
#: A "terse model": strings close and the reply ends wherever the grammar allows.
TERSE = {QUOTE: 100, STRING_DELIM: 100, TURN_END: 100}
#: Thinking opened and closed at once, then calls with their strings closed at once
#: (no '"' bias: a thought may hold '"', which would then tie with <channel|>).
THOUGHT_THEN_CALL = {CHANNEL_START: 100, CHANNEL_END: 100, STRING_DELIM: 100, TURN_END: 100}
ASK = "What is the weather in Paris?"
BACKENDS = ("transformers", "mlx")
CONTROL = re.compile(r"<\|?[a-z_\"]+\|?>")


# ------------------------------------------------ fast tier: scripted deltas


class ScriptedGemma4(BaseGemmaChatCompletion):
    """A core client named like a Gemma 4 model whose deltas are scripted (nothing loads)."""

    implementation = "scripted"
    supports_constraints = True

    def __init__(self, script: list[Delta], model_name: str = "scripted/gemma-4-E2B-it") -> None:
        super().__init__(model_name)
        self.script = script
        self.params: list[SamplingParams] = []

    def load(self) -> ScriptedGemma4:
        self._loaded = True
        return self

    def stream_deltas(
        self, conversations: Sequence[Any], params: SamplingParams
    ) -> Iterator[Delta]:
        self._check_constraints(params)
        self.params.append(params)
        self.load()
        yield from self.script

    async def astream_deltas(  # type: ignore[override]
        self, conversations: Sequence[Any], params: SamplingParams
    ) -> AsyncIterator[Delta]:
        self._check_constraints(params)
        self.params.append(params)
        self.load()
        for delta in self.script:
            yield delta


THOUGHT = ["The user", " greets me", "; answer kindly."]
ANSWER = ["Hello", " there", "!"]
#: A thought in three pieces, then the answer; the boundary falls inside one delta.
THINKING = [
    Delta(0, "", reasoning=THOUGHT[0], reasoning_tokens=3),
    Delta(0, "", reasoning=THOUGHT[1], reasoning_tokens=5),
    Delta(0, ANSWER[0], reasoning=THOUGHT[2], reasoning_tokens=9),
    Delta(0, ANSWER[1], reasoning_tokens=9),
    Delta(0, ANSWER[2], "stop", 12, 14, reasoning_tokens=9),
]


class Tokens(BaseCallbackHandler):
    def __init__(self) -> None:
        self.chunks: list[Any] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.chunks.append(kwargs["chunk"])


def check_reasoning_message(message: AIMessage) -> None:
    assert message.content == "".join(ANSWER)
    assert message.additional_kwargs == {"reasoning_content": "".join(THOUGHT)}
    assert message.content_blocks == [
        {"type": "reasoning", "reasoning": "".join(THOUGHT)},
        {"type": "text", "text": "".join(ANSWER)},
    ]
    assert message.usage_metadata == {
        "input_tokens": 12,
        "output_tokens": 14,
        "total_tokens": 26,
        "output_token_details": {"reasoning": 9},
    }


def test_reasoning_field_and_per_call_option_map_to_thinking() -> None:
    fake = ScriptedGemma4(THINKING)
    assert ChatGemmaLocal(client=fake).reasoning is None
    ChatGemmaLocal(client=fake).invoke("hi")
    ChatGemmaLocal(client=fake, reasoning=True).invoke("hi")
    ChatGemmaLocal(client=fake, reasoning=True).invoke("hi", reasoning=False)
    ChatGemmaLocal(client=fake, reasoning=False).bind(reasoning=True).invoke("hi")
    ChatGemmaLocal(client=fake, reasoning=False).invoke("hi", reasoning=None)  # None: the field
    assert [p.thinking for p in fake.params] == [None, True, False, True, False]


def test_reasoning_goes_to_additional_kwargs_and_content_blocks() -> None:
    message = ChatGemmaLocal(client=ScriptedGemma4(THINKING), reasoning=True).invoke("hi")
    check_reasoning_message(message)


def test_streamed_reasoning_comes_first_and_adds_up_to_invoke() -> None:
    model = ChatGemmaLocal(client=ScriptedGemma4(THINKING), reasoning=True)
    chunks = list(model.stream("hi"))
    assert [c.additional_kwargs.get("reasoning_content") for c in chunks] == [
        *THOUGHT,
        None,
        None,
    ]
    assert [c.content for c in chunks] == ["", "", *ANSWER]
    assert chunks[0].content_blocks == [{"type": "reasoning", "reasoning": THOUGHT[0]}]
    assert [c.usage_metadata is not None for c in chunks] == [False] * 4 + [True]
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    assert isinstance(total, AIMessageChunk)
    check_reasoning_message(total)


async def test_async_and_callback_paths_give_the_same_message() -> None:
    model = ChatGemmaLocal(client=ScriptedGemma4(THINKING), reasoning=True)
    check_reasoning_message(await model.ainvoke("hi"))
    listener = Tokens()
    check_reasoning_message(model.invoke("hi", config={"callbacks": [listener]}))
    assert [c.message.additional_kwargs.get("reasoning_content") for c in listener.chunks][
        :3
    ] == THOUGHT
    check_reasoning_message(await model.ainvoke("hi", config={"callbacks": [Tokens()]}))
    total = None
    async for chunk in model.astream("hi"):
        total = chunk if total is None else total + chunk
    assert isinstance(total, AIMessageChunk)
    check_reasoning_message(total)


def test_no_reasoning_no_reasoning_fields() -> None:
    script = [Delta(0, "Hi"), Delta(0, "", "stop", 3, 1)]
    message = ChatGemmaLocal(client=ScriptedGemma4(script), reasoning=False).invoke("hi")
    assert message.additional_kwargs == {}
    assert message.content_blocks == [{"type": "text", "text": "Hi"}]
    assert message.usage_metadata is not None
    assert "output_token_details" not in message.usage_metadata


def test_reasoning_must_be_a_bool() -> None:
    fake = ScriptedGemma4(THINKING)
    with pytest.raises(ValidationError, match="reasoning"):
        ChatGemmaLocal(client=fake, reasoning="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="reasoning must be True, False or None, got 'yes'"):
        ChatGemmaLocal(client=fake).invoke("hi", reasoning="yes")
    assert fake.params == []


CANNOT_THINK = r"reasoning=True needs a model that can think \(Gemma 4\); .* is a gemma3 model"


def test_reasoning_on_gemma3_fails_before_any_load(gemma3_path: Path) -> None:
    with pytest.raises(ValueError, match=CANNOT_THINK):
        ChatGemmaLocal(model=str(gemma3_path), backend="transformers", reasoning=True)
    # client_kwargs of its own: a shared client no other test (in this process) has loaded
    model = ChatGemmaLocal(
        model=str(gemma3_path),
        backend="transformers",
        temperature=0,
        client_kwargs={"max_queue": 255},
    )
    for call in (
        lambda: model.invoke("hi", reasoning=True),
        lambda: list(model.stream("hi", reasoning=True)),
        lambda: model.bind(reasoning=True).batch(["a", "b"]),
        lambda: model.bind_tools([get_weather]).invoke("hi", reasoning=True),
    ):
        with pytest.raises(ValueError, match=CANNOT_THINK):
            call()
    assert model.client is not None and not model.client.is_loaded
    assert ChatGemmaLocal(model=str(gemma3_path), backend="transformers", reasoning=False)


async def test_reasoning_on_gemma3_fails_before_any_load_async(gemma3_path: Path) -> None:
    model = ChatGemmaLocal(model=str(gemma3_path), backend="mlx", client_kwargs={"max_queue": 255})
    with pytest.raises(ValueError, match=CANNOT_THINK):
        await model.ainvoke("hi", reasoning=True)
    with pytest.raises(ValueError, match=CANNOT_THINK):
        [c async for c in model.astream("hi", reasoning=True)]
    assert model.client is not None and not model.client.is_loaded


# ------------------------------------------------ fast tier: a call cut off by max_tokens


@tool
def get_weather(city: str) -> str:
    """Current weather of a city."""
    return f"Sunny in {city}."


@tool
def get_time(zone: str) -> str:
    """Current time in a time zone."""
    return f"Noon in {zone}."


def cut_script(partial: str, limit: int = 6) -> list[Delta]:
    return [Delta(0, ""), Delta(0, "", "length", 20, limit, partial_call=partial)]


def cut_error(limit: int = 6, used: int = 6) -> str:
    return (
        f"the reply was cut off by max_tokens={limit} after {used} tokens before the tool "
        "call was complete; raise max_tokens"
    )


@pytest.mark.parametrize(
    ("tools", "choice", "partial", "name"),
    [
        pytest.param([get_weather, get_time], "get_time", "call:get_ti", "get_time", id="named"),
        pytest.param([get_weather], "required", "", "get_weather", id="only-tool"),
        pytest.param(
            [get_weather, get_time],
            "required",
            'call:get_time{zone:<|"|>Eur',
            "get_time",
            id="gemma4-text",
        ),
        pytest.param(
            [get_weather, get_time],
            "any",
            '{"name": "get_time", "parameters": {"zo',
            "get_time",
            id="gemma3-text",
        ),
        pytest.param([get_weather, get_time], "required", "call:get_", None, id="unknown"),
        pytest.param([get_weather, get_time], "required", "call:nope{", None, id="not-a-tool"),
    ],
)
def test_cut_off_call_is_an_invalid_tool_call(
    tools: list[BaseTool], choice: str, partial: str, name: str | None
) -> None:
    model = ChatGemmaLocal(client=ScriptedGemma4(cut_script(partial)), max_tokens=6)
    message = model.bind_tools(tools, tool_choice=choice).invoke("hi")
    assert message.tool_calls == [] and message.content == ""
    assert message.response_metadata["finish_reason"] == "length"
    assert message.invalid_tool_calls == [
        {
            "type": "invalid_tool_call",
            "id": None,
            "name": name,
            "args": partial or None,
            "error": cut_error(),
        }
    ]


def test_cut_off_call_in_every_path() -> None:
    partial = 'call:get_time{zone:<|"|>Eur'
    model = ChatGemmaLocal(client=ScriptedGemma4(cut_script(partial, 4)), max_tokens=9)
    bound = model.bind_tools([get_weather, get_time], tool_choice="required")
    expected = [
        {
            "type": "invalid_tool_call",
            "id": None,
            "name": "get_time",
            "args": partial,
            "error": cut_error(9, 4),
        }
    ]
    assert bound.invoke("hi").invalid_tool_calls == expected
    assert bound.invoke("hi", config={"callbacks": [Tokens()]}).invalid_tool_calls == expected
    chunks = list(bound.stream("hi"))
    assert chunks[-1].invalid_tool_calls == expected
    assert chunks[-1].tool_call_chunks == []  # partial text never parses into a "whole" call
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    assert isinstance(total, AIMessageChunk) and total.tool_calls == []


async def test_cut_off_call_async() -> None:
    model = ChatGemmaLocal(client=ScriptedGemma4(cut_script("call:get_w", 5)), max_tokens=5)
    bound = model.bind_tools([get_weather, get_time], tool_choice="required")
    expected = [
        {
            "type": "invalid_tool_call",
            "id": None,
            "name": None,
            "args": "call:get_w",
            "error": cut_error(5, 5),
        }
    ]
    assert (await bound.ainvoke("hi")).invalid_tool_calls == expected
    assert (await bound.ainvoke("hi", config={"callbacks": [Tokens()]})).invalid_tool_calls == (
        expected
    )
    chunks = [c async for c in bound.astream("hi")]
    assert chunks[-1].invalid_tool_calls == expected


def test_complete_calls_before_a_cut_one_are_kept() -> None:
    whole = ToolCall(0, "call_000000000000000000000000", "get_weather", '{"city": "Rome"}')
    script = [
        Delta(0, "", tool_calls=(whole,)),
        Delta(0, "", "length", 20, 8, partial_call="call:get_time{"),
    ]
    model = ChatGemmaLocal(client=ScriptedGemma4(script), max_tokens=8)
    bound = model.bind_tools([get_weather, get_time], tool_choice="required")
    for message in (bound.invoke("hi"), bound.invoke("hi", config={"callbacks": [Tokens()]})):
        assert [(c["name"], c["args"]) for c in message.tool_calls] == [
            ("get_weather", {"city": "Rome"})
        ]
        assert [(c["name"], c["args"]) for c in message.invalid_tool_calls] == [
            ("get_time", "call:get_time{")
        ]
    chunks = list(bound.stream("hi"))
    assert [c["name"] for c in chunks[0].tool_call_chunks] == ["get_weather"]
    assert [c["name"] for c in chunks[-1].invalid_tool_calls] == ["get_time"]


def test_a_reply_cut_in_prose_has_no_invalid_call() -> None:
    script = [Delta(0, "Some"), Delta(0, " text", "length", 5, 2)]
    message = ChatGemmaLocal(client=ScriptedGemma4(script)).bind_tools([get_weather]).invoke("hi")
    assert message.invalid_tool_calls == [] and message.content == "Some text"


# ------------------------------------------------ real tiny Gemma 4, both backends


@pytest.fixture(scope="module")
def gemma4_clients(gemma4_path: Path) -> Iterator[dict[str, BaseGemmaChatCompletion]]:
    from core import GemmaMLXChatCompletion, GemmaTransformersChatCompletion

    clients: dict[str, BaseGemmaChatCompletion] = {
        "transformers": GemmaTransformersChatCompletion(
            str(gemma4_path), device_map="cpu", torch_dtype="float32"
        ),
        "mlx": GemmaMLXChatCompletion(str(gemma4_path)),
    }
    yield clients
    for client in clients.values():
        client.close()


@pytest.fixture(params=BACKENDS)
def g4(request: pytest.FixtureRequest, gemma4_clients: dict[str, Any]) -> BaseGemmaChatCompletion:
    client: BaseGemmaChatCompletion = gemma4_clients[request.param]
    return client


def llm(client: BaseGemmaChatCompletion, **options: Any) -> ChatGemmaLocal:
    return ChatGemmaLocal(client=client, temperature=0, **{"max_tokens": 64, **options})


def no_control_tokens(*texts: Any) -> None:
    for text in texts:
        assert isinstance(text, str) and not CONTROL.search(text), text


def test_real_thought_cut_off_by_max_tokens(g4: BaseGemmaChatCompletion) -> None:
    """Thinking opened (the bias), never closed: all 12 tokens are reasoning."""
    model = llm(g4, max_tokens=12, reasoning=True, logit_bias={CHANNEL_START: 100})
    json_mode = {"type": "json_object"}  # its grammar lets the channel open only first
    message = model.invoke(ASK, response_format=json_mode)
    reasoning = message.additional_kwargs["reasoning_content"]
    assert reasoning and message.content == ""
    no_control_tokens(reasoning)
    assert message.content_blocks == [{"type": "reasoning", "reasoning": reasoning}]
    assert message.usage_metadata is not None
    assert message.usage_metadata["output_tokens"] == 12
    assert message.usage_metadata.get("output_token_details") == {"reasoning": 12}
    chunks = list(model.stream(ASK, response_format=json_mode))
    assert "".join(c.additional_kwargs.get("reasoning_content", "") for c in chunks) == reasoning
    assert all(c.content == "" for c in chunks)
    direct = g4.create(
        [{"role": "user", "content": ASK}],
        temperature=0,
        max_tokens=12,
        thinking=True,
        response_format=json_mode,
        logit_bias={CHANNEL_START: 100},
    )
    assert direct["choices"][0]["message"]["reasoning_content"] == reasoning


async def test_real_thought_then_a_call(g4: BaseGemmaChatCompletion) -> None:
    """A thought closed at once (the bias), then the forced call: reasoning tokens counted,
    no control token anywhere, the call whole; the same in every path."""
    bias = THOUGHT_THEN_CALL
    bound = llm(g4, reasoning=True, logit_bias=bias).bind_tools([get_weather], tool_choice="any")
    message = bound.invoke(ASK)
    [call] = message.tool_calls
    assert call["name"] == "get_weather" and set(call["args"]) == {"city"}
    assert message.content == "" and "reasoning_content" not in message.additional_kwargs
    assert message.usage_metadata is not None
    details = message.usage_metadata.get("output_token_details")
    assert details == {"reasoning": EMPTY_THOUGHT_TOKENS}
    again = await bound.ainvoke(ASK)
    assert [(c["name"], c["args"]) for c in again.tool_calls] == [(call["name"], call["args"])]
    assert again.usage_metadata == message.usage_metadata
    plain = llm(g4, logit_bias=TERSE).bind_tools([get_weather], tool_choice="any").invoke(ASK)
    assert plain.usage_metadata is not None and "output_token_details" not in plain.usage_metadata


def test_real_reasoning_off_by_default(g4: BaseGemmaChatCompletion) -> None:
    message = llm(g4, max_tokens=8).invoke(ASK)
    assert "reasoning_content" not in message.additional_kwargs
    no_control_tokens(message.content)
    assert message.usage_metadata is not None
    assert "output_token_details" not in message.usage_metadata


# ------------------------------------------------ real: tools, structured output, agents


class Forecast(BaseModel):
    """A weather forecast."""

    city: Literal["Paris", "Rome", "Oslo"]
    days: Annotated[int, Field(ge=1, le=7)]
    sunny: bool


def schema_of(tool_: Any) -> dict[str, Any]:
    return convert_to_openai_tool(tool_)["function"]["parameters"]


@pytest.mark.parametrize(
    ("choice", "names"),
    [
        ("required", None),
        ("any", None),
        ("Forecast", ["Forecast"]),
        ({"type": "function", "function": {"name": "get_time"}}, ["get_time"]),
    ],
)
def test_real_forced_calls_are_valid(g4: BaseGemmaChatCompletion, choice: Any, names: Any) -> None:
    tools = [get_weather, get_time, Forecast]
    schemas = {convert_to_openai_tool(t)["function"]["name"]: schema_of(t) for t in tools}
    message = llm(g4, logit_bias=TERSE).bind_tools(tools, tool_choice=choice).invoke(ASK)
    assert message.tool_calls and message.invalid_tool_calls == []
    for call in message.tool_calls:
        jsonschema.validate(call["args"], schemas[call["name"]])
        assert call["id"] and call["id"].startswith("call_")
    if names is not None:
        assert [c["name"] for c in message.tool_calls] == names
    assert message.response_metadata["finish_reason"] == "tool_calls"


def test_real_tool_choice_none_and_auto(g4: BaseGemmaChatCompletion) -> None:
    model = llm(g4, max_tokens=8)
    none = model.bind_tools([get_weather], tool_choice="none").invoke(ASK)
    plain = model.invoke(ASK)
    assert none.tool_calls == [] and none.content == plain.content
    assert none.usage_metadata == plain.usage_metadata  # the prompt declares no tools
    auto = model.bind_tools([get_weather, Forecast]).invoke(ASK)
    assert auto.invalid_tool_calls == [] or auto.response_metadata["finish_reason"] == "length"
    no_control_tokens(auto.content)


def test_real_streamed_calls_add_up_to_invoke(g4: BaseGemmaChatCompletion) -> None:
    bound = llm(g4, logit_bias=TERSE).bind_tools([get_weather, Forecast], tool_choice="required")
    message = bound.invoke(ASK)
    total = None
    for chunk in bound.stream(ASK):
        total = chunk if total is None else total + chunk
    assert isinstance(total, AIMessageChunk)
    assert [(c["name"], c["args"]) for c in total.tool_calls] == [
        (c["name"], c["args"]) for c in message.tool_calls
    ]
    assert total.usage_metadata == message.usage_metadata


def test_real_tool_message_round_trip(g4: BaseGemmaChatCompletion) -> None:
    bound = llm(g4, logit_bias=TERSE).bind_tools([get_weather], tool_choice="required")
    first = bound.invoke(ASK)
    [call] = first.tool_calls
    result = ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])
    second = (
        llm(g4, max_tokens=6).bind_tools([get_weather]).invoke([HumanMessage(ASK), first, result])
    )
    assert second.response_metadata["finish_reason"] in ("stop", "length", "tool_calls")
    no_control_tokens(second.content)
    prompt = g4.format_prompt(convert_messages_to_dicts([HumanMessage(ASK), first, result]))
    assert f'<|tool_call>call:get_weather{{city:<|"|>{call["args"]["city"]}<|"|>}}<tool_call|>' in (
        prompt.text
    )
    assert "<|tool_response>response:get_weather{" in prompt.text


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
async def test_real_structured_output(g4: BaseGemmaChatCompletion, method: str) -> None:
    runnable = llm(g4, logit_bias=TERSE).with_structured_output(Forecast, method=method)
    forecast = runnable.invoke("Forecast for Rome?")
    assert isinstance(forecast, Forecast)
    assert await runnable.ainvoke("Forecast for Rome?") == forecast
    streamed = list(runnable.stream("Forecast for Rome?"))
    assert streamed[-1] == forecast
    raw = llm(g4, logit_bias=TERSE).with_structured_output(
        Forecast.model_json_schema(), method=method, include_raw=True
    )
    out = raw.invoke("Forecast for Rome?")
    assert out["parsing_error"] is None and out["parsed"] == forecast.model_dump()


def test_real_json_mode(g4: BaseGemmaChatCompletion) -> None:
    out = llm(g4, logit_bias=TERSE).with_structured_output(method="json_mode").invoke(ASK)
    assert isinstance(out, dict)


def test_real_cut_off_forced_call(g4: BaseGemmaChatCompletion) -> None:
    bound = llm(g4, max_tokens=8).bind_tools([get_weather, get_time], tool_choice="get_time")
    message = bound.invoke(ASK)
    assert message.tool_calls == [] and message.content == ""
    [bad] = message.invalid_tool_calls
    assert bad["name"] == "get_time" and bad["error"] == cut_error(8, 8)
    head = 'call:get_time{zone:<|"|>'  # what the grammar makes the call start with
    partial = bad["args"]
    assert partial and (head.startswith(partial) or partial.startswith(head)), partial
    assert list(bound.stream(ASK))[-1].invalid_tool_calls == [bad]
    with pytest.raises(OutputParserException, match="cut off after 8 tokens"):
        llm(g4, max_tokens=8).with_structured_output(Forecast, method="function_calling").invoke(
            ASK
        )


async def test_real_cut_off_forced_call_async(g4: BaseGemmaChatCompletion) -> None:
    bound = llm(g4, max_tokens=3).bind_tools([get_weather, get_time], tool_choice="required")
    message = await bound.ainvoke(ASK)
    [bad] = message.invalid_tool_calls
    assert bad["error"] == cut_error(3, 3) and message.tool_calls == []
    chunks = [c async for c in bound.astream(ASK)]
    assert chunks[-1].invalid_tool_calls == [bad]


def weather_tool(ran: list[tuple[str, int]]) -> BaseTool:
    @tool
    def get_forecast(
        city: Literal["Paris", "Rome", "Oslo"], days: Annotated[int, Field(ge=1, le=7)]
    ) -> str:
        """Weather of a city for the next days."""
        ran.append((city, days))
        return f"Sunny in {city} for {days} days."

    return get_forecast


def test_real_agent_runs_the_tool_and_finishes(g4: BaseGemmaChatCompletion) -> None:
    """LangGraph's prebuilt ReAct agent (deprecated for ``langchain.agents.create_agent``,
    tested below; still what LangGraph users call): the first step must call, later
    steps may; the tool really runs and the loop ends with a reply without calls."""
    ran: list[tuple[str, int]] = []
    tool_ = weather_tool(ran)
    model = llm(g4, logit_bias=TERSE)

    def pick(state: dict[str, Any], runtime: Any) -> Any:
        answered = any(isinstance(m, ToolMessage) for m in state["messages"])
        return model.bind_tools([tool_], tool_choice="auto" if answered else "required")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # moved to langchain.agents
        from langgraph.prebuilt import create_react_agent

        agent = create_react_agent(pick, [tool_])
    out = agent.invoke(
        {"messages": [("user", "What is the weather in Paris for three days?")]},
        {"recursion_limit": 8},
    )
    check_agent_run(list(out["messages"]), ran)


def check_agent_run(messages: list[Any], ran: list[tuple[str, int]]) -> None:
    """The calls the agent's model made are the ones the tool ran, each answered by its
    ToolMessage, and the run ends with a reply that calls nothing."""
    calls = [c for m in messages if isinstance(m, AIMessage) for c in m.tool_calls]
    assert calls and ran == [(c["args"]["city"], c["args"]["days"]) for c in calls]
    results = [m for m in messages if isinstance(m, ToolMessage)]
    assert [m.tool_call_id for m in results] == [c["id"] for c in calls]
    assert all(m.content.startswith("Sunny in ") for m in results)
    final = messages[-1]
    assert isinstance(final, AIMessage) and not final.tool_calls and not final.invalid_tool_calls
    no_control_tokens(final.content)


async def test_real_create_agent_runs_the_tool_and_finishes(g4: BaseGemmaChatCompletion) -> None:
    """``langchain.agents.create_agent`` (LangChain 1.x) with ChatGemmaLocal and a real tool,
    sync and async. A random model calls only when made to: a ``wrap_model_call``
    middleware asks for a call (``tool_choice="required"``) until a tool result is in the
    history, then leaves the choice to the model ("auto"); the terse bias ends that
    reply. The tool really runs and the graph ends on its own."""
    from langchain.agents import create_agent
    from langchain.agents.middleware import ModelRequest, wrap_model_call

    ran: list[tuple[str, int]] = []
    tool_ = weather_tool(ran)
    choices: list[str] = []

    def choose(request: ModelRequest) -> ModelRequest:
        answered = any(isinstance(m, ToolMessage) for m in request.messages)
        choices.append("auto" if answered else "required")
        return request.override(tool_choice=choices[-1])

    @wrap_model_call
    def call_first(request: ModelRequest, handler: Any) -> Any:
        return handler(choose(request))

    @wrap_model_call
    async def acall_first(request: ModelRequest, handler: Any) -> Any:
        return await handler(choose(request))

    ask = {"messages": [("user", "What is the weather in Paris for three days?")]}
    config: Any = {"recursion_limit": 8}
    model = llm(g4, logit_bias=TERSE)
    agent = create_agent(model, [tool_], middleware=[call_first])
    check_agent_run(list(agent.invoke(ask, config)["messages"]), ran)
    assert choices == ["required", "auto"]
    sync_calls = list(ran)

    ran.clear()
    choices.clear()
    aagent = create_agent(model, [tool_], middleware=[acall_first])
    check_agent_run(list((await aagent.ainvoke(ask, config))["messages"]), ran)
    assert choices == ["required", "auto"] and ran == sync_calls  # greedy: the same run


def test_a_cut_off_call_is_left_out_of_the_history() -> None:
    """An agent loop sends the cut-off reply back: its complete calls go on, the cut-off
    one (never finished by the model) is left out; any other invalid call still fails."""
    whole = {"name": "get_weather", "args": {"city": "Rome"}, "id": "call_1", "type": "tool_call"}
    cut = {"type": "invalid_tool_call", "id": None, "name": "get_time", "args": "call:get_t"}
    reply = AIMessage("", tool_calls=[whole], invalid_tool_calls=[{**cut, "error": cut_error()}])
    assert convert_messages_to_dicts([reply]) == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                }
            ],
        }
    ]
    only_cut = AIMessage("", invalid_tool_calls=[{**cut, "error": cut_error()}])
    assert convert_messages_to_dicts([only_cut]) == [{"role": "assistant", "content": ""}]
    other = AIMessage("", invalid_tool_calls=[{**cut, "error": "bad JSON"}])
    with pytest.raises(ValueError, match="carries an invalid tool call"):
        convert_messages_to_dicts([other])


@pytest.mark.parametrize(
    "checkpoint", ["gemma4_moe_path", "gemma4_vision_path", "gemma4_unified_path"]
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_other_gemma4_checkpoints_think_and_call_tools(
    request: pytest.FixtureRequest, checkpoint: str, backend: str
) -> None:
    """The MoE checkpoint and the multimodal ``gemma4`` and ``gemma4_unified`` ones used
    for text: a thought, then a forced call, and structured output, through the same
    adapter."""
    from core import GemmaMLXChatCompletion, GemmaTransformersChatCompletion

    path = str(request.getfixturevalue(checkpoint))
    client: BaseGemmaChatCompletion = (
        GemmaTransformersChatCompletion(path, device_map="cpu", torch_dtype="float32")
        if backend == "transformers"
        else GemmaMLXChatCompletion(path)
    )
    with client:
        model = llm(client, reasoning=True, logit_bias=THOUGHT_THEN_CALL)
        bound = model.bind_tools([Forecast], tool_choice="any")
        message = bound.invoke(ASK)
        [call] = message.tool_calls
        jsonschema.validate(call["args"], schema_of(Forecast))
        assert "reasoning_content" not in message.additional_kwargs  # closed at once
        usage = message.usage_metadata
        assert usage is not None
        # the grammar lets a model spell the "thought" label in more tokens than 6
        assert (
            3 <= usage.get("output_token_details", {}).get("reasoning", 0) < usage["output_tokens"]
        )
        structured = llm(client, logit_bias=TERSE).with_structured_output(Forecast)
        assert isinstance(structured.invoke("Forecast for Oslo?"), Forecast)
