"""``GemmaLocal`` on Gemma 4 (tiny random-weight ``gemma4_text``), on both backends:
thinking as ``ThinkingBlock`` / ``thinking_delta``, native tool calls through
``FunctionCallingLLM``, a ``FunctionAgent`` run with a real tool, and structured output.

A random model follows no prompt, so each test steers it deterministically
(greedy decoding, ``tool_choice`` / ``tool_required``, ``logit_bias`` on
Gemma 4's control tokens) and compares with what core itself answers to the
same request. Where the exact text matters (a thought, then an answer), a
scripted model with the real Gemma 4 tokenizer and template writes it
(:class:`ScriptedGemma`): everything from the chat template to core's Gemma 4
output parser is the real code.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import make_client
from llama_index.core.agent.workflow import AgentOutput, AgentStream, FunctionAgent, ToolCallResult
from llama_index.core.base.llms.types import (
    ChatMessage,
    MessageRole,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.prompts import PromptTemplate
from pydantic import BaseModel, Field
from test_llama_index_support import (
    ScriptedGemma,
    Tools,
    check_call_response,
    check_selections,
)

from llama_index_gemma_local import GemmaLocal, to_openai_message, to_openai_messages

pytestmark = [
    pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince20"),
    pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince211"),
    pytest.mark.filterwarnings("ignore:is_running called from within a step"),
]

# Gemma 4's control-token ids (the same in the tiny and the real vocabulary).
TOOL_CALL = 48  # <|tool_call>
CHANNEL = 100  # <|channel>: opens the thinking channel
CHANNEL_END = 101  # <channel|>
TURN_END = 106  # <turn|>
#: Open the thinking channel and never close it: the reply is all thought, cut
#: off by max_tokens (a random model closes it at once or never; this is "never").
THINK_ONLY = {CHANNEL: 30.0, CHANNEL_END: -30.0}

USER = [ChatMessage(role="user", content="Write a short poem about the sea.")]
OPENAI_USER = [{"role": "user", "content": "Write a short poem about the sea."}]
#: A JSON reply (its grammar puts the optional thinking channel before the JSON).
FLAG = {
    "type": "json_schema",
    "json_schema": {
        "name": "Flag",
        "schema": {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}},
            "required": ["ok"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}


@pytest.fixture(scope="module", params=["transformers", "mlx"])
def g4_client(request: pytest.FixtureRequest, gemma4_path: Path):
    """A Gemma 4 client per backend, shared by this module's tests."""
    client = make_client(request.param, gemma4_path)
    yield client
    client.close()


@pytest.fixture
def tools() -> Tools:
    return Tools()


def thoughts(message: ChatMessage) -> list[ThinkingBlock]:
    return [b for b in message.blocks if isinstance(b, ThinkingBlock)]


# ------------------------------------------------------------- options, errors


def test_thinking_on_a_model_that_cannot_think_fails_before_any_load(gemma3_path: Path) -> None:
    with pytest.raises(ValueError, match="thinking=True needs a model that can think"):
        GemmaLocal(str(gemma3_path), backend="transformers", thinking=True)
    llm = GemmaLocal(str(gemma3_path), backend="transformers")
    with pytest.raises(ValueError, match="gemma3 models cannot"):
        llm.chat(USER, thinking=True)
    with pytest.raises(ValueError, match="gemma3 models cannot"):
        llm.stream_chat(USER, reasoning_effort="high")
    with pytest.raises(ValueError, match="gemma3 models cannot"):
        asyncio.run(llm.achat(USER, thinking=True))
    assert not llm.client.is_loaded
    # off (False, "none") is fine on any model
    GemmaLocal(str(gemma3_path), backend="transformers", thinking=False)
    assert not llm.client.is_loaded


