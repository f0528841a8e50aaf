"""``GemmaLocal`` as a ``FunctionCallingLLM``, on both backends (tiny random-weight Gemma 3).

A random model follows no prompt, so every guarantee comes from core's
grammar: under greedy decoding and seeded sampling, every call in a response
parses, names one of the tools given and carries arguments that validate
(``jsonschema``) against that tool's schema; ``tool_required`` / a named
``tool_choice`` force calls, ``"none"`` gives none, and
``allow_parallel_tool_calls=False`` allows one. The tools are LlamaIndex
``FunctionTool``s over Python functions that record their calls, so a test can
also check that a tool really ran, with the arguments the model chose.

Agents (``FunctionAgent``, ``ReActAgent``) run to completion; see the agent
section for what each test can and cannot promise with a random model.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from llama_index.core.agent.workflow import (
    AgentOutput,
    FunctionAgent,
    ReActAgent,
    ToolCallResult,
)
from llama_index.core.base.llms.types import ToolCallBlock
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.llms import ChatMessage
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.tools import FunctionTool
from pydantic import BaseModel, Field
from test_llama_index_support import (
    Recorder,
    ScriptedGemma,
    Tools,
    check_args,
    check_call_response,
    check_selections,
    is_gemma_prompt,
)

from llama_index_gemma_local import GemmaLocal, to_openai_messages

# llama-index's workflow agents inspect themselves (pydantic models) and use a
# deprecated call of their own: not ours to fix
pytestmark = [
    pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince20"),
    pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince211"),
    pytest.mark.filterwarnings("ignore:is_running called from within a step"),
]

ASK = "What is the weather in Paris for three days?"
MAX = 200
SAMPLING = [
    pytest.param({"temperature": 0}, id="greedy"),
    pytest.param({"temperature": 1.0, "seed": 0}, id="seed0"),
    pytest.param({"temperature": 1.0, "seed": 1}, id="seed1"),
]


@pytest.fixture
def tools() -> Tools:
    return Tools()


@pytest.fixture
def llm(client) -> GemmaLocal:
    return GemmaLocal(client=client, temperature=0, max_tokens=MAX)


def newline_bias(client) -> dict[int, float]:
    """Push the model to start another call whenever the grammar allows one."""
    ids = client.load().tokenizer.convert_tokens_to_ids(["\n", "<0x0A>"])
    return {i: 100.0 for i in ids if i is not None}


# ------------------------------------------------------------- chat_with_tools


def test_metadata_says_function_calling(llm: GemmaLocal) -> None:
    assert llm.metadata.is_function_calling_model is True


@pytest.mark.parametrize("sampling", SAMPLING)
def test_required_calls_name_real_tools_and_validate(client, tools: Tools, sampling) -> None:
    llm = GemmaLocal(client=client, max_tokens=MAX, **sampling)
    given = tools.all()
    # (OpenAI's strict is accepted: arguments are always decoded under the schema)
    response = llm.chat_with_tools(given, user_msg=ASK, tool_required=True, strict=True)
    selections = check_call_response(response, given)
    assert len(selections) == 1  # allow_parallel_tool_calls defaults to False: one call
    assert response.additional_kwargs["finish_reason"] == "tool_calls"
    assert llm.get_tool_calls_from_response(response) == selections


@pytest.mark.parametrize("choice", ["multiply", {"type": "function", "function": {"name": "ping"}}])
@pytest.mark.parametrize("sampling", SAMPLING[:2])
def test_named_tool_choice_makes_that_call(client, tools: Tools, choice, sampling) -> None:
    llm = GemmaLocal(client=client, max_tokens=MAX, **sampling)
    given = tools.all()
    response = llm.chat_with_tools(given, user_msg=ASK, tool_choice=choice)
    [selection] = check_call_response(response, given)
    name = choice if isinstance(choice, str) else choice["function"]["name"]
    assert selection.tool_name == name


@pytest.mark.parametrize("sampling", SAMPLING)
def test_nested_arguments_validate(client, tools: Tools, sampling) -> None:
    """An object inside the arguments, an array of enums, a boolean: all per the schema."""
    llm = GemmaLocal(client=client, max_tokens=MAX, **sampling)
    given = [tools.alarm_tool()]
    response = llm.chat_with_tools(given, user_msg="Wake me at seven.", tool_required=True)
    [selection] = check_call_response(response, given)
    assert set(selection.tool_kwargs) == {"time", "days", "loud"}
    assert set(selection.tool_kwargs["time"]) == {"hour", "minute"}


@pytest.mark.parametrize("sampling", SAMPLING)
def test_auto_gives_prose_or_valid_calls(client, tools: Tools, sampling) -> None:
    llm = GemmaLocal(client=client, max_tokens=64, **sampling)
    given = tools.all()
    response = llm.chat_with_tools(given, user_msg=ASK, allow_parallel_tool_calls=True)
    selections = check_call_response(response, given)
    if not selections:
        assert not (response.message.content or "").startswith("{")
        assert response.additional_kwargs["finish_reason"] in ("stop", "length")
        assert llm.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []


def test_auto_forced_into_a_call_by_its_first_character(llm: GemmaLocal, client, tools) -> None:
    brace = client.load().tokenizer.convert_tokens_to_ids("{")
    given = tools.all()
    response = llm.chat_with_tools(given, user_msg=ASK, logit_bias={brace: 100})
    assert check_call_response(response, given)


def test_tool_choice_none_makes_no_call(llm: GemmaLocal, tools: Tools, client) -> None:
    response = llm.chat_with_tools(tools.all(), user_msg=ASK, tool_choice="none", max_tokens=12)
    assert not [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
    assert "tool_calls" not in response.message.additional_kwargs
    assert response.additional_kwargs["finish_reason"] in ("stop", "length")
    # "none" describes no tools: the prompt is the plain conversation's
    plain = client.create([{"role": "user", "content": ASK}], temperature=0, max_tokens=12)
    assert response.raw["usage"] == plain["usage"]
    assert response.message.content == plain["choices"][0]["message"]["content"]
    assert llm.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []
    with pytest.raises(ValueError, match=r"Expected at least one tool call.*tool_required=True"):
        llm.get_tool_calls_from_response(response)


def test_parallel_calls_flag(llm: GemmaLocal, client, tools: Tools) -> None:
    given = tools.all()
    bias = newline_bias(client)
    many = llm.chat_with_tools(
        given, user_msg=ASK, tool_required=True, allow_parallel_tool_calls=True, logit_bias=bias
    )
    assert len(check_call_response(many, given)) >= 2
    one = llm.chat_with_tools(
        given, user_msg=ASK, tool_required=True, allow_parallel_tool_calls=False, logit_bias=bias
    )
    assert len(check_call_response(one, given)) == 1
    assert one.additional_kwargs["finish_reason"] == "tool_calls"


def test_chat_accepts_tools_directly(llm: GemmaLocal, tools: Tools, client) -> None:
    """``chat(messages, tools=...)`` takes LlamaIndex tools or OpenAI dicts; same request."""
    given = tools.all()
    messages = [ChatMessage(role="user", content=ASK)]
    options = {"tool_choice": "required", "temperature": 1.0, "seed": 4}
    response = llm.chat(messages, tools=given, **options)
    openai_tools = [t.metadata.to_openai_tool() for t in given]
    direct = client.create(
        [{"role": "user", "content": ASK}], tools=openai_tools, max_tokens=MAX, **options
    )
    assert _strip(response.message.additional_kwargs["tool_calls"]) == _strip(
        direct["choices"][0]["message"]["tool_calls"]
    )
    assert llm.chat(messages, tools=openai_tools, **options).raw["usage"] == direct["usage"]


def _strip(calls: list[dict]) -> list[tuple[str, str]]:
    return [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


def _names_and_args(selections) -> list[tuple[str, dict]]:
    return [(s.tool_name, s.tool_kwargs) for s in selections]


async def test_async_equals_sync(client, tools: Tools) -> None:
    llm = GemmaLocal(client=client, temperature=1.0, seed=5, max_tokens=MAX)
    given = tools.all()
    sync = llm.chat_with_tools(given, user_msg=ASK, tool_required=True)
    response = await llm.achat_with_tools(given, user_msg=ASK, tool_required=True)
    assert _names_and_args(check_call_response(response, given)) == _names_and_args(
        llm.get_tool_calls_from_response(sync)
    )


@pytest.mark.parametrize("parallel", [False, True])
def test_streamed_calls_reassemble_to_the_same_calls(client, tools: Tools, parallel) -> None:
    llm = GemmaLocal(client=client, temperature=1.0, seed=2, max_tokens=MAX)
    given = tools.all()
    options = {"tool_required": True, "allow_parallel_tool_calls": parallel}
    expected = _names_and_args(
        llm.get_tool_calls_from_response(llm.chat_with_tools(given, user_msg=ASK, **options))
    )
    responses = list(llm.stream_chat_with_tools(given, user_msg=ASK, **options))
    seen = [_names_and_args(llm.get_tool_calls_from_response(r, False)) for r in responses]
    assert seen[-1] == expected
    assert all(seen[i] == seen[-1][: len(seen[i])] for i in range(len(seen)))  # calls only grow
    last = responses[-1]
    check_call_response(last, given)
    assert last.additional_kwargs["finish_reason"] == "tool_calls"
    assert last.additional_kwargs["completion_tokens"] > 0
    assert all(r.delta == "" for r in responses)  # calls are not text


async def test_async_stream_reassembles_too(client, tools: Tools) -> None:
    llm = GemmaLocal(client=client, temperature=1.0, seed=2, max_tokens=MAX)
    given = tools.all()
    expected = _names_and_args(
        llm.get_tool_calls_from_response(
            llm.chat_with_tools(given, user_msg=ASK, tool_required=True)
        )
    )
    stream = await llm.astream_chat_with_tools(given, user_msg=ASK, tool_required=True)
    responses = [r async for r in stream]
    assert _names_and_args(llm.get_tool_calls_from_response(responses[-1])) == expected


# --------------------------------------------------------- predict_and_call


def test_predict_and_call_runs_the_tool(client, tools: Tools) -> None:
    llm = GemmaLocal(client=client, temperature=1.0, seed=0, max_tokens=MAX)
    tool = tools.multiply_tool()
    response = llm.predict_and_call([tool], user_msg="What is 6 times 7?", tool_required=True)
    [(name, args)] = tools.calls
    assert name == "multiply"
    [source] = response.sources
    assert source.raw_output == args["a"] * args["b"] and not source.is_error
    assert response.response == str(args["a"] * args["b"])
    assert source.raw_input["kwargs"] == args
    check_args("multiply", args, [tool])


async def test_apredict_and_call_parallel(client, tools: Tools) -> None:
    llm = GemmaLocal(client=client, temperature=0, max_tokens=MAX)
    given = [tools.multiply_tool(), tools.ping_tool()]
    response = await llm.apredict_and_call(
        given,
        user_msg="Multiply, then ping.",
        tool_required=True,
        allow_parallel_tool_calls=True,
        logit_bias=newline_bias(client),
    )
    assert len(response.sources) >= 2 and len(tools.calls) == len(response.sources)
    assert [s.tool_name for s in response.sources] == [name for name, _ in tools.calls]
    assert all(not s.is_error for s in response.sources)


# --------------------------------------------------------------- round trip


def test_tool_results_go_back_to_the_model(llm: GemmaLocal, client, tools: Tools) -> None:
    """The assistant's call message and the tool's result message render like core's own."""
    given = tools.all()
    first = llm.chat_with_tools(given, user_msg=ASK, tool_required=True)
    [selection] = llm.get_tool_calls_from_response(first)
    result = ChatMessage(
        role="tool", content="sunny", additional_kwargs={"tool_call_id": selection.tool_id}
    )
    history = [ChatMessage(role="user", content=ASK), first.message, result]
    second = llm.chat_with_tools(given, chat_history=history, max_tokens=8)
    expected = client.format_prompt(
        [
            {"role": "user", "content": ASK},
            first.raw["choices"][0]["message"],
            {"role": "tool", "tool_call_id": selection.tool_id, "content": "sunny"},
        ],
        tools=[t.metadata.to_openai_tool() for t in given],
        parallel_tool_calls=False,  # chat_with_tools' default
    )
    assert second.raw["usage"]["prompt_tokens"] == len(expected.ids)
    assert to_openai_messages(history)[1] == first.raw["choices"][0]["message"]
    check_call_response(second, given)
    assert len(history) == 3  # chat_history is not modified


