"""GGUF files (llama.cpp, Ollama) and the checks on a local model path, for both backends.

Data flow::

    model_name (+ gguf_file) ──check_model_path──▶ None (a folder with config.json,
        or a hub id: load as before) | GGUFSource(folder, file, architecture)
        | ModelNotFoundError / UnsupportedGGUFError   (no weights loaded, no heavy import)

    GGUFSource ──transformers──▶ from_pretrained(folder, gguf_file=file): dequantised on load
    GGUFSource ──MLX──▶ converted_folder(): a Hugging Face folder converted once, then cached
        ──▶ mlx_lm.load(folder)

:func:`check_model_path` runs in the backends' constructors: it only looks at
the file system and reads the first bytes of a GGUF file (its magic and
``general.architecture``), so a wrong path or a GGUF of another model family
fails at once with an error that says what was expected there.

The MLX backend cannot read GGUF. :func:`converted_folder` has transformers
dequantise the GGUF (in float32, so the weights are exactly the GGUF's) and
saves a Hugging Face folder: ``config.json``, ``model.safetensors``, the
tokenizer with the GGUF's chat template or else the packaged Gemma one, and a
generation config that ends a reply at ``<end_of_turn>``. The folder lives in
``$GEMMA_LOCAL_CACHE/gguf/`` (default ``~/.cache/gemma-local/gguf/``), named
after the GGUF file and a digest of its resolved path, size and modification
time, so an edited or replaced file is converted again. It takes 4 bytes a
parameter on disk (about 1.1 GB for Gemma 3 270M). Conversion needs torch,
transformers and gguf (``pip install "gemma-local[gguf]"``); a converted folder
is written under a temporary name and renamed into place, so two processes
converting at once never see half a folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import struct
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

from .errors import GemmaLocalError, MissingDependencyError, ModelNotFoundError

logger = logging.getLogger("gemma_local")

#: GGUF ``general.architecture`` values of the Gemma families that transformers can read.
GEMMA_GGUF_ARCHITECTURES = ("gemma2", "gemma3", "gemma4")

#: The packaged chat template for each architecture, used when the GGUF carries none.
CHAT_TEMPLATES = {
    "gemma2": "gemma2_chat_template.jinja",
    "gemma3": "gemma3_chat_template.jinja",
    "gemma4": "gemma4_chat_template.jinja",
}

#: Written last into a converted folder: its presence means the folder is complete.
MARKER = "gemma-local-gguf.json"

GGUF_INSTALL = 'pip install "gemma-local[gguf]"'
WEIGHTS_HINT = (
    "config.json, the weights (*.safetensors) and the tokenizer files, as written by "
    "save_pretrained, `hf download` or mlx_lm.convert"
)


class UnsupportedGGUFError(GemmaLocalError, ValueError):
    """A GGUF file that holds no Gemma model, or whose header cannot be read."""


@dataclass(frozen=True)
class GGUFSource:
    """A local GGUF file: the folder it is in, its name, and its ``general.architecture``."""

    folder: Path
    file: str
    architecture: str

    @property
    def path(self) -> Path:
        return self.folder / self.file


# --------------------------------------------------------------- the header


def require_gguf() -> None:
    """:class:`~core.errors.MissingDependencyError` naming the extra if ``gguf`` is missing."""
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError(
            "reading GGUF files needs the gguf package, which is not installed. "
            f"Install it with: {GGUF_INSTALL}"
        )


def _gguf_module() -> Any:
    require_gguf()
    import gguf

    return gguf


def is_gguf_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic (``b"GGUF"``)."""
    try:
        with open(path, "rb") as file:
            return file.read(4) == b"GGUF"
    except OSError:
        return False


def _read(file: BinaryIO, size: int) -> bytes:
    data = file.read(size)
    if len(data) != size:
        raise EOFError("the file ends inside its header")
    return data


