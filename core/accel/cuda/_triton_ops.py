"""What the Triton ops of the fast path share (:mod:`core.accel.cuda.decode_attention`,
:mod:`core.accel.cuda.gemv`, :mod:`core.accel.cuda.rope_store`): whether one runs on a device, its
self-check, and the GPU's SM count. Imports neither torch nor triton at import.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("gemma_local")


def available(device: Any, load: Callable[[], Any]) -> bool:
    """Whether an op runs on ``device``: CUDA, with triton importable and the op
    registered (``load`` imports its kernels module, registering it, when needed)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        load()
    except ImportError:  # no triton
        return False
    return True


def self_check(name: str, error: Callable[[], float], tolerance: float = 5e-2) -> bool:
    """Run ``error`` (the op on small random inputs against its reference: the largest
    difference): False, with a warning, where the kernel does not compile or run on this
    GPU or disagrees, so that the caller keeps its plain-torch path."""
    try:
        worst = error()
    except Exception as exc:  # a GPU or triton build the kernel does not run on
        logger.warning("%s kernel unavailable here: %s: %s", name, type(exc).__name__, exc)
        return False
    if not worst < tolerance:
        logger.warning("%s kernel disagrees with the reference (%.3g)", name, worst)
        return False
    return True


@functools.cache
def sm_count(device_type: str, index: int | None) -> int:
    """Streaming multiprocessors of a CUDA device; 0 elsewhere (Triton's interpreter)."""
    if device_type != "cuda":
        return 0
    import torch

    return int(torch.cuda.get_device_properties(index or 0).multi_processor_count)


def pdl_available(device: Any) -> bool:
    """Whether kernels can be launched with programmatic dependent launch on ``device``:
    a CUDA GPU of compute capability 9 or more (Hopper) and a triton that has
    ``launch_pdl`` and ``gdc_wait``."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        import triton.language as tl
    except ImportError:
        return False
    if not hasattr(getattr(tl.extra, "cuda", None), "gdc_wait"):
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def op_pair(
    name: str, pdl_name: str, make: Callable[[bool], Callable[..., Any]], mutates_args: Any = ()
) -> tuple[Any, Any]:
    """Register ``name``, the ``triton_op`` ``make(False)`` (inductor sees into it), and
    ``pdl_name``, ``make(True)`` launching its kernels with programmatic dependent launch:
    a plain custom op, opaque to inductor (inside a ``triton_op`` inductor reads the
    kernel to find what it writes, cannot read the ``griddepcontrol`` assembly, takes
    every input as written and copies them all: probe 11, 398 -> 878 launches a step),
    whose fake (shapes) is the first op's."""
    import torch
    from torch.library import triton_op

    op = triton_op(name, mutates_args=mutates_args)(make(False))
    twin = torch.library.custom_op(pdl_name, make(True), mutates_args=mutates_args)
    twin.register_fake(lambda *args, **kwargs: op(*args, **kwargs))
    return op, twin