# ------------------------------------------------------------------- errors


def test_errors_come_before_any_load(gemma3_path: Path, tools: Tools) -> None:
    llm = GemmaLocal(str(gemma3_path), backend="transformers")
    given = tools.all()
    with pytest.raises(ValueError, match="unknown tool 'nope'; the tools are: 'get_weather'"):
        llm.chat_with_tools(given, user_msg=ASK, tool_choice="nope")
    with pytest.raises(ValueError, match="unknown tool 'nope'"):
        llm.stream_chat_with_tools(given, user_msg=ASK, tool_choice="nope")
    with pytest.raises(ValueError, match="tool_choice='required' needs tools"):
        llm.chat_with_tools([], user_msg=ASK, tool_required=True)
    bad = FunctionTool.from_defaults(tools.ping, name="my tool", description="x")
    with pytest.raises(ValueError, match="tool name 'my tool' is not a valid function name"):
        llm.chat_with_tools([bad], user_msg=ASK)
    odd = FunctionTool.from_defaults(tools.ping, name="odd", description="x", fn_schema=OddArgs)
    with pytest.raises(ValueError, match=r"tools\[0\] \(odd\) parameters .*constrained decoding"):
        llm.chat_with_tools([odd], user_msg=ASK)
    with pytest.raises(ValueError, match="cannot both apply"):
        llm.chat_with_tools(given, user_msg=ASK, response_format={"type": "json_object"})
    with pytest.raises(TypeError, match=r"LlamaIndex tools .* got str"):
        llm.chat([ChatMessage(role="user", content=ASK)], tools=["get_weather"])
    with pytest.raises(ValueError, match="tool_call_id"):
        llm.chat_with_tools(given, chat_history=[ChatMessage(role="tool", content="42")])
    assert not llm.client.is_loaded


