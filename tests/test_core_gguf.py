"""Model paths checked before any load, and GGUF headers read without loading (core.gguf).

Each check runs in the backends' constructors: a wrong local path fails at
once with :class:`~core.errors.ModelNotFoundError` saying what was expected
there, and a GGUF of another model family with :class:`UnsupportedGGUFError`.
Hub ids and folders that do not exist load as before (the loader reports
those). No weights load here; the real GGUF file is in ``test_real_gemma.py``.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import gguf
import pytest
from conftest import BACKENDS, make_client

from core import GemmaTransformersChatCompletion
from core.errors import GemmaLocalError, ModelNotFoundError
from core.gguf import (
    GGUFSource,
    UnsupportedGGUFError,
    check_model_path,
    converted_path,
    is_gguf_file,
    read_architecture,
)


def write_gguf(path: Path, architecture: str) -> Path:
    """A GGUF file with one small tensor, written by the gguf package's own writer."""
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_string("general.name", "test")
    writer.add_tensor("token_embd.weight", np.zeros((4, 2), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def write_raw_header(path: Path, pairs: list[tuple[str, int, bytes]]) -> Path:
    """A GGUF v3 header with the given (key, GGUFValueType, encoded value) pairs, no tensors."""
    body = b"".join(
        gguf_string(key) + struct.pack("<I", kind) + value for key, kind, value in pairs
    )
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(pairs)) + body)
    return path


# ------------------------------------------------------------------- headers


def test_architecture_from_a_gguf_written_by_the_gguf_package(tmp_path) -> None:
    path = write_gguf(tmp_path / "m.gguf", "gemma3")
    assert is_gguf_file(path)
    assert read_architecture(path) == "gemma3"


def test_architecture_after_other_keys_skips_arrays_of_strings_and_numbers(tmp_path) -> None:
    kinds = gguf.GGUFValueType
    strings = struct.pack("<IQ", kinds.STRING, 2) + gguf_string("a") + gguf_string("bcd")
    numbers = struct.pack("<IQ", kinds.FLOAT32, 3) + struct.pack("<3f", 1, 2, 3)
    path = write_raw_header(
        tmp_path / "late.gguf",
        [
            ("tokenizer.ggml.tokens", kinds.ARRAY, strings),
            ("tokenizer.ggml.scores", kinds.ARRAY, numbers),
            ("general.alignment", kinds.UINT32, struct.pack("<I", 32)),
            ("general.architecture", kinds.STRING, gguf_string("gemma2")),
        ],
    )
    assert read_architecture(path) == "gemma2"


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"GGUF" + struct.pack("<I", 3), "cannot be read"),  # ends inside the header
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 0), "no general.architecture"),
    ],
)
def test_unreadable_or_incomplete_header(tmp_path, content, match) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(UnsupportedGGUFError, match=match):
        read_architecture(path)


# -------------------------------------------------------------- path checks


def test_gguf_file_and_folder_plus_gguf_file(tmp_path) -> None:
    path = write_gguf(tmp_path / "gemma.gguf", "gemma3")
    source = check_model_path(str(path))
    assert source == GGUFSource(tmp_path, "gemma.gguf", "gemma3")
    assert source.path == path
    assert check_model_path(str(tmp_path), "gemma.gguf") == source


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gemma", "gemma3n"])
def test_gguf_of_another_architecture_is_refused_by_name(tmp_path, architecture) -> None:
    path = write_gguf(tmp_path / "other.gguf", architecture)
    with pytest.raises(UnsupportedGGUFError) as info:
        check_model_path(str(path))
    text = str(info.value)
    assert repr(architecture) in text and "gemma3" in text
    assert ("not a Gemma model" in text) is (not architecture.startswith("gemma"))
    assert isinstance(info.value, (GemmaLocalError, ValueError))


