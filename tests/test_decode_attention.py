"""The fused decode-attention op (core.accel.cuda.decode_attention) against its plain-torch
reference.

Each case runs the real op (``gemma_local::decode_attention``): on CUDA when
there is a GPU, else through Triton's interpreter on CPU tensors, patched to
compute bfloat16 as a GPU does (``tests/triton_interpreter.py``).
"""

from __future__ import annotations

import importlib.util
import zlib
from collections.abc import Iterator
from typing import Any

import pytest

from core.accel.cuda import decode_attention as da
from tests import triton_interpreter

torch = pytest.importorskip("torch")

CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(
    not HAS_TRITON, reason="needs triton (CUDA wheels); runs in the interpreter"
)

# Triton's interpreter runs a grid's programs one after the other: on CPU the 12b's 8 KV
# heads are 2 (still a head index past 0; the splits per head are the same, see plan()).
KV_12B = 8 if CUDA else 2

# (B, KV, R, D, S, mask pattern)
CASES = [
    (1, 1, 4, 256, 512, "none"),  # gemma-3-1b at batch 1
    (1, KV_12B, 2, 256, 512, "none"),  # gemma-3-12b at batch 1
    (2, KV_12B, 2, 256, 300, "tail"),  # S not a multiple of the tile; slots 250.. masked
    (3, 2, 1, 64, 256, "left_pad"),  # per-row left padding
    (3, 2, 1, 64, 256, "ring"),  # a sliding-window ring buffer, wrapped
    (2, 2, 3, 128, 40, "left_pad"),  # one split (no combine), a partial tile
    (1, 1, 2, 64, 2048, "ring"),  # 32 splits: the combine takes two chunks
]