def test_bad_thinking_options_fail_before_any_load(gemma4_path: Path) -> None:
    with pytest.raises(ValueError, match="thinking"):  # pydantic's, a ValueError
        GemmaLocal(str(gemma4_path), backend="transformers", thinking="yes")
    llm = GemmaLocal(str(gemma4_path), backend="transformers")
    with pytest.raises(ValueError, match="reasoning_effort must be one of"):
        llm.chat(USER, reasoning_effort="extreme")
    with pytest.raises(ValueError, match="contradicts"):
        llm.chat(USER, thinking=True, reasoning_effort="none")
    assert not llm.client.is_loaded


def test_thinking_is_off_by_default_and_the_call_decides(g4_client) -> None:
    """Thinking tells the template ``<|think|>``; a per-call option overrides the field,
    whichever way it is spelled (``thinking`` or OpenAI's ``reasoning_effort``)."""
    def prompt_tokens(llm: GemmaLocal, **kwargs: Any) -> int:
        response = llm.chat(USER, max_tokens=1, **kwargs)
        return response.additional_kwargs["prompt_tokens"]

    off = GemmaLocal(client=g4_client, temperature=0)
    on = GemmaLocal(client=g4_client, temperature=0, thinking=True)
    plain = g4_client.create(OPENAI_USER, temperature=0, max_tokens=1)["usage"]["prompt_tokens"]
    thinking = g4_client.create(OPENAI_USER, temperature=0, max_tokens=1, thinking=True)
    assert thinking["usage"]["prompt_tokens"] > plain
    assert prompt_tokens(off) == plain
    assert prompt_tokens(on) == thinking["usage"]["prompt_tokens"]
    assert prompt_tokens(off, reasoning_effort="low") == thinking["usage"]["prompt_tokens"]
    assert prompt_tokens(on, reasoning_effort="none") == plain
    assert prompt_tokens(on, thinking=False) == plain


# ------------------------------------------------------------------ thinking


def test_plain_chat_matches_core(g4_client) -> None:
    llm = GemmaLocal(client=g4_client, temperature=0, max_tokens=8)
    reference = g4_client.create(OPENAI_USER, temperature=0, max_tokens=8)
    response = llm.chat(USER)
    assert response.message.content == reference["choices"][0]["message"]["content"]
    assert not thoughts(response.message)
    assert response.raw["usage"] == reference["usage"]
    streamed = list(llm.stream_chat(USER))
    assert "".join(r.delta for r in streamed) == response.message.content
    assert all("thinking_delta" not in r.additional_kwargs for r in streamed)


def test_thought_is_a_thinking_block_with_its_token_count(g4_client) -> None:
    """The thought (here the whole reply, cut off by max_tokens) is a ThinkingBlock, exactly
    core's ``reasoning_content``; ``num_tokens`` is core's ``reasoning_tokens``."""
    options = {"max_tokens": 12, "logit_bias": THINK_ONLY, "response_format": FLAG}
    reference = g4_client.create(OPENAI_USER, temperature=0, thinking=True, **options)
    message = reference["choices"][0]["message"]
    assert message["reasoning_content"]  # the model thought, and said nothing yet
    llm = GemmaLocal(client=g4_client, temperature=0, thinking=True)
    response = llm.chat(USER, **options)
    thinking, text = response.message.blocks
    assert isinstance(thinking, ThinkingBlock) and isinstance(text, TextBlock)
    assert thinking.content == message["reasoning_content"]
    assert thinking.num_tokens == reference["usage"]["completion_tokens_details"]["reasoning_tokens"]
    assert thinking.num_tokens == 12
    assert response.message.content == message["content"] == ""
    assert response.additional_kwargs["reasoning_tokens"] == 12
    assert response.additional_kwargs["finish_reason"] == "length"
    assert response.raw["choices"][0]["message"] == message
    # the thought goes back to core with the message (Gemma 4's template decides what to show)
    assert to_openai_message(response.message) == {
        "role": "assistant",
        "content": "",
        "reasoning_content": message["reasoning_content"],
    }


