"""Images and audio through GemmaLocal: block conversions, then the tiny multimodal models.

Pure tier: one table row per way an ``ImageBlock`` / ``AudioBlock`` holds its
media (bytes, base64 bytes, a file object, a path, a URL; with and without a
MIME type / format); a table of refusals. Nothing is decoded there (core
does) and no block is modified.

End to end: ``chat`` / ``stream_chat`` / ``achat`` and a ``SimpleChatEngine``
whose history holds an image, on the tiny Gemma 3 vision and Gemma 4
vision + audio checkpoints (transformers, and MLX through mlx-vlm), greedy.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import make_client
from llama_index.core.base.llms.types import (
    AudioBlock,
    ChatMessage,
    DocumentBlock,
    ImageBlock,
    TextBlock,
    VideoBlock,
)
from llama_index.core.chat_engine import SimpleChatEngine
from media_support import noise_png, tone_wav

from llama_index_gemma_local import GemmaLocal, to_openai_message, to_openai_messages
from llama_index_gemma_local.messages import audio_part, image_part

PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00"
    b"\x1f\x15\xc4\x89\x00\x00\x00\rIDATx\x9cc\xf8\xff\xff?\x00\x05\xfe\x02\xfe\xa7\x35\x81\x84"
    b"\x00\x00\x00\x00IEND\xaeB`\x82"
)
PNG64 = base64.b64encode(PNG).decode()
WAV = b"RIFF\x24\x00\x00\x00WAVEfmt "  # a header is enough: nothing is decoded here
WAV64 = base64.b64encode(WAV).decode()


def image_url(url: str, detail: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"url": url}
    if detail is not None:
        spec["detail"] = detail
    return {"type": "image_url", "image_url": spec}


def _png_file(tmp: Path) -> Path:
    path = tmp / "dot.png"
    path.write_bytes(PNG)
    return path


def _wav_file(tmp: Path) -> Path:
    path = tmp / "beep.wav"
    path.write_bytes(WAV)
    return path


Row = tuple[Callable[[Path], Any], Callable[[Path], dict[str, Any]]]

IMAGES: dict[str, Row] = {
    "bytes": (
        lambda t: ImageBlock(image=PNG),
        lambda t: image_url(f"data:image/png;base64,{PNG64}"),
    ),
    "base64-bytes": (
        lambda t: ImageBlock(image=PNG64.encode(), image_mimetype="image/png"),
        lambda t: image_url(f"data:image/png;base64,{PNG64}"),
    ),
    "bytes-no-mime": (  # filetype cannot tell: core reads the format from the bytes
        lambda t: ImageBlock(image=b"\x00\x01\x02 not sniffable"),
        lambda t: image_url(
            "data:application/octet-stream;base64,"
            + base64.b64encode(b"\x00\x01\x02 not sniffable").decode()
        ),
    ),
    "file-object": (
        lambda t: ImageBlock(image=io.BytesIO(PNG), image_mimetype="image/png"),
        lambda t: image_url(f"data:image/png;base64,{PNG64}"),
    ),
    "path": (lambda t: ImageBlock(path=_png_file(t)), lambda t: image_url(str(t / "dot.png"))),
    "http-url": (
        lambda t: ImageBlock(url="https://example.org/cat.png"),
        lambda t: image_url("https://example.org/cat.png"),
    ),
    "file-url": (
        lambda t: ImageBlock(url=_png_file(t).as_uri()),
        lambda t: image_url((t / "dot.png").as_uri()),
    ),
    "data-url": (
        lambda t: ImageBlock(url=f"data:image/png;base64,{PNG64}"),
        lambda t: image_url(f"data:image/png;base64,{PNG64}"),
    ),
    "detail": (
        lambda t: ImageBlock(image=PNG, detail="low"),
        lambda t: image_url(f"data:image/png;base64,{PNG64}", "low"),
    ),
}

AUDIOS: dict[str, Row] = {
    "bytes-wav": (
        lambda t: AudioBlock(audio=WAV, format="wav"),
        lambda t: {"type": "input_audio", "input_audio": {"data": WAV64, "format": "wav"}},
    ),
    "bytes-sniffed-format": (  # AudioBlock guesses "wav" from the RIFF header
        lambda t: AudioBlock(audio=WAV),
        lambda t: {"type": "input_audio", "input_audio": {"data": WAV64, "format": "wav"}},
    ),
    "format-alias": (
        lambda t: AudioBlock(audio=WAV, format="MPEG"),
        lambda t: {"type": "input_audio", "input_audio": {"data": WAV64, "format": "mp3"}},
    ),
    "format-mime": (
        lambda t: AudioBlock(audio=WAV, format="audio/x-flac"),
        lambda t: {"type": "input_audio", "input_audio": {"data": WAV64, "format": "flac"}},
    ),
    "bytes-no-format": (
        lambda t: AudioBlock(audio=b"\x00\x01 unknown"),
        lambda t: {
            "type": "audio",
            "audio": "data:application/octet-stream;base64,"
            + base64.b64encode(b"\x00\x01 unknown").decode(),
        },
    ),
    "file-object": (
        lambda t: AudioBlock(audio=io.BytesIO(WAV), format="wav"),
        lambda t: {"type": "input_audio", "input_audio": {"data": WAV64, "format": "wav"}},
    ),
    "path": (
        lambda t: AudioBlock(path=_wav_file(t)),
        lambda t: {"type": "audio", "audio": str(t / "beep.wav")},
    ),
    "url": (
        lambda t: AudioBlock(url="https://example.org/a.ogg"),
        lambda t: {"type": "audio", "audio": "https://example.org/a.ogg"},
    ),
}


@pytest.mark.parametrize("case", IMAGES, ids=str)
def test_image_block_table(case: str, tmp_path: Path) -> None:
    make, expected = IMAGES[case]
    block = make(tmp_path)
    before = block.model_dump()
    assert image_part(block) == expected(tmp_path)
    assert block.model_dump() == before


@pytest.mark.parametrize("case", AUDIOS, ids=str)
def test_audio_block_table(case: str, tmp_path: Path) -> None:
    make, expected = AUDIOS[case]
    block = make(tmp_path)
    before = block.model_dump()
    assert audio_part(block) == expected(tmp_path)
    assert block.model_dump() == before


@pytest.mark.parametrize("case", [*IMAGES, *AUDIOS], ids=str)
def test_user_message_keeps_blocks_in_order(case: str, tmp_path: Path) -> None:
    make, expected = IMAGES.get(case) or AUDIOS[case]
    message = ChatMessage(
        role="user", blocks=[TextBlock(text="What is this?"), make(tmp_path), TextBlock(text="?")]
    )
    before = message.model_dump()
    assert to_openai_message(message) == {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is this?"},
            expected(tmp_path),
            {"type": "text", "text": "?"},
        ],
    }
    assert message.model_dump() == before


def test_a_file_object_is_read_from_its_start_and_left_where_it_was() -> None:
    stream = io.BytesIO(PNG)
    stream.seek(5)
    assert image_part(ImageBlock(image=stream, image_mimetype="image/png")) == image_url(
        f"data:image/png;base64,{PNG64}"
    )
    assert stream.tell() == 5


def test_images_in_several_turns(tmp_path: Path) -> None:
    messages = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(
            role="user", blocks=[ImageBlock(image=PNG), ImageBlock(path=_png_file(tmp_path))]
        ),
        ChatMessage(role="assistant", content="Two dots."),
        ChatMessage(role="user", blocks=[AudioBlock(audio=WAV), TextBlock(text="And this?")]),
    ]
    out = to_openai_messages(messages)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[1]["content"] == [
        image_url(f"data:image/png;base64,{PNG64}"),
        image_url(str(tmp_path / "dot.png")),
    ]
    assert out[3]["content"] == [
        {"type": "input_audio", "input_audio": {"data": WAV64, "format": "wav"}},
        {"type": "text", "text": "And this?"},
    ]


REFUSALS = [
    (
        ChatMessage(role="user", blocks=[ImageBlock()]),
        ValueError,
        "ImageBlock (block 0 of message 0, role 'user') has no image: set its image",
    ),
    (
        ChatMessage(role="user", blocks=[TextBlock(text="x"), AudioBlock()]),
        ValueError,
        "AudioBlock (block 1 of message 0, role 'user') has no audio",
    ),
    (
        ChatMessage(role="user", blocks=[AudioBlock(audio=WAV, format="m4a")]),
        ValueError,
        "has format 'm4a'; Gemma's audio reader decodes wav, flac, ogg, mp3",
    ),
    (
        ChatMessage(role="user", blocks=[ImageBlock(image=io.BytesIO(b""))]),
        ValueError,
        "holds no image data (0 bytes)",
    ),
    (
        ChatMessage(role="system", blocks=[ImageBlock(image=PNG)]),
        ValueError,
        "role 'system'): Gemma reads images and audio in user messages only",
    ),
    (
        ChatMessage(
            role="tool", blocks=[ImageBlock(image=PNG)], additional_kwargs={"tool_call_id": "1"}
        ),
        ValueError,
        "role 'tool'): Gemma reads images and audio in user messages only",
    ),
    (
        ChatMessage(role="user", blocks=[DocumentBlock(data=b"%PDF-1.4")]),
        TypeError,
        "got DocumentBlock (block 0 of message 0, role 'user'); extract its text into a TextBlock",
    ),
    (
        ChatMessage(role="user", blocks=[VideoBlock(video=b"\x00\x00\x00\x18ftypmp42")]),
        TypeError,
        "got VideoBlock (block 0 of message 0, role 'user'); send frames as ImageBlocks",
    ),
]


@pytest.mark.parametrize(("message", "error", "words"), REFUSALS)
def test_bad_media_blocks_are_refused_by_name(
    message: ChatMessage, error: type[Exception], words: str
) -> None:
    before = message.model_dump()
    with pytest.raises(error) as raised:
        to_openai_messages([message])
    assert words in str(raised.value)
    assert message.model_dump() == before


def test_every_part_is_one_core_reads(tmp_path: Path) -> None:
    from core import media

    for make, _ in [*IMAGES.values(), *AUDIOS.values()]:
        block = make(tmp_path)
        part = image_part(block) if isinstance(block, ImageBlock) else audio_part(block)
        assert media.is_media_part(part), part


# ------------------------------------------------------------- end to end, tiny models
#
# GemmaLocal on the tiny multimodal checkpoints (random weights, real processors):
# greedy decoding, so the same image gives the same reply and a different image a
# different one; bytes and a path to the same image are the same model input.

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
def mm_llm(mm_client: Any) -> GemmaLocal:
    return GemmaLocal(client=mm_client, temperature=0, max_tokens=REPLY_TOKENS)


def _ask(block: Any) -> list[ChatMessage]:
    return [ChatMessage(role="user", blocks=[TextBlock(text="What is in this picture?"), block])]


def test_the_image_reaches_the_model(mm_llm: GemmaLocal, tmp_path: Path) -> None:
    png = noise_png(1)
    path = tmp_path / "one.png"
    path.write_bytes(png)
    first = mm_llm.chat(_ask(ImageBlock(image=png)))
    from_path = mm_llm.chat(_ask(ImageBlock(path=path)))
    from_url = mm_llm.chat(_ask(ImageBlock(url=path.as_uri())))
    other = mm_llm.chat(_ask(ImageBlock(image=noise_png(2))))
    assert first.message.content == from_path.message.content == from_url.message.content
    assert first.message.content != other.message.content


def test_stream_chat_adds_up_to_chat(mm_llm: GemmaLocal) -> None:
    messages = _ask(ImageBlock(image=noise_png(3)))
    whole = mm_llm.chat(messages)
    deltas = [r.delta or "" for r in mm_llm.stream_chat(messages)]
    assert len(deltas) > 1
    assert "".join(deltas) == whole.message.content


async def test_async_chat_gives_the_same_reply(mm_llm: GemmaLocal) -> None:
    messages = _ask(ImageBlock(image=noise_png(4)))
    reply = await mm_llm.achat(messages)
    assert reply.message.content == mm_llm.chat(messages).message.content


def test_usage_counts_the_image_tokens_core_counts(mm_llm: GemmaLocal, mm_client: Any) -> None:
    messages = _ask(ImageBlock(image=noise_png(5)))
    reply = mm_llm.chat(messages)
    direct = mm_client.create(to_openai_messages(messages), temperature=0, max_tokens=REPLY_TOKENS)
    assert reply.message.content == direct["choices"][0]["message"]["content"]
    assert reply.additional_kwargs["prompt_tokens"] == direct["usage"]["prompt_tokens"]


def test_multimodal_chat_in_a_chat_engine(mm_llm: GemmaLocal) -> None:
    def engine_reply(seed: int) -> tuple[str, list[ChatMessage]]:
        history = [
            ChatMessage(
                role="user", blocks=[ImageBlock(image=noise_png(seed)), TextBlock(text="Look.")]
            ),
            ChatMessage(role="assistant", content="I see it."),
        ]
        engine = SimpleChatEngine.from_defaults(llm=mm_llm, system_prompt="Be brief.")
        reply = engine.chat("What is in the picture?", chat_history=history)
        return str(reply), engine.chat_history

    text, history = engine_reply(6)
    expected = mm_llm.chat(
        [
            ChatMessage(role="system", content="Be brief."),
            *history[:2],
            ChatMessage(role="user", content="What is in the picture?"),
        ]
    )
    assert text == expected.message.content
    assert isinstance(history[0].blocks[0], ImageBlock)  # the image stays in the memory
    assert engine_reply(7)[0] != text


@pytest.mark.parametrize("backend", ["transformers", "mlx"])
def test_audio_block_reaches_gemma4(backend: str, gemma4_vision_path: Path, tmp_path: Path) -> None:
    client = make_client(backend, gemma4_vision_path)
    try:
        llm = GemmaLocal(client=client, temperature=0, max_tokens=REPLY_TOKENS)
        wav = tone_wav(440)
        path = tmp_path / "a.wav"
        path.write_bytes(wav)

        def ask(block: AudioBlock) -> str:
            messages = [ChatMessage(role="user", blocks=[TextBlock(text="Listen."), block])]
            return str(llm.chat(messages).message.content)

        same = {ask(AudioBlock(audio=wav, format="wav")), ask(AudioBlock(path=path))}
        assert len(same) == 1
        assert ask(AudioBlock(audio=tone_wav(1500), format="wav")) not in same
    finally:
        client.close()


def test_mlx_loads_mlx_vlm_at_the_first_image(gemma3_vision_path: Path) -> None:
    # backend="mlx": text through mlx-lm; the first image loads mlx-vlm's model (core.mlx_media)
    llm = GemmaLocal(str(gemma3_vision_path), backend="mlx", max_tokens=4)
    try:
        assert isinstance(llm.complete("hi").text, str)
        assert llm.client._vision is None
        assert llm.chat(_ask(ImageBlock(image=noise_png(1)))).message.content
        assert llm.client._vision is not None and llm.client._vision.shared
    finally:
        llm.client.close()