class OddArgs(BaseModel):
    """Arguments whose schema uses a keyword the grammar engine does not implement."""

    x: int = Field(json_schema_extra={"not": {"const": 1}})


async def test_async_errors_come_before_any_load(gemma3_path: Path, tools: Tools) -> None:
    llm = GemmaLocal(str(gemma3_path), backend="mlx")
    with pytest.raises(ValueError, match="unknown tool 'nope'"):
        await llm.achat_with_tools(tools.all(), user_msg=ASK, tool_choice="nope")
    with pytest.raises(ValueError, match="unknown tool 'nope'"):
        await llm.astream_chat_with_tools(tools.all(), user_msg=ASK, tool_choice="nope")
    assert not llm.client.is_loaded


# -------------------------------------------------------------------- agents
#
# FunctionAgent: each step is one chat_with_tools call (streamed by default).
# Under tool_choice "auto" a model may call tools or answer; the grammar
# guarantees that every call names a real tool with valid arguments, so the
# tool runs, and prose ends the run. What it cannot guarantee is that a model
# ever stops calling: that is the model's choice (a random one answers at its
# first auto step: it almost never samples "{" first). Decoding is greedy or
# seeded, so each run is deterministic. The tests assert that the run
# finishes within a timeout without a max-iterations error, that every call
# validated, that each call really ran the Python function with the model's
# arguments, and that the tool's result reached the next step's prompt.