def test_streamed_thought_comes_as_thinking_deltas(g4_client) -> None:
    """Each streamed response carries its piece of thought in ``additional_kwargs
    ["thinking_delta"]`` (as LlamaIndex's Ollama and Anthropic integrations do) and the
    thought so far as a ThinkingBlock; the text deltas stay empty."""
    options = {"max_tokens": 12, "logit_bias": THINK_ONLY, "response_format": FLAG}
    llm = GemmaLocal(client=g4_client, temperature=0, thinking=True)
    whole = llm.chat(USER, **options)
    streamed = list(llm.stream_chat(USER, **options))
    pieces = [r.additional_kwargs.get("thinking_delta", "") for r in streamed]
    assert len([p for p in pieces if p]) >= 2
    assert "".join(pieces) == thoughts(whole.message)[0].content
    assert all(r.delta == "" for r in streamed)
    so_far = ""
    for response, piece in zip(streamed[:-1], pieces, strict=False):
        so_far += piece
        assert thoughts(response.message)[0].content == so_far
    last = streamed[-1]
    assert last.message.blocks == whole.message.blocks
    assert last.additional_kwargs == whole.additional_kwargs
    assert last.raw["usage"] == whole.raw["usage"]


async def test_async_thinking_matches_sync(g4_client) -> None:
    options = {"max_tokens": 10, "logit_bias": THINK_ONLY, "response_format": FLAG}
    llm = GemmaLocal(client=g4_client, temperature=0, thinking=True)
    whole = llm.chat(USER, **options)
    assert (await llm.achat(USER, **options)).message.blocks == whole.message.blocks
    streamed = [r async for r in await llm.astream_chat(USER, **options)]
    assert "".join(r.additional_kwargs.get("thinking_delta", "") for r in streamed) == (
        thoughts(whole.message)[0].content
    )
    assert streamed[-1].message.blocks == whole.message.blocks


@pytest.fixture
def scripted(gemma4_path: Path) -> ScriptedGemma:
    """A Gemma 4 model (real tokenizer, template and output parser) that writes what it is told."""
    return ScriptedGemma(gemma4_path)


def test_thought_then_answer(scripted: ScriptedGemma) -> None:
    """Gemma 4 writes ``<|channel>thought\\n…<channel|>`` then its answer: the thought is
    the ThinkingBlock before the text, never part of it."""
    reply = "<|channel>thought\nTwo and three make five.<channel|>It is 5."
    scripted.enqueue(reply, reply)
    llm = GemmaLocal(client=scripted, thinking=True)
    question = [ChatMessage(role="user", content="What is 2 + 3?")]
    response = llm.chat(question)
    thought, text = response.message.blocks
    # num_tokens: the thought's tokens as the tokenizer reads the scripted reply
    assert isinstance(thought, ThinkingBlock) and thought.num_tokens and thought.num_tokens > 0
    assert thought.content == "Two and three make five."
    assert text == TextBlock(text="It is 5.")
    assert response.message.content == "It is 5."
    assert "<|think|>" in scripted.history[-1]["prompt"]
    streamed = list(llm.stream_chat(question))
    assert "".join(r.delta for r in streamed) == "It is 5."
    assert "".join(r.additional_kwargs.get("thinking_delta", "") for r in streamed) == (
        "Two and three make five."
    )
    assert streamed[-1].message.blocks == response.message.blocks
    scripted.enqueue("5")
    assert llm.complete("What is 2 + 3?", thinking=False).text == "5"
    assert "<|think|>" not in scripted.history[-1]["prompt"]


