"""The fused q/k norm + RoPE + KV-cache write op (core.accel.cuda.rope_store) against its reference.

Each case runs the real op (``gemma_local::rope_store``): on CUDA when there
is a GPU, else through Triton's interpreter on CPU tensors, patched to round
fp32 -> bfloat16 to nearest even as a GPU does (``tests/triton_interpreter.py``).
The plain-torch reference is itself checked against transformers' own Gemma 3
norm and RoPE.

``torch.compile`` cannot trace a Triton op run by the interpreter (its fake
tensors reach the interpreted kernel), so, as for decode attention, the
compiled and graph-captured op is tested on CUDA only.
"""

from __future__ import annotations

import importlib.util
import zlib
from collections.abc import Iterator
from typing import Any

import pytest

from core.accel.cuda import rope_store as rs
from tests import triton_interpreter

torch = pytest.importorskip("torch")

CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(
    not HAS_TRITON, reason="needs triton (CUDA wheels); runs in the interpreter"
)

# Triton's interpreter runs a grid's programs (a row's heads) one after the other: on CPU
# the 12b's 16 query heads on 8 KV heads are 4 on 2 (the same 2 query heads per KV head).
HEADS_12B, KV_12B = (16, 8) if CUDA else (4, 2)

# (B, heads, KV, D, S, slot, q/k norm); batch 3 passes cos/sin as [B, D], batch 1 as [B, 1, D]
CASES = [
    (1, 4, 1, 256, 16, 9, True),  # gemma-3-1b
    (3, 4, 1, 256, 16, 0, True),
    (1, HEADS_12B, KV_12B, 256, 12, 0, True),  # gemma-3-12b
    (3, HEADS_12B, KV_12B, 256, 12, 11, True),  # the last slot
    (3, 8, 4, 128, 10, 4, False),  # gemma-2-like: no q/k norm
    (1, 8, 4, 128, 10, 0, False),
]
POSITIONS = (7, 130, 4000)


def inputs(case: tuple[Any, ...], dtype: Any, device: str) -> tuple[Any, ...]:
    """The op's arguments for ``case``: (qkv, cos, sin, keys, values, slot, heads, q_w, k_w)."""
    batch, heads, kv, dim, slots, slot, norm = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    qkv = 2 * torch.randn(batch, (heads + 2 * kv) * dim, generator=gen)
    # What the model's rotary embedding returns for one position per row: [B, 1, D].
    inv_freq = 10_000.0 ** (-torch.arange(0, dim, 2).float() / dim)
    angles = torch.tensor(POSITIONS[:batch]).float()[:, None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    cos, sin = angles.cos(), angles.sin()
    if batch > 1:
        cos, sin = cos[:, 0], sin[:, 0]
    keys = torch.randn(batch, kv, slots, dim, generator=gen)
    values = torch.randn(batch, kv, slots, dim, generator=gen)
    weights = [0.5 * torch.randn(dim, generator=gen) for _ in range(2)] if norm else [None] * 2
    tensors = [qkv, cos, sin, keys, values, *weights]
    qkv, cos, sin, keys, values, q_w, k_w = (
        None if t is None else t.to(device, dtype) for t in tensors
    )
    slot_t = torch.tensor([slot], device=device)
    return qkv, cos, sin, keys, values, slot_t, heads, q_w, k_w


@pytest.fixture(scope="module")
def device() -> Iterator[str]:
    """``cuda``, or ``cpu`` with the kernel running in Triton's interpreter."""
    yield from triton_interpreter.device(rs.available)


def assert_close(got: Any, want: Any) -> None:
    """fp32: tight. 16-bit: within two ulps of the largest value (the kernel's sum of
    squares runs in another order than torch's, which can move the normed value,
    rounded to the dtype, by one ulp before RoPE)."""
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        ulp = torch.finfo(got.dtype).eps
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, atol=2 * ulp * scale, rtol=2 * ulp)


