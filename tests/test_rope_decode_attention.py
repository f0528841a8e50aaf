"""The rope/store op folded into decode attention (``core.decode_attention.rope_decode_attention``).

Each case runs the real op (``gemma_local::rope_decode_attention``): on CUDA when
there is a GPU, else through Triton's interpreter on CPU tensors, patched as for
the other ops (``tests/triton_interpreter.py``). It must return what the two ops
it replaces return one after the other (``rope_store`` then ``decode_attention``)
and leave the caches as they leave them: the output against the plain-torch
reference, the caches exactly.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import Any

import pytest

from core import decode_attention as da
from core import rope_store as rs
from tests import triton_interpreter
from tests.test_decode_attention import make_mask
from tests.test_rope_store import inputs as rope_inputs

torch = pytest.importorskip("torch")

CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(
    not HAS_TRITON, reason="needs triton (CUDA wheels); runs in the interpreter"
)

# (B, heads, KV, D, S, slot, q/k norm, mask pattern, limit or None)
CASES = [
    (1, 4, 1, 256, 512, 9, True, "none", 10),  # gemma-3-1b at batch 1, the cache's start
    (1, 16, 8, 256, 512, 300, True, "none", 301),  # gemma-3-12b at batch 1: several splits
    (3, 16, 8, 256, 256, 255, True, "left_pad", 256),  # the last slot, left padding
    (2, 8, 4, 128, 300, 120, False, "tail", None),  # gemma-2-like, no limit: S not a tile
    (3, 4, 2, 64, 256, 17, True, "ring", 256),  # a wrapped sliding window
    (2, 6, 2, 128, 40, 39, False, "left_pad", 40),  # one split (no combine), R = 3
]


def inputs(case: tuple[Any, ...], dtype: Any, device: str) -> tuple[Any, ...]:
    batch, heads, kv, dim, slots, slot, norm, pattern, limit = case
    qkv, cos, sin, keys, values, slot_t, heads, q_w, k_w = rope_inputs(
        (batch, heads, kv, dim, slots, slot, norm), dtype, device
    )
    allowed = make_mask(batch, slots, pattern)
    allowed[..., slot] = True  # the step's own slot is always attended
    if limit is not None:
        allowed[..., limit:] = False
        keys[:, :, limit:] = float("nan")  # never read
        values[:, :, limit:] = float("nan")
        limit = torch.tensor([limit], device=device)
    return qkv, cos, sin, keys, values, slot_t, heads, q_w, k_w, allowed.to(device), limit


@pytest.fixture(scope="module")
def device() -> Iterator[str]:
    """``cuda``, or ``cpu`` with the kernels running in Triton's interpreter."""
    yield from triton_interpreter.device(da.available)