def read_architecture(path: str | os.PathLike[str]) -> str:
    """``general.architecture`` from a GGUF file's header, reading only the bytes before it.

    The metadata is a list of typed key/value pairs (the ``gguf`` package's
    ``GGUFValueType``); ``general.architecture`` is by convention the first,
    so this reads a few hundred bytes where ``gguf.GGUFReader`` would parse
    the whole vocabulary.
    """
    gguf = _gguf_module()
    kinds = gguf.GGUFValueType
    sizes = {
        kinds.UINT8: 1, kinds.INT8: 1, kinds.BOOL: 1,
        kinds.UINT16: 2, kinds.INT16: 2,
        kinds.UINT32: 4, kinds.INT32: 4, kinds.FLOAT32: 4,
        kinds.UINT64: 8, kinds.INT64: 8, kinds.FLOAT64: 8,
    }  # fmt: skip
    wanted = gguf.Keys.General.ARCHITECTURE
    try:
        with open(path, "rb") as file:
            magic, version = struct.unpack("<II", _read(file, 8))
            if magic != gguf.GGUF_MAGIC:
                raise UnsupportedGGUFError(f"{path} is not a GGUF file (no GGUF magic)")
            order = "<" if version & 0xFFFF else ">"  # a big-endian file reads as version << 16
            _, kv_count = struct.unpack(order + "QQ", _read(file, 16))

            def string() -> str:
                (length,) = struct.unpack(order + "Q", _read(file, 8))
                return _read(file, length).decode("utf-8", errors="replace")

            def skip(kind: Any) -> None:
                if kind == kinds.STRING:
                    string()
                elif kind == kinds.ARRAY:
                    (inner,) = struct.unpack(order + "I", _read(file, 4))
                    (count,) = struct.unpack(order + "Q", _read(file, 8))
                    inner = kinds(inner)
                    if inner in sizes:
                        file.seek(sizes[inner] * count, os.SEEK_CUR)
                    else:
                        for _ in range(count):
                            skip(inner)
                else:
                    _read(file, sizes[kind])

            for _ in range(kv_count):
                key = string()
                (raw,) = struct.unpack(order + "I", _read(file, 4))
                kind = kinds(raw)
                if key == wanted:
                    if kind != kinds.STRING:
                        break
                    return string()
                skip(kind)
    except (EOFError, ValueError, KeyError, struct.error) as exc:
        if isinstance(exc, UnsupportedGGUFError):
            raise
        raise UnsupportedGGUFError(f"the GGUF header of {path} cannot be read ({exc})") from exc
    raise UnsupportedGGUFError(f"{path} has no general.architecture in its GGUF header")


def check_architecture(path: Path) -> str:
    """The file's architecture, or :class:`UnsupportedGGUFError` if it is not a Gemma one."""
    architecture = read_architecture(path)
    if architecture not in GEMMA_GGUF_ARCHITECTURES:
        kind = (
            "a Gemma model whose GGUF form transformers cannot read"
            if architecture.startswith("gemma")
            else "not a Gemma model"
        )
        raise UnsupportedGGUFError(
            f"{path} holds a {architecture!r} model (its GGUF general.architecture), "
            f"{kind}. gemma-local loads GGUF files of {', '.join(GEMMA_GGUF_ARCHITECTURES)}; "
            "for other Gemma versions pass a Hugging Face folder or hub id instead."
        )
    return architecture


# ------------------------------------------------------------ path checks


def _listing(folder: Path, limit: int = 5) -> str:
    names = sorted(p.name for p in folder.iterdir())
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_model_path(model_name: str, gguf_file: str | None = None) -> GGUFSource | None:
    """Check a local model path before anything loads; a :class:`GGUFSource` for a GGUF file.

    Returns ``None`` for what loads as before: a folder holding
    ``config.json``, or a name that is no local path (a hub id such as
    ``google/gemma-3-1b-it``, or a folder that does not exist, which the
    loader reports). Raises :class:`~core.errors.ModelNotFoundError` for a
    file that is not GGUF, an empty folder, a folder without ``config.json``
    or a missing ``.gguf`` file, and :class:`UnsupportedGGUFError` for a GGUF
    of another model family. ``gguf_file`` names a GGUF file inside the
    folder ``model_name`` (or, for a hub id, in that repository).
    """
    if gguf_file is not None and (not isinstance(gguf_file, str) or not gguf_file.strip()):
        raise ValueError(f"gguf_file must be the name of a .gguf file or None, got {gguf_file!r}")
    path = Path(model_name).expanduser()
    if gguf_file is not None:
        if path.is_file():
            raise ValueError(
                f"gguf_file={gguf_file!r} names a file inside the folder model_name, but "
                f"{model_name!r} is a file: pass either the .gguf file's path alone, or its "
                "folder with gguf_file"
            )
        if not path.is_dir():
            return None  # a hub repository that holds the file
        file = path / gguf_file
        if not file.is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            held = f"GGUF files there: {', '.join(ggufs)}" if ggufs else "it holds no .gguf file"
            raise ModelNotFoundError(f"there is no GGUF file {gguf_file!r} in {path} ({held})")
        if not is_gguf_file(file):
            raise ModelNotFoundError(
                f"{file} is not a GGUF file (it does not start with the GGUF magic); "
                "gguf_file must name a GGUF file from llama.cpp or Ollama"
            )
        return GGUFSource(file.parent, file.name, check_architecture(file))
    if path.is_file():
        if is_gguf_file(path):
            return GGUFSource(path.parent, path.name, check_architecture(path))
        raise ModelNotFoundError(
            f"model {model_name!r} is a file but not a GGUF file (it does not start with the "
            "GGUF magic). Pass a folder holding "
            f"{WEIGHTS_HINT}, or a .gguf file from llama.cpp or Ollama."
        )
    if path.is_dir():
        if (path / "config.json").is_file():
            return None
        if not any(path.iterdir()):
            raise ModelNotFoundError(
                f"model folder {model_name!r} is empty: expected {WEIGHTS_HINT}."
            )
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if ggufs:
            raise ModelNotFoundError(
                f"model folder {model_name!r} has no config.json but holds GGUF "
                f"file(s) {', '.join(ggufs)}: pass the file's path, e.g. "
                f"{str(path / ggufs[0])!r}, to load it."
            )
        raise ModelNotFoundError(
            f"model folder {model_name!r} has no config.json (it holds {_listing(path)}): "
            f"expected {WEIGHTS_HINT}."
        )
    if path.suffix.lower() == ".gguf":
        raise ModelNotFoundError(f"there is no GGUF file at {model_name!r}")
    return None