@needs_triton
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_reference(device: str, case: Any, dtype: str) -> None:
    args = inputs(case, getattr(torch, dtype), device)
    qkv, cos, sin, keys, values, slot_t, heads, q_w, k_w = args
    batch, _, kv, dim, slots, slot, _ = case
    before_k, before_v = keys.clone(), values.clone()
    want_k, want_v = keys.clone(), values.clone()

    q = rs.rope_store(*args)
    want = rs.reference(qkv, cos, sin, want_k, want_v, slot_t, heads, q_w, k_w)

    assert q.shape == (batch, kv, heads // kv, dim) and q.dtype == qkv.dtype
    assert_close(q, want)
    assert_close(keys[:, :, slot], want_k[:, :, slot])
    v = qkv.view(batch, heads + 2 * kv, dim)[:, heads + kv :]
    assert torch.equal(values[:, :, slot], v)  # copied bit for bit
    others = [i for i in range(slots) if i != slot]
    assert torch.equal(keys[:, :, others], before_k[:, :, others])
    assert torch.equal(values[:, :, others], before_v[:, :, others])


@needs_triton
@pytest.mark.parametrize("slot", [-1, 16])
def test_slot_outside_the_cache_writes_nothing(device: str, slot: int) -> None:
    """The kernel cannot raise on a slot it reads on the device: it writes nothing."""
    qkv, cos, sin, keys, values, _, heads, q_w, k_w = inputs(CASES[1], torch.float32, device)
    before_k, before_v = keys.clone(), values.clone()
    slot_t = torch.tensor(slot, device=device)  # a 0-d tensor does as well
    q = rs.rope_store(qkv, cos, sin, keys, values, slot_t, heads, q_w, k_w)
    want = rs.reference(
        qkv, cos, sin, keys.clone(), values.clone(), torch.tensor(0, device=device), heads, q_w, k_w
    )
    torch.testing.assert_close(q, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(keys, before_k) and torch.equal(values, before_v)


@needs_triton
def test_rejects_arguments_it_does_not_take(device: str) -> None:
    qkv, cos, sin, keys, values, slot, heads, *_ = inputs(CASES[4], torch.float32, device)
    weights = (torch.ones(128, device=device), torch.ones(128, device=device))

    def call(**change: Any) -> Any:
        args = dict(qkv=qkv, cos=cos, sin=sin, keys=keys, values=values, slot=slot, heads=heads)
        return rs.rope_store(**{**args, **change})

    cases = [
        ({"keys": keys[..., :96], "values": values[..., :96]}, "head dim must be one of"),
        ({"heads": 6}, "multiple of the KV heads"),
        ({"qkv": qkv[:, :-128]}, r"qkv must be \[B, \(heads \+ 2 \* KV\) \* D\]"),
        ({"qkv": qkv.t().contiguous().t()}, "stride 1"),
        ({"cos": cos[:, None, None]}, r"cos must be \[B, D\] or \[B, 1, D\]"),
        ({"qkv": qkv.double()}, "qkv must be one of"),
        ({"sin": sin.half()}, "share a dtype"),
        ({"slot": torch.tensor([1, 2], device=device)}, "slot must be an int64"),
        ({"slot": torch.tensor([1.0], device=device)}, "slot must be an int64"),
        ({"q_norm_weight": weights[0]}, "both q_norm_weight and k_norm_weight"),
        ({"q_norm_weight": weights[0][:64], "k_norm_weight": weights[1]}, "q_norm_weight must be"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            call(**change)


def test_reference_matches_transformers() -> None:
    """:func:`rs.reference` is Gemma 3's own attention prologue: ``Gemma3RMSNorm`` on
    each q and k head, then ``apply_rotary_pos_emb``."""
    modeling = pytest.importorskip("transformers.models.gemma3.modeling_gemma3")
    args = inputs((3, 16, 8, 256, 12, 5, True), torch.float32, "cpu")
    qkv, cos, sin, keys, _, _, heads, q_w, k_w = args
    batch, kv, dim = qkv.shape[0], keys.shape[1], keys.shape[3]
    got = rs.reference(*args)

    q_norm, k_norm = modeling.Gemma3RMSNorm(dim, eps=1e-6), modeling.Gemma3RMSNorm(dim, eps=1e-6)
    q_norm.weight.data.copy_(q_w)
    k_norm.weight.data.copy_(k_w)
    # As Gemma3Attention: [B, 1, heads * D] -> [B, heads, 1, D], norm, RoPE.
    q, k, _ = qkv[:, None].split([heads * dim, kv * dim, kv * dim], dim=-1)
    q = q_norm(q.view(batch, 1, heads, dim).transpose(1, 2))
    k = k_norm(k.view(batch, 1, kv, dim).transpose(1, 2))
    with torch.no_grad():
        q, k = modeling.apply_rotary_pos_emb(q, k, cos[:, None], sin[:, None])
    torch.testing.assert_close(got, q.reshape(batch, kv, heads // kv, dim))
    torch.testing.assert_close(keys[:, :, 5], k[:, :, 0])


def test_unavailable_on_cpu_and_import_is_light() -> None:
    assert rs.available("cpu") is False
    assert triton_interpreter.heavy_imports("core.accel.cuda.rope_store") == []


@needs_triton
@pytest.mark.parametrize("norm", [True, False], ids=["gemma3", "gemma2"])
def test_works_self_check(device: str, norm: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path turns the kernel on only after it ran right once on the device."""
    assert rs.works(4, 2, 64, torch.float32, device, norm)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("PTX for this GPU failed to compile")

    monkeypatch.setattr(rs, "rope_store", broken)
    assert not rs.works(4, 2, 64, torch.float32, device, norm)

    def unwritten(qkv: Any, cos: Any, sin: Any, keys: Any, values: Any, *rest: Any) -> Any:
        """The right q, but the cache left as it was."""
        return rs.reference(qkv, cos, sin, keys.clone(), values.clone(), *rest)

    monkeypatch.setattr(rs, "rope_store", unwritten)
    assert not rs.works(4, 2, 64, torch.float32, device, norm)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_compiled_and_graph_captured() -> None:
    """On CUDA: inside ``torch.compile(fullgraph=True)``, and replayed from a CUDA graph
    with the slot and the projection changed in place (the slot is read on the device)."""
    assert rs.available("cuda")
    args = inputs((3, 16, 8, 256, 12, 4, True), torch.bfloat16, "cuda")
    qkv, cos, sin, keys, values, slot, heads, q_w, k_w = args

    def step(qkv: Any, cos: Any, sin: Any, keys: Any, values: Any, slot: Any) -> Any:
        return rs.rope_store(qkv, cos, sin, keys, values, slot, heads, q_w, k_w) * 2

    def expect(qkv: Any, keys: Any, values: Any, slot: Any) -> tuple[Any, Any, Any]:
        keys, values = keys.clone(), values.clone()
        q = rs.reference(qkv, cos, sin, keys, values, slot, heads, q_w, k_w)
        return q * 2, keys, values

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    want = expect(qkv, keys, values, slot)
    got = compiled(qkv, cos, sin, keys, values, slot)
    for a, b in zip((got, keys, values), want, strict=True):
        assert_close(a, b)

    compiled(qkv, cos, sin, keys, values, slot)  # warm up before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = compiled(qkv, cos, sin, keys, values, slot)
    want = expect(qkv.flip(0), keys, values, slot + 5)
    qkv.copy_(qkv.flip(0))
    slot.add_(5)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip((out, keys, values), want, strict=True):
        assert_close(a, b)
