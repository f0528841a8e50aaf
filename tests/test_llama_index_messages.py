"""The LlamaIndex adapter's pure mapping functions: messages in, responses out (no model)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from llama_index.core.base.llms.types import (
    AudioBlock,
    CachePoint,
    ChatMessage,
    ChatResponse,
    DocumentBlock,
    ImageBlock,
    MessageRole,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.tools import FunctionTool

from core import Delta, ToolCall
from llama_index_gemma_local import (
    DeltaFolder,
    StreamFolder,
    assistant_message,
    chat_to_completion_response,
    completion_to_chat_response,
    reply_response,
    resolve_tool_choice,
    to_openai_message,
    to_openai_messages,
    to_openai_tool,
    tool_selections,
)

PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00"
    b"\x1f\x15\xc4\x89\x00\x00\x00\rIDATx\x9cc\xf8\xff\xff?\x00\x05\xfe\x02\xfe\xa7\x35\x81\x84"
    b"\x00\x00\x00\x00IEND\xaeB`\x82"
)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            ChatMessage(role="system", content="Be brief."),
            {"role": "system", "content": "Be brief."},
        ),
        (ChatMessage(role="user", content="Hi"), {"role": "user", "content": "Hi"}),
        (
            ChatMessage(role="assistant", content="Hello!"),
            {"role": "assistant", "content": "Hello!"},
        ),
        (ChatMessage(role=MessageRole.USER, content=""), {"role": "user", "content": ""}),
        (ChatMessage(role="user"), {"role": "user", "content": ""}),
        (
            ChatMessage(role="user", blocks=[TextBlock(text="one")]),
            {"role": "user", "content": "one"},
        ),
        (
            ChatMessage(role="user", blocks=[TextBlock(text="one"), TextBlock(text="two")]),
            {
                "role": "user",
                "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}],
            },
        ),
        (ChatMessage.from_str("é ✓ 海", "assistant"), {"role": "assistant", "content": "é ✓ 海"}),
    ],
    ids=["system", "user", "assistant", "empty", "no-blocks", "one-block", "two-blocks", "unicode"],
)
def test_message_table(message: ChatMessage, expected: dict) -> None:
    assert to_openai_message(message) == expected


@pytest.mark.parametrize("role", ["function", "developer", "chatbot", "model"], ids=lambda r: r)
def test_unsupported_roles_are_refused_by_name(role: str) -> None:
    with pytest.raises(
        ValueError, match=rf"'{role}'.*allowed roles: system, user, assistant, tool"
    ):
        to_openai_message(ChatMessage(role=role, content="x"))


@pytest.mark.parametrize(
    ("block", "name"),
    [
        (DocumentBlock(data=b"%PDF-1.4"), "DocumentBlock"),
        (ThinkingBlock(content="hmm"), "ThinkingBlock"),
        (ToolCallBlock(tool_name="search"), "ToolCallBlock"),
        (CachePoint(cache_control={"type": "ephemeral"}), "CachePoint"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_unreadable_blocks_are_refused_with_their_type(block, name: str) -> None:
    message = ChatMessage(role="user", blocks=[TextBlock(text="look:"), block])
    with pytest.raises(TypeError, match=rf"TextBlock, ImageBlock and AudioBlock .*; got {name}"):
        to_openai_message(message)


@pytest.mark.parametrize("block", [ImageBlock(image=PNG), AudioBlock(audio=b"RIFF0000WAVE")])
def test_media_blocks_only_in_user_messages(block) -> None:
    with pytest.raises(ValueError, match=r"role 'assistant'.*in user messages only"):
        to_openai_messages([ChatMessage(role="assistant", blocks=[block])])


@pytest.mark.parametrize(
    "bad", [{"role": "user", "content": "hi"}, "hi", None], ids=["dict", "str", "none"]
)
def test_not_a_chat_message(bad) -> None:
    with pytest.raises(TypeError, match="ChatMessage"):
        to_openai_messages([bad])


@pytest.mark.parametrize("bad", ["hello", ChatMessage(content="hi"), 3], ids=["str", "msg", "int"])
def test_messages_must_be_a_sequence(bad) -> None:
    with pytest.raises(TypeError, match="sequence of ChatMessage"):
        to_openai_messages(bad)


def test_mapping_never_mutates_its_input() -> None:
    messages = [
        ChatMessage(role="system", content="s"),
        ChatMessage(role="user", blocks=[TextBlock(text="a"), TextBlock(text="b")]),
    ]
    before = [m.model_dump() for m in messages]
    out = to_openai_messages(messages)
    out[1]["content"].append({"type": "text", "text": "c"})
    assert [m.model_dump() for m in messages] == before


COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello"},
            "logprobs": None,
            "finish_reason": "length",
        }
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
}


def _chunk(choices: list, **extra) -> dict:
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": choices,
        **extra,
    }


CHUNKS = [
    _chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]),
    _chunk([{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]),
    _chunk([{"index": 0, "delta": {"content": "lo"}, "finish_reason": None}]),
    _chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
    _chunk([], usage={"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}),
]


def test_completion_to_chat_response() -> None:
    response = completion_to_chat_response(COMPLETION)
    assert response.message.role == MessageRole.ASSISTANT
    assert response.message.content == "Hello"
    assert response.raw is COMPLETION
    assert response.additional_kwargs == {
        "prompt_tokens": 5,
        "completion_tokens": 2,
        "total_tokens": 7,
        "finish_reason": "length",
    }


def test_stream_folder() -> None:
    folder = StreamFolder()
    responses = [r for c in CHUNKS if (r := folder.feed(c)) is not None]
    assert [r.delta for r in responses] == ["Hel", "lo", ""]
    assert [r.message.content for r in responses] == ["Hel", "Hello", "Hello"]
    assert [r.raw for r in responses] == [CHUNKS[1], CHUNKS[2], CHUNKS[4]]
    assert responses[0].additional_kwargs == {}
    assert responses[-1].additional_kwargs == {
        "prompt_tokens": 5,
        "completion_tokens": 3,
        "total_tokens": 8,
        "finish_reason": "stop",
    }


def test_chat_to_completion_response_copies() -> None:
    chat = ChatResponse(
        message=ChatMessage(role="assistant", content="x"),
        delta="x",
        raw={"r": 1},
        additional_kwargs={"total_tokens": 3},
    )
    completion = chat_to_completion_response(chat)
    assert (completion.text, completion.delta, completion.raw) == ("x", "x", {"r": 1})
    completion.additional_kwargs["extra"] = 1
    assert chat.additional_kwargs == {"total_tokens": 3}
    assert chat.message.additional_kwargs == {}


# ------------------------------------------------------------------ tool calls

CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'},
}
CALL_2 = {"id": "call_2", "type": "function", "function": {"name": "ping", "arguments": "{}"}}
WEATHER_BLOCK = ToolCallBlock(
    tool_call_id="call_1", tool_name="get_weather", tool_kwargs={"city": "Paris", "days": 2}
)


class SDKToolCall:
    """Stands in for the OpenAI SDK's ``ChatCompletionMessageToolCall`` (a pydantic model)."""

    def __init__(self, call: dict[str, Any]) -> None:
        self.call = call

    def model_dump(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.call))


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            ChatMessage(role="tool", content="42", additional_kwargs={"tool_call_id": "call_1"}),
            {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        ),
        (
            ChatMessage(
                role=MessageRole.TOOL,
                blocks=[TextBlock(text="a"), TextBlock(text="b")],
                additional_kwargs={"tool_call_id": "call_1", "name": "x"},
            ),
            {
                "role": "tool",
                "tool_call_id": "call_1",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
        ),
        (
            ChatMessage(role="assistant", blocks=[WEATHER_BLOCK]),
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
        ),
        (
            ChatMessage(role="assistant", blocks=[TextBlock(text="Let me look."), WEATHER_BLOCK]),
            {"role": "assistant", "content": "Let me look.", "tool_calls": [CALL]},
        ),
        (
            ChatMessage(
                role="assistant",
                blocks=[
                    ToolCallBlock(
                        tool_call_id="call_1",
                        tool_name="get_weather",
                        tool_kwargs='{"city": "Paris", "days": 2}',
                    ),
                    ToolCallBlock(tool_call_id="call_2", tool_name="ping"),
                ],
            ),
            {"role": "assistant", "content": None, "tool_calls": [CALL, CALL_2]},
        ),
        (
            ChatMessage(role="assistant", content="", additional_kwargs={"tool_calls": [CALL]}),
            {"role": "assistant", "content": "", "tool_calls": [CALL]},
        ),
        (
            ChatMessage(role="assistant", additional_kwargs={"tool_calls": [SDKToolCall(CALL)]}),
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
        ),
        (
            ChatMessage(role="assistant", content="Hi", additional_kwargs={"tool_call_id": "x"}),
            {"role": "assistant", "content": "Hi"},
        ),
    ],
    ids=[
        "tool",
        "tool-blocks",
        "call-block",
        "text-and-call",
        "str-kwargs-and-no-args",
        "openai-kwargs",
        "openai-sdk-object",
        "return-direct",
    ],
)
def test_tool_message_table(message: ChatMessage, expected: dict) -> None:
    assert to_openai_message(message) == expected


