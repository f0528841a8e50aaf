"""Images and audio in messages (issue 19): core.media's parsing, the families' checks, and
both backends (transformers; MLX through mlx-vlm) on the tiny multimodal checkpoints (Gemma 3
vision, Gemma 4 vision + audio), greedy and on the CPU; and what the two backends agree on.

Images and sounds are made here (PIL, numpy, soundfile): nothing is downloaded, and the one
http test serves its image from a local server on an owned thread.
"""

from __future__ import annotations

import base64
import copy
import http.server
import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core import media
from core.errors import ContextWindowExceededError
from core.families import family_for
from core.messages import normalize_messages
from tests.conftest import make_client

# ----------------------------------------------------------------- helpers


def image(seed: int, width: int = 56, height: int = 40) -> Any:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def png(seed: int, **size: int) -> bytes:
    out = io.BytesIO()
    image(seed, **size).save(out, format="PNG")
    return out.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def wav(hz: float, seconds: float = 0.5, rate: int = 16_000, fmt: str = "WAV") -> bytes:
    import numpy as np
    import soundfile

    t = np.arange(int(seconds * rate)) / rate
    out = io.BytesIO()
    soundfile.write(out, 0.5 * np.sin(2 * np.pi * hz * t), rate, format=fmt)
    return out.getvalue()


def ask(*parts: dict[str, Any], text: str = "What is this?") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, *parts]}]


def image_url(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def input_audio(data: bytes, fmt: str = "wav") -> dict[str, Any]:
    return {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt},
    }


def reply(result: dict[str, Any]) -> str:
    return str(result["choices"][0]["message"]["content"])


GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 8}
#: A JSON schema whose replies are short (the tiny models never end a free string).
COLOUR: dict[str, Any] = {
    "type": "object",
    "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]}},
    "required": ["colour"],
    "additionalProperties": False,
}


# ------------------------------------------------------------- parsing


def test_every_image_source_decodes_to_the_same_pixels(tmp_path: Path) -> None:
    data = png(3)
    file = tmp_path / "cat.png"
    file.write_bytes(data)
    parts = [
        image_url(data_uri(data)),
        image_url(str(file)),
        image_url(file.as_uri()),
        {"type": "image_url", "image_url": data_uri(data)},  # the URL string alone
        {"type": "image", "image": data},
        {"type": "image", "image": file},
        {"type": "image", "image": image(3)},
    ]
    expected = image(3).tobytes()
    for i, part in enumerate(parts):
        decoded = media.parse_part(part, f"part {i}")
        assert isinstance(decoded, media.Image)
        assert decoded.image.convert("RGB").tobytes() == expected, part["type"]
        assert decoded.size == (56, 40)


def test_audio_sources_decode_to_mono_samples(tmp_path: Path) -> None:
    import numpy as np

    data = wav(440)
    (tmp_path / "a.wav").write_bytes(data)
    for part in (
        input_audio(data),
        input_audio(wav(440, fmt="FLAC"), "flac"),
        {"type": "audio", "audio": data},
        {"type": "audio", "audio": tmp_path / "a.wav"},
        {"type": "audio", "audio": data_uri(data, "audio/wav")},
    ):
        decoded = media.parse_part(part, "p")
        assert isinstance(decoded, media.Audio)
        assert decoded.sampling_rate == 16_000 and decoded.samples.ndim == 1
        assert decoded.seconds == pytest.approx(0.5)
    stereo = np.stack([np.zeros(800), np.ones(800)], axis=1)
    array = media.parse_part({"type": "audio", "audio": stereo, "sampling_rate": 8000}, "p")
    assert isinstance(array, media.Audio) and np.allclose(array.samples, 0.5)


def _truncated_png() -> bytes:
    return png(1)[:200]


BAD_PARTS = [
    pytest.param(image_url("data:image/png;base64,%%%not base64%%%"), "not valid base64", id="b64"),
    pytest.param(image_url("data:image/png,rawtext"), "not base64-encoded", id="not-b64-uri"),
    pytest.param(
        image_url("/no/such/picture.png"), "'/no/such/picture.png' does not exist", id="path"
    ),
    pytest.param(image_url("file:///no/such.png"), "'/no/such.png' does not exist", id="file-url"),
    pytest.param(image_url("ftp://host/x.png"), "unsupported URL scheme 'ftp'", id="scheme"),
    pytest.param(
        {"type": "image", "image": _truncated_png()}, "not a readable image", id="truncated"
    ),
    pytest.param(
        {"type": "image", "image": b"hello, not a picture"}, "not an image PIL can read", id="junk"
    ),
    pytest.param({"type": "image", "image": 42}, "expected a URL, a path or bytes", id="int"),
    pytest.param({"type": "image"}, "has type 'image' but no 'image'", id="no-image"),
    pytest.param(
        {"type": "image_url", "image_url": {"url": "x.png", "detail": "ultra"}},
        "detail",
        id="detail",
    ),
    pytest.param({"type": "image_url", "image_url": {}}, "'url'", id="no-url"),
    pytest.param(
        input_audio(b"RIFF", "aac"), "supported audio formats are wav, flac, ogg, mp3", id="aac"
    ),
    pytest.param(
        {"type": "input_audio", "input_audio": {"data": "@@@", "format": "wav"}},
        "not valid base64",
        id="audio-b64",
    ),
    pytest.param(input_audio(b"not a wav file at all"), "not readable wav audio", id="audio-junk"),
    pytest.param({"type": "audio", "audio": [0.0, 0.1]}, "needs 'sampling_rate'", id="no-rate"),
    pytest.param(
        {"type": "audio", "audio": [[[0.0]]], "sampling_rate": 16000}, "1-D", id="audio-shape"
    ),
]