# ------------------------------------------------------------- conversion


def cache_dir() -> Path:
    """Where converted GGUF folders live: ``$GEMMA_LOCAL_CACHE/gguf`` (default ``~/.cache/gemma-local/gguf``)."""
    root = os.environ.get("GEMMA_LOCAL_CACHE") or Path.home() / ".cache" / "gemma-local"
    return Path(root).expanduser() / "gguf"


def converted_path(source: GGUFSource, root: Path | None = None) -> Path:
    """The folder :func:`converted_folder` writes for ``source`` (whether or not it exists yet)."""
    file = source.path.resolve()
    stat = file.stat()
    key = f"{file}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    return (root or cache_dir()) / f"{file.stem}-{digest}"


def chat_template(architecture: str) -> str:
    """The packaged chat template for a GGUF architecture."""
    name = CHAT_TEMPLATES.get(architecture, "gemma3_chat_template.jinja")
    return resources.files("core").joinpath("chat_templates", name).read_text(encoding="utf-8")


def load_tokenizer(source: GGUFSource, **kwargs: Any) -> Any:
    """The tokenizer of a GGUF file, with its chat template or else the packaged one."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source.folder), gguf_file=source.file, **kwargs)
    if not getattr(tokenizer, "chat_template", None):
        logger.info(
            "%s carries no chat template; using the packaged %s one",
            source.path,
            source.architecture,
        )
        tokenizer.chat_template = chat_template(source.architecture)
    return tokenizer


def converted_folder(source: GGUFSource, root: Path | None = None) -> Path:
    """A Hugging Face folder holding ``source``'s model, converted on the first call and cached.

    See the module docstring for what the folder holds and where it lives.
    """
    target = converted_path(source, root)
    if (target / MARKER).is_file():
        return target
    for module in ("torch", "transformers", "gguf"):
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError(
                f"converting a GGUF file for the MLX backend needs {module}, which is not "
                f"installed. Install it with: {GGUF_INSTALL}"
            )
    import torch
    from transformers import AutoModelForCausalLM

    logger.warning("converting %s to a Hugging Face folder in %s (once)", source.path, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"
    try:
        tokenizer = load_tokenizer(source)
        model = AutoModelForCausalLM.from_pretrained(
            str(source.folder), gguf_file=source.file, dtype=torch.float32
        )
        # The weights are plain float32 now: save them as such, not as a GGUF "quantization".
        for holder in (model.config, getattr(model.config, "text_config", None)):
            if holder is not None and hasattr(holder, "quantization_config"):
                delattr(holder, "quantization_config")
        model.hf_quantizer = None
        end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
        eos = model.generation_config.eos_token_id
        eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
            model.generation_config.eos_token_id = sorted({*eos_ids, end_of_turn})
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        (partial / MARKER).write_text(
            json.dumps(
                {"source": str(source.path.resolve()), "architecture": source.architecture},
                indent=2,
            )
        )
        del model
        try:
            partial.rename(target)
        except OSError:  # another process finished first
            if not (target / MARKER).is_file():
                raise
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return target