AGENT_TIMEOUT_S = 120


@pytest.fixture
def recorder():
    root = get_dispatcher()
    handler = Recorder(events=[])
    root.add_event_handler(handler)
    yield handler
    root.event_handlers.remove(handler)


async def run_agent(agent, question: str) -> tuple[Any, list[ToolCallResult], list[AgentOutput]]:
    """Run to the end (``max_iterations=10``, a timeout); the tool results and step outputs."""
    handler = agent.run(question, max_iterations=10)
    results: list[ToolCallResult] = []
    outputs: list[AgentOutput] = []

    async def drain() -> Any:
        async for event in handler.stream_events():
            if isinstance(event, ToolCallResult):
                results.append(event)
            elif isinstance(event, AgentOutput):
                outputs.append(event)
        return await handler

    result = await asyncio.wait_for(drain(), AGENT_TIMEOUT_S)
    return result, results, outputs


def check_agent_calls(
    tools: Tools, given: list[FunctionTool], results: list[ToolCallResult]
) -> None:
    """Every call the agent made validated, and ran the real function with those arguments."""
    check_selections(
        [
            ToolSelection(tool_id=r.tool_id, tool_name=r.tool_name, tool_kwargs=r.tool_kwargs)
            for r in results
        ],
        given,
    )
    assert len(tools.calls) == len(results)
    for (name, ran_with), result in zip(tools.calls, results, strict=True):
        assert name == result.tool_name
        assert all(ran_with[k] == v for k, v in result.tool_kwargs.items())
        assert not result.tool_output.is_error


