"""Images and audio through ChatGemmaLocal: block conversions, then the tiny multimodal models.

Pure tier: every form LangChain passes media in (standard v1 blocks, the
older v0 ``source_type`` blocks, OpenAI Chat Completions / Responses blocks)
is one row of a table; each bad block is one row of another. The conversion
never mutates its input and decodes nothing (core does).

End to end: ChatGemmaLocal on the tiny Gemma 3 vision and Gemma 4
vision + audio checkpoints (transformers, and MLX through mlx-vlm; random weights, real
processors),
greedy: the same image gives the same reply, a different one another, every
block form of one image is the same input, usage equals core's count.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import make_client
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.content import create_audio_block, create_image_block
from media_support import b64, noise_png, tone_wav

from langchain_gemma_local import ChatGemmaLocal
from langchain_gemma_local.messages import (
    AUDIO_MIME_TYPES,
    MEDIA_BLOCK_TYPES,
    convert_media_block,
    convert_message_to_dict,
    convert_messages_to_dicts,
)

B64 = "iVBORw0KGgo="  # never decoded here: core decodes and checks the media
URI = f"data:image/png;base64,{B64}"
WAV = "UklGRiQAAABXQVZF"


def image_url(url: str, detail: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"url": url}
    if detail is not None:
        spec["detail"] = detail
    return {"type": "image_url", "image_url": spec}


def input_audio(data: str, fmt: str) -> dict[str, Any]:
    return {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}


CONVERSIONS = [
    # ---- images, LangChain v1 standard blocks
    ({"type": "image", "base64": B64, "mime_type": "image/png"}, image_url(URI)),
    (
        {"type": "image", "base64": B64, "mime_type": "image/jpeg", "id": "lc_1"},
        image_url(f"data:image/jpeg;base64,{B64}"),
    ),
    (
        {"type": "image", "base64": B64},  # no MIME type: core reads the format from the bytes
        image_url(f"data:application/octet-stream;base64,{B64}"),
    ),
    ({"type": "image", "url": "https://example.org/a.png"}, image_url("https://example.org/a.png")),
    ({"type": "image", "url": URI}, image_url(URI)),
    ({"type": "image", "url": "file:///tmp/a.png"}, image_url("file:///tmp/a.png")),
    ({"type": "image", "url": "/tmp/a.png"}, image_url("/tmp/a.png")),
    (
        {"type": "image", "url": "/tmp/a.png", "extras": {"detail": "low"}},
        image_url("/tmp/a.png", "low"),
    ),
    (dict(create_image_block(base64=B64, mime_type="image/png")), image_url(URI)),
    # ---- images, LangChain v0 blocks
    (
        {"type": "image", "source_type": "base64", "data": B64, "mime_type": "image/png"},
        image_url(URI),
    ),
    (
        {"type": "image", "source_type": "url", "url": "https://example.org/a.png"},
        image_url("https://example.org/a.png"),
    ),
    # ---- images, OpenAI blocks LangChain still accepts
    (image_url(URI), image_url(URI)),
    (image_url(URI, "high"), image_url(URI, "high")),
    ({"type": "image_url", "image_url": URI}, image_url(URI)),
    ({"type": "input_image", "image_url": URI, "detail": "auto"}, image_url(URI, "auto")),
    # ---- core's own Python parts pass on
    ({"type": "image", "image": b"\x89PNG"}, {"type": "image", "image": b"\x89PNG"}),
    # ---- audio, v1 / v0 / OpenAI
    ({"type": "audio", "base64": WAV, "mime_type": "audio/wav"}, input_audio(WAV, "wav")),
    ({"type": "audio", "base64": WAV, "mime_type": "audio/x-wav"}, input_audio(WAV, "wav")),
    ({"type": "audio", "base64": WAV, "mime_type": "audio/mpeg"}, input_audio(WAV, "mp3")),
    ({"type": "audio", "base64": WAV, "mime_type": "audio/mp3"}, input_audio(WAV, "mp3")),
    ({"type": "audio", "base64": WAV, "mime_type": "Audio/FLAC"}, input_audio(WAV, "flac")),
    (
        {"type": "audio", "base64": WAV, "mime_type": "audio/ogg; codecs=opus"},
        input_audio(WAV, "ogg"),
    ),
    (
        {"type": "audio", "base64": WAV},
        {"type": "audio", "audio": f"data:application/octet-stream;base64,{WAV}"},
    ),
    (
        {"type": "audio", "url": "https://example.org/a.wav"},
        {"type": "audio", "audio": "https://example.org/a.wav"},
    ),
    ({"type": "audio", "url": "/tmp/a.wav"}, {"type": "audio", "audio": "/tmp/a.wav"}),
    (
        {"type": "audio", "source_type": "base64", "data": WAV, "mime_type": "audio/wav"},
        input_audio(WAV, "wav"),
    ),
    (
        {"type": "audio", "source_type": "url", "url": "/tmp/a.wav"},
        {"type": "audio", "audio": "/tmp/a.wav"},
    ),
    (dict(create_audio_block(base64=WAV, mime_type="audio/wav")), input_audio(WAV, "wav")),
    (input_audio(WAV, "wav"), input_audio(WAV, "wav")),
    (
        {"type": "audio", "audio": "/tmp/a.wav", "sampling_rate": None},
        {"type": "audio", "audio": "/tmp/a.wav", "sampling_rate": None},
    ),
]


@pytest.mark.parametrize(("block", "expected"), CONVERSIONS)
def test_media_block_table(block: dict[str, Any], expected: dict[str, Any]) -> None:
    before = copy.deepcopy(block)
    out = convert_media_block(block)
    assert out == expected
    assert block == before  # never mutated
    # a new object all the way down: changing the output leaves the input alone
    inner = out.get("image_url") or out.get("input_audio")
    if isinstance(inner, dict):
        inner["url" if "url" in inner else "data"] = "changed"
        assert block == before


def _human(block: dict[str, Any]) -> HumanMessage:
    return HumanMessage([{"type": "text", "text": "What is this?"}, block])


@pytest.mark.parametrize(("block", "expected"), CONVERSIONS)
def test_human_message_keeps_text_and_media_in_order(
    block: dict[str, Any], expected: dict[str, Any]
) -> None:
    message = _human(block)
    before = message.model_copy(deep=True)
    assert convert_message_to_dict(message) == {
        "role": "user",
        "content": [{"type": "text", "text": "What is this?"}, expected],
    }
    assert message == before


def test_several_images_and_earlier_turns() -> None:
    first = {"type": "image", "base64": B64, "mime_type": "image/png"}
    second = {"type": "image", "url": "/tmp/b.png"}
    messages: list[BaseMessage] = [
        SystemMessage("Be brief."),
        HumanMessage([first, "and", second]),
        AIMessage("Two squares."),
        ChatMessage(role="user", content=[{"type": "audio", "url": "/tmp/a.wav"}]),
    ]
    before = [m.model_copy(deep=True) for m in messages]
    assert convert_messages_to_dicts(messages) == [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [image_url(URI), {"type": "text", "text": "and"}, image_url("/tmp/b.png")],
        },
        {"role": "assistant", "content": "Two squares."},
        {"role": "user", "content": [{"type": "audio", "audio": "/tmp/a.wav"}]},
    ]
    assert messages == before


IMAGE = {"type": "image", "base64": B64, "mime_type": "image/png"}

REFUSALS = [
    # (message, error, words the message must hold)
    (
        HumanMessage([{"type": "image", "file_id": "file-abc"}]),
        ValueError,
        "HumanMessage content block 0 ('image') refers to a provider's stored file (file_id)",
    ),
    (
        HumanMessage([{"type": "audio", "file_id": "file-abc"}]),
        ValueError,
        "block 0 ('audio') refers to a provider's stored file (file_id)",
    ),
    (
        HumanMessage([{"type": "image", "source_type": "id", "id": "file-abc"}]),
        ValueError,
        "refers to a provider's stored file (source_type 'id')",
    ),
    (
        HumanMessage([{"type": "input_image", "file_id": "file-abc"}]),
        ValueError,
        "('input_image') refers to a provider's stored file",
    ),
    (HumanMessage([{"type": "image"}]), ValueError, "('image') has no image: give 'base64'"),
    (HumanMessage([{"type": "audio"}]), ValueError, "('audio') has no audio: give 'base64'"),
    (
        HumanMessage([{"type": "image", "source_type": "path", "path": "/a"}]),
        ValueError,
        "source_type 'path'; an image is given by 'url' or 'base64'",
    ),
    (
        HumanMessage([{"type": "image", "base64": B64, "mime_type": "application/pdf"}]),
        ValueError,
        "mime_type 'application/pdf' is not an image type",
    ),
    (
        HumanMessage([{"type": "image", "base64": ""}]),
        ValueError,
        "base64 data must be a non-empty string",
    ),
    (
        HumanMessage([{"type": "audio", "base64": WAV, "mime_type": "audio/mp4"}]),
        ValueError,
        "mime_type 'audio/mp4' is not an audio format",
    ),
    (
        HumanMessage([{"type": "audio", "base64": WAV, "mime_type": "audio/webm"}]),
        ValueError,
        "with ffmpeg first",
    ),
    (
        HumanMessage([{"type": "image_url", "image_url": {"detail": "low"}}]),
        ValueError,
        "('image_url') has no image URL",
    ),
    (
        HumanMessage([{"type": "input_audio", "input_audio": "UklGR"}]),
        ValueError,
        "must be {'type': 'input_audio', 'input_audio': {'data'",
    ),
    # media outside user messages: Gemma's templates read it in user turns only
    (
        ToolMessage([IMAGE], tool_call_id="1"),
        ValueError,
        "ToolMessage content block 0 ('image') is media in a message with role 'tool'",
    ),
    (
        AIMessage([{"type": "text", "text": "here"}, IMAGE]),
        ValueError,
        "AIMessage content block 1 ('image') is media in a message with role 'assistant'",
    ),
    (
        SystemMessage([image_url(URI)]),
        ValueError,
        "in user messages (HumanMessage) only",
    ),
    (
        ChatMessage(role="assistant", content=[input_audio(WAV, "wav")]),
        ValueError,
        "('input_audio') is media in a message with role 'assistant'",
    ),
    # data Gemma cannot read at all
    (
        HumanMessage([{"type": "video", "url": "/tmp/v.mp4"}]),
        TypeError,
        "('video'): Gemma cannot read video blocks (send frames as images)",
    ),
    (
        HumanMessage([{"type": "file", "base64": B64, "mime_type": "application/pdf"}]),
        TypeError,
        "Gemma cannot read file blocks",
    ),
    (
        HumanMessage([{"type": "text-plain", "text": "x", "mime_type": "text/plain"}]),
        TypeError,
        "Gemma cannot read text-plain blocks (send its text as a text block)",
    ),
    (
        HumanMessage([{"type": "hologram"}]),
        TypeError,
        "type 'hologram'; ChatGemmaLocal accepts strings",
    ),
]


@pytest.mark.parametrize(("message", "error", "words"), REFUSALS)
def test_bad_media_blocks_are_refused_by_name(
    message: BaseMessage, error: type[Exception], words: str
) -> None:
    before = message.model_copy(deep=True)
    with pytest.raises(error) as raised:
        convert_message_to_dict(message)
    assert words in str(raised.value)
    assert message == before


@pytest.mark.parametrize("block", [{"type": "text", "text": "x"}, {"type": "file"}, "text"])
def test_convert_media_block_takes_only_media(block: Any) -> None:
    with pytest.raises(TypeError, match="image and audio blocks are of the types 'audio', 'image'"):
        convert_media_block(block, where="block 3")


def test_audio_mime_types_name_only_formats_core_decodes() -> None:
    from core import media

    assert set(AUDIO_MIME_TYPES.values()) == set(media.AUDIO_FORMATS)
    assert {"image", "audio"} <= MEDIA_BLOCK_TYPES


def test_every_converted_part_is_a_part_core_reads() -> None:
    from core import media

    for _, part in CONVERSIONS:
        assert media.is_media_part(part), part


# ------------------------------------------------------------- end to end, tiny models
#
# ChatGemmaLocal on the tiny multimodal checkpoints (random weights, real processors):
# greedy decoding, so the same input gives the same reply and a different image gives
# a different one; every block form of the same image is the same model input.

#: (checkpoint fixture, backend): Gemma 3 reads images, Gemma 4 images and audio.
MULTIMODAL = [
    ("gemma3_vision_path", "transformers"),
    ("gemma4_vision_path", "transformers"),
    ("gemma3_vision_path", "mlx"),
    ("gemma4_vision_path", "mlx"),
]
REPLY_TOKENS = 12


@pytest.fixture(scope="module", params=MULTIMODAL, ids=lambda p: f"{p[0][:6]}-{p[1]}")
def mm_client(request: pytest.FixtureRequest) -> Iterator[Any]:
    fixture, backend = request.param
    client = make_client(backend, request.getfixturevalue(fixture))
    yield client
    client.close()


@pytest.fixture
def mm_model(mm_client: Any) -> ChatGemmaLocal:
    return ChatGemmaLocal(client=mm_client, temperature=0, max_tokens=REPLY_TOKENS)


def _ask(block: dict[str, Any]) -> list[BaseMessage]:
    return [HumanMessage([{"type": "text", "text": "What is in this picture?"}, block])]


def _image(seed: int) -> dict[str, Any]:
    return {"type": "image", "base64": b64(noise_png(seed)), "mime_type": "image/png"}


def test_the_image_reaches_the_model(mm_model: ChatGemmaLocal) -> None:
    first = mm_model.invoke(_ask(_image(1)))
    again = mm_model.invoke(_ask(_image(1)))
    other = mm_model.invoke(_ask(_image(2)))
    assert first.content == again.content
    assert first.usage_metadata == again.usage_metadata
    assert first.content != other.content


def test_every_block_form_is_the_same_input(mm_model: ChatGemmaLocal, tmp_path: Path) -> None:
    png = noise_png(3)
    path = tmp_path / "noise.png"
    path.write_bytes(png)
    uri = f"data:image/png;base64,{b64(png)}"
    forms = [
        {"type": "image", "base64": b64(png), "mime_type": "image/png"},
        {"type": "image", "source_type": "base64", "data": b64(png), "mime_type": "image/png"},
        {"type": "image_url", "image_url": {"url": uri}},
        {"type": "image", "url": str(path)},
        {"type": "image", "source_type": "url", "url": path.as_uri()},
        {"type": "input_image", "image_url": uri},
    ]
    replies = [mm_model.invoke(_ask(form)) for form in forms]
    assert len({r.content for r in replies}) == 1
    assert len({r.usage_metadata["input_tokens"] for r in replies if r.usage_metadata}) == 1


def test_usage_counts_the_image_tokens_core_counts(
    mm_model: ChatGemmaLocal, mm_client: Any
) -> None:
    block = _image(4)
    message = mm_model.invoke(_ask(block))
    openai = convert_messages_to_dicts(_ask(block))
    direct = mm_client.create(openai, temperature=0, max_tokens=REPLY_TOKENS)
    assert message.content == direct["choices"][0]["message"]["content"]
    assert message.usage_metadata is not None
    assert message.usage_metadata["input_tokens"] == direct["usage"]["prompt_tokens"]
    text_only = mm_model.invoke([HumanMessage("What is in this picture?")])
    assert text_only.usage_metadata is not None
    # the image's soft tokens (Gemma 3: 256; Gemma 4: the client's budget) are read
    assert message.usage_metadata["input_tokens"] - text_only.usage_metadata["input_tokens"] > 16


def test_stream_adds_up_to_invoke(mm_model: ChatGemmaLocal) -> None:
    messages = _ask(_image(5))
    whole = mm_model.invoke(messages)
    chunks = list(mm_model.stream(messages))
    joined = chunks[0]
    for chunk in chunks[1:]:
        joined += chunk
    assert len(chunks) > 1
    assert joined.content == whole.content
    assert joined.usage_metadata == whole.usage_metadata


async def test_async_gives_the_same_reply(mm_model: ChatGemmaLocal) -> None:
    messages = _ask(_image(6))
    assert (await mm_model.ainvoke(messages)).content == mm_model.invoke(messages).content


def test_batch_mixes_requests_with_and_without_images(mm_model: ChatGemmaLocal) -> None:
    inputs: list[list[BaseMessage]] = [
        _ask(_image(7)),
        [HumanMessage("Tell me about the sea.")],
        _ask(_image(8)),
    ]
    assert [m.content for m in mm_model.batch(inputs)] == [
        mm_model.invoke(i).content for i in inputs
    ]


def test_images_in_earlier_turns(mm_model: ChatGemmaLocal) -> None:
    history: list[BaseMessage] = [
        HumanMessage([_image(9), "Remember this picture."]),
        AIMessage("I will."),
        HumanMessage("What was in it?"),
    ]
    other = [HumanMessage([_image(10), "Remember this picture."]), *history[1:]]
    assert mm_model.invoke(history).content != mm_model.invoke(other).content


@pytest.mark.parametrize("backend", ["transformers", "mlx"])
def test_audio_reaches_gemma4(backend: str, gemma4_vision_path: Path, tmp_path: Path) -> None:
    client = make_client(backend, gemma4_vision_path)
    try:
        model = ChatGemmaLocal(client=client, temperature=0, max_tokens=REPLY_TOKENS)
        wav = tone_wav(440)
        path = tmp_path / "a.wav"
        path.write_bytes(wav)

        def ask(block: dict[str, Any]) -> str:
            reply = model.invoke([HumanMessage(["What do you hear?", block])])
            return str(reply.content)

        forms = [
            {"type": "audio", "base64": b64(wav), "mime_type": "audio/wav"},
            {"type": "input_audio", "input_audio": {"data": b64(wav), "format": "wav"}},
            {"type": "audio", "url": str(path)},
        ]
        replies = [ask(form) for form in forms]
        assert len(set(replies)) == 1
        other = ask({"type": "audio", "base64": b64(tone_wav(1500)), "mime_type": "audio/wav"})
        assert other != replies[0]
    finally:
        client.close()


def test_media_on_a_text_only_checkpoint_fails_before_generating(gemma3_path: Path) -> None:
    model = ChatGemmaLocal(model=str(gemma3_path), backend="transformers", max_tokens=4)
    with pytest.raises(ValueError, match="cannot read images: it reads text only"):
        model.invoke(_ask(_image(1)))
    # the model is still usable
    assert isinstance(model.invoke("hi").content, str)


def test_mlx_loads_mlx_vlm_at_the_first_image(gemma3_vision_path: Path) -> None:
    # backend="mlx": text through mlx-lm; the first image loads mlx-vlm's model (core.mlx_media)
    model = ChatGemmaLocal(model=str(gemma3_vision_path), backend="mlx", max_tokens=4)
    try:
        assert isinstance(model.invoke("hi").content, str)
        assert model.client._vision is None
        assert model.invoke(_ask(_image(1))).content
        assert model.client._vision is not None and model.client._vision.shared
    finally:
        model.client.close()