@needs_triton
@pytest.mark.parametrize("softcap", [None, 50.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_rope_store_then_attention(
    device: str, case: Any, dtype: str, softcap: float | None
) -> None:
    qkv, cos, sin, keys, values, slot, heads, q_w, k_w, allowed, limit = inputs(
        case, getattr(torch, dtype), device
    )
    scale = case[3] ** -0.5
    # the two ops it replaces, on copies of the cache
    want_k, want_v = keys.clone(), values.clone()
    q = rs.rope_store(qkv, cos, sin, want_k, want_v, slot, heads, q_w, k_w)
    want = da.decode_attention(q, want_k, want_v, allowed, scale, softcap, limit)
    got = da.rope_decode_attention(
        qkv, cos, sin, keys, values, slot, heads, q_w, k_w, 1e-6, allowed, scale, softcap, limit
    )
    assert got.shape == q.shape and got.dtype == q.dtype
    # the caches: v the same bits, k within an ulp (the norm's sum runs in another
    # order), NaN past the limit left as it was
    rtol = 1e-5 if dtype == "float32" else 2**-7
    torch.testing.assert_close(keys, want_k, atol=1e-6, rtol=rtol, equal_nan=True)
    torch.testing.assert_close(values, want_v, atol=0, rtol=0, equal_nan=True)
    # the output: as close to fp64 math as the two ops are
    bound = keys.shape[2] if limit is None else int(limit.item())
    ref_k, ref_v = want_k[:, :, :bound].double(), want_v[:, :, :bound].double()
    exact = da.reference(
        rs.reference(qkv.double(), cos.double(), sin.double(), want_k.double().clone(),
                     want_v.double().clone(), slot, heads,
                     None if q_w is None else q_w.double(),
                     None if k_w is None else k_w.double()),
        ref_k, ref_v, allowed[..., :bound], scale, softcap,
    )  # fmt: skip
    err = (got.double() - exact).abs().max().item()
    two_ops = (want.double() - exact).abs().max().item()
    if dtype == "float32":
        assert err < 5e-5
    else:
        assert err < max(2 * two_ops, 8e-3)


@needs_triton
def test_writes_the_slot_past_the_limit_and_nothing_outside(device: str) -> None:
    """A slot past the limit is written (not read), as rope_store writes it; one outside
    the cache writes nothing; every other slot is left as it was."""
    case = (2, 4, 2, 64, 128, 0, True, "none", None)
    qkv, cos, sin, keys, values, _, heads, q_w, k_w, allowed, _ = inputs(
        case, torch.float32, device
    )
    for slot, limit in ((100, 64), (128, 64), (-1, 64)):
        k, v = keys.clone(), values.clone()
        want_k, want_v = keys.clone(), values.clone()
        at = torch.tensor([slot], device=device)
        bound = torch.tensor([limit], device=device)
        mask = allowed.clone()
        mask[..., limit:] = False
        rs.rope_store(qkv, cos, sin, want_k, want_v, at, heads, q_w, k_w)
        da.rope_decode_attention(
            qkv, cos, sin, k, v, at, heads, q_w, k_w, 1e-6, mask, 0.125, None, bound
        )
        # k within an fp32 ulp or two (the norm's sum runs in another order), v exactly
        torch.testing.assert_close(k, want_k, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(v, want_v, atol=0, rtol=0)


@needs_triton
def test_rejects_what_either_op_rejects(device: str) -> None:
    qkv, cos, sin, keys, values, slot, heads, q_w, k_w, allowed, _ = inputs(
        CASES[5], torch.float32, device
    )
    args = (slot, heads, q_w, k_w, 1e-6, allowed, 0.125)
    with pytest.raises(ValueError, match="qkv must be"):
        da.rope_decode_attention(qkv[:, :-1], cos, sin, keys, values, *args)
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        da.rope_decode_attention(qkv, cos, sin, keys, values, slot, 5, *args[2:])
    with pytest.raises(ValueError, match="bool"):
        da.rope_decode_attention(qkv, cos, sin, keys, values, *args[:5], allowed.float(), 0.125)


@needs_triton
@pytest.mark.parametrize("norm", [True, False], ids=["gemma3", "gemma2"])
def test_works_self_check(device: str, norm: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path folds the ops together only after the fused one ran right once."""
    assert da.rope_works(4, 2, 64, torch.float32, device, norm)
    monkeypatch.setattr(da, "rope_decode_attention", lambda qkv, cos, sin, k, *rest: k[:, :, :2])
    assert not da.rope_works(4, 2, 64, torch.float32, device, norm)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_compiled_and_graph_captured() -> None:
    """On CUDA: inside ``torch.compile(fullgraph=True)`` (the cache writes kept) and
    replayed from a CUDA graph with a new slot."""
    qkv, cos, sin, keys, values, slot, heads, q_w, k_w, allowed, limit = inputs(
        CASES[2], torch.bfloat16, "cuda"
    )
    scale = 256**-0.5

    def step(qkv: Any, keys: Any, values: Any, slot: Any) -> Any:
        args = (slot, heads, q_w, k_w, 1e-6, allowed, scale, None, limit)
        return da.rope_decode_attention(qkv, cos, sin, keys, values, *args) * 2

    def expected(qkv: Any, keys: Any, values: Any, slot: Any) -> Any:
        q = rs.rope_store(qkv, cos, sin, keys, values, slot, heads, q_w, k_w)
        return da.decode_attention(q, keys, values, allowed, scale, None, limit) * 2

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    k, v, want_k, want_v = keys.clone(), values.clone(), keys.clone(), values.clone()
    torch.testing.assert_close(
        compiled(qkv, k, v, slot), expected(qkv, want_k, want_v, slot), atol=2e-2, rtol=2e-2
    )
    torch.testing.assert_close(k, want_k, equal_nan=True)

    static = [qkv.clone(), keys.clone(), values.clone(), slot.clone()]
    compiled(*static)  # warm up before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = compiled(*static)
    static[0].copy_(static[0].flip(1))
    static[3].fill_(100)
    graph.replay()
    torch.cuda.synchronize()
    want_k, want_v = static[1].clone(), static[2].clone()
    want = expected(static[0], want_k, want_v, static[3])
    torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(static[1], want_k, equal_nan=True)