def check_results_were_read(
    client, recorder: Recorder, given: list[FunctionTool], results: list[ToolCallResult]
) -> None:
    """The step after the calls read each call and its result, rendered by core."""
    messages, _ = recorder.chats()[-1]
    prompt = client.format_prompt(
        to_openai_messages(messages), tools=[t.metadata.to_openai_tool() for t in given]
    ).text
    for result in results:
        assert f"```tool_output\n{result.tool_output.content}\n```" in prompt
        arguments = json.dumps(result.tool_kwargs, ensure_ascii=False)
        call = f'{{"name": "{result.tool_name}", "parameters": {arguments}}}'
        assert call in prompt


@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "not-streaming"])
async def test_function_agent_answers_under_auto(
    client, tools: Tools, recorder: Recorder, streaming
) -> None:
    llm = GemmaLocal(client=client, temperature=0, max_tokens=64)
    given = [tools.multiply_tool(), tools.weather_tool()]
    agent = FunctionAgent(tools=given, llm=llm, streaming=streaming)
    result, results, outputs = await run_agent(agent, "What is 6 times 7?")
    check_agent_calls(tools, given, results)
    # the run ended on the model's answer, which is the result
    assert str(result) == outputs[-1].response.content == recorder.chats()[-1][1].message.content
    assert len(recorder.chats()) == len(outputs)


@pytest.mark.parametrize("first", ["multiply", "required"])
async def test_function_agent_forced_first_step_then_loop(
    client, tools: Tools, recorder: Recorder, first: str
) -> None:
    """``initial_tool_choice`` forces the first step's calls (a named tool, or any:
    several may come, in parallel); they run; the next step reads their results."""
    llm = GemmaLocal(client=client, temperature=0, max_tokens=96)
    given = [tools.multiply_tool(), tools.weather_tool()]
    agent = FunctionAgent(tools=given, llm=llm, initial_tool_choice=first)
    result, results, outputs = await run_agent(agent, "What is 6 times 7?")
    assert results, "the forced first step must have called a tool"
    if first == "multiply":
        [call] = results
        assert call.tool_output.raw_output == call.tool_kwargs["a"] * call.tool_kwargs["b"]
    check_agent_calls(tools, given, results)
    assert len(recorder.chats()) == len(outputs) >= 2
    check_results_were_read(client, recorder, given, results)
    assert str(result) == outputs[-1].response.content