def test_tool_messages_need_a_call_id() -> None:
    with pytest.raises(ValueError, match=r"tool message needs additional_kwargs\['tool_call_id'\]"):
        to_openai_message(ChatMessage(role="tool", content="42"))


@pytest.mark.parametrize("role", ["user", "system", "tool"])
def test_tool_call_blocks_only_in_assistant_messages(role: str) -> None:
    message = ChatMessage(
        role=role, blocks=[WEATHER_BLOCK], additional_kwargs={"tool_call_id": "c"}
    )
    with pytest.raises(
        TypeError, match=rf"got ToolCallBlock \(block 0 of the message, role '{role}'\)"
    ):
        to_openai_message(message)


def test_junk_tool_calls_are_refused() -> None:
    with pytest.raises(TypeError, match="OpenAI tool calls"):
        to_openai_message(ChatMessage(role="assistant", additional_kwargs={"tool_calls": [3]}))


def test_tool_mapping_never_mutates_its_input() -> None:
    message = ChatMessage(role="assistant", blocks=[WEATHER_BLOCK], additional_kwargs={})
    before = message.model_dump()
    out = to_openai_message(message)
    out["tool_calls"][0]["function"]["name"] = "changed"
    assert message.model_dump() == before


def test_assistant_message_round_trips() -> None:
    """A reply's message maps back to exactly the OpenAI message core produced."""
    for core_message in (
        {"role": "assistant", "content": None, "tool_calls": [CALL, CALL_2]},
        {"role": "assistant", "content": "Hello"},
    ):
        message = assistant_message(core_message["content"], core_message.get("tool_calls", []))
        assert to_openai_message(message) == core_message