@pytest.mark.parametrize(("part", "error"), BAD_PARTS)
def test_bad_parts_raise_value_errors_naming_the_part(part: dict[str, Any], error: str) -> None:
    messages = ask(part)
    before = copy.deepcopy(messages)
    with pytest.raises(ValueError, match=error) as info:
        media.resolve_messages(messages)
    assert "messages[0]['content'][1]" in str(info.value)
    assert messages == before


def test_media_outside_user_messages_is_refused() -> None:
    part = image_url(data_uri(png(0)))
    for role in ("system", "assistant"):
        messages = [{"role": role, "content": [part]}, {"role": "user", "content": "hi"}]
        with pytest.raises(ValueError, match="allowed in user messages only"):
            media.resolve_messages(messages)


class _Images(http.server.BaseHTTPRequestHandler):
    body = png(5)

    def do_GET(self) -> None:
        if self.path != "/cat.png":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def image_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=server.serve_forever, name="test-image-server")
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def test_http_urls_are_fetched_with_a_size_limit(image_server: str, monkeypatch) -> None:
    fetched = media.parse_part(image_url(f"{image_server}/cat.png"), "p")
    assert isinstance(fetched, media.Image) and fetched.image.tobytes() == image(5).tobytes()
    with pytest.raises(
        ValueError, match=r"fetching http://127\.0\.0\.1:\d+/dog\.png failed: HTTP 404"
    ):
        media.parse_part(image_url(f"{image_server}/dog.png"), "p")
    monkeypatch.setattr(media, "MAX_IMAGE_BYTES", 100)
    with pytest.raises(ValueError, match="larger than the limit of 100 bytes"):
        media.parse_part(image_url(f"{image_server}/cat.png"), "p")


def test_an_unreachable_url_names_the_url() -> None:
    closed = "http://127.0.0.1:9/photo.png"  # the discard port: nothing listens
    with pytest.raises(
        ValueError, match=r"could not fetch http://127\.0\.0\.1:9/photo\.png .*data URI"
    ):
        media.parse_part(image_url(closed), "messages[0]['content'][1]")


def test_resolving_never_mutates_and_keeps_text_only_messages() -> None:
    text_only = [{"role": "user", "content": "hello"}]
    assert media.resolve_messages(text_only) is text_only
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, image_url(data_uri(png(0)))]},
    ]
    before = copy.deepcopy(messages)
    resolved = media.resolve_messages(messages)
    assert messages == before and resolved is not messages
    assert resolved[0] is messages[0]  # no media: the same dict
    part = resolved[1]["content"][1]
    assert part["type"] == "image" and isinstance(part["image"], media.Image)
    assert media.resolve_messages(resolved) is resolved  # already decoded: nothing to do
    assert media.media_kinds(messages) == {"image"}


def test_user_content_with_media_renders_as_parts_in_order() -> None:
    one, two = image_url(data_uri(png(1))), image_url(data_uri(png(2)))
    messages = [
        {"role": "system", "content": "S"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}, one],
        },
        {
            "role": "user",
            "content": [{"type": "text", "text": "c"}, two, {"type": "text", "text": "d"}],
        },
    ]
    turns = normalize_messages(messages)
    content = turns[1]["content"]
    assert [p["type"] for p in content] == ["text", "image", "text", "image", "text"]
    # Text parts of a message join with "\n" and turns with "\n\n", as for text alone.
    assert content[0]["text"] == "a\nb" and content[2]["text"] == "c" and content[4]["text"] == "d"
    images = media.collect_media(turns)
    assert [i.image.tobytes() for i in images] == [image(1).tobytes(), image(2).tobytes()]
    # Gemma 2 folds the system text into the first turn's first text part.
    folded = normalize_messages(messages, system_role=False)
    assert folded[0]["content"][0]["text"] == "S\n\na\nb"
    text = [
        {"role": "user", "content": [{"type": "text", "text": "a"}]},
        {"role": "user", "content": "b"},
    ]
    assert normalize_messages(text) == [{"role": "user", "content": "a\n\nb"}]


def test_families_say_what_a_checkpoint_reads() -> None:
    gemma3, gemma4 = family_for("gemma3"), family_for("gemma4")
    assert gemma3.media_inputs({"model_type": "gemma3_text"}) == frozenset()
    assert gemma3.media_inputs({"model_type": "gemma3", "vision_config": {}}) == {"image"}
    assert gemma3.media_inputs(None) is None
    e2b = {"model_type": "gemma4", "vision_config": {}, "audio_config": {}}
    assert gemma4.media_inputs(e2b) == {"image", "audio"}
    assert gemma3.media_placeholders(None) == {"image": "<start_of_image>"}
    assert gemma4.media_placeholders(e2b) == {"image": "<|image|>", "audio": "<|audio|>"}
    with pytest.raises(
        ValueError,
        match=r"my/1b cannot read images: it reads text only \(model_type 'gemma3_text'\)",
    ):
        gemma3.check_media({"image"}, "my/1b", {"model_type": "gemma3_text"})
    with pytest.raises(ValueError, match="cannot read audio: it reads text and images only"):
        gemma4.check_media({"audio"}, "my/31b", {"model_type": "gemma4", "vision_config": {}})
    gemma4.check_media({"image", "audio"}, "my/e2b", e2b)
    gemma3.check_media({"image"}, "not/downloaded", None)  # unknown until loaded
    options = media.MediaOptions(image_soft_tokens=140)
    assert gemma4.processor_options(options) == {"max_soft_tokens": 140}
    with pytest.raises(ValueError, match="image_soft_tokens is a Gemma 4 option"):
        gemma3.processor_options(options)
    assert gemma3.processor_options(media.MediaOptions(pan_and_scan=True)) == {
        "do_pan_and_scan": True
    }
    with pytest.raises(ValueError, match="pan_and_scan is a Gemma 3 option"):
        gemma4.processor_options(media.MediaOptions(pan_and_scan=True))
    with pytest.raises(ValueError, match=r"image_soft_tokens must be one of \(70, 140"):
        media.MediaOptions(image_soft_tokens=100)