def make_mask(batch: int, slots: int, pattern: str) -> Any:
    allowed = torch.ones(batch, 1, 1, slots, dtype=torch.bool)
    if pattern == "tail":
        allowed[..., 250:] = False
    elif pattern == "left_pad":
        for row in range(batch):
            allowed[row, ..., : 7 * row] = False
    elif pattern == "ring":
        # each row's window of slots/2 valid slots starts at a different slot and wraps
        idx = torch.arange(slots)
        for row in range(batch):
            head = (slots // 3 + 29 * row) % slots
            allowed[row, 0, 0] = (idx - head) % slots < slots // 2
    return allowed


def inputs(case: tuple[int, int, int, int, int, str], dtype: Any, device: str) -> tuple[Any, ...]:
    batch, heads, rows, dim, slots, pattern = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    q, k, v = (
        torch.randn(batch, heads, n, dim, generator=gen).to(device, dtype)
        for n in (rows, slots, slots)
    )
    return q, k, v, make_mask(batch, slots, pattern).to(device)


@pytest.fixture(scope="module")
def device() -> Iterator[str]:
    """``cuda``, or ``cpu`` with the kernels running in Triton's interpreter."""
    yield from triton_interpreter.device(da.available)


@needs_triton
@pytest.mark.parametrize("softcap", [None, 50.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_reference(device: str, case: Any, dtype: str, softcap: float | None) -> None:
    q, k, v, allowed = inputs(case, getattr(torch, dtype), device)
    scale = case[3] ** -0.5
    out = da.decode_attention(q, k, v, allowed, scale, softcap)
    assert out.shape == q.shape and out.dtype == q.dtype
    # Against fp32 math: the kernel must be as close as the reference in its own dtype is.
    exact = da.reference(q.double(), k.double(), v.double(), allowed, scale, softcap)
    err = (out.double() - exact).abs().max().item()
    if dtype == "float32":
        assert err < 2e-5
    else:
        ref_err = (da.reference(q, k, v, allowed, scale, softcap).double() - exact).abs().max()
        assert err < max(2 * ref_err.item(), 4e-3)


@needs_triton
@pytest.mark.parametrize("limit", [1, 63, 64, 200, 512])
def test_limit_skips_the_slots_past_it(device: str, limit: int) -> None:
    """Slots at or past ``limit`` are never read: NaN there would poison the output."""
    q, k, v, allowed = inputs((2, KV_12B, 2, 64, 512, "left_pad"), torch.float32, device)
    allowed[..., limit:] = False
    allowed[:, ..., 0] = True  # every row keeps a slot, whatever the limit
    k[:, :, limit:], v[:, :, limit:] = float("nan"), float("nan")
    bound = torch.tensor([limit], device=device)
    out = da.decode_attention(q, k, v, allowed, 0.125, None, bound)
    expected = da.reference(q, k[:, :, :limit], v[:, :, :limit], allowed[..., :limit], 0.125)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)


@needs_triton
def test_masks_per_query_head_and_empty_rows(device: str) -> None:
    """A full [B, KV, R, S] mask, and a row with nothing allowed (zeros, not NaN)."""
    q, k, v, _ = inputs((2, 2, 3, 64, 130, "none"), torch.float32, device)
    allowed = torch.rand(2, 2, 3, 130, generator=torch.Generator().manual_seed(1)) < 0.5
    allowed[1, 0, 2] = False
    allowed = allowed.to(device)
    out = da.decode_attention(q, k, v, allowed, 0.125)
    expected = da.reference(q, k, v, allowed, 0.125)
    expected[1, 0, 2] = 0
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)


@needs_triton
def test_rejects_shapes_it_does_not_take(device: str) -> None:
    q, k, v, allowed = inputs((1, 1, 2, 64, 64, "none"), torch.float32, device)
    with pytest.raises(ValueError, match="head dim"):
        da.decode_attention(q[..., :48], k[..., :48], v[..., :48], allowed, 1.0)
    with pytest.raises(ValueError, match="query heads"):
        da.decode_attention(q.new_zeros(1, 1, 17, 64), k, v, allowed, 1.0)
    with pytest.raises(ValueError, match="bool"):
        da.decode_attention(q, k, v, allowed.float(), 1.0)


def test_unavailable_on_cpu_and_import_is_light() -> None:
    assert da.available("cpu") is False
    assert triton_interpreter.heavy_imports("core.accel.cuda.decode_attention") == []


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_compiled_and_graph_captured() -> None:
    """On CUDA: eager, inside ``torch.compile(fullgraph=True)``, and replayed from a CUDA graph."""
    assert da.available("cuda")
    q, k, v, allowed = inputs((2, 8, 2, 256, 512, "tail"), torch.bfloat16, "cuda")
    scale = 256**-0.5
    expected = da.reference(q, k, v, allowed, scale, 50.0)

    def step(q: Any, k: Any, v: Any, allowed: Any) -> Any:
        return da.decode_attention(q, k, v, allowed, scale, 50.0) * 2

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(q, k, v, allowed), expected * 2, atol=2e-2, rtol=2e-2)

    static = [t.clone() for t in (q, k, v, allowed)]
    compiled(*static)  # warm up before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = compiled(*static)
    static[1].copy_(static[1].flip(2))
    static[2].copy_(static[2].flip(2))
    graph.replay()
    torch.cuda.synchronize()
    flipped = da.reference(q, k.flip(2), v.flip(2), allowed, scale, 50.0)
    torch.testing.assert_close(out, flipped * 2, atol=2e-2, rtol=2e-2)


@needs_triton
@pytest.mark.parametrize(("arch", "window"), [("gemma3_path", 8), ("gemma2_path", 6)])
def test_fast_path_with_the_kernel_equals_plain_path(
    device: str, arch: str, window: int, request: pytest.FixtureRequest
) -> None:
    """The decode step with the op (interpreted on CPU) gives ``model.generate``'s greedy
    tokens: left-padded rows, a sliding window that wraps, Gemma 2's soft-capping."""
    from core.accel.cuda import fast_path
    from tests.test_fast_path import fast, greedy, load, plain, prompts_of

    model = load(request.getfixturevalue(arch), sliding_window=window).to(device)
    fast_path.release(model)
    engine = fast_path._engine(model, compile=False, cuda_graphs=False)
    engine.layout.decode_kernel = da.decode_attention  # the engine does so when it compiles
    assert fast_path.describe(model)["decode_attention"] == "triton"
    batch = prompts_of(11, 4, 9, seed=3)
    assert fast(model, batch, greedy(20)).tokens == plain(model, batch, 20)  # same device


@needs_triton
def test_works_self_check(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path turns the kernel on only after it ran right once on the device."""
    assert da.works((1, 2, 2, 64), torch.float32, device)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("PTX for this GPU failed to compile")

    monkeypatch.setattr(da, "decode_attention", broken)
    assert not da.works((1, 2, 2, 64), torch.float32, device)
    monkeypatch.setattr(da, "decode_attention", lambda q, *rest: torch.zeros_like(q))
    assert not da.works((1, 2, 2, 64), torch.float32, device)
