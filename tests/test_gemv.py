"""The decode-step products op (core.accel.cuda.gemv) against its plain-torch reference.

Each case runs the real op (``gemma_local::gemv``): on CUDA when there is a
GPU, else through Triton's interpreter on CPU tensors, patched to compute
bfloat16 as a GPU does (``tests/triton_interpreter.py``). Both forms of the
kernel are covered (one row: a reduction; 2-16 rows: ``tl.dot``, either way round), with and
without the folded norm and activation, shapes whose N and K are not
multiples of the blocks, and the fast path's decode step running on it.
"""

from __future__ import annotations

import importlib.util
import zlib
from collections.abc import Iterator
from typing import Any

import pytest

from core.accel.cuda import gemv
from tests import triton_interpreter

torch = pytest.importorskip("torch")

CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(
    not HAS_TRITON, reason="needs triton (CUDA wheels); runs in the interpreter"
)

# (rows, N, K, block): N/K multiples of the blocks or not; None = the op's own config
CASES = [
    (1, 96, 256, None),
    (1, 40, 200, (8, 64, 4, 1)),  # ragged N and K
    (3, 96, 256, None),  # the dot form, rows padded to 16
    (16, 64, 320, (32, 128, 4, 2)),
    (5, 40, 200, (16, 64, 4, 1)),
    (16, 128, 320, (64, 64, 4, 2, True)),  # the swapped dot form (W @ x.T)
    (5, 100, 200, (64, 64, 4, 1, True)),  # swapped, ragged N and K, rows padded to 16
]


@pytest.fixture(scope="module")
def device() -> Iterator[str]:
    """``cuda``, or ``cpu`` with the kernel running in Triton's interpreter."""
    yield from triton_interpreter.device(gemv.available)


def inputs(rows: int, n: int, k: int, dtype: Any, device: str) -> tuple[Any, Any, Any]:
    gen = torch.Generator().manual_seed(zlib.crc32(repr((rows, n, k)).encode()))
    x = torch.randn(rows, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k**0.5
    norm = 0.3 * torch.randn(k, generator=gen)
    return x.to(device, dtype), w.to(device, dtype), norm.to(device, dtype)


def run(x: Any, w: Any, norm: Any, act: bool, block: Any) -> Any:
    if block is None:
        return gemv.gemv(x, w, norm, 1e-6, act)
    from core.accel.cuda import _gemv_triton as kernels

    kernel = kernels._gemv_kernel
    return kernels.launch(x, w, norm, 1e-6, act, kernel, block=block)


@needs_triton
@pytest.mark.parametrize("act", [False, True], ids=["plain", "act"])
@pytest.mark.parametrize("norm", [False, True], ids=["x", "norm"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:3])))
def test_matches_reference(device: str, case: Any, dtype: str, norm: bool, act: bool) -> None:
    rows, n, k, block = case
    x, w, norm_w = inputs(rows, n, k, getattr(torch, dtype), device)
    norm_w = norm_w if norm else None
    got = run(x, w, norm_w, act, block)
    assert got.shape == (rows, n // 2 if act else n) and got.dtype == x.dtype
    if dtype == "float32":
        want = gemv.reference(x, w, norm_w, 1e-6, act)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        # the reference in fp32 from the same bf16 inputs; the op rounds the products
        # (and the activation) to bf16 as the modules do, and folds the norm unrounded
        want = gemv.reference(
            x.float(), w.float(), None if norm_w is None else norm_w.float(), 1e-6, act
        )
        torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=2e-2)