# ------------------------------------------------------------- both backends

#: The backends that read images and audio; every test below runs on each.
MULTIMODAL = ("transformers", "mlx")


@pytest.fixture(scope="module", params=MULTIMODAL)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def gemma3_vision(backend: str, gemma3_vision_path: Path) -> Iterator[Any]:
    client = make_client(backend, gemma3_vision_path)
    yield client
    client.close()


@pytest.fixture(scope="module")
def gemma4_vision(backend: str, gemma4_vision_path: Path) -> Iterator[Any]:
    client = make_client(backend, gemma4_vision_path)
    yield client
    client.close()


def _processor(path: Path) -> Any:
    from core.transformers_media import load_processor

    return load_processor(str(path), "gemma4" if "gemma4" in path.name else "gemma3")


def test_gemma3_reads_images_from_every_source(gemma3_vision, gemma3_vision_path, tmp_path) -> None:
    from PIL import Image

    data = png(7)
    (tmp_path / "p.png").write_bytes(data)
    sources = [
        image_url(data_uri(data)),
        image_url(str(tmp_path / "p.png")),
        image_url((tmp_path / "p.png").as_uri()),
        {"type": "image", "image": data},
        {"type": "image", "image": Image.open(io.BytesIO(data))},
    ]
    results = [gemma3_vision.create(ask(part), **GREEDY) for part in sources]
    assert len({reply(r) for r in results}) == 1
    # Exact prompt_tokens: the processor's ids, with the image's 256 soft tokens.
    prompt = gemma3_vision.format_prompt(ask(sources[0]))
    processor = _processor(gemma3_vision_path)
    ids = processor(text=[prompt.text], images=[[image(7)]], add_special_tokens=False)["input_ids"][
        0
    ]
    assert list(prompt.ids) == list(ids)
    assert prompt.ids.count(processor.tokenizer.image_token_id) == 256  # <image_soft_token>
    assert {r["usage"]["prompt_tokens"] for r in results} == {len(ids)}
    text_only = gemma3_vision.format_prompt(ask(text="What is this?"))
    assert len(ids) > len(text_only.ids) + 256


def test_the_image_reaches_the_model(gemma3_vision, gemma4_vision) -> None:
    for client in (gemma3_vision, gemma4_vision):
        a, b, a_again = (
            reply(client.create(ask(image_url(data_uri(png(seed)))), **GREEDY))
            for seed in (0, 1, 0)
        )
        assert a != b, client.model_name  # two images, two answers
        assert a == a_again


def test_gemma4_image_and_audio_prompt_tokens(gemma4_vision, gemma4_vision_path) -> None:
    import numpy as np

    messages = ask(image_url(data_uri(png(2))), input_audio(wav(300)))
    prompt = gemma4_vision.format_prompt(messages)
    processor = _processor(gemma4_vision_path)
    samples = media.decode_audio(wav(300), "w").samples
    expected = processor(
        text=[prompt.text], images=[[image(2)]], audio=[samples], add_special_tokens=False
    )["input_ids"][0]
    assert list(prompt.ids) == list(expected)
    ids = np.array(prompt.ids)
    assert 0 < (ids == processor.image_token_id).sum() <= 70  # within the tiny budget
    assert (ids == processor.audio_token_id).sum() > 0
    result = gemma4_vision.create(messages, **GREEDY)
    assert result["usage"]["prompt_tokens"] == len(expected)


def test_gemma4_hears_the_audio(gemma4_vision) -> None:
    low, high, low_again = (
        reply(gemma4_vision.create(ask(input_audio(wav(hz)), text="Listen."), **GREEDY))
        for hz in (200, 3000, 200)
    )
    assert low != high and low == low_again
    # 8 kHz audio is resampled to the feature extractor's 16 kHz: the same token count.
    eight = gemma4_vision.format_prompt(ask(input_audio(wav(200, rate=8000)), text="Listen."))
    sixteen = gemma4_vision.format_prompt(ask(input_audio(wav(200)), text="Listen."))
    assert len(eight.ids) == len(sixteen.ids)


def test_streaming_with_an_image(gemma3_vision) -> None:
    messages = ask(image_url(data_uri(png(4))))
    whole = gemma3_vision.create(messages, **GREEDY)
    chunks = list(gemma3_vision.create(messages, stream=True, **GREEDY))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == reply(whole)
    assert chunks[-1]["usage"]["prompt_tokens"] == whole["usage"]["prompt_tokens"]


@pytest.mark.asyncio
async def test_async_with_an_image(gemma3_vision) -> None:
    messages = ask(image_url(data_uri(png(4))))
    result = await gemma3_vision.acreate(messages, **GREEDY)
    assert reply(result) == reply(gemma3_vision.create(messages, **GREEDY))


