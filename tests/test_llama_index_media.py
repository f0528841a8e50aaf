"""LlamaIndex ``ImageBlock`` / ``AudioBlock`` -> the OpenAI parts core reads (pure, no model).

One table row per way a block holds its media (bytes, base64 bytes, a file
object, a path, a URL; with and without a MIME type / format); a table of
refusals. Nothing is decoded here (core does) and no block is modified.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from llama_index.core.base.llms.types import (
    AudioBlock,
    ChatMessage,
    DocumentBlock,
    ImageBlock,
    TextBlock,
    VideoBlock,
)

from llama_index_gemma_local import to_openai_message, to_openai_messages
from llama_index_gemma_local.messages import AUDIO_FORMATS, audio_part, image_part

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


def test_audio_formats_are_the_ones_core_decodes() -> None:
    from core import media

    assert tuple(AUDIO_FORMATS) == tuple(media.AUDIO_FORMATS)


def test_every_part_is_one_core_reads(tmp_path: Path) -> None:
    from core import media

    for make, _ in [*IMAGES.values(), *AUDIOS.values()]:
        block = make(tmp_path)
        part = image_part(block) if isinstance(block, ImageBlock) else audio_part(block)
        assert media.is_media_part(part), part