@needs_triton
def test_rejects_arguments_it_does_not_take(device: str) -> None:
    x, w, norm = inputs(2, 64, 128, torch.float32, device)
    cases = [
        ((x[0], w), "x must be \\[M, K\\]"),
        ((x, w[:, :64]), "x has K=128 but weight has K=64"),
        ((x.double(), w.double()), "bfloat16, float16 or float32"),
        ((x, w.half()), "share a dtype"),
        ((x.t().contiguous().t(), w), "contiguous along K"),
        ((x, w[:63], None, 1e-6, True), "even N"),
        ((x, w, norm[:100]), "norm_weight must be \\[K\\]"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            gemv.gemv(*args)


def test_folded_products() -> None:
    """Where the residual form pays (the H200 measurements in the docstring)."""
    assert gemv.folded("qkv", (1536, 1152))  # 1b
    assert not gemv.folded("qkv", (8192, 3840))  # 12b
    assert not gemv.folded("gate_up", (13824, 1152))
    assert not gemv.folded("gate_up", (30720, 3840))


def test_preferred_products() -> None:
    """What the fast path runs through the op (the H200 measurements in the docstring)."""
    for name in ("qkv", "o", "gate_up", "down"):
        assert gemv.preferred(name, 1, (30720, 3840))  # one row: every product
    assert gemv.preferred("down", 16, (3840, 15360)) and gemv.preferred("o", 16, (3840, 4096))
    assert not gemv.preferred("down", 16, (1152, 6912))  # too few programs
    # the wide products where the swapped form is tuned (the activation in gate/up's)
    assert gemv.preferred("qkv", 16, (8192, 3840)) and gemv.swapped(8192, 3840, act=False)
    assert gemv.preferred("gate_up", 16, (30720, 3840)) and gemv.swapped(15360, 3840, act=True)
    assert gemv.preferred("gate_up", 16, (13824, 1152))
    assert not gemv.preferred("qkv", 16, (1536, 1152))  # not tuned swapped: cuBLAS
    assert not gemv.swapped(3840, 15360, act=False)
    assert not gemv.preferred("down", 17, (3840, 15360))  # a GEMM: cuBLAS


def test_unavailable_on_cpu_and_import_is_light() -> None:
    assert gemv.available("cpu") is False
    assert triton_interpreter.heavy_imports("core.accel.cuda.gemv") == []


@needs_triton
def test_works_self_check(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path turns the kernel on only after it ran right once on the device."""
    assert gemv.works(torch.float32, device)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("PTX for this GPU failed to compile")

    monkeypatch.setattr(gemv, "gemv", broken)
    assert not gemv.works(torch.float32, device)
    monkeypatch.setattr(gemv, "gemv", lambda x, w, *rest: torch.zeros(x.shape[0], w.shape[0]))
    assert not gemv.works(torch.float32, device)


@needs_triton
@pytest.mark.parametrize("arch", ["gemma3_path", "gemma2_path", "gemma1_path"])
def test_fast_path_on_the_triton_ops_equals_plain_path(
    device: str, arch: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decode step on the gemv and rope/store ops (and the attention op; interpreted
    on CPU) gives ``model.generate``'s greedy tokens: batch 1 (the reduction form) and a
    left-padded batch of 3 in a bucket of 4 (the dot form), every product through the
    op, a sliding window that wraps.

    Sized for the interpreter: each way of wiring the ops runs at the row counts where it
    differs from the one before (no one-row run that repeats the last; Gemma 2 runs the
    first wiring only, see there), 10 tokens (9 steps: every slot of the 8-slot window
    rewritten), a 128-slot cache (the attention op still splits it and combines the
    splits, as it does the default 256 slots) and, interpreted, blocks of 128 outputs
    (two programs for q/k/v and gate/up: the residual form's h written by one of them)."""
    from core.accel.cuda import _gemv_triton as kernels
    from core.accel.cuda import decode_attention, fast_path, rope_store
    from tests.test_fast_path import fast, greedy, load, plain, prompts_of

    monkeypatch.setenv("GEMMA_LOCAL_FUSE", "1")  # the ops need the stacked projections
    monkeypatch.setattr(fast_path, "MIN_CACHE_LEN", 128)
    if device == "cpu":
        interpreted = kernels.config

        def wide(rows: int, n_out: int, k: int, act: bool, sms: int) -> tuple[int, ...]:
            return (128, *interpreted(rows, n_out, k, act, sms)[1:])

        monkeypatch.setattr(kernels, "config", wide)
    monkeypatch.setattr(gemv, "preferred", lambda *args: True)
    window = {} if arch == "gemma1_path" else {"sliding_window": 8}
    model = load(request.getfixturevalue(arch), **window).to(device)
    fast_path.release(model)
    engine = fast_path._engine(model, compile=False, cuda_graphs=False)
    lay = engine.layout  # what the engine sets when it compiles on CUDA
    assert lay.fused
    lay.gemv, lay.rope_store, lay.swap = gemv.gemv, rope_store.rope_store, True
    one, three = prompts_of(13), prompts_of(11, 4, 9, seed=3)

    def check(batch: list[list[int]]) -> None:
        assert fast(model, batch, greedy(10)).tokens == plain(model, batch, 10)

    folded: list[int] = []  # rows of each residual add folded into a product

    def gemv_residual(y: Any, *args: Any) -> Any:
        folded.append(y.shape[0])
        return gemv.gemv_residual(y, *args)

    lay.gemv_residual, lay.fold = gemv_residual, "all"
    lay.decode_kernel = decode_attention.decode_attention
    check(one)
    check(three)
    # both of a layer's add + norms (before q/k/v, before gate/up) at 1 and 4 rows
    assert set(folded) == {1, 4}
    assert len(folded) % (2 * len(lay.layers)) == 0
    if arch == "gemma2_path":
        # What Gemma 2 brings to the ops (no q/k norms, the attention's soft-cap) ran
        # above; the wirings below differ by arch only in the post-norms before each
        # add, which Gemma 3 has as Gemma 2 does (and Gemma 1 has not)
        fast_path.release(model)
        return
    # and without the residual form: the add + norms as torch ops, the products on the op
    # (at 4 rows in the next run, as its kernel runs at one row only)
    lay.gemv_residual, lay.fold = None, "auto"
    folded.clear()
    check(one)
    assert not folded
    # and the add + norms as the PDL chain's kernel (launched plainly here): one-row
    # steps only (a padded batch keeps inductor's)
    added: list[int] = []

    def residual_add(y: Any, r: Any, post: Any, eps: float) -> Any:
        added.append(y.shape[0])
        return kernels.launch_residual(y, r, post, eps, kernels._residual_kernel)

    lay.residual_add = residual_add
    check(one)
    check(three)
    assert set(added) == {1} and len(added) % (2 * len(lay.layers)) == 0
    # and at 2-16 rows with cuBLAS's products (the op's dot form not preferred): both
    # add + norms with the next norm as one kernel of ours (core.accel.cuda.gemv.residual_norm);
    # one row runs as in the run before
    monkeypatch.setattr(gemv, "preferred", lambda name, rows, shape: rows == 1)
    normed: list[int] = []

    def residual_norm(y: Any, r: Any, post: Any, post_eps: float, w: Any, eps: float) -> Any:
        normed.append(y.shape[0])
        kernel = kernels._residual_kernel
        return kernels.launch_residual(y, r, post, post_eps, kernel, norm_weight=w, eps=eps)

    lay.residual_norm = residual_norm
    check(three)
    assert set(normed) == {4} and len(normed) % (2 * len(lay.layers)) == 0
    # and the 2-16-row q/k/v and gate/up products on the op's swapped form after that
    # kernel, the activation in gate/up's (the form the 12b's TUNED entries pick)
    real_config = kernels.config
    swapped: list[tuple[int, bool]] = []  # (rows, act) of each swapped product

    def config(rows: int, n_out: int, k: int, act: bool, sms: int) -> tuple[int, ...]:
        if rows > 1:
            swapped.append((rows, act))
            return (64, 64, 4, 1, True)
        return real_config(rows, n_out, k, act, sms)

    monkeypatch.setattr(kernels, "config", config)
    wide_products = ("qkv", "gate_up")
    monkeypatch.setattr(
        gemv, "preferred", lambda name, rows, shape: rows == 1 or name in wide_products
    )
    normed.clear()
    check(three)
    assert set(swapped) == {(4, False), (4, True)}
    assert len(swapped) % (2 * len(lay.layers)) == 0
    assert set(normed) == {4} and len(normed) % (2 * len(lay.layers)) == 0
    fast_path.release(model)


def run_residual(y: Any, r: Any, w: Any, norm: Any, act: bool, post: Any, block: Any) -> Any:
    if block is None:
        return gemv.gemv_residual(y, r, w, norm, 1e-6, act, post, 1e-5)
    from core.accel.cuda import _gemv_triton as kernels

    return kernels.launch(
        y,
        w,
        norm,
        1e-6,
        act,
        kernels._gemv_kernel,
        residual=r,
        post_weight=post,
        post_eps=1e-5,
        block=block,
    )


@needs_triton
@pytest.mark.parametrize("act", [False, True], ids=["plain", "act"])
@pytest.mark.parametrize("post", [False, True], ids=["add", "post-norm"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:3])))
def test_residual_form_matches_reference(
    device: str, case: Any, dtype: str, post: bool, act: bool
) -> None:
    """``h = r + post_norm(y)`` folded in front of the product: h equals the modules'
    rounded add exactly in bf16 (each program computes it from the same loads), and the
    product is :func:`gemv.reference` of that h."""
    rows, n, k, block = case
    y, w, norm_w = inputs(rows, n, k, getattr(torch, dtype), device)
    r, _, post_w = inputs(rows + 1, n, k, getattr(torch, dtype), device)
    r, post_w = 4 * r[:rows], post_w if post else None
    got, hidden = run_residual(y, r, w, norm_w, act, post_w, block)
    want_h = r + (y if post_w is None else gemv.rms_norm(y, post_w, 1e-5))
    assert hidden.shape == r.shape and hidden.dtype == r.dtype
    if dtype == "float32":
        torch.testing.assert_close(hidden, want_h, atol=1e-5, rtol=1e-5)
        want = gemv.reference(hidden, w, norm_w, 1e-6, act)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        # at most one bf16 ulp where the fp32 norm sits on a rounding boundary
        torch.testing.assert_close(hidden.float(), want_h.float(), atol=0, rtol=2**-7)
        want = gemv.reference(hidden.float(), w.float(), norm_w.float(), 1e-6, act)
        torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=2e-2)
    assert not torch.equal(hidden, r)  # y was added