def test_batches_mix_requests_with_and_without_media(gemma3_vision, gemma4_vision) -> None:
    for client in (gemma3_vision, gemma4_vision):
        conversations = [
            ask(image_url(data_uri(png(10)))),
            [{"role": "user", "content": "Write a short poem about the sea."}],
            ask(image_url(data_uri(png(11))), image_url(data_uri(png(12))), text="Compare."),
        ]
        if client is gemma4_vision:
            conversations.append(ask(input_audio(wav(500)), text="Listen."))
        alone = [client.create(c, **GREEDY) for c in conversations]
        batch = client.create_batch(conversations, **GREEDY)
        assert [reply(r) for r in batch] == [reply(r) for r in alone]
        assert [r["usage"] for r in batch] == [r["usage"] for r in alone]
        n = client.create(conversations[0], n=2, **GREEDY)
        assert [c["message"]["content"] for c in n["choices"]] == [reply(alone[0])] * 2


def test_gemma4_thinks_about_an_image(gemma4_vision) -> None:
    """Gemma 4's thinking channel with an image: the family's parser splits the thought
    from the JSON reply, and usage counts the thought, as for text. The tiny model is
    steered: <|channel> (100) and <channel|> (101) open and close the thought at once,
    <turn|> (106) ends the reply."""
    import json

    out = gemma4_vision.create(
        ask(image_url(data_uri(png(2)))),
        temperature=0,
        max_tokens=96,
        thinking=True,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": COLOUR}},
        logit_bias={100: 100, 101: 100, 106: 100},
    )
    message = out["choices"][0]["message"]
    assert json.loads(message["content"])["colour"] in ("red", "green", "blue")
    assert out["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0
    assert out["choices"][0]["finish_reason"] == "stop"


def test_media_tokens_count_against_the_context_window(gemma3_vision) -> None:
    # 8 images x 260 tokens > the tiny model's 2048-token window.
    parts = [image_url(data_uri(png(i))) for i in range(8)]
    messages = ask(*parts)
    with pytest.raises(
        ContextWindowExceededError, match=r"more for the images / audio\) but .* 2048"
    ) as info:
        gemma3_vision.create(messages, **GREEDY)
    assert isinstance(info.value, ValueError)
    assert reply(gemma3_vision.create(ask(parts[0]), **GREEDY))  # still usable


def test_bad_media_leaves_the_client_usable(gemma4_vision) -> None:
    good = ask(image_url(data_uri(png(0))))
    for part, error in (
        ({"type": "image", "image": _truncated_png()}, "not a readable image"),
        (input_audio(b"x", "m4a"), "supported audio formats"),
        (image_url("/nowhere.png"), "does not exist"),
    ):
        messages = ask(part)
        before = copy.deepcopy(messages)
        with pytest.raises(ValueError, match=error):
            gemma4_vision.create(messages, **GREEDY)
        assert messages == before
    spelled = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "<|image|> here"}, good[0]["content"][1]],
        }
    ]
    with pytest.raises(ValueError, match=r"holds 2 <\|image\|> markers for 1 image parts"):
        gemma4_vision.create(spelled, **GREEDY)
    assert reply(gemma4_vision.create(good, **GREEDY))


_CANNOT_READ = [
    (
        "gemma3_path",
        "image",
        r"cannot read images: it reads text only \(model_type 'gemma3_text'\)",
    ),
    ("gemma2_path", "image", r"cannot read images: it reads text only \(model_type 'gemma2'\)"),
    ("gemma4_path", "audio", r"cannot read audio: it reads text only \(model_type 'gemma4_text'\)"),
    ("gemma3_vision_path", "audio", "cannot read audio: it reads text and images only"),
]


@pytest.mark.parametrize(
    ("backend", "checkpoint", "part", "error"),
    [(b, *row) for b in MULTIMODAL for row in _CANNOT_READ]
    + [
        ("transformers", "gemma3n_path", "image", "Gemma 3n's images and audio need its full model")
    ],
)
def test_checkpoints_that_cannot_read_it_refuse_before_loading(
    request: pytest.FixtureRequest, backend: str, checkpoint: str, part: str, error: str
) -> None:
    path = request.getfixturevalue(checkpoint)
    client = make_client(backend, path)
    try:
        media_part = image_url(data_uri(png(0))) if part == "image" else input_audio(wav(300))
        with pytest.raises(ValueError, match=error) as info:
            client.create(ask(media_part), **GREEDY)
        assert str(path) in str(info.value) and not client.is_loaded
    finally:
        client.close()


def test_mlx_gemma3n_without_towers_says_why(gemma3n_path: Path) -> None:
    # MLX reads Gemma 3n's images and audio through mlx-vlm's gemma3n; this tiny 3n holds its
    # text weights only (gemma3n_media_path has the towers), so mlx-vlm cannot load it.
    client = make_client("mlx", gemma3n_path)
    try:
        with pytest.raises(ValueError, match=r"mlx-vlm cannot load .* vision / audio towers"):
            client.create(ask(image_url(data_uri(png(0)))), **GREEDY)
        text = client.create([{"role": "user", "content": "Hello"}], **GREEDY)
        assert text["usage"]["completion_tokens"] > 0  # still usable for text
    finally:
        client.close()