def test_earlier_thoughts_go_back_as_the_template_says(scripted: ScriptedGemma) -> None:
    """An answered turn's ThinkingBlock goes back as ``reasoning_content``; Gemma 4's
    template drops the thought of a turn that a user message follows."""
    scripted.enqueue("<|channel>thought\nSum.<channel|>It is 5.", "Bye.")
    llm = GemmaLocal(client=scripted, thinking=True)
    first = llm.chat([ChatMessage(role="user", content="What is 2 + 3?")])
    history = [
        ChatMessage(role="user", content="What is 2 + 3?"),
        first.message,
        ChatMessage(role="user", content="Thanks."),
    ]
    assert to_openai_messages(history)[1]["reasoning_content"] == "Sum."
    assert llm.chat(history).message.content == "Bye."
    prompt = scripted.history[-1]["prompt"]
    assert "It is 5." in prompt and "Sum." not in prompt


# -------------------------------------------------------------------- tools


def test_required_call_in_gemma4_syntax(g4_client, tools: Tools) -> None:
    """Calls are written in Gemma 4's own syntax under the grammar; they arrive as
    ToolCallBlocks with schema-valid arguments, equal to core's own."""
    given = [tools.multiply_tool(), tools.weather_tool()]
    llm = GemmaLocal(client=g4_client, temperature=0, max_tokens=64)
    response = llm.chat_with_tools(given, user_msg="What is 6 times 7?", tool_required=True)
    assert response.additional_kwargs["finish_reason"] == "tool_calls"
    selections = check_call_response(response, given)
    assert selections == llm.get_tool_calls_from_response(response)
    direct = g4_client.create(
        [{"role": "user", "content": "What is 6 times 7?"}],
        temperature=0,
        max_tokens=64,
        tools=[t.metadata.to_openai_tool() for t in given],
        tool_choice="required",
        parallel_tool_calls=False,
    )
    calls = direct["choices"][0]["message"]["tool_calls"]
    assert [(s.tool_name, s.tool_kwargs) for s in selections] == [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls
    ]
    prompt = g4_client.format_prompt(
        [{"role": "user", "content": "x"}], tools=[t.metadata.to_openai_tool() for t in given]
    ).text
    assert "<|tool>declaration:multiply" in prompt  # declared by Gemma 4's template


def test_named_choice_streamed_and_async(g4_client, tools: Tools) -> None:
    given = [tools.multiply_tool(), tools.weather_tool()]
    llm = GemmaLocal(client=g4_client, temperature=0, max_tokens=64)
    kwargs = {"user_msg": "Weather in Rome?", "tool_choice": "get_weather"}
    whole = llm.chat_with_tools(given, **kwargs)
    [selection] = check_call_response(whole, given)
    assert selection.tool_name == "get_weather"
    streamed = list(llm.stream_chat_with_tools(given, **kwargs))
    last = streamed[-1]
    assert [(b.tool_name, b.tool_kwargs) for b in last.message.blocks] == [
        ("get_weather", selection.tool_kwargs)
    ]
    assert last.additional_kwargs["finish_reason"] == "tool_calls"
    again = asyncio.run(llm.achat_with_tools(given, **kwargs))
    assert [s.tool_kwargs for s in llm.get_tool_calls_from_response(again)] == [
        selection.tool_kwargs
    ]


def test_thinking_before_a_call(g4_client, tools: Tools) -> None:
    """With thinking on, the thought channel comes first (opened and closed by
    ``logit_bias``) and the call after it."""
    given = [tools.multiply_tool()]
    llm = GemmaLocal(client=g4_client, temperature=0, max_tokens=64, thinking=True)
    bias = {CHANNEL: 30.0, CHANNEL_END: 5.0}
    response = llm.chat_with_tools(given, user_msg="6 times 7?", tool_required=True, logit_bias=bias)
    check_call_response(response, given)
    assert response.additional_kwargs["reasoning_tokens"] > 0  # it opened the channel
    assert response.additional_kwargs["finish_reason"] == "tool_calls"
    # a thought that takes every token leaves no call, and the error says why
    thinking_only = llm.chat_with_tools(
        given, user_msg="6 times 7?", tool_required=True, logit_bias=THINK_ONLY, max_tokens=8
    )
    with pytest.raises(ValueError, match=r"cut off after 8 tokens .* still thinking"):
        llm.get_tool_calls_from_response(thinking_only)


