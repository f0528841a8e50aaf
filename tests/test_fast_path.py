"""The fast decode path (core.accel.cuda.fast_path) against the plain ``model.generate`` path.

The fast path normally runs on CUDA only (compiled step + CUDA graphs); the
same loop runs eagerly on the CPU, which is how these tests check its logic:
under greedy decoding it must produce exactly the plain path's tokens, for
Gemma 1, 2 and 3, single prompts and left-padded batches, sliding windows
shorter than the generation (the ring-buffer layers), repetition penalty and
logit bias, and through the client's ``create`` / ``create_batch`` /
streaming, with the same text, finish reasons and usage.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from core.accel.cuda import fast_path
from core.params import SamplingParams
from core.stream import Prompt, TokenSink

USER = [{"role": "user", "content": "Write a short poem about the sea."}]

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

EOS = frozenset({1, 106})


class RecordingSink(TokenSink):
    """A real TokenSink that also keeps the token ids each row accepted."""

    def __init__(self, prompts: list[Prompt], params: SamplingParams, cancel: Any = None) -> None:
        self.deltas: list[Any] = []
        super().__init__(
            prompts,
            params,
            lambda ids: " ".join(map(str, ids)),
            EOS,
            self.deltas.append,
            cancel or threading.Event(),
        )
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.pushes = 0

    def push(self, tokens: Any) -> None:
        self.pushes += 1
        for i, (row, token) in enumerate(zip(self.rows, tokens, strict=True)):
            if row.finish_reason is None:
                self.tokens[i].append(int(token))
        super().push(tokens)


def load(path: Path, **config: Any) -> Any:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, **config
    )
    return model.eval()


def prompts_of(*lengths: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 100, (n,), generator=gen).tolist() for n in lengths]


def plain(model: Any, prompts: list[list[int]], n: int, **options: Any) -> list[list[int]]:
    """``model.generate`` (dynamic cache), greedy; each row cut after its first end id."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(
        input_ids=ids.to(model.device),
        attention_mask=mask.to(model.device),
        max_new_tokens=n,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=0,
        eos_token_id=sorted(EOS),
        **options,
    )
    rows = []
    for row in out[:, width:].tolist():
        ends = [i for i, t in enumerate(row) if t in EOS]
        rows.append(row[: ends[0] + 1] if ends else row)
    return rows


def fast(model: Any, prompts: list[list[int]], params: SamplingParams, **kw: Any) -> RecordingSink:
    ps = [Prompt("", tuple(p)) for p in prompts]
    sink = RecordingSink(ps, params, kw.pop("cancel", None))
    compile = kw.pop("compile", False)
    if not fast_path.generate(model, ps, params, sink, compile=compile, **kw):
        # its bucket is compiling in the background (compile=True): once it is built, it serves
        assert fast_path.settle(model, timeout=900)
        assert fast_path.generate(model, ps, params, sink, compile=compile, **kw)
    sink.close()
    fast_path.idle(model)  # the client's scheduler does this once no request runs
    return sink


def greedy(n: int, **options: Any) -> SamplingParams:
    return SamplingParams.build(temperature=0, max_tokens=n, **options)


@pytest.fixture(scope="module")
def gemma3(gemma3_path: Path) -> Any:
    return load(gemma3_path)


# ------------------------------------------------------------------ greedy equality


@pytest.mark.parametrize(
    "arch", ["gemma3_path", "gemma3_vision_path", "gemma2_path", "gemma1_path"]
)
def test_greedy_tokens_equal_plain_path(arch: str, request: pytest.FixtureRequest) -> None:
    model = load(request.getfixturevalue(arch))
    single = prompts_of(9)
    assert fast(model, single, greedy(24)).tokens == plain(model, single, 24)
    batch = prompts_of(9, 14, 3, seed=1)
    sink = fast(model, batch, greedy(24))
    assert sink.tokens == plain(model, batch, 24)
    assert all(row.finish_reason in ("stop", "length") for row in sink.rows)