def test_folder_with_config_and_hub_ids_pass_unchanged(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert check_model_path(str(tmp_path)) is None
    for name in ["google/gemma-3-1b-it", "gemma-local-test/not-here", "/no/such/folder"]:
        assert check_model_path(name) is None
    assert check_model_path("google/gemma-3-1b-it-GGUF", "model.gguf") is None  # on the hub


def bad_paths(root: Path) -> dict[str, tuple[str, str | None, str]]:
    """name: (model_name, gguf_file, what the message must say)."""
    text = root / "notes.txt"
    text.write_text("not a model")
    empty = root / "empty"
    empty.mkdir()
    no_config = root / "no-config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(b"\0")
    with_gguf = root / "with-gguf"
    with_gguf.mkdir()
    write_gguf(with_gguf / "gemma.gguf", "gemma3")
    return {
        "file that is not GGUF": (str(text), None, "is a file but not a GGUF file"),
        "empty folder": (str(empty), None, "is empty: expected config.json"),
        "folder without config.json": (str(no_config), None, "has no config.json"),
        "folder holding only a GGUF": (str(with_gguf), None, "gemma.gguf"),
        "missing .gguf file": (str(root / "gone.gguf"), None, "no GGUF file at"),
        "gguf_file not in the folder": (str(with_gguf), "other.gguf", "no GGUF file 'other.gguf'"),
        "gguf_file not GGUF": (str(root), "notes.txt", "is not a GGUF file"),
    }


CASES = [
    "file that is not GGUF",
    "empty folder",
    "folder without config.json",
    "folder holding only a GGUF",
    "missing .gguf file",
    "gguf_file not in the folder",
    "gguf_file not GGUF",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_local_paths_raise_model_not_found(tmp_path, case) -> None:
    model_name, gguf_file, message = bad_paths(tmp_path)[case]
    with pytest.raises(ModelNotFoundError, match=message):
        check_model_path(model_name, gguf_file)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case",
    ["file that is not GGUF", "empty folder", "folder without config.json", "missing .gguf file"],
)
def test_backends_raise_model_not_found_in_the_constructor(tmp_path, backend, case) -> None:
    model_name, _, message = bad_paths(tmp_path)[case]
    with pytest.raises(ModelNotFoundError, match=message) as info:
        make_client(backend, Path(model_name))
    assert model_name in str(info.value) and isinstance(info.value, OSError)


def test_folder_message_lists_what_it_holds(tmp_path) -> None:
    for name in ["a.bin", "b.txt"]:
        (tmp_path / name).write_text("x")
    with pytest.raises(ModelNotFoundError, match=r"it holds a\.bin, b\.txt"):
        check_model_path(str(tmp_path))


def test_gguf_file_option_errors(tmp_path) -> None:
    path = write_gguf(tmp_path / "gemma.gguf", "gemma3")
    with pytest.raises(ValueError, match="gguf_file must be"):
        check_model_path(str(tmp_path), "")
    with pytest.raises(ValueError, match="is a file"):
        check_model_path(str(path), "gemma.gguf")
    with pytest.raises(ValueError, match="cannot be combined with use_4bit_quantization"):
        GemmaTransformersChatCompletion(str(path), use_4bit_quantization=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_accept_a_gemma_gguf_without_loading(tmp_path, backend) -> None:
    path = write_gguf(tmp_path / "gemma.gguf", "gemma3")
    client = make_client(backend, path)
    assert client._gguf == GGUFSource(tmp_path, "gemma.gguf", "gemma3")
    assert not client.is_loaded
    client.close()
    with pytest.raises(UnsupportedGGUFError, match="'llama'"):
        make_client(backend, write_gguf(tmp_path / "llama.gguf", "llama"))


def test_converted_folder_path_follows_the_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GEMMA_LOCAL_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "gemma.gguf", "gemma3")
    source = check_model_path(str(path))
    assert source is not None
    first = converted_path(source)
    assert first.parent == tmp_path / "cache" / "gguf" and first.name.startswith("gemma-")
    assert converted_path(source) == first  # stable for the same file
    stat = path.stat()  # the file changed: a new modification time
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert converted_path(source) != first