def test_predict_and_call_and_the_result_round_trip(g4_client, tools: Tools) -> None:
    """``predict_and_call`` runs the real tool; the call and its result go back to core
    as OpenAI messages that Gemma 4's template renders as its own tool turns."""
    given = [tools.multiply_tool()]
    llm = GemmaLocal(client=g4_client, temperature=0, max_tokens=64)
    output = llm.predict_and_call(given, user_msg="What is 6 times 7?", tool_required=True)
    [(name, args)] = tools.calls
    [source] = output.sources
    assert name == "multiply" and source.raw_output == args["a"] * args["b"]
    assert output.response == str(args["a"] * args["b"])
    call = llm.chat_with_tools(given, user_msg="What is 6 times 7?", tool_required=True)
    [selection] = llm.get_tool_calls_from_response(call)
    history = [
        ChatMessage(role="user", content="What is 6 times 7?"),
        call.message,
        ChatMessage(
            role=MessageRole.TOOL,
            content="42",
            additional_kwargs={"tool_call_id": selection.tool_id},
        ),
    ]
    answer = llm.chat(history, max_tokens=4)
    assert answer.additional_kwargs["completion_tokens"] <= 4
    prompt = g4_client.format_prompt(to_openai_messages(history)).text
    assert "<|tool_call>call:multiply{" in prompt
    assert "<|tool_response>response:multiply{" in prompt and "42" in prompt


# --------------------------------------------------------------------- agent


@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "not-streaming"])
async def test_function_agent_runs_a_tool_then_answers(
    g4_client, tools: Tools, streaming: bool
) -> None:
    """``initial_tool_choice`` forces the first step's call; the real tool runs; the next
    step reads its result and, with Gemma 4's call marker banned by ``logit_bias``,
    can only answer, so the run ends there, deterministically."""
    llm = GemmaLocal(
        client=g4_client, temperature=0, max_tokens=48, logit_bias={TOOL_CALL: -100.0}
    )
    given = [tools.multiply_tool()]
    agent = FunctionAgent(
        tools=given, llm=llm, initial_tool_choice="multiply", streaming=streaming
    )
    handler = agent.run("What is 6 times 7?", max_iterations=5)
    results: list[ToolCallResult] = []
    outputs: list[AgentOutput] = []
    streamed: list[AgentStream] = []

    async def drain() -> Any:
        async for event in handler.stream_events():
            if isinstance(event, ToolCallResult):
                results.append(event)
            elif isinstance(event, AgentOutput):
                outputs.append(event)
            elif isinstance(event, AgentStream):
                streamed.append(event)
        return await handler

    result = await asyncio.wait_for(drain(), 120)
    [call] = results
    selection = ToolSelection(
        tool_id=call.tool_id, tool_name=call.tool_name, tool_kwargs=call.tool_kwargs
    )
    check_selections([selection], given)
    assert tools.calls == [("multiply", call.tool_kwargs)]
    assert call.tool_output.raw_output == call.tool_kwargs["a"] * call.tool_kwargs["b"]
    assert len(outputs) == 2  # the call, then the answer
    assert not any(isinstance(b, ToolCallBlock) for b in outputs[-1].response.blocks)
    assert str(result) == outputs[-1].response.content
    if streaming:
        assert "".join(e.delta for e in streamed if e.delta) == str(result)
    # the answering step read the call and the tool's result, rendered by Gemma 4's template
    prompt = g4_client.format_prompt(
        [
            {"role": "user", "content": "What is 6 times 7?"},
            to_openai_message(outputs[0].response),
            {"role": "tool", "tool_call_id": call.tool_id, "content": str(call.tool_output)},
        ]
    ).text
    assert "<|tool_call>call:multiply{" in prompt
    assert "<|tool_response>response:multiply{" in prompt and str(call.tool_output) in prompt