def test_tool_selections() -> None:
    message = assistant_message(None, [CALL, CALL_2])
    expected = [
        ToolSelection(
            tool_id="call_1", tool_name="get_weather", tool_kwargs={"city": "Paris", "days": 2}
        ),
        ToolSelection(tool_id="call_2", tool_name="ping", tool_kwargs={}),
    ]
    assert tool_selections(message) == expected
    # the OpenAI form alone (e.g. a message built by other code) reads the same
    openai_only = ChatMessage(role="assistant", additional_kwargs={"tool_calls": [CALL, CALL_2]})
    assert tool_selections(openai_only) == expected
    assert tool_selections(ChatMessage(role="assistant", content="no calls")) == []
    partial = dict(CALL, function={"name": "get_weather", "arguments": '{"city": "Par'})
    [selection] = tool_selections(assistant_message(None, [partial]))
    assert selection.tool_kwargs == {}  # arguments still arriving


def weather(city: str, days: int) -> str:
    """Weather of a city."""
    return city * days


@pytest.mark.parametrize(
    ("tool", "expected"),
    [
        (
            FunctionTool.from_defaults(weather, description="Weather of a city."),
            {
                "type": "function",
                "function": {
                    "name": "weather",
                    "description": "Weather of a city.",
                    "parameters": {
                        "properties": {
                            "city": {"title": "City", "type": "string"},
                            "days": {"title": "Days", "type": "integer"},
                        },
                        "required": ["city", "days"],
                        "type": "object",
                    },
                },
            },
        ),
        ({"type": "function", "function": {"name": "ping"}}, None),
    ],
    ids=["function-tool", "openai-dict"],
)
def test_to_openai_tool(tool, expected) -> None:
    assert to_openai_tool(tool) == (expected or tool)


def test_to_openai_tool_refuses_names_llama_index_would_rename() -> None:
    tool = FunctionTool.from_defaults(weather, name="my weather")
    with pytest.raises(ValueError, match="tool name 'my weather' is not a valid function name"):
        to_openai_tool(tool)
    with pytest.raises(TypeError, match="got int"):
        to_openai_tool(3)


@pytest.mark.parametrize(
    ("choice", "required", "expected"),
    [
        (None, False, "auto"),
        (None, True, "required"),
        ("none", True, "none"),
        ("auto", False, "auto"),
        ("required", False, "required"),
        ("add", False, {"type": "function", "function": {"name": "add"}}),
        ({"type": "function", "function": {"name": "x"}}, True, None),
    ],
)
def test_resolve_tool_choice(choice, required: bool, expected) -> None:
    assert resolve_tool_choice(choice, required) == (expected or choice)


