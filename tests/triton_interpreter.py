"""Running the Triton ops' tests without a GPU: Triton's interpreter on CPU tensors.

``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before anything imports
triton when there is no CUDA. The interpreter computes two things unlike a
GPU, which :func:`device` patches for the duration of a test module:

* its ``tl.dot`` multiplies bfloat16 tiles as raw 16-bit integers: bfloat16
  operands are widened to float32 first (exact; what a GPU's bf16 MMA with
  fp32 accumulation computes);
* its fp32 -> bfloat16 cast truncates where a GPU rounds to nearest even.

:func:`heavy_imports` is the ops' other shared check: importing one must stay light.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


def _patch_interpreter() -> Callable[[], None]:
    """Apply both patches; returns the undo."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    create_dot, cast_impl = builder.create_dot, builder.cast_impl

    def widen(handle: Any) -> Any:
        if handle.dtype.scalar == tl.bfloat16:
            data = (handle.data.astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(data, tl.float32)
        return handle

    def dot(self: Any, a: Any, b: Any, *rest: Any) -> Any:
        return create_dot(self, widen(a), widen(b), *rest)

    def cast(self: Any, src: Any, dst_type: Any) -> Any:
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.asarray(src.data, dtype=np.float32).view(np.uint32)
            bits = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
            return interpreter.TensorHandle((bits >> np.uint32(16)).astype(np.uint16), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    builder.create_dot, builder.cast_impl = dot, cast

    def undo() -> None:
        builder.create_dot, builder.cast_impl = create_dot, cast_impl

    return undo


def device(available: Callable[[str], bool]) -> Iterator[str]:
    """For a module-scoped fixture: ``cuda`` (where ``available("cuda")`` must hold),
    else ``cpu`` with the kernels running in the patched interpreter."""
    import torch

    if torch.cuda.is_available():
        assert available("cuda")
        yield "cuda"
        return
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported without TRITON_INTERPRET=1 before this module ran")
    os.environ["TRITON_INTERPRET"] = "1"
    undo = _patch_interpreter()
    yield "cpu"
    undo()


def heavy_imports(module: str) -> list[str]:
    """Which of torch and triton ``import core, <module>`` imports, in a fresh process."""
    root = Path(__file__).resolve().parents[1]
    code = (
        f"import sys, json, core, {module};"
        "print(json.dumps([m for m in ('torch', 'triton') if m in sys.modules]))"
    )
    env = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout))