@pytest.mark.parametrize(("arch", "window"), [("gemma3_path", 8), ("gemma2_path", 6)])
def test_sliding_window_shorter_than_generation(
    arch: str, window: int, request: pytest.FixtureRequest
) -> None:
    # Prompts longer than the window and a generation that slides well past it:
    # the sliding layers use a ring of `window` slots, the full layers the bucket.
    model = load(request.getfixturevalue(arch), sliding_window=window)
    batch = prompts_of(20, 11, seed=2)
    assert fast(model, batch, greedy(30)).tokens == plain(model, batch, 30)
    single = prompts_of(17, seed=3)  # no padding: the windowed layers still need their mask
    assert fast(model, single, greedy(30)).tokens == plain(model, single, 30)


def test_repetition_penalty_and_logit_bias_equal_plain_path(gemma3: Any) -> None:
    batch = prompts_of(10, 6, seed=3)
    params = greedy(20, repetition_penalty=1.5, logit_bias={7: 4.0, 42: -2.5})
    expected = plain(
        gemma3, batch, 20, repetition_penalty=1.5, sequence_bias={(7,): 4.0, (42,): -2.5}
    )
    assert fast(gemma3, batch, params).tokens == expected


def test_prompts_padded_to_prefill_graph_widths_equal_plain_path(gemma3_path: Path) -> None:
    """With CUDA graphs the prompt is left-padded to a multiple of PREFILL_STEP so that a
    captured prefill serves many prompt lengths; the padding changes no token, and the
    repetition penalty does not count it as seen."""
    model = load(gemma3_path)
    fast_path.release(model)
    engine = fast_path._engine(model, compile=False, cuda_graphs=False)
    engine.prefill_graphs = True  # what CUDA graphs switch on (the capture needs CUDA)
    for batch in (prompts_of(13), prompts_of(11, 4, 9, seed=3), prompts_of(64, 30, seed=4)):
        assert fast(model, batch, greedy(8)).tokens == plain(model, batch, 8)
    batch = prompts_of(10, seed=3)
    params = greedy(12, repetition_penalty=1.5)
    assert fast(model, batch, params).tokens == plain(model, batch, 12, repetition_penalty=1.5)
    # the last request's row was padded from 10 to 64 tokens, the one before from 64 and
    # 30 (its bucket is still held)
    assert engine.buckets[(1, 256)].pad.tolist() == [fast_path.PREFILL_STEP - 10]
    assert engine.buckets[(2, 256)].pad.tolist() == [0, fast_path.PREFILL_STEP - 30]
    fast_path.release(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: graph capture")
def test_prefill_graph_is_captured_on_first_use_and_replays(gemma3_path: Path) -> None:
    model = load(gemma3_path).cuda()
    fast_path.release(model)
    batch = prompts_of(13, 40, seed=6)
    want = plain(model, batch, 6)
    for _ in range(3):  # the prompt run and captured, then replayed twice
        assert fast(model, batch, greedy(6), compile=True).tokens == want
        assert fast_path.describe(model)["prefill_graphs"] == 1
    other = prompts_of(70, 3, seed=7)  # another width (128): another graph
    assert fast(model, other, greedy(6), compile=True).tokens == plain(model, other, 6)
    assert fast_path.describe(model)["prefill_graphs"] == 2
    assert not fast_path.describe(model)["fallbacks"]
    fast_path.release(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: graph capture")
@pytest.mark.parametrize("pdl", ["1", "0"], ids=["pdl", "plain-launches"])
def test_decode_ops_launched_with_pdl_give_generates_tokens(
    gemma3_path: Path, monkeypatch: pytest.MonkeyPatch, pdl: str
) -> None:
    """On a Hopper GPU the decode step's Triton ops are launched with programmatic
    dependent launch (``GEMMA_LOCAL_PDL=0``: plainly); either way, replayed in CUDA
    graphs, batch 1 and a padded batch give ``generate``'s greedy tokens."""
    from core.accel.cuda import gemv

    monkeypatch.setenv("GEMMA_LOCAL_PDL", pdl)
    model = load(gemma3_path).cuda()
    fast_path.release(model)
    for batch in (prompts_of(13, seed=8), prompts_of(21, 5, 9, seed=9)):
        assert fast(model, batch, greedy(12), compile=True).tokens == plain(model, batch, 12)
    info = fast_path.describe(model)
    assert info["pdl"] is (pdl == "1" and gemv.pdl_available(model.device))
    assert not info["fallbacks"]
    fast_path.release(model)


def test_fused_projections_change_nothing(
    gemma3_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load(gemma3_path)
    batch = prompts_of(8, 5, seed=4)
    before = plain(model, batch, 16)
    monkeypatch.setenv("GEMMA_LOCAL_FUSE", "1")
    sink = fast(model, batch, greedy(16))
    assert fast_path.describe(model)["fused_projections"] is True
    assert sink.tokens == before
    assert plain(model, batch, 16) == before  # the model itself still works unchanged


def test_compiled_step_traces_in_one_graph(gemma3: Any) -> None:
    """What CUDA compiles: the decode forward traces with no graph break (dynamo only here)."""
    fast_path._import_torch()
    layout = fast_path._Layout(gemma3)
    bucket = fast_path._Bucket(layout, 2, 256)
    bucket.step.fill_(3)
    compiled = torch.compile(fast_path._decode_forward, backend="eager", fullgraph=True)
    with torch.inference_mode():
        expected = fast_path._decode_forward(
            layout, bucket.keys, bucket.values, bucket.tok, bucket.step, bucket.pad
        )
        got = compiled(layout, bucket.keys, bucket.values, bucket.tok, bucket.step, bucket.pad)
    assert torch.equal(expected[0], got[0])
    # the MLP activations come back too (so that inductor stores them): one per fused layer
    assert len(got[1]) == (len(layout.layers) if layout.fused else 0)


def test_compiled_engine_equals_plain_path(gemma3_path: Path) -> None:
    model = load(gemma3_path)
    batch = prompts_of(7, 4, seed=5)
    sink = fast(model, batch, greedy(12), compile="eager")
    assert sink.tokens == plain(model, batch, 12)
    assert fast_path.describe(model)["compile"] == "eager"


@pytest.mark.parametrize("arch", ["gemma3_path", "gemma4_moe_path"])
def test_a_bucket_compiling_in_the_background_leaves_its_request_to_the_plain_path(
    arch: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No request waits for compilation: the first request of a bucket starts compiling it
    on the engine's thread and is handed back untouched (the caller takes ``generate``);
    once the bucket is built its requests run on the fast path, equal to the plain path.
    Gemma 4 (MoE): its own whole step compiled (``GEMMA_LOCAL_OWN_COMPILE``)."""
    monkeypatch.delenv("GEMMA_LOCAL_COMPILE_WAIT", raising=False)
    model = load(request.getfixturevalue(arch))
    prompt = prompts_of(9)
    ps = [Prompt("", tuple(prompt[0]))]
    sink = RecordingSink(ps, greedy(8))
    assert not fast_path.generate(model, ps, greedy(8), sink, compile="eager")
    assert sink.pushes == 0 and not sink.done  # nothing was served: the caller serves it
    assert fast_path.settle(model, timeout=600)
    info = fast_path.describe(model)
    assert info["compiled_buckets"] == [[1, 256]]
    assert "background, batch 1, 256 slots" in info["compile_seconds"]
    assert fast_path.generate(model, ps, greedy(8), sink, compile="eager")
    sink.close()
    assert sink.tokens == plain(model, prompt, 8)
    info = fast_path.describe(model)
    assert info["compile"] == "eager" and not info["fallbacks"], info
    # another bucket (two rows) compiles in its turn; GEMMA_LOCAL_COMPILE_WAIT=1 waits for it
    monkeypatch.setenv("GEMMA_LOCAL_COMPILE_WAIT", "1")
    batch = prompts_of(5, 7, seed=4)
    assert fast(model, batch, greedy(6), compile="eager").tokens == plain(model, batch, 6)
    assert fast_path.describe(model)["compiled_buckets"] == [[1, 256]]


def test_a_request_that_finds_no_graph_runs_uncaptured_and_the_graph_is_captured_when_idle(
    gemma3_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bucket's decode step is captured before a prompt is read, so the first request of
    a bucket does not wait for it: it runs its steps uncaptured and leaves the capture to
    the model thread's next idle moment (:func:`fast_path.idle`); later requests replay
    it. ``GEMMA_LOCAL_COMPILE_WAIT=1`` captures in the request, before its prompt. (The
    CPU cannot capture: a stand-in graph that runs the step and counts its replays.)"""
    monkeypatch.delenv("GEMMA_LOCAL_COMPILE_WAIT", raising=False)
    model = load(gemma3_path)
    engine = fast_path._engine(model, compile=False, cuda_graphs=False)
    engine.use_graphs, engine.prefill_graphs = True, False
    captured: list[tuple[Any, ...]] = []
    replays = [0]

    class Graph:
        def __init__(self, b: Any, how: Any) -> None:
            self.b, self.how = b, how

        def replay(self) -> None:
            replays[0] += 1
            engine._step(self.b, self.how)

    def capture(b: Any, how: Any, split: bool = False) -> Any:
        captured.append(((b.batch, b.length), how.greedy, split))
        b.graphs[how] = Graph(b, how)
        return b.graphs[how]

    monkeypatch.setattr(engine, "_capture", capture)
    batch = prompts_of(9, seed=2)
    want = plain(model, batch, 10)

    def request() -> list[list[int]]:
        ps = [Prompt("", tuple(p)) for p in batch]
        sink = RecordingSink(ps, greedy(10))
        with torch.inference_mode():
            assert fast_path.generate(model, ps, greedy(10), sink)
        sink.close()
        return sink.tokens

    assert request() == want
    assert not captured and replays[0] == 0  # nothing captured in the request
    assert engine.pending_steps
    with torch.inference_mode():
        assert engine.idle() == 1
    assert captured == [((1, 256), True, False)] and not engine.pending_steps
    assert request() == want
    assert replays[0] == 9  # the second request replayed the graph, every step
    with torch.inference_mode():
        assert engine.idle() == 0  # nothing left to capture
    monkeypatch.setenv("GEMMA_LOCAL_COMPILE_WAIT", "1")  # another bucket: in the request
    batch = prompts_of(9, 4, seed=2)
    want = plain(model, batch, 10)
    assert request() == want
    assert captured[-1] == ((2, 256), True, False) and not engine.pending_steps
    fast_path.release(model)


def test_the_client_gives_its_idle_moments_to_the_backend(gemma3_path: Path) -> None:
    """The scheduler calls the backend's idle work once a request leaves nothing running
    (where the CUDA fast path captures its graphs); a failure there fails no request."""
    from core import GemmaTransformersChatCompletion

    calls = []
    client = GemmaTransformersChatCompletion(
        str(gemma3_path), device_map="cpu", torch_dtype="float32"
    )
    try:
        client._scheduler._on_idle = lambda: calls.append(1) or 1 / 0
        first = client.create(USER, temperature=0, max_tokens=4)
        assert calls
        assert client.create(USER, temperature=0, max_tokens=4)["choices"] == first["choices"]
    finally:
        client.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: compile + graphs")
def test_the_first_request_on_the_gpu_does_not_wait_for_compilation(
    gemma3_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the client: the first request is served by ``generate`` while the fast path's
    code compiles on its thread; once it is built the same request runs on the fast path
    (the continuous batch) and gives the same reply."""
    from core import GemmaTransformersChatCompletion

    monkeypatch.delenv("GEMMA_LOCAL_COMPILE_WAIT", raising=False)
    monkeypatch.delenv("GEMMA_LOCAL_FAST_PATH", raising=False)
    client = GemmaTransformersChatCompletion(
        str(gemma3_path), device_map="cuda", torch_dtype="float32"
    )
    try:
        first = client.create(USER, temperature=0, max_tokens=8)
        batch = client._slot_batch
        assert batch is not None and not batch._views  # the batch served nothing: generate did
        assert fast_path.settle(client.model, timeout=900)
        second = client.create(USER, temperature=0, max_tokens=8)
        assert second["choices"] == first["choices"]
        assert batch._views  # its one-row step served the second request
        assert fast_path.settle(client.model, timeout=900)
        info = fast_path.describe(client.model)
        assert [1, batch.slots] in info["compiled_buckets"] and not info["fallbacks"], info
    finally:
        client.close()


def test_release_stops_the_background_compile(gemma3_path: Path, monkeypatch: Any) -> None:
    monkeypatch.delenv("GEMMA_LOCAL_COMPILE_WAIT", raising=False)
    model = load(gemma3_path)
    engine = fast_path._engine(model, compile="eager", cuda_graphs=False)
    assert not engine.ready((1, 256), 16)
    assert not engine.ready((2, 256), 16)
    fast_path.release(model)
    assert engine.background.settle(timeout=600)
    assert (2, 256) not in engine.background.done  # dropped from the queue
    assert fast_path.describe(model) == {"active": False}


def test_compiled_prefill_is_one_graph_for_every_layer_and_length(
    gemma3_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regional compilation: one compiled layer serves the sliding and the global layers
    and every prompt length, so a new prompt length never compiles again."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("GEMMA_LOCAL_REGIONAL", "0")  # the decode step as one graph here
    monkeypatch.setenv("GEMMA_LOCAL_COMPILE_WAIT", "1")  # compiled in the request: counted
    torch._dynamo.reset()
    counters.clear()
    model = load(gemma3_path)
    assert fast_path._Layout(model).types == ["sliding_attention", "full_attention"]
    for lengths in ((7, 4), (19, 11), (30, 2)):
        batch = prompts_of(*lengths, seed=len(lengths))
        assert fast(model, batch, greedy(3), compile="eager").tokens == plain(model, batch, 3)
    assert counters["stats"]["unique_graphs"] == 2  # the decode step and one prefill layer
    info = fast_path.describe(model)
    assert info["compiled_prefill"] and not info["fallbacks"]
    assert list(info["compile_seconds"]) == ["prefill, batch n, padded"]


def test_regional_decode_is_one_graph_per_piece(
    gemma3_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``GEMMA_LOCAL_REGIONAL=1``: the step's inputs, one layer for every layer and the
    logits are compiled apart (and the prompt's layer): four graphs, same tokens."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("GEMMA_LOCAL_REGIONAL", "1")
    monkeypatch.setenv("GEMMA_LOCAL_COMPILE_WAIT", "1")  # compiled in the request: counted
    torch._dynamo.reset()
    counters.clear()
    model = load(gemma3_path)
    for lengths in ((7, 4), (19, 11)):
        batch = prompts_of(*lengths, seed=len(lengths))
        assert fast(model, batch, greedy(6), compile="eager").tokens == plain(model, batch, 6)
    assert counters["stats"]["unique_graphs"] == 4
    assert not fast_path.describe(model)["fallbacks"]


# ------------------------------------------------------------------ sink contract


def test_max_tokens_and_finish_reasons(gemma3: Any) -> None:
    sink = fast(gemma3, prompts_of(6, 9), greedy(5))
    for row, tokens in zip(sink.rows, sink.tokens, strict=True):
        assert row.completion_tokens == len(tokens) <= 5
        if row.finish_reason == "length":
            assert len(tokens) == 5
    # one push per step at most: the prefill token, then one per decode step
    assert sink.pushes <= 5


def test_logit_bias_forces_end_of_turn(gemma3: Any) -> None:
    sink = fast(gemma3, prompts_of(6), greedy(10, logit_bias={106: 100}))
    assert sink.tokens == [[106]]
    assert sink.rows[0].finish_reason == "stop"
    assert sink.pushes == 1  # finished by the prefill token: no decode step ran


def test_sampling_is_seeded_and_top_k_1_is_greedy(gemma3: Any) -> None:
    batch = prompts_of(8, 5, seed=6)
    params = SamplingParams.build(temperature=1.0, top_p=0.9, max_tokens=16, seed=1)
    torch.manual_seed(1)
    first = fast(gemma3, batch, params).tokens
    torch.manual_seed(1)
    assert fast(gemma3, batch, params).tokens == first
    expected = fast(gemma3, batch, greedy(16)).tokens
    for options in ({"top_k": 1}, {"top_p": 1e-6}):
        sampled = SamplingParams.build(temperature=1.5, max_tokens=16, **options)
        assert fast(gemma3, batch, sampled).tokens == expected
    vocab = gemma3.config.vocab_size
    wide = SamplingParams.build(temperature=2.0, top_k=50, repetition_penalty=1.2, max_tokens=16)
    assert all(0 <= t < vocab for row in fast(gemma3, batch, wide).tokens for t in row)


def test_cancel_stops_within_a_burst(gemma3: Any) -> None:
    cancel = threading.Event()

    class CancelAfterFirst(RecordingSink):
        def push(self, tokens: Any) -> None:
            super().push(tokens)
            cancel.set()

    ps = [Prompt("", tuple(prompts_of(5)[0]))]
    sink = CancelAfterFirst(ps, greedy(200), cancel)
    fast_path.generate(gemma3, ps, greedy(200), sink, compile=False)
    assert sink.pushes == 1
    assert sink.done


def test_buckets_are_reused(gemma3_path: Path) -> None:
    model = load(gemma3_path)
    fast(model, prompts_of(5), greedy(4))
    fast(model, prompts_of(9), greedy(8))
    assert fast_path.describe(model)["buckets"] == [[1, 256]]
    fast(model, prompts_of(5, 6), greedy(300))
    assert fast_path.describe(model)["buckets"] == [[1, 256], [2, 512]]
    fast_path.release(model)
    assert fast_path.describe(model) == {"active": False}


def test_batch_buckets() -> None:
    sizes = {n: fast_path.batch_bucket(n) for n in (1, 2, 3, 4, 5, 9, 16, 17, 32, 33, 50)}
    assert sizes == {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 9: 16, 16: 16, 17: 32, 32: 32, 33: 48, 50: 64}


def test_odd_batches_run_in_a_padded_bucket(gemma3_path: Path) -> None:
    """3 prompts run in the 4-row bucket (a row of padding, its tokens dropped) and give
    the plain path's tokens; 4 prompts then reuse that bucket, nothing new is built."""
    model = load(gemma3_path)
    three = prompts_of(8, 3, 12, seed=7)
    sink = fast(model, three, greedy(10))
    assert sink.tokens == plain(model, three, 10)
    assert {d.index for d in sink.deltas} == {0, 1, 2}  # nothing of the padding row
    assert fast_path.describe(model)["buckets"] == [[4, 256]]
    four = prompts_of(5, 9, 2, 7, seed=8)
    assert fast(model, four, greedy(10)).tokens == plain(model, four, 10)
    assert fast_path.describe(model)["buckets"] == [[4, 256]]


def test_cache_len_buckets() -> None:
    assert fast_path.cache_len(1) == fast_path.MIN_CACHE_LEN
    assert fast_path.cache_len(256) == 256
    assert fast_path.cache_len(257) == 512
    assert fast_path.cache_len(383) == 512
    assert fast_path.cache_len(5000) == 8192


def test_supported(gemma3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GEMMA_LOCAL_FAST_PATH", raising=False)
    assert not fast_path.supported(gemma3)  # auto: CUDA only
    monkeypatch.setenv("GEMMA_LOCAL_FAST_PATH", "on")
    assert fast_path.supported(gemma3)
    monkeypatch.setenv("GEMMA_LOCAL_FAST_PATH", "off")
    assert not fast_path.supported(gemma3)
    monkeypatch.setenv("GEMMA_LOCAL_FAST_PATH", "sometimes")
    with pytest.raises(ValueError, match="GEMMA_LOCAL_FAST_PATH"):
        fast_path.supported(gemma3)
    monkeypatch.setenv("GEMMA_LOCAL_FAST_PATH", "on")
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    assert not fast_path.supported(llama)


# ------------------------------------------------------------ through the client


@pytest.fixture(scope="module")
def fast_client(gemma3_path: Path) -> Any:
    """A client whose ``_generate`` starts with the hook the transformers backend uses."""
    from core import GemmaTransformersChatCompletion

    class FastClient(GemmaTransformersChatCompletion):
        def _generate(self, prompts: Any, params: Any, sink: Any) -> None:
            pad = self.tokenizer.pad_token_id
            pad = 0 if pad is None else int(pad)
            if fast_path.supported(self.model):
                return fast_path.generate(self.model, prompts, params, sink, pad_id=pad)
            return super()._generate(prompts, params, sink)

    client = FastClient(str(gemma3_path), device_map="cpu", torch_dtype="float32")
    yield client
    client.close()


def strip_ids(completion: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in completion.items() if k not in ("id", "created")}


def test_client_results_equal_plain_path(
    fast_client: Any, tf_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEMMA_LOCAL_FAST_PATH", "on")
    conversations = [USER, [{"role": "user", "content": "Hello world! How are you today?"}]]
    options = {"temperature": 0, "max_tokens": 12, "stop": ["e "]}
    expected = [strip_ids(c) for c in tf_client.create_batch(conversations, **options)]
    got = [strip_ids(c) for c in fast_client.create_batch(conversations, **options)]
    assert got == expected
    assert fast_path.describe(fast_client.model)["active"]
    assert strip_ids(fast_client.create(USER, **options)) == strip_ids(
        tf_client.create(USER, **options)
    )
    chunks = list(fast_client.create(USER, stream=True, temperature=0, max_tokens=12))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    plain_text = tf_client.create(USER, temperature=0, max_tokens=12)["choices"][0]["message"]
    assert text == plain_text["content"]
    assert chunks[-1]["usage"]["completion_tokens"] <= 12


# ------------------------------------------------------------------ grammars

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
FORCED = {"type": "function", "function": {"name": "get_weather"}}
ANSWER = {
    "type": "json_schema",
    "json_schema": {
        "name": "answer",
        "schema": {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
            "required": ["ok", "n"],
        },
    },
}


def same(completion: dict[str, Any]) -> dict[str, Any]:
    """A completion without what differs between two equal calls (ids, time, call ids)."""
    out = strip_ids(completion)
    out["choices"] = [dict(c, message=dict(c["message"])) for c in out["choices"]]
    for choice in out["choices"]:
        calls = choice["message"].get("tool_calls")
        if calls:
            choice["message"]["tool_calls"] = [c["function"] for c in calls]
    return out


@pytest.fixture(scope="module")
def whole_client(gemma3_path: Path) -> Any:
    """A client whose requests all run whole on the fast path: its continuous batch has
    16 cache slots, which no request here fits."""
    from test_fast_path_batch import slot_client

    client = slot_client(gemma3_path, "cpu", GEMMA_LOCAL_SLOT_TOKENS="16")
    yield client
    client.close()


@pytest.fixture
def masked_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the constrained decode loops the fast path runs (one per request)."""
    calls: list[int] = []
    original = fast_path._Engine._decode_masked

    def spy(self: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(fast_path._Engine, "_decode_masked", spy)
    return calls


@pytest.mark.parametrize(
    "options",
    [
        {"tools": [WEATHER], "tool_choice": FORCED, "max_tokens": 80},
        {"tools": [WEATHER], "tool_choice": "required", "max_tokens": 80},
        {"tools": [WEATHER], "tool_choice": "auto", "max_tokens": 30},
        {"response_format": ANSWER, "max_tokens": 60},
        {"response_format": {"type": "json_object"}, "max_tokens": 24, "stop": ["}"]},
        {"tools": [WEATHER], "tool_choice": FORCED, "max_tokens": 80, "logit_bias": {100: 5.0}},
    ],
    ids=["forced", "required", "auto", "json-schema", "json-object-stop", "forced-bias"],
)
def test_constrained_requests_equal_plain_path(
    tf_client: Any,
    whole_client: Any,
    monkeypatch: pytest.MonkeyPatch,
    masked_steps: list[int],
    options: Any,
) -> None:
    """Tools and JSON output on the fast path: the grammar's mask is applied on the device,
    and the greedy reply (text, calls, finish reason, usage) is the plain path's."""
    conversations = [USER, [{"role": "user", "content": "Weather in Oslo, please?"}]]
    monkeypatch.setenv("GEMMA_LOCAL_FAST_PATH", "off")
    expected = [same(c) for c in tf_client.create_batch(conversations, temperature=0, **options)]
    alone = same(tf_client.create(USER, temperature=0, **options))
    monkeypatch.setenv("GEMMA_LOCAL_FAST_PATH", "on")
    got = [same(c) for c in whole_client.create_batch(conversations, temperature=0, **options)]
    assert got == expected
    assert same(whole_client.create(USER, temperature=0, **options)) == alone
    assert masked_steps, "the constrained loop did not run"
    if options.get("tool_choice") not in (None, "auto"):
        for reply in got:
            call = reply["choices"][0]["message"]["tool_calls"][0]
            assert call["name"] == "get_weather"
            assert json.loads(call["arguments"])["unit"] in ("celsius", "fahrenheit")


def test_constrained_sampling_and_streaming_on_the_fast_path(
    whole_client: Any, monkeypatch: pytest.MonkeyPatch, masked_steps: list[int]
) -> None:
    """Sampled (unseeded, so on the fast path) constrained rows only ever draw allowed
    tokens: every call parses and fits the schema; a stream's deltas add up to the call."""
    monkeypatch.setenv("GEMMA_LOCAL_FAST_PATH", "on")
    replies = whole_client.create(
        USER, temperature=1.5, top_p=0.95, n=3, tools=[WEATHER], tool_choice=FORCED, max_tokens=120
    )
    for choice in replies["choices"]:
        assert choice["finish_reason"] == "tool_calls"
        arguments = json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"])
        assert arguments["unit"] in ("celsius", "fahrenheit")
        assert isinstance(arguments["city"], str) and len(arguments["city"]) <= 10
    mood = {"type": "string", "enum": ["calm", "stormy"]}
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "mood": mood}}
    schema.update(required=["ok", "mood"], additionalProperties=False)
    response_format = {"type": "json_schema", "json_schema": {"name": "sea", "schema": schema}}
    chunks = list(
        whole_client.create(
            USER, stream=True, temperature=0, response_format=response_format, max_tokens=120
        )
    )
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    answer = json.loads(text)
    assert isinstance(answer["ok"], bool) and answer["mood"] in ("calm", "stormy")
    assert len(masked_steps) == 2