@needs_triton
@pytest.mark.parametrize("post", [False, True], ids=["add", "post-norm"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows, k", [(1, 256), (3, 200), (16, 1152)])
def test_residual_add_kernel_matches_the_residual_form(
    device: str, rows: int, k: int, dtype: str, post: bool
) -> None:
    """The PDL chain's add + norm kernel (``core.accel.cuda.gemv.residual_add``, here launched
    plainly) gives the h of the residual form and of the modules' add."""
    from core.accel.cuda import _gemv_triton as kernels

    y, w, _ = inputs(rows, 32, k, getattr(torch, dtype), device)
    r, _, post_w = inputs(rows + 1, 32, k, getattr(torch, dtype), device)
    r, post_w = 4 * r[:rows], post_w if post else None
    got = kernels.launch_residual(y, r, post_w, 1e-5, kernels._residual_kernel)
    _, want = run_residual(y, r, w, None, False, post_w, None)
    assert got.shape == r.shape and got.dtype == r.dtype
    # the sums of squares are taken in another order: fp32 a few ulps apart, bf16 at
    # most one ulp where that moves a rounding boundary
    if dtype == "float32":
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    else:
        torch.testing.assert_close(got.float(), want.float(), atol=0, rtol=2**-7)
    modules = r + (y if post_w is None else gemv.rms_norm(y, post_w, 1e-5))
    torch.testing.assert_close(got.float(), modules.float(), atol=1e-5, rtol=2**-7)
    with pytest.raises(ValueError, match="residual must be"):
        kernels.launch_residual(y, r[:, :16], post_w, 1e-5, kernels._residual_kernel)


@needs_triton
@pytest.mark.parametrize("post", [False, True], ids=["add", "post-norm"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows, k", [(2, 256), (3, 200), (16, 1152)])
def test_residual_norm_kernel_matches_the_modules(
    device: str, rows: int, k: int, dtype: str, post: bool
) -> None:
    """The add + norm kernel with the next norm (``core.accel.cuda.gemv.residual_norm``: the op on
    CUDA, the kernel interpreted on CPU) gives the residual form's h and the norm
    module's output of that h."""
    from core.accel.cuda import _gemv_triton as kernels

    y, w, norm_w = inputs(rows, 32, k, getattr(torch, dtype), device)
    r, _, post_w = inputs(rows + 1, 32, k, getattr(torch, dtype), device)
    r, post_w = 4 * r[:rows], post_w if post else None
    if device == "cuda":
        got_h, got_n = gemv.residual_norm(y, r, post_w, 1e-5, norm_w, 1e-6)
    else:
        got_h, got_n = kernels.launch_residual(
            y, r, post_w, 1e-5, kernels._residual_kernel, norm_weight=norm_w, eps=1e-6
        )
    _, want_h = run_residual(y, r, w, None, False, post_w, None)
    want_n = gemv.rms_norm(got_h, norm_w, 1e-6)
    assert got_n.shape == r.shape and got_n.dtype == r.dtype
    if dtype == "float32":
        torch.testing.assert_close(got_h, want_h, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got_n, want_n, atol=1e-5, rtol=1e-5)
    else:  # at most one bf16 ulp where the sums of squares move a rounding boundary
        torch.testing.assert_close(got_h.float(), want_h.float(), atol=0, rtol=2**-7)
        torch.testing.assert_close(got_n.float(), want_n.float(), atol=1e-5, rtol=2**-7)
    assert not torch.equal(got_n, got_h)  # the norm was applied
    with pytest.raises(ValueError, match="norm_weight must be"):
        kernels.launch_residual(
            y, r, post_w, 1e-5, kernels._residual_kernel, norm_weight=norm_w[:16]
        )


@needs_triton
def test_residual_form_rejects_arguments_it_does_not_take(device: str) -> None:
    y, w, norm = inputs(2, 64, 128, torch.float32, device)
    cases = [
        ((y, y[:1], w), "residual must be \\[M, K\\] = \\[2, 128\\] in torch.float32"),
        ((y, y.double(), w), "residual must be"),
        ((y, y.t().contiguous().t(), w), "residual must be contiguous along K"),
        ((y, y, w, norm, 1e-6, False, norm[:10]), "post_weight must be \\[K\\] = \\[128\\]"),
        ((y, y, w[:, :64]), "x has K=128 but weight has K=64"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            gemv.gemv_residual(*args)


@needs_triton
def test_programmatic_dependent_launch_gives_the_same_chain(device: str) -> None:
    """``pdl=True``: each product may start before the one it reads has finished and
    waits for it inside (``griddepcontrol.wait``): a chain of products and residual adds, each reading the one before, captured in a
    CUDA graph and replayed, equals the chain launched plainly."""
    if device != "cuda" or not gemv.pdl_available(device):
        pytest.skip("needs a Hopper (sm90+) GPU: PDL is a launch attribute of the hardware")
    k = 512
    gen = torch.Generator(device=device).manual_seed(0)
    ws = [(torch.randn(k, k, generator=gen, device=device) / k**0.5).bfloat16() for _ in range(8)]
    gate_up = (torch.randn(2 * k, k, generator=gen, device=device) / k**0.5).bfloat16()
    norm = (0.1 * torch.randn(k, generator=gen, device=device)).bfloat16()
    x0 = torch.randn(1, k, generator=gen, device=device).bfloat16()

    from core.accel.cuda import _gemv_triton as kernels

    def chain(pdl: bool) -> Any:
        x, y = x0, torch.zeros_like(x0)
        for i, w in enumerate(ws):
            if i % 3 == 1:
                y, x = gemv.gemv_residual(y, x, w, norm, 1e-6, False, norm, 1e-6, pdl=pdl)
            elif i % 3 == 2:
                if pdl:
                    x = gemv.residual_add(y, x, norm)
                else:  # the same kernel, launched plainly
                    x = kernels.launch_residual(y, x, norm, 1e-6, kernels._residual_kernel)
                y = gemv.gemv(gemv.gemv(x, gate_up, norm, 1e-6, True, pdl=pdl), w, pdl=pdl)
            else:
                y = gemv.gemv(y + x, w, norm, 1e-6, pdl=pdl)
        return x, y

    want = chain(False)
    chain(True)  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = chain(True)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