async def test_function_agent_return_direct_tool(client, tools: Tools) -> None:
    """A ``return_direct`` tool's result is the answer: the run ends after its call."""
    llm = GemmaLocal(client=client, temperature=1.0, seed=0, max_tokens=64)
    given = [tools.multiply_tool(return_direct=True)]
    agent = FunctionAgent(tools=given, llm=llm, initial_tool_choice="multiply")
    result, results, _ = await run_agent(agent, "What is 6 times 7?")
    [call] = results
    check_agent_calls(tools, given, results)
    assert str(result) == str(call.tool_output.raw_output)


# ReActAgent does not use function calling: it asks for "Thought / Action /
# Action Input" text and parses it (llama-index's ReActOutputParser). A random
# model writes none of those keywords, and the parser takes such a reply as
# the final answer ("implicit answer"). So on the real models the honest
# guarantee is: the run finishes after one step, the model read the ReAct
# prompt (with our tool's name and description) through the Gemma template,
# and the result is exactly the model's reply. The Action -> Observation ->
# Answer loop needs specific text, so it runs on the scripted fake below,
# through the real chat path and template; so does the parser's error loop.


async def test_react_agent_on_the_real_models(client, tools: Tools, recorder: Recorder) -> None:
    llm = GemmaLocal(client=client, temperature=0, max_tokens=48)
    given = [tools.multiply_tool()]
    agent = ReActAgent(tools=given, llm=llm)
    result, results, _ = await run_agent(agent, "What is 6 times 7?")
    [(messages, response)] = recorder.chats()  # one LLM call: the reply was the answer
    assert messages[0].role.value == "system"
    assert "multiply" in messages[0].content and "Multiply two integers." in messages[0].content
    assert "Action Input" in messages[0].content
    assert results == [] and tools.calls == []
    assert str(result) == response.message.content
    assert response.additional_kwargs["completion_tokens"] > 0


@pytest.fixture
def scripted(gemma3_path: Path) -> ScriptedGemma:
    client = ScriptedGemma(gemma3_path)
    yield client
    client.close()


ACTION = 'Thought: I need to multiply.\nAction: multiply\nAction Input: {"a": 6, "b": 7}'
ANSWER = "Thought: I can answer without using any more tools.\nAnswer: 42"


@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "not-streaming"])
async def test_react_agent_tool_loop_scripted(
    scripted: ScriptedGemma, tools: Tools, streaming
) -> None:
    scripted.enqueue(ACTION, ANSWER)
    llm = GemmaLocal(client=scripted, temperature=0, max_tokens=128)
    agent = ReActAgent(tools=[tools.multiply_tool()], llm=llm, streaming=streaming)
    result, results, _ = await run_agent(agent, "What is 6 times 7?")
    assert tools.calls == [("multiply", {"a": 6, "b": 7})]
    assert [r.tool_output.raw_output for r in results] == [42]
    assert str(result) == "42"
    first, second = (h["prompt"] for h in scripted.history)
    assert is_gemma_prompt(first, "multiply", "What is 6 times 7?")
    # the action went back as the model's turn, the observation as the user's
    action = "<start_of_turn>model\nThought: I need to multiply.\nAction: multiply\n"
    assert is_gemma_prompt(second, action, "<start_of_turn>user\nObservation: 42<end_of_turn>")


async def test_react_agent_parse_errors_loop_back(scripted: ScriptedGemma, tools: Tools) -> None:
    """A reply the parser rejects goes back with the parser's error; the next one finishes."""
    scripted.enqueue("Thought: hmm\nAction: multiply\nAction Input: not json", ANSWER)
    llm = GemmaLocal(client=scripted, temperature=0, max_tokens=128)
    agent = ReActAgent(tools=[tools.multiply_tool()], llm=llm)
    result, results, _ = await run_agent(agent, "What is 6 times 7?")
    assert str(result) == "42" and results == [] and tools.calls == []
    retry = scripted.history[1]["prompt"]
    assert is_gemma_prompt(retry, "Error while parsing the output")
