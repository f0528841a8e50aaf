"""Shared fixtures: tiny random-weight Gemma checkpoints built once per test session.

Every checkpoint is written to disk by :mod:`core.tiny` and loaded through the
real loading code (``from_pretrained`` / ``mlx_lm.load``); nothing downloads.
Session-scoped clients are shared (a client is safe to share); a test that
closes or breaks a client builds its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# torch's OpenMP threads busy-wait by default; on a small shared CPU that starves
# the event loop and other threads (heartbeat tests) and halves test speed.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


# Without a GPU the Triton kernels (core.accel.cuda.decode_attention) run in Triton's
# interpreter; it must be switched on before anything imports triton.
if not _cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

BACKENDS = ("transformers", "mlx")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


def _build(root: Path, arch: str, dtype: str = "float32") -> Path:
    from core.tiny import build_tiny_checkpoint

    path = root / f"{arch}-{dtype}"
    if not (path / "config.json").exists():
        build_tiny_checkpoint(path, arch, dtype=dtype)
    return path


@pytest.fixture(scope="session")
def gemma3_path(tiny_dir: Path) -> Path:
    """Gemma 3 text-only checkpoint (``gemma3_text``, like gemma-3-1b-it), float32."""
    return _build(tiny_dir, "gemma3_text")


@pytest.fixture(scope="session")
def gemma3_vision_path(tiny_dir: Path) -> Path:
    """Gemma 3 multimodal checkpoint (``gemma3``, like gemma-3-4b/12b/27b-it), float32."""
    return _build(tiny_dir, "gemma3")


@pytest.fixture(scope="session")
def gemma2_path(tiny_dir: Path) -> Path:
    return _build(tiny_dir, "gemma2")


@pytest.fixture(scope="session")
def gemma1_path(tiny_dir: Path) -> Path:
    return _build(tiny_dir, "gemma")


@pytest.fixture(scope="session")
def mlx_4bit_path(tiny_dir: Path, gemma3_path: Path) -> Path:
    """The Gemma 3 checkpoint converted by ``mlx_lm.convert`` to 4-bit."""
    from mlx_lm import convert

    out = tiny_dir / "gemma3_text-mlx-4bit"
    if not out.exists():
        convert(str(gemma3_path), str(out), quantize=True, q_bits=4, q_group_size=64)
    return out


def make_client(backend: str, path: Path, **options):
    """A client on ``backend`` for a tiny checkpoint (float32 on the CPU for transformers)."""
    if backend == "transformers":
        from core import GemmaTransformersChatCompletion

        options = {"device_map": "cpu", "torch_dtype": "float32", **options}
        return GemmaTransformersChatCompletion(str(path), **options)
    from core import GemmaMLXChatCompletion

    return GemmaMLXChatCompletion(str(path), **options)


@pytest.fixture(scope="session")
def tf_client(gemma3_path: Path) -> Iterator:
    client = make_client("transformers", gemma3_path)
    yield client
    client.close()


@pytest.fixture(scope="session")
def mlx_client(gemma3_path: Path) -> Iterator:
    client = make_client("mlx", gemma3_path)
    yield client
    client.close()


@pytest.fixture(params=BACKENDS)
def client(request: pytest.FixtureRequest):
    """The shared Gemma 3 client of each backend (tests run once per backend)."""
    return request.getfixturevalue("tf_client" if request.param == "transformers" else "mlx_client")


@pytest.fixture
def backend_name(client) -> str:
    return client.implementation


USER = [{"role": "user", "content": "Write a short poem about the sea."}]


@pytest.fixture(scope="session")
def gemma4_path(tiny_dir: Path) -> Path:
    """Gemma 4 dense E-like text checkpoint (``gemma4_text``: per-layer embeddings,
    KV-shared layers, double-wide MLP; like gemma-4-E2B/E4B), float32."""
    return _build(tiny_dir, "gemma4_text")


@pytest.fixture(scope="session")
def gemma4_moe_path(tiny_dir: Path) -> Path:
    """Gemma 4 MoE checkpoint (``gemma4_text`` with ``enable_moe_block`` and
    ``attention_k_eq_v``; like gemma-4-26B-A4B), float32."""
    return _build(tiny_dir, "gemma4_moe")


@pytest.fixture(scope="session")
def gemma4_vision_path(tiny_dir: Path) -> Path:
    """Gemma 4 multimodal checkpoint (``gemma4``, ``Gemma4ForConditionalGeneration``,
    a one-layer vision tower, no processor yet), float32."""
    return _build(tiny_dir, "gemma4")


@pytest.fixture(scope="session")
def gemma4_unified_path(tiny_dir: Path) -> Path:
    """Gemma 4 unified checkpoint (``gemma4_unified``, ``Gemma4UnifiedForConditionalGeneration``:
    encoder-free multimodal, K=V global attention, no per-layer embeddings; like
    gemma-4-12B), float32. mlx-lm loads it with its ``gemma4`` module."""
    return _build(tiny_dir, "gemma4_unified")


@pytest.fixture(scope="session")
def gemma3n_path(tiny_dir: Path) -> Path:
    """Gemma 3n checkpoint (``gemma3n``, text weights only: transformers loads it with
    ``Gemma3nForCausalLM``; ``AutoModelForCausalLM`` needs timm), float32."""
    return _build(tiny_dir, "gemma3n")


@pytest.fixture(scope="session")
def gemma3n_media_path(tiny_dir: Path) -> Path:
    """Gemma 3n checkpoint with its vision and audio towers and processor, for mlx-vlm
    (``core.tiny.gemma3n_towers``: a tiny audio tower, the fixed-size 294M MobileNetV5
    vision tower in bfloat16, ~590 MB); transformers cannot build its towers (timm)."""
    from core.tiny.gemma3n_towers import add_gemma3n_towers

    path = tiny_dir / "gemma3n-media-float32"
    if not (path / "processor_config.json").exists():
        from core.tiny import build_tiny_checkpoint

        add_gemma3n_towers(build_tiny_checkpoint(path, "gemma3n"))
    return path