def test_completion_with_tool_calls() -> None:
    completion = {
        **COMPLETION,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": None, "tool_calls": [CALL, CALL_2]},
                "logprobs": None,
                "finish_reason": "tool_calls",
            }
        ],
    }
    response = completion_to_chat_response(completion)
    message = response.message
    assert message.content is None
    assert message.blocks == [
        WEATHER_BLOCK,
        ToolCallBlock(tool_call_id="call_2", tool_name="ping", tool_kwargs={}),
    ]
    assert message.additional_kwargs == {"tool_calls": [CALL, CALL_2]}
    assert response.additional_kwargs["finish_reason"] == "tool_calls"
    assert chat_to_completion_response(response).text == ""


def _call_chunk(index: int, **part: Any) -> dict:
    return _chunk(
        [
            {
                "index": 0,
                "delta": {"tool_calls": [{"index": index, **part}]},
                "finish_reason": None,
            }
        ]
    )


def test_stream_folder_with_whole_calls() -> None:
    """Core sends each call whole, in one chunk, once it is complete."""
    chunks = [
        CHUNKS[0],
        _call_chunk(0, **CALL),
        _call_chunk(1, **CALL_2),
        _chunk([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]),
        _chunk([], usage={"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}),
    ]
    folder = StreamFolder()
    responses = [r for c in chunks if (r := folder.feed(c)) is not None]
    assert [r.delta for r in responses] == ["", "", ""]
    assert [len(tool_selections(r.message)) for r in responses] == [1, 2, 2]
    last = responses[-1]
    assert to_openai_message(last.message) == {
        "role": "assistant",
        "content": None,
        "tool_calls": [CALL, CALL_2],
    }
    assert last.additional_kwargs["finish_reason"] == "tool_calls"
    assert last.additional_kwargs["completion_tokens"] == 9


def test_stream_folder_with_openai_style_fragments() -> None:
    """Calls split over chunks (name first, then pieces of arguments) accumulate by index."""
    function = CALL["function"]
    chunks = [
        _call_chunk(0, id="call_1", type="function", function={"name": "get_weather"}),
        _call_chunk(0, function={"arguments": function["arguments"][:9]}),
        _call_chunk(0, function={"arguments": function["arguments"][9:]}),
    ]
    folder = StreamFolder()
    responses = [folder.feed(c) for c in chunks]
    assert [s.tool_kwargs for r in responses for s in tool_selections(r.message)] == [
        {},
        {},
        {"city": "Paris", "days": 2},
    ]
    assert responses[-1].message.additional_kwargs["tool_calls"] == [CALL]


# ------------------------------------------------------- thinking and deltas


def test_thinking_blocks_go_back_as_reasoning_content() -> None:
    message = ChatMessage(
        role="assistant",
        blocks=[ThinkingBlock(content="Sum it.", num_tokens=4), TextBlock(text="5")],
    )
    assert to_openai_message(message) == {
        "role": "assistant",
        "content": "5",
        "reasoning_content": "Sum it.",
    }
    with_call = ChatMessage(
        role="assistant", blocks=[ThinkingBlock(content="Call."), WEATHER_BLOCK]
    )
    assert to_openai_message(with_call) == {
        "role": "assistant",
        "content": None,
        "tool_calls": [CALL],
        "reasoning_content": "Call.",
    }
    empty = ChatMessage(role="assistant", blocks=[ThinkingBlock(), TextBlock(text="x")])
    assert "reasoning_content" not in to_openai_message(empty)


def test_assistant_message_puts_the_thought_first() -> None:
    message = assistant_message("It is 5.", [], "Two and three.", 7)
    assert message.blocks == [
        ThinkingBlock(content="Two and three.", num_tokens=7),
        TextBlock(text="It is 5."),
    ]
    assert message.content == "It is 5."
    only_thought = assistant_message("", [], "Hm", 2)
    assert only_thought.content == ""
    called = assistant_message(None, [CALL], "Weather first.", 3)
    assert called.blocks == [ThinkingBlock(content="Weather first.", num_tokens=3), WEATHER_BLOCK]
    assert called.content is None
    assert assistant_message("Hi", [], "", 0).blocks == [TextBlock(text="Hi")]


WEATHER_CALL = ToolCall(0, "call_1", "get_weather", '{"city": "Paris", "days": 2}')


def test_reply_response_from_a_folded_delta() -> None:
    reply = Delta(0, "", "tool_calls", 5, 9, (WEATHER_CALL,), "Check it.", 3)
    response = reply_response(reply, "m")
    assert response.message.blocks == [
        ThinkingBlock(content="Check it.", num_tokens=3),
        WEATHER_BLOCK,
    ]
    assert response.message.additional_kwargs == {"tool_calls": [CALL]}
    assert response.additional_kwargs == {
        "prompt_tokens": 5,
        "completion_tokens": 9,
        "total_tokens": 14,
        "reasoning_tokens": 3,
        "finish_reason": "tool_calls",
    }
    raw = response.raw
    assert raw["object"] == "chat.completion" and raw["model"] == "m"
    assert raw["choices"][0]["message"] == {
        "role": "assistant",
        "content": None,
        "reasoning_content": "Check it.",
        "tool_calls": [CALL],
    }
    assert raw["usage"]["completion_tokens_details"] == {"reasoning_tokens": 3}
    # the same reply through the chat.completion dict gives the same response
    again = completion_to_chat_response(raw)
    assert again.message == response.message
    assert again.additional_kwargs == response.additional_kwargs
    with pytest.raises(ValueError, match="finished reply"):
        reply_response(Delta(0, "x"), "m")


def test_delta_folder_streams_thought_then_answer() -> None:
    deltas = [
        Delta(0, "", None, 5, 2, (), "Two and ", 2),
        Delta(0, "", None, 5, 3, (), "three.", 3),
        Delta(0, "It is", None, 5, 5, (), "", 4),
        Delta(0, " 5.", "stop", 5, 6, (), "", 4),
    ]
    folder = DeltaFolder("m")
    responses = [r for d in deltas for r in folder.feed(d)]
    assert [r.delta for r in responses] == ["", "", "It is", " 5.", ""]
    assert [r.additional_kwargs.get("thinking_delta") for r in responses[:3]] == [
        "Two and ",
        "three.",
        None,
    ]
    assert [r.message.blocks[0].content for r in responses] == [
        "Two and ",
        "Two and three.",
        "Two and three.",
        "Two and three.",
        "Two and three.",
    ]
    assert [r.message.content for r in responses] == ["", "", "It is", "It is 5.", "It is 5."]
    assert [r.raw["object"] for r in responses] == ["chat.completion.chunk"] * 5
    assert responses[0].raw["choices"][0]["delta"] == {
        "role": "assistant",
        "content": "",
        "reasoning_content": "Two and ",
    }
    assert responses[3].raw["choices"][0]["finish_reason"] == "stop"
    last = responses[-1]
    assert last.raw["usage"]["completion_tokens_details"] == {"reasoning_tokens": 4}
    assert last.message.blocks == [
        ThinkingBlock(content="Two and three.", num_tokens=4),
        TextBlock(text="It is 5."),
    ]
    assert last.additional_kwargs == {
        "prompt_tokens": 5,
        "completion_tokens": 6,
        "total_tokens": 11,
        "reasoning_tokens": 4,
        "finish_reason": "stop",
    }
    assert all("finish_reason" not in r.additional_kwargs for r in responses[:-1])


def test_delta_folder_without_thought_or_text() -> None:
    """A row that ends on its end-of-turn token: one last response, no empty ones before."""
    folder = DeltaFolder("m")
    assert folder.feed(Delta(0, "Hi", None, 3, 1)) != []
    [last] = folder.feed(Delta(0, "", "stop", 3, 2))
    assert last.delta == "" and last.message.blocks == [TextBlock(text="Hi")]
    assert last.additional_kwargs == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
        "finish_reason": "stop",
    }


def test_stream_folder_reads_reasoning_content() -> None:
    chunks = [
        CHUNKS[0],
        _chunk([{"index": 0, "delta": {"reasoning_content": "Hm"}, "finish_reason": None}]),
        CHUNKS[1],
        CHUNKS[3],
        _chunk(
            [],
            usage={
                "prompt_tokens": 5,
                "completion_tokens": 3,
                "total_tokens": 8,
                "completion_tokens_details": {"reasoning_tokens": 1},
            },
        ),
    ]
    folder = StreamFolder()
    responses = [r for c in chunks if (r := folder.feed(c)) is not None]
    assert [r.additional_kwargs.get("thinking_delta") for r in responses] == ["Hm", None, None]
    assert responses[-1].message.blocks == [
        ThinkingBlock(content="Hm", num_tokens=1),
        TextBlock(text="Hel"),
    ]
    assert responses[-1].additional_kwargs["reasoning_tokens"] == 1