# ------------------------------------------------------------------- engines

FACT = "The lighthouse keeper of Port Ellen is called Morag."


@pytest.fixture(scope="module")
def index():
    from llama_index.core import Document, VectorStoreIndex
    from llama_index.core.embeddings import MockEmbedding

    docs = [Document(text=FACT), Document(text="The sea is wide and deep.")]
    return VectorStoreIndex.from_documents(docs, embed_model=MockEmbedding(embed_dim=8))


def test_query_engine_on_gemma4(g4_client, index) -> None:
    llm = GemmaLocal(client=g4_client, temperature=0, max_tokens=6)
    engine = index.as_query_engine(llm=llm, similarity_top_k=2)
    response = engine.query("Who keeps the lighthouse?")
    streamed = index.as_query_engine(llm=llm, similarity_top_k=2, streaming=True).query(
        "Who keeps the lighthouse?"
    )
    assert "".join(streamed.response_gen) == str(response)
    assert FACT in response.source_nodes[0].get_content() + response.source_nodes[1].get_content()


def test_engines_answer_without_the_thought(scripted: ScriptedGemma, index) -> None:
    """A query engine and a chat engine over a thinking Gemma 4 return the answer only
    (also streamed); the thought stays in the LLM's response."""
    from llama_index.core.chat_engine import SimpleChatEngine

    reply = "<|channel>thought\nThe first document names him.<channel|>Morag."
    scripted.enqueue(reply, reply, reply)
    llm = GemmaLocal(client=scripted, thinking=True, max_tokens=64)
    engine = index.as_query_engine(llm=llm, similarity_top_k=2)
    assert str(engine.query("Who keeps the lighthouse?")) == "Morag."
    assert FACT in scripted.history[-1]["prompt"] and "<|think|>" in scripted.history[-1]["prompt"]
    streaming = index.as_query_engine(llm=llm, similarity_top_k=2, streaming=True)
    assert "".join(streaming.query("Who keeps the lighthouse?").response_gen) == "Morag."
    chat = SimpleChatEngine.from_defaults(llm=llm)
    assert str(chat.chat("Who keeps the lighthouse?")) == "Morag."


# --------------------------------------------------------------- structured


class Flag(BaseModel):
    ok: bool


class Pair(BaseModel):
    a: int = Field(ge=0, le=9)
    b: int = Field(ge=0, le=9)


def test_structured_predict_on_gemma4(g4_client) -> None:
    llm = GemmaLocal(client=g4_client, temperature=0, max_tokens=64)
    prompt = PromptTemplate("Two digits about {topic}.")
    pair = llm.structured_predict(Pair, prompt, topic="the sea")
    assert isinstance(pair, Pair)
    assert asyncio.run(llm.astructured_predict(Pair, prompt, topic="the sea")) == pair
    *_, last = list(llm.stream_structured_predict(Pair, prompt, topic="the sea"))
    assert last == pair
    structured = llm.as_structured_llm(Pair)
    response = structured.chat([ChatMessage(role="user", content="Two digits about the sea.")])
    assert response.raw == pair
    assert json.loads(response.message.content) == pair.model_dump()


def test_structured_predict_with_thinking(g4_client) -> None:
    """The thought comes before the JSON and stays out of it: the reply still validates."""
    bias = {CHANNEL: 30.0, CHANNEL_END: 5.0}  # open the channel, then close it
    llm = GemmaLocal(
        client=g4_client, temperature=0, max_tokens=64, thinking=True, logit_bias=bias
    )
    flag = llm.structured_predict(Flag, PromptTemplate("Is {x} wet?"), x="the sea")
    assert isinstance(flag, Flag)
    response = llm.chat(USER, response_format=FLAG)
    assert response.additional_kwargs["reasoning_tokens"] > 0  # it opened the channel
    assert isinstance(Flag.model_validate_json(response.message.content), Flag)
