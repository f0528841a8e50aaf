"""Images and audio in OpenAI content parts: parsed, fetched and decoded once, eagerly.

Data flow::

    user message content parts ──resolve_messages──▶ the same messages, each media part
        replaced by {"type": "image", "image": Image} / {"type": "audio", "audio": Audio}
        (decoded; a new list, the caller's never mutated)
    ──family.render_inputs──▶ template messages whose content lists hold those parts
        (the chat template writes the family's placeholder for each)
    ──collect_media──▶ the Image / Audio records in the order the template writes them
    ──backend processor (AutoProcessor / mlx-vlm)──▶ media tokens, pixel_values, audio features

Accepted parts (in ``user`` messages only; OpenAI allows media nowhere else):

* ``{"type": "image_url", "image_url": {"url": URL, "detail": "auto"|"low"|"high"}}``
  (``image_url`` may also be the URL string itself), where ``URL`` is a
  ``data:image/...;base64,...`` URI, a local file path, a ``file://`` URL, or an
  ``http(s)://`` URL (fetched with a :data:`FETCH_TIMEOUT_S` timeout and at most
  :data:`MAX_IMAGE_BYTES`; no network gives a ``ValueError`` naming the URL).
  ``detail`` is checked and otherwise ignored: the number of tokens an image
  costs is the model's (Gemma 3: 256 per image or crop) or the client's option
  (Gemma 4's ``image_soft_tokens``).
* ``{"type": "input_audio", "input_audio": {"data": BASE64, "format": FORMAT}}``
  with ``FORMAT`` one of :data:`AUDIO_FORMATS`.
* Python-side shapes, for callers who hold the object already:
  ``{"type": "image", "image": PIL.Image.Image | bytes | str | os.PathLike}``
  (``str``: any URL the ``image_url`` part takes, or a path) and
  ``{"type": "audio", "audio": bytes | str | os.PathLike | numpy.ndarray}``
  (an ndarray of samples needs ``"sampling_rate"``: ``{"type": "audio",
  "audio": array, "sampling_rate": 16000}``).

Audio formats are the ones libsndfile (through ``soundfile``) decodes with no
other program: WAV, FLAC, OGG (Vorbis/Opus) and MP3. AAC / M4A / WebM need
ffmpeg, which gemma-local does not call: convert them first. Audio is mixed
down to mono; resampling to the model's rate is the backend's (its feature
extractor says the rate).

Everything fails early with a ``ValueError`` that names the part
(``messages[0]['content'][1]``) and what is allowed: a data URI that is not
base64, a path that does not exist, bytes that are no image or a truncated
one, an unsupported audio format. ``PIL``, ``numpy`` and ``soundfile`` are
imported inside the functions (``pip install "gemma-local[media]"``).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import require

#: The media kinds a checkpoint may read.
KINDS = ("image", "audio")
#: Content part types that carry media, as callers write them.
MEDIA_PART_TYPES = ("image_url", "input_audio", "image", "audio")
#: ``input_audio.format`` values: what libsndfile decodes without ffmpeg.
AUDIO_FORMATS = ("wav", "flac", "ogg", "mp3")
#: OpenAI's ``image_url.detail`` values (accepted, see the module docstring).
DETAILS = ("auto", "low", "high")
#: Largest encoded image / audio accepted, from any source (OpenAI's limits: 20 / 25 MB).
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_AUDIO_BYTES = 25 * 1024 * 1024
#: Seconds an ``http(s)`` fetch may take (connect and each read).
FETCH_TIMEOUT_S = 10.0
#: Longest audio accepted, in seconds (Gemma 4's audio encoder reads up to 30 s).
MAX_AUDIO_SECONDS = 30.0

_DATA_URI = re.compile(
    r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[^;,]*)*),(?P<data>.*)", re.S
)


#: Gemma 4's image soft-token budgets (``Gemma4ImageProcessor.max_soft_tokens``).
IMAGE_SOFT_TOKENS = (70, 140, 280, 560, 1120)


@dataclass(frozen=True)
class MediaOptions:
    """Per-client options of the model's image processor; ``None`` keeps the model's default.

    Attributes:
        image_soft_tokens: Gemma 4: the most soft tokens one image may cost
            (one of :data:`IMAGE_SOFT_TOKENS`; the checkpoint's processor
            config says its default, 280 on the released models). More tokens
            read finer detail and cost more context and time.
        pan_and_scan: Gemma 3: also read crops of a large or elongated image
            (each crop costs another 256 tokens); default off, as the
            released processors.
    """

    image_soft_tokens: int | None = None
    pan_and_scan: bool | None = None

    def __post_init__(self) -> None:
        n = self.image_soft_tokens
        if n is not None and (isinstance(n, bool) or n not in IMAGE_SOFT_TOKENS):
            raise ValueError(
                f"image_soft_tokens must be one of {IMAGE_SOFT_TOKENS} or None, got {n!r}"
            )
        if self.pan_and_scan is not None and not isinstance(self.pan_and_scan, bool):
            raise ValueError(f"pan_and_scan must be True, False or None, got {self.pan_and_scan!r}")


@dataclass(frozen=True)
class Sources:
    """Where media may be read from besides the request itself (data URIs and bytes always).

    Both are allowed by default, for a library called by its own user. A server
    taking requests from others should turn them off (a path or ``file://`` URL
    would read the server's files, an ``http(s)`` URL would make it fetch
    addresses of the sender's choosing): see ``BaseGemmaChatCompletion.media_sources``.
    """

    local_files: bool = True
    urls: bool = True


#: Everything allowed: data URIs, bytes, local paths and file:// URLs, http(s) URLs.
ALL_SOURCES = Sources()


@dataclass(frozen=True, eq=False)
class Image:
    """A decoded image (``PIL.Image.Image``, fully loaded) and where it came from."""

    image: Any
    source: str

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` in pixels."""
        return tuple(self.image.size)


@dataclass(frozen=True, eq=False)
class Audio:
    """Decoded mono audio: float32 ``samples`` at ``sampling_rate`` Hz, and its source."""

    samples: Any
    sampling_rate: int
    source: str

    @property
    def seconds(self) -> float:
        return float(len(self.samples)) / self.sampling_rate

    def at_rate(self, rate: int) -> Any:
        """The samples resampled to ``rate`` Hz (float32; ``scipy.signal.resample_poly``),
        the rate a model's feature extractor reads; the samples themselves at their own rate."""
        if self.sampling_rate == rate:
            return self.samples
        from math import gcd

        import numpy as np
        from scipy.signal import resample_poly

        g = gcd(self.sampling_rate, rate)
        out = resample_poly(self.samples, rate // g, self.sampling_rate // g)
        return np.asarray(out, dtype=np.float32)


Media = Image | Audio


def is_media_part(part: Any) -> bool:
    """Whether ``part`` is a content part that carries an image or audio."""
    return isinstance(part, Mapping) and part.get("type") in MEDIA_PART_TYPES


def kind_of(part: Mapping[str, Any]) -> str:
    """``"image"`` or ``"audio"`` for a media part (resolved or not)."""
    return "audio" if part.get("type") in ("input_audio", "audio") else "image"


# ----------------------------------------------------------------- sources


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _decode_base64(data: str, where: str, what: str) -> bytes:
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            f"{where}: the {what} is not valid base64 (a data URI must look like "
            "'data:image/png;base64,iVBORw0...')"
        ) from None


def _from_data_uri(url: str, where: str) -> bytes:
    match = _DATA_URI.fullmatch(url)
    if match is None:
        raise ValueError(f"{where}: malformed data URI {_short(url)!r}")
    if ";base64" not in match["params"].lower():
        raise ValueError(
            f"{where}: the data URI is not base64-encoded; write "
            "'data:<mime type>;base64,<base64 data>'"
        )
    return _decode_base64(match["data"], where, "data URI's payload")


def _read_path(path: Path, where: str, limit: int) -> bytes:
    path = path.expanduser()
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ValueError(f"{where}: {str(path)!r} {what}")
    size = path.stat().st_size
    if size > limit:
        raise ValueError(f"{where}: {str(path)!r} is {size} bytes; the limit is {limit}")
    return path.read_bytes()


def _fetch(url: str, where: str, limit: int) -> bytes:
    """GET ``url`` with a timeout and a size limit; a clear error when it cannot."""
    request = urllib.request.Request(url, headers={"User-Agent": "gemma-local"})
    try:
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S) as response:
            data = response.read(limit + 1)
    except urllib.error.HTTPError as exc:
        raise ValueError(f"{where}: fetching {url} failed: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ValueError(
            f"{where}: could not fetch {url} ({reason}); without network access pass the "
            "image as a data URI, a file path or bytes instead"
        ) from exc
    if len(data) > limit:
        raise ValueError(f"{where}: {url} is larger than the limit of {limit} bytes")
    return data


