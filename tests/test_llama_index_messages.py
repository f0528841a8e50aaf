"""The LlamaIndex adapter's pure mapping functions: messages in, responses out (no model)."""

from __future__ import annotations

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

from llama_index_gemma_local import (
    StreamFolder,
    chat_to_completion_response,
    completion_to_chat_response,
    to_openai_message,
    to_openai_messages,
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


@pytest.mark.parametrize(
    "role", ["tool", "function", "developer", "chatbot", "model"], ids=lambda r: r
)
def test_unsupported_roles_are_refused_by_name(role: str) -> None:
    with pytest.raises(ValueError, match=rf"'{role}'.*allowed roles: system, user, assistant"):
        to_openai_message(ChatMessage(role=role, content="x"))


@pytest.mark.parametrize(
    ("block", "name"),
    [
        (ImageBlock(image=PNG), "ImageBlock"),
        (AudioBlock(audio=b"RIFF0000WAVE"), "AudioBlock"),
        (DocumentBlock(data=b"%PDF-1.4"), "DocumentBlock"),
        (ThinkingBlock(content="hmm"), "ThinkingBlock"),
        (ToolCallBlock(tool_name="search"), "ToolCallBlock"),
        (CachePoint(cache_control={"type": "ephemeral"}), "CachePoint"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_non_text_blocks_are_refused_with_their_type(block, name: str) -> None:
    message = ChatMessage(role="user", blocks=[TextBlock(text="look:"), block])
    with pytest.raises(TypeError, match=rf"only TextBlock content, got {name}"):
        to_openai_message(message)


def test_image_error_says_images_are_not_supported_yet() -> None:
    with pytest.raises(TypeError, match="images are not supported yet"):
        to_openai_messages([ChatMessage(role="user", blocks=[ImageBlock(image=PNG)])])


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