def test_processor_options(backend, gemma3_vision_path, gemma4_vision_path) -> None:
    wide = {"type": "image", "image": image(1, width=1024, height=256)}
    plain = make_client(backend, gemma3_vision_path)
    crops = make_client(backend, gemma3_vision_path, pan_and_scan=True)
    budget = make_client(backend, gemma4_vision_path, image_soft_tokens=140)
    default4 = make_client(backend, gemma4_vision_path)
    try:
        one = plain.create(ask(wide), **GREEDY)["usage"]["prompt_tokens"]
        more = crops.create(ask(wide), **GREEDY)["usage"]["prompt_tokens"]
        assert more > one + 256  # the crops: 256 soft tokens each, and the words around them
        processor = _processor(gemma3_vision_path)
        text = crops.format_prompt(ask(wide)).text
        expected = processor(
            text=[text], images=[[wide["image"]]], add_special_tokens=False, do_pan_and_scan=True
        )["input_ids"][0]
        assert more == len(expected)
        big = {"type": "image", "image": image(2, width=640, height=480)}
        token = _processor(gemma4_vision_path).image_token_id
        small = default4.format_prompt(ask(big)).ids.count(token)
        large = budget.format_prompt(ask(big)).ids.count(token)
        assert small <= 70 < large <= 140
    finally:
        for client in (plain, crops, budget, default4):
            client.close()
    with pytest.raises(ValueError, match="image_soft_tokens is a Gemma 4 option"):
        make_client(backend, gemma3_vision_path, image_soft_tokens=280)
    with pytest.raises(ValueError, match="pan_and_scan is a Gemma 3 option"):
        make_client(backend, gemma4_vision_path, pan_and_scan=False)
    with pytest.raises(ValueError, match="image_soft_tokens must be one of"):
        make_client(backend, gemma4_vision_path, image_soft_tokens=64)