def _file_url_path(url: str, where: str) -> Path:
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(
            f"{where}: file URL {url!r} names host {parsed.netloc!r}; only local files"
        )
    return Path(urllib.request.url2pathname(parsed.path))


def _refused(where: str, what: str) -> ValueError:
    return ValueError(
        f"{where}: this client does not read media from {what}; send the image or audio "
        "inline, as a data URI (or base64 input_audio)"
    )


def _bytes_from(
    source: Any, where: str, limit: int, sources: Sources = ALL_SOURCES
) -> tuple[bytes, str]:
    """The encoded bytes of a URL / path / bytes source, and a short description of it."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > limit:
            raise ValueError(f"{where}: {len(data)} bytes; the limit is {limit}")
        return data, "bytes"
    if isinstance(source, os.PathLike):
        if not sources.local_files:
            raise _refused(where, "local files")
        path = Path(os.fspath(source))
        return _read_path(path, where, limit), str(path)
    if not isinstance(source, str) or not source.strip():
        raise ValueError(
            f"{where}: expected a URL, a path or bytes, got {type(source).__name__} {source!r}"
        )
    url = source.strip()
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = _from_data_uri(url, where)
        if len(data) > limit:
            raise ValueError(f"{where}: the data URI holds {len(data)} bytes; the limit is {limit}")
        return data, "data URI"
    if scheme in ("http", "https"):
        if not sources.urls:
            raise _refused(where, "URLs")
        return _fetch(url, where, limit), url
    if scheme == "file":
        if not sources.local_files:
            raise _refused(where, "local files")
        path = _file_url_path(url, where)
        return _read_path(path, where, limit), str(path)
    if len(scheme) > 1:  # "C:\..." is a path; "ftp://..." is not
        raise ValueError(
            f"{where}: unsupported URL scheme {scheme!r} in {_short(url)!r}; use a data: URI, "
            "an http(s):// or file:// URL, or a local path"
        )
    if not sources.local_files:
        raise _refused(where, "local files")
    return _read_path(Path(url), where, limit), url


# ------------------------------------------------------------------ decode


def decode_image(data: bytes, where: str, source: str = "bytes") -> Image:
    """Decode (fully) an encoded image; ``ValueError`` for bytes that are no image or truncated."""
    require("PIL", feature="Images in messages")
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    try:
        with PILImage.open(io.BytesIO(data)) as probe:
            probe.verify()  # structure and checksums (PNG CRCs)
        image = PILImage.open(io.BytesIO(data))
        image.load()  # every pixel: a truncated file fails here
    except UnidentifiedImageError:
        raise ValueError(
            f"{where}: {source} is not an image PIL can read ({len(data)} bytes); "
            "send PNG, JPEG, WebP, GIF or BMP"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated / corrupt data
        raise ValueError(f"{where}: {source} is not a readable image: {exc}") from None
    except PILImage.DecompressionBombError as exc:
        raise ValueError(f"{where}: {source} is too large an image: {exc}") from None
    return Image(image, source)


def _pil_image(value: Any, where: str) -> Image:
    from PIL import Image as PILImage

    if not isinstance(value, PILImage.Image):
        raise TypeError(type(value).__name__)
    try:
        value.load()
    except (OSError, ValueError) as exc:
        raise ValueError(f"{where}: the PIL image cannot be read: {exc}") from None
    width, height = value.size
    if width < 1 or height < 1:
        raise ValueError(f"{where}: the image is empty ({width}x{height} pixels)")
    return Image(value.copy(), "PIL image")  # the caller may change theirs later


def decode_audio(data: bytes, where: str, source: str = "bytes", fmt: str | None = None) -> Audio:
    """Decode WAV / FLAC / OGG / MP3 bytes to mono float32 samples."""
    require("soundfile", "numpy", feature="Audio in messages")
    import numpy as np
    import soundfile

    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        said = f"{fmt} " if fmt else ""
        raise ValueError(
            f"{where}: {source} is not readable {said}audio ({exc}); send one of "
            f"{', '.join(AUDIO_FORMATS)} (convert others, e.g. m4a or webm, with ffmpeg first)"
        ) from None
    return _audio(np.asarray(samples).mean(axis=1, dtype=np.float32), int(rate), where, source)


def _audio(samples: Any, rate: int, where: str, source: str) -> Audio:
    import numpy as np

    if len(samples) == 0:
        raise ValueError(f"{where}: {source} holds no audio samples")
    if not np.all(np.isfinite(samples)):
        raise ValueError(f"{where}: {source} holds NaN or infinite samples")
    audio = Audio(np.ascontiguousarray(samples, dtype=np.float32), rate, source)
    if audio.seconds > MAX_AUDIO_SECONDS:
        raise ValueError(
            f"{where}: {source} is {audio.seconds:.1f} s long; at most {MAX_AUDIO_SECONDS:.0f} s "
            "of audio per part (split longer recordings)"
        )
    return audio


def _array_audio(value: Any, rate: Any, where: str) -> Audio:
    import numpy as np

    if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
        raise ValueError(
            f"{where}: audio given as an array needs 'sampling_rate' (a positive int, Hz), "
            f"got {rate!r}"
        )
    array = np.asarray(value)
    if array.ndim == 2:  # (samples, channels)
        array = array.mean(axis=1)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.number):
        raise ValueError(
            f"{where}: audio samples must be a 1-D (or samples x channels) numeric array, "
            f"got shape {array.shape} of {array.dtype}"
        )
    return _audio(array.astype(np.float32), rate, where, "array")


# ------------------------------------------------------------------- parts


def _image_part(part: Mapping[str, Any], where: str, sources: Sources) -> Image:
    if part["type"] == "image_url":
        spec = part.get("image_url")
        if isinstance(spec, Mapping):
            url, detail = spec.get("url"), spec.get("detail")
            if detail is not None and detail not in DETAILS:
                raise ValueError(
                    f"{where}['image_url']['detail'] must be one of {DETAILS}, got {detail!r}"
                )
        else:
            url = spec
        if not isinstance(url, str):
            raise ValueError(
                f"{where} must be {{'type': 'image_url', 'image_url': {{'url': <data URI, "
                f"path or URL>}}}}, got image_url={spec!r}"
            )
        data, source = _bytes_from(url, where, MAX_IMAGE_BYTES, sources)
        return decode_image(data, where, source)
    value = part.get("image")
    if isinstance(value, Image):  # already resolved
        return value
    if value is None:
        raise ValueError(
            f"{where} has type 'image' but no 'image' (a PIL.Image, bytes, a path or a URL)"
        )
    require("PIL", feature="Images in messages")
    try:
        return _pil_image(value, where)
    except TypeError:
        pass
    data, source = _bytes_from(value, f"{where}['image']", MAX_IMAGE_BYTES, sources)
    return decode_image(data, where, source)


def _audio_part(part: Mapping[str, Any], where: str, sources: Sources) -> Audio:
    if part["type"] == "input_audio":
        spec = part.get("input_audio")
        data = spec.get("data") if isinstance(spec, Mapping) else None
        fmt = spec.get("format") if isinstance(spec, Mapping) else None
        if not isinstance(data, str):
            raise ValueError(
                f"{where} must be {{'type': 'input_audio', 'input_audio': {{'data': <base64>, "
                f"'format': {' | '.join(map(repr, AUDIO_FORMATS))}}}}}, got {_short(repr(spec))}"
            )
        if not isinstance(fmt, str) or fmt.lower() not in AUDIO_FORMATS:
            raise ValueError(
                f"{where}['input_audio']['format'] is {fmt!r}; supported audio formats are "
                f"{', '.join(AUDIO_FORMATS)} (what libsndfile decodes without ffmpeg; convert "
                "others first)"
            )
        raw = _decode_base64(data, where, "input_audio data")
        if len(raw) > MAX_AUDIO_BYTES:
            raise ValueError(f"{where}: {len(raw)} bytes of audio; the limit is {MAX_AUDIO_BYTES}")
        return decode_audio(raw, where, "input_audio", fmt.lower())
    value = part.get("audio")
    if isinstance(value, Audio):
        return value
    if value is None:
        raise ValueError(f"{where} has type 'audio' but no 'audio' (bytes, a path or an array)")
    if isinstance(value, (bytes, bytearray, memoryview, str, os.PathLike)):
        data, source = _bytes_from(value, f"{where}['audio']", MAX_AUDIO_BYTES, sources)
        return decode_audio(data, where, source)
    require("numpy", feature="Audio in messages")
    return _array_audio(value, part.get("sampling_rate"), where)


def parse_part(part: Mapping[str, Any], where: str, sources: Sources = ALL_SOURCES) -> Media:
    """Decode one media part (see the module docstring) into an :class:`Image` / :class:`Audio`."""
    if kind_of(part) == "audio":
        return _audio_part(part, where, sources)
    return _image_part(part, where, sources)


def resolved_part(media: Media) -> dict[str, Any]:
    """The template-ready part of decoded media: ``{"type": "image", "image": Image}`` / audio."""
    if isinstance(media, Image):
        return {"type": "image", "image": media}
    return {"type": "audio", "audio": media}


def is_resolved(part: Any) -> bool:
    """Whether ``part`` is a media part already decoded by :func:`resolve_messages`."""
    return isinstance(part, Mapping) and isinstance(part.get(part.get("type", "")), (Image, Audio))


def resolve_messages(messages: Any, sources: Sources = ALL_SOURCES) -> Any:
    """``messages`` with every media part decoded (a new list; the caller's is not touched).

    Messages without media are passed on as they are (the same objects). A
    media part in a message that is not a ``user`` message raises
    ``ValueError``. Anything that is not a list of messages goes on unchanged
    for the message checks to describe.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        return messages
    out: list[Any] = []
    changed = False
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, (str, bytes)) or not isinstance(content, Sequence):
            out.append(message)
            continue
        if not any(is_media_part(p) and not is_resolved(p) for p in content):
            out.append(message)  # no media, or decoded already
            continue
        role = message.get("role")
        where = f"messages[{i}]['content']"
        if role != "user":
            j = next(j for j, p in enumerate(content) if is_media_part(p))
            raise ValueError(
                f"{where}[{j}] is {content[j].get('type')!r} content in a {role!r} message; "
                "images and audio are allowed in user messages only"
            )
        parts = [
            p
            if not is_media_part(p) or is_resolved(p)
            else resolved_part(parse_part(p, f"{where}[{j}]", sources))
            for j, p in enumerate(content)
        ]
        out.append({**message, "content": parts})
        changed = True
    return out if changed else messages


def media_kinds(messages: Any) -> frozenset[str]:
    """The media kinds (``"image"``, ``"audio"``) the messages' parts hold."""
    kinds: set[str] = set()
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        return frozenset()
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, Sequence) and not isinstance(content, (str, bytes)):
            kinds.update(kind_of(p) for p in content if is_media_part(p))
    return frozenset(kinds)


def collect_media(turns: Sequence[Mapping[str, Any]]) -> list[Media]:
    """The decoded media of template messages, in the order the chat template writes them."""
    return list(_iter_media(turns))


def _iter_media(turns: Sequence[Mapping[str, Any]]) -> Iterator[Media]:
    for turn in turns:
        content = turn.get("content")
        if isinstance(content, (str, bytes)) or not isinstance(content, Sequence):
            continue
        for part in content:
            if is_resolved(part):
                yield part[part["type"]]
            elif is_media_part(part):
                raise ValueError("media part not resolved; call core.media.resolve_messages first")


__all__ = [
    "ALL_SOURCES",
    "AUDIO_FORMATS",
    "DETAILS",
    "FETCH_TIMEOUT_S",
    "IMAGE_SOFT_TOKENS",
    "KINDS",
    "MAX_AUDIO_BYTES",
    "MAX_AUDIO_SECONDS",
    "MAX_IMAGE_BYTES",
    "MEDIA_PART_TYPES",
    "Audio",
    "Image",
    "Media",
    "MediaOptions",
    "Sources",
    "collect_media",
    "decode_audio",
    "decode_image",
    "is_media_part",
    "is_resolved",
    "kind_of",
    "media_kinds",
    "parse_part",
    "resolve_messages",
    "resolved_part",
]