def test_json_tools_and_seeds_with_an_image(gemma3_vision) -> None:
    """Core's grammar, seeded sampler and penalties apply to a request with an image as to text."""
    import json

    messages = ask(image_url(data_uri(png(6))))
    out = gemma3_vision.create(
        messages,
        temperature=0,
        max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": COLOUR}},
    )
    assert json.loads(reply(out))["colour"] in ("red", "green", "blue")  # the grammar held
    tool = {
        "type": "function",
        "function": {
            "name": "describe",
            "description": "Describe the picture.",
            "parameters": {
                "type": "object",
                "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]}},
                "required": ["colour"],
            },
        },
    }
    called = gemma3_vision.create(
        messages,
        temperature=0,
        max_tokens=200,
        tools=[tool],
        tool_choice="required",
        parallel_tool_calls=False,
    )
    (call,) = called["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "describe"
    assert json.loads(call["function"]["arguments"])["colour"] in ("red", "green", "blue")
    assert called["choices"][0]["finish_reason"] == "tool_calls"
    sampled = [
        reply(gemma3_vision.create(messages, temperature=1.0, max_tokens=8, seed=seed))
        for seed in (1, 1, 2)
    ]
    assert sampled[0] == sampled[1] != sampled[2]
    token = gemma3_vision.tokenizer.encode("sea", add_special_tokens=False)[0]
    biased = gemma3_vision.create(messages, temperature=0, max_tokens=4, logit_bias={token: 100})
    assert reply(biased) == gemma3_vision.tokenizer.decode([token] * 4)


def test_a_client_can_refuse_local_files_and_urls(gemma3_vision_path, tmp_path) -> None:
    (tmp_path / "p.png").write_bytes(png(0))
    closed = media.Sources(local_files=False, urls=False)
    for part in (
        image_url(str(tmp_path / "p.png")),
        image_url((tmp_path / "p.png").as_uri()),
        {"type": "image", "image": tmp_path / "p.png"},
        {"type": "audio", "audio": str(tmp_path / "a.wav")},
    ):
        with pytest.raises(ValueError, match="does not read media from local files"):
            media.resolve_messages(ask(part), closed)
    with pytest.raises(ValueError, match="does not read media from URLs"):
        media.resolve_messages(ask(image_url("https://example.com/cat.png")), closed)
    assert media.resolve_messages(ask(image_url(data_uri(png(0)))), closed)  # inline: fine
    client = make_client("transformers", gemma3_vision_path)
    client.media_sources = closed
    try:
        with pytest.raises(ValueError, match="does not read media from local files"):
            client.create(ask(image_url(str(tmp_path / "p.png"))), **GREEDY)
        assert not client.is_loaded
    finally:
        client.close()


# ------------------------------------------------------------ MLX (mlx-vlm)


@pytest.fixture(scope="module")
def mlx_gemma3(gemma3_vision_path: Path) -> Iterator[Any]:
    client = make_client("mlx", gemma3_vision_path)
    yield client
    client.close()


@pytest.fixture(scope="module")
def mlx_gemma4(gemma4_vision_path: Path) -> Iterator[Any]:
    client = make_client("mlx", gemma4_vision_path)
    yield client
    client.close()


def test_mlx_vlm_shares_mlx_lms_language_weights(mlx_gemma3, mlx_gemma4) -> None:
    from mlx.utils import tree_flatten

    for client in (mlx_gemma3, mlx_gemma4):
        text = [{"role": "user", "content": "Write a short poem about the sea."}]
        before = reply(client.create(text, **GREEDY))
        assert client._vision is None  # text only: mlx-vlm not loaded
        assert reply(client.create(ask(image_url(data_uri(png(0)))), **GREEDY))
        vision = client._vision
        assert vision.shared
        ours = dict(tree_flatten(client.model.parameters()))
        theirs = dict(tree_flatten(vision.model.parameters()))
        language = {k: v for k, v in theirs.items() if k.startswith("language_model.")}
        # Every language weight of mlx-vlm's model is one of mlx-lm's arrays (not a copy);
        # Gemma 3's separate lm_head is the tied embedding.
        held = {id(v) for v in ours.values()}
        assert language and all(id(v) in held for v in language.values())
        assert any(k.startswith("vision_tower.") for k in theirs)  # the towers are its own
        assert reply(client.create(text, **GREEDY)) == before  # text still through mlx-lm


def test_mlx_quantized_checkpoints(gemma3_vision_path, gemma4_vision_path, tmp_path) -> None:
    """4-bit checkpoints written by mlx_vlm.convert (as the mlx-community ones): mlx-lm reads
    their text, mlx-vlm shares its quantized arrays and reads the image. One written by
    mlx_lm.convert has lost its towers and its vision config: it reads text only, and an
    image is refused before loading."""
    import subprocess
    import sys

    from mlx_lm import convert as lm_convert

    for path in (gemma3_vision_path, gemma4_vision_path):
        out = tmp_path / f"{path.name}-vlm-4bit"
        # In a process of its own: mlx_vlm.convert loads the processor through the
        # AutoProcessor patch that mlx-vlm installs on import, which core.mlx_media takes
        # back in this process.
        convert = (
            "import sys; from mlx_vlm.convert import convert; "
            "convert(sys.argv[1], sys.argv[2], quantize=True, q_bits=4, q_group_size=64)"
        )
        subprocess.run([sys.executable, "-c", convert, str(path), str(out)], check=True)
        client = make_client("mlx", out)
        try:
            a, b = (
                reply(client.create(ask(image_url(data_uri(png(s)))), **GREEDY)) for s in (0, 1)
            )
            assert a != b and client._vision.shared
            assert client.get_model_info()["quantization"] == "mlx 4-bit (group size 64)"
        finally:
            client.close()
    out = tmp_path / "lm-4bit"
    lm_convert(str(gemma3_vision_path), str(out), quantize=True, q_bits=4, q_group_size=64)
    client = make_client("mlx", out)
    try:
        with pytest.raises(ValueError, match=r"cannot read images: it reads text only"):
            client.create(ask(image_url(data_uri(png(0)))), **GREEDY)  # no vision_config left
        assert not client.is_loaded
        assert reply(client.create([{"role": "user", "content": "Hello"}], **GREEDY))
    finally:
        client.close()


def test_mlx_close_releases_mlx_vlm_and_loads_it_again(gemma4_vision_path) -> None:
    client = make_client("mlx", gemma4_vision_path)
    try:
        messages = ask(image_url(data_uri(png(3))), input_audio(wav(400)))
        first = client.create(messages, **GREEDY)
        vision = client._vision
        client.close()
        assert client._vision is None and not client.is_loaded
        again = client.create(messages, **GREEDY)
        assert client._vision is not None and client._vision is not vision
        assert reply(again) == reply(first) and again["usage"] == first["usage"]
    finally:
        client.close()


def test_transformers_takes_its_own_processor_under_mlx_vlms_patch(
    gemma3_vision_path, monkeypatch
) -> None:
    # A program that imported mlx-vlm's Gemma modules itself has mlx-vlm's AutoProcessor
    # patch; the transformers backend still gets transformers' processor (torch tensors).
    from mlx_vlm.models.base import install_auto_processor_patch
    from mlx_vlm.models.gemma3.processing_gemma3 import Gemma3Processor
    from transformers import AutoProcessor

    monkeypatch.setattr(AutoProcessor, "from_pretrained", AutoProcessor.from_pretrained)
    install_auto_processor_patch("gemma3", Gemma3Processor)
    assert type(AutoProcessor.from_pretrained(str(gemma3_vision_path))) is Gemma3Processor
    processor = _processor(gemma3_vision_path)
    assert type(processor).__module__.startswith("transformers.")
    client = make_client("transformers", gemma3_vision_path)
    try:
        prompt = client.format_prompt(ask(image_url(data_uri(png(0)))))
        assert "pixel_values" in prompt.media.tensors
    finally:
        client.close()


def test_mlx_leaves_transformers_auto_processor_alone(mlx_gemma4, gemma3_vision_path) -> None:
    from transformers import AutoProcessor

    before = AutoProcessor.__dict__["from_pretrained"]
    client = make_client("mlx", gemma3_vision_path)  # a model type mlx-vlm patches on import
    try:
        assert reply(client.create(ask(image_url(data_uri(png(0)))), **GREEDY))
        assert reply(mlx_gemma4.create(ask(input_audio(wav(300))), **GREEDY))
    finally:
        client.close()
    assert AutoProcessor.__dict__["from_pretrained"] is before
    processor = _processor(gemma3_vision_path)  # transformers' own, returning torch tensors
    assert type(processor).__module__.startswith("transformers.")


def test_mlx_logits_processors_read_the_whole_prompt() -> None:
    # mlx-vlm hands processors the tokens from its last prefill chunk on; a repetition
    # penalty must see the prompt as on mlx-lm.
    import mlx.core as mx

    from core.mlx_media import _whole_context

    seen: list[list[int]] = []

    def record(tokens: Any, logits: Any) -> Any:
        seen.append(tokens.tolist())
        return logits

    (process,) = _whole_context([record], [5, 6, 7, 8])
    logits = mx.zeros((1, 10))
    process(mx.array([8]), logits)  # chunked prefill: the last prompt token only
    process(mx.array([8, 3]), logits)
    (unchunked,) = _whole_context([record], [5, 6, 7, 8])
    unchunked(mx.array([5, 6, 7, 8]), logits)  # no chunks: the whole prompt
    assert seen == [[5, 6, 7, 8], [5, 6, 7, 8, 3], [5, 6, 7, 8]]


def test_mlx_media_with_adapters_is_refused_before_loading(gemma3_vision_path, tmp_path) -> None:
    from core import GemmaMLXChatCompletion

    client = GemmaMLXChatCompletion(str(gemma3_vision_path), adapter_path=str(tmp_path))
    try:
        with pytest.raises(NotImplementedError, match=r"adapter_path .* mlx-vlm's model"):
            client.create(ask(image_url(data_uri(png(0)))), **GREEDY)
        assert not client.is_loaded
    finally:
        client.close()


# -------------------------------------------- transformers and mlx-vlm agree


def _mlx_first_logprobs(client: Any, messages: Any) -> Any:
    """mlx-vlm's log-probabilities of the first token after the prompt (numpy), on the MLX
    thread, through the client's mlx-vlm model and processor."""

    def job() -> Any:
        import mlx.core as mx
        import numpy as np
        from mlx_vlm.generate import generate_step

        prompt = client._prompt(client.resolve_media([messages])[0])
        arrays = dict(prompt.media.arrays)
        steps = generate_step(
            mx.array(list(prompt.ids))[None],
            client._vision.model,
            arrays.pop("pixel_values", None),
            arrays.pop("attention_mask"),
            max_tokens=1,
            temperature=0.0,
            **arrays,
        )
        _, logprobs = next(steps)
        steps.close()
        return np.array(logprobs.astype(mx.float32))

    client.load()
    return client._worker.call(job)


def _torch_first_logprobs(client: Any, prompt: Any, drop: tuple[str, ...] = ()) -> Any:
    import torch

    tensors = {k: v for k, v in prompt.media.tensors.items() if k not in drop}
    with torch.inference_mode():
        logits = client.model(input_ids=torch.tensor([prompt.ids]), **tensors).logits[0, -1]
    return torch.log_softmax(logits.float(), -1).numpy()


def test_backends_agree_on_gemma3_images(gemma3_vision_path) -> None:
    """Same ids and bit-identical pixel_values (mlx-vlm's Gemma3Processor runs transformers'
    PIL image processor). The greedy replies differ, and not because of preprocessing:
    transformers' Gemma 3 lets the tokens of one image attend to each other both ways
    (token_type_ids), mlx-vlm's attends causally over them. With that mask dropped on the
    transformers side the two models' next-token distributions agree (as text does; this also
    checks the image features' scale, see core.mlx_media._fix_image_scale)."""
    import numpy as np

    tf = make_client("transformers", gemma3_vision_path)
    mlx = make_client("mlx", gemma3_vision_path)
    try:
        for seed in (0, 1):
            messages = ask(image_url(data_uri(png(seed))), image_url(data_uri(png(seed + 5))))
            ours, theirs = tf.format_prompt(messages), mlx.format_prompt(messages)
            assert ours.ids == theirs.ids and ours.text == theirs.text
            assert ours.ids.count(tf._processor.tokenizer.image_token_id) == 512
            assert np.array_equal(
                ours.media.tensors["pixel_values"].numpy(),
                np.array(theirs.media.arrays["pixel_values"]),
            )
            causal = _torch_first_logprobs(tf, ours, drop=("token_type_ids",))
            both_ways = _torch_first_logprobs(tf, ours)
            vlm = _mlx_first_logprobs(mlx, messages)
            assert np.allclose(vlm, causal, atol=1e-3), np.abs(vlm - causal).max()
            assert np.abs(vlm - both_ways).max() > 10 * np.abs(vlm - causal).max()
    finally:
        tf.close()
        mlx.close()


def test_backends_agree_on_gemma4_images_and_audio(gemma4_vision_path) -> None:
    """Gemma 4: mlx-vlm's image processor and mel features are numpy re-implementations of
    transformers'. The ids are equal; the image patches agree to float rounding and the greedy
    replies about images are the same; the mel features differ by about 1e-3, so for audio
    the next-token distributions are compared (close), not the replies."""
    import numpy as np

    tf = make_client("transformers", gemma4_vision_path)
    mlx = make_client("mlx", gemma4_vision_path)
    try:
        for seed in (0, 1):
            messages = ask(image_url(data_uri(png(seed))))
            ours, theirs = tf.format_prompt(messages), mlx.format_prompt(messages)
            assert ours.ids == theirs.ids
            # transformers: 16 px patches, rows first, padded; mlx-vlm: the resized image.
            image_4d = np.array(theirs.media.arrays["pixel_values"])[0]
            channels, height, width = image_4d.shape
            patches = (
                image_4d.reshape(channels, height // 16, 16, width // 16, 16)
                .transpose(1, 3, 2, 4, 0)
                .reshape(-1, 16 * 16 * channels)
            )
            reference = ours.media.tensors["pixel_values"][0].numpy()
            assert np.allclose(patches, reference[: len(patches)], atol=1e-6)
            assert reply(tf.create(messages, **GREEDY)) == reply(mlx.create(messages, **GREEDY))
        listen = ask(input_audio(wav(300)), text="Listen.")
        ours, theirs = tf.format_prompt(listen), mlx.format_prompt(listen)
        assert ours.ids == theirs.ids
        mel = np.array(theirs.media.arrays["input_features"])
        assert np.allclose(mel, ours.media.tensors["input_features"].numpy(), atol=5e-3)
        assert np.allclose(
            _mlx_first_logprobs(mlx, listen), _torch_first_logprobs(tf, ours), atol=5e-3
        )
    finally:
        tf.close()
        mlx.close()


# ------------------------------------------------------- Gemma 3n (MLX only)
# transformers builds Gemma 3n's towers only through timm, which needs torchvision (not
# installable beside the CPU torch; see README): its backend refuses Gemma 3n media before
# loading (test_checkpoints_that_cannot_read_it_refuse_before_loading). On MLX, mlx-vlm's
# gemma3n reads them. The tiny checkpoint's vision tower is mlx-vlm's fixed MobileNetV5-300M
# (one 512 px image takes minutes on a CPU), so these tests send audio; images go through
# the same code (core.mlx_media), as on Gemma 3 / 4.


@pytest.fixture(scope="module")
def mlx_gemma3n(gemma3n_media_path: Path) -> Iterator[Any]:
    client = make_client("mlx", gemma3n_media_path)
    yield client
    client.close()


def test_gemma3n_hears_the_audio_on_mlx(mlx_gemma3n) -> None:
    low, high, low_again = (
        reply(mlx_gemma3n.create(ask(input_audio(wav(hz)), text="Listen."), **GREEDY))
        for hz in (200, 3000, 200)
    )
    assert low != high and low == low_again
    eight = mlx_gemma3n.format_prompt(ask(input_audio(wav(200, rate=8000)), text="Listen."))
    sixteen = mlx_gemma3n.format_prompt(ask(input_audio(wav(200)), text="Listen."))
    assert eight.ids == sixteen.ids  # resampled to the feature extractor's 16 kHz


def test_gemma3n_audio_prompt_tokens_on_mlx(mlx_gemma3n, gemma3n_media_path) -> None:
    """The ids and mel features are transformers' Gemma3nProcessor's (mlx-vlm's processor
    runs the same feature extractor): 188 <audio_soft_token> per clip between
    <start_of_audio> and <end_of_audio>, every one counted in prompt_tokens."""
    import numpy as np
    from transformers import AutoProcessor

    messages = ask(input_audio(wav(300)), input_audio(wav(900, seconds=1.5)), text="Listen.")
    prompt = mlx_gemma3n.format_prompt(messages)
    processor = AutoProcessor.from_pretrained(str(gemma3n_media_path))
    samples = [media.decode_audio(wav(300), "w").samples]
    samples.append(media.decode_audio(wav(900, seconds=1.5), "w").samples)
    expected = processor(text=[prompt.text], audio=samples, add_special_tokens=False)
    assert list(prompt.ids) == list(expected["input_ids"][0])
    assert prompt.ids.count(processor.audio_token_id) == 2 * 188
    assert prompt.text.count("<audio_soft_token>") == 2  # the template's one marker per clip
    assert np.array_equal(
        np.array(prompt.media.arrays["input_features"]), expected["input_features"]
    )
    result = mlx_gemma3n.create(messages, **GREEDY)
    assert result["usage"]["prompt_tokens"] == len(prompt.ids)
    text_only = mlx_gemma3n.format_prompt(ask(text="Listen."))
    assert len(prompt.ids) > len(text_only.ids) + 2 * 188


def test_gemma3n_streams_and_batches_audio_on_mlx(mlx_gemma3n) -> None:
    from mlx.utils import tree_flatten

    listen = ask(input_audio(wav(500)), text="Listen.")
    whole = mlx_gemma3n.create(listen, **GREEDY)
    chunks = list(mlx_gemma3n.create(listen, stream=True, **GREEDY))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == reply(whole)
    assert chunks[-1]["usage"] == whole["usage"]
    conversations = [
        listen,
        [{"role": "user", "content": "Write a short poem about the sea."}],
        ask(input_audio(wav(250)), text="And this?"),
    ]
    alone = [mlx_gemma3n.create(c, **GREEDY) for c in conversations]
    batch = mlx_gemma3n.create_batch(conversations, **GREEDY)
    assert [reply(r) for r in batch] == [reply(r) for r in alone]
    assert [r["usage"] for r in batch] == [r["usage"] for r in alone]
    n = mlx_gemma3n.create(listen, n=2, **GREEDY)
    assert [c["message"]["content"] for c in n["choices"]] == [reply(whole)] * 2
    # mlx-vlm's gemma3n names its language model language_model.model.*, mlx-lm's
    # model.language_model.*: the same arrays all the same (core.mlx_media.LANGUAGE_PREFIXES).
    # Both packages replace each layer's AltUp coefficient matrices (4 x 4) by clipped
    # copies on every forward pass: those are equal, not the same arrays.
    import numpy as np

    vision = mlx_gemma3n._vision
    assert vision.shared
    ours = dict(tree_flatten(mlx_gemma3n.model.parameters()))
    held = {id(v) for v in ours.values()}
    language = {
        k: v for k, v in tree_flatten(vision.model.parameters()) if k.startswith("language_model.")
    }
    coefs = {k for k in language if k.endswith("_coefs.weight")}
    assert len(coefs) == 8 and len(language) > 100
    assert all(id(language[k]) in held for k in language.keys() - coefs)
    for k in coefs:
        mine = ours["model.language_model." + k.removeprefix("language_model.model.")]
        assert np.array_equal(np.array(language[k]), np.array(mine))


def test_gemma3n_bad_audio_leaves_the_client_usable_on_mlx(mlx_gemma3n) -> None:
    good = ask(input_audio(wav(400)), text="Listen.")
    spelled = ask(input_audio(wav(400)), text="<audio_soft_token> here")
    for messages, error in (
        (ask(input_audio(b"x", "m4a")), "supported audio formats"),
        (ask(input_audio(b"RIFF....WAVE", "wav")), "audio"),
        (spelled, r"holds 2 <audio_soft_token> markers for 1 audio parts"),
    ):
        before = copy.deepcopy(messages)
        with pytest.raises(ValueError, match=error):
            mlx_gemma3n.create(messages, **GREEDY)
        assert messages == before
    assert reply(mlx_gemma3n.create(good, **GREEDY))


def test_transformers_refuses_gemma3n_audio_before_loading(gemma3n_media_path) -> None:
    client = make_client("transformers", gemma3n_media_path)
    try:
        with pytest.raises(ValueError, match=r"Gemma 3n's images and audio need .* timm") as info:
            client.create(ask(input_audio(wav(300))), **GREEDY)
        assert str(gemma3n_media_path) in str(info.value) and not client.is_loaded
    finally:
        client.close()
