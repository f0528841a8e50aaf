"""MLX batches spread over CPU streams (``cpu_streams``).

MLX runs each stream's work on one core, so on a CPU device a batch's rows are
prefilled on several streams, then a Gemma 3 batch decodes in one generator
whose step gives each stream a share of every matmul and of the attention
heads (``core.accel.mlx_split._SplitDecode``); other models and quantized ones
decode each stream's rows in a generator of its own. These tests force the split (``cpu_streams``
set, whatever the machine's core count) and check that it gives exactly the
tokens of one-by-one ``create()`` calls and of the one-stream batch, with stop
strings, ``n``, rows of different lengths, prompts longer than Gemma 3's
sliding window, grammars, seeds and a stream broken off early; and that the
split step's logits are mlx-lm's own, bit for bit.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from conftest import make_client
from test_core_exit import run_script
from test_core_structured import PERSON, check_json, schema_format
from test_core_support import PROMPTS, USER, content

pytest.importorskip("mlx_lm")

import mlx.core as mx

#: The module (``mlx_lm.generate`` as an attribute is the function of that name).
generate_module = importlib.import_module("mlx_lm.generate")

from core import GemmaMLXChatCompletion, accel  # noqa: E402
from core.accel import mlx_split  # noqa: E402
from core.stream import Prompt  # noqa: E402

pytestmark = pytest.mark.skipif(
    mx.default_device().type != mx.DeviceType.cpu, reason="the split is for CPU devices"
)

GREEDY = {"temperature": 0, "max_tokens": 12}
#: Longer than the tiny Gemma 3's 512-token sliding window: its rotating cache wraps.
LONG = [{"role": "user", "content": " ".join(f"word{i}" for i in range(300))}]


@pytest.fixture(scope="module")
def split_client(gemma3_path: Path):
    """Every batch of two or more rows split across two CPU streams."""
    client = make_client("mlx", gemma3_path, cpu_streams=2)
    yield client
    client.close()


@pytest.fixture(scope="module")
def one_stream_client(gemma3_path: Path):
    client = make_client("mlx", gemma3_path, cpu_streams=1)
    yield client
    client.close()


@pytest.fixture
def generators(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Records each ``BatchGenerator`` a request builds."""
    made: list[object] = []

    class Recording(generate_module.BatchGenerator):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(generate_module, "BatchGenerator", Recording)
    return made


def choices(outs: list[dict]) -> list[list[dict]]:
    return [out["choices"] for out in outs]


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "2"])
def test_cpu_streams_is_validated_before_anything_loads(value) -> None:
    with pytest.raises(ValueError, match="cpu_streams"):
        GemmaMLXChatCompletion("some/model-that-is-never-loaded", cpu_streams=value)


def test_cpu_streams_default_and_value() -> None:
    assert GemmaMLXChatCompletion("some/model").cpu_streams is None
    assert GemmaMLXChatCompletion("some/model", cpu_streams=3).cpu_streams == 3


def test_usable_cores_is_at_least_one() -> None:
    assert accel.usable_cores() >= 1


# -------------------------------------------------------------------- groups


def prompts_of(*lengths: int) -> list[Prompt]:
    return [Prompt("", tuple(range(2, 2 + n))) for n in lengths]


def test_rows_are_dealt_to_the_streams_longest_first() -> None:
    client = GemmaMLXChatCompletion("some/model", cpu_streams=2)
    assert client._stream_groups(prompts_of(5, 9, 7, 3, 8)) == [[1, 2, 3], [4, 0]]
    client.cpu_streams = 3
    assert client._stream_groups(prompts_of(5, 9)) == [[1], [0]]  # at most one stream per row


def test_one_group_for_one_stream_a_gpu_or_a_one_token_prompt(monkeypatch) -> None:
    rows = prompts_of(4, 6, 5)
    assert GemmaMLXChatCompletion("m", cpu_streams=1)._stream_groups(rows) == [[0, 1, 2]]
    split = GemmaMLXChatCompletion("m", cpu_streams=2)
    assert split._stream_groups([*rows, Prompt("", (2,))]) == [[0, 1, 2, 3]]
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    assert split._stream_groups(rows) == [[0, 1, 2]]


def test_the_default_is_one_stream_per_core(monkeypatch) -> None:
    monkeypatch.setattr(accel, "usable_cores", lambda: 2)
    client = GemmaMLXChatCompletion("some/model")
    assert client._stream_groups(prompts_of(4, 5, 6)) == [[2, 0], [1]]
    monkeypatch.setattr(accel, "usable_cores", lambda: 1)
    assert client._stream_groups(prompts_of(4, 5, 6)) == [[0, 1, 2]]


# ------------------------------------------------------- the split decode step


@pytest.mark.parametrize(
    ("heads", "kv_heads", "streams", "shares"),
    [
        (8, 2, 2, [(0, 4, 0, 1, 0, 1), (4, 8, 1, 2, 1, 2)]),  # whole groups per stream
        (2, 1, 2, [(0, 1, 0, 1, 0, 1), (1, 2, 1, 1, 0, 1)]),  # one group: its k/v on the first
        (8, 4, 4, [(0, 2, 0, 1, 0, 1), (2, 4, 1, 2, 1, 2), (4, 6, 2, 3, 2, 3), (6, 8, 3, 4, 3, 4)]),
        (8, 2, 3, [(0, 8, 0, 2, 0, 2)]),  # the heads do not split: all on the first stream
        (6, 3, 2, [(0, 6, 0, 3, 0, 3)]),  # a share would read parts of two groups
        (4, 2, 1, [(0, 4, 0, 2, 0, 2)]),
    ],
)
def test_head_shares(heads, kv_heads, streams, shares) -> None:
    assert mlx_split._head_shares(heads, kv_heads, streams) == shares


def test_even_cuts_are_whole_gemm_blocks() -> None:
    assert mlx_split._even_cuts(16384, 2) == [0, 8192, 16384]
    assert mlx_split._even_cuts(100, 3) == [0, 32, 64, 100]
    assert mlx_split._even_cuts(64, 1) == [0, 64]


def small_gemma3(heads: int, kv_heads: int, *, tie: bool = True, dtype=None, **args):
    """A random Gemma 3 (mlx-lm's own; bfloat16 unless ``dtype``), with a short sliding
    window."""
    from mlx_lm.models import gemma3_text

    options = {
        "model_type": "gemma3_text",
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "intermediate_size": 96,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": 16,
        "vocab_size": 97,
        "query_pre_attn_scalar": 16,
        "sliding_window": 8,
        "sliding_window_pattern": 2,
        **args,
    }
    mx.random.seed(heads * 10 + kv_heads)
    model = gemma3_text.Model(gemma3_text.ModelArgs(**options))
    model.set_dtype(dtype or mx.bfloat16)
    model.tie_word_embeddings = tie
    mx.eval(model.parameters())
    return model


def batch_cache(model, lengths: list[int]):
    """Each row's prompt prefilled into its own cache, merged as ``BatchGenerator`` does."""
    from mlx_lm.generate import _merge_caches
    from mlx_lm.models.cache import make_prompt_cache

    caches = [make_prompt_cache(model) for _ in lengths]
    for row, (cache, length) in enumerate(zip(caches, lengths, strict=True)):
        model(mx.array([(row * 7 + j * 3) % 97 for j in range(length)])[None], cache=cache)
    mx.eval([c.state for cache in caches for c in cache])
    return _merge_caches(caches)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "streams", "options"),
    [
        (4, 2, 2, {}),
        (2, 1, 2, {"tie": False}),
        (4, 1, 2, {"rope_scaling": {"factor": 8.0, "rope_type": "linear"}}),
        (8, 2, 3, {"num_hidden_layers": 6, "sliding_window_pattern": 6}),
        (4, 2, 1, {}),
    ],
)
def test_split_decode_gives_the_models_logits_bit_for_bit(heads, kv_heads, streams, options):
    """Rows of different lengths (left padding), the sliding window wrapping, rows leaving."""
    model = small_gemma3(heads, kv_heads, **options)
    step = mlx_split.split_decode(model, [mx.new_stream(mx.cpu) for _ in range(streams)])
    assert isinstance(step, mlx_split._SplitDecode)
    lengths = [5, 11, 3, 9]
    ours, theirs = batch_cache(model, lengths), batch_cache(model, lengths)
    tokens = mx.array([1, 2, 3, 4])
    for i in range(14):
        if i == 10:  # a row finishes: BatchGenerator filters the caches
            for a, b in zip(ours, theirs, strict=True):
                a.filter([0, 2, 3])
                b.filter([0, 2, 3])
            tokens = tokens[mx.array([0, 2, 3])]
        expected = model(tokens[:, None], cache=theirs)
        with mx.stream(step._streams[0]):
            logits = step(tokens[:, None], cache=ours)
        assert logits.shape == expected.shape
        assert mx.array_equal(logits, expected).item(), f"step {i}"
        tokens = mx.argmax(expected[:, -1], axis=-1)
    # A prompt (several tokens) goes to the model itself.
    assert mx.array_equal(
        step(tokens[:, None] * mx.ones((1, 2), mx.int32), cache=ours),
        model(tokens[:, None] * mx.ones((1, 2), mx.int32), cache=theirs),
    ).item()


def test_the_multimodal_gemma3_splits_its_language_model(gemma3_vision_path, generators) -> None:
    client = make_client("mlx", gemma3_vision_path, cpu_streams=2)
    try:
        singles = [client.create(m, **GREEDY) for m in PROMPTS]
        batch = client.create_batch(PROMPTS, **GREEDY)
        [generator] = generators
        assert isinstance(generator.model, mlx_split._SplitDecode)
        assert generator.model._text is client.model.language_model
        assert choices(batch) == choices(singles)
    finally:
        client.close()


def test_quantized_batches_keep_one_generator_per_stream(mlx_4bit_path, generators) -> None:
    """Quantized projections are not split: each stream decodes its own rows."""
    client = make_client("mlx", mlx_4bit_path, cpu_streams=2)
    try:
        singles = [client.create(m, **GREEDY) for m in PROMPTS]
        batch = client.create_batch(PROMPTS, **GREEDY)
        assert len(generators) == 2
        assert all(g.model is client.model for g in generators)
        assert choices(batch) == choices(singles)
    finally:
        client.close()


# ------------------------------------------------------------ real generation


def test_split_batch_equals_one_by_one_and_the_one_stream_batch(
    split_client, one_stream_client, generators
) -> None:
    conversations = [*PROMPTS, LONG]
    singles = [split_client.create(m, **GREEDY) for m in conversations]
    batch = split_client.create_batch(conversations, **GREEDY)
    # the client's one running batch (continuous batching), its step spread over both streams
    [generator] = generators
    assert generator.stream == mlx_split._CPU_STREAMS[0]
    assert isinstance(generator.model, mlx_split._SplitDecode)
    assert generator.model._streams == mlx_split._CPU_STREAMS[:2]
    assert choices(batch) == choices(singles)
    assert [b["usage"] for b in batch] == [s["usage"] for s in singles]
    assert batch[3]["usage"]["prompt_tokens"] > 512  # past the sliding window
    assert choices(one_stream_client.create_batch(conversations, **GREEDY)) == choices(singles)


def test_more_streams_than_cores_chunked_prefill_and_reused_streams(gemma3_path) -> None:
    client = make_client("mlx", gemma3_path, cpu_streams=3, prefill_step_size=64)
    conversations = [LONG, *PROMPTS[1:]]  # the long prompt takes several prefill chunks
    try:
        singles = [client.create(m, **GREEDY) for m in conversations]
        for _ in range(2):
            assert choices(client.create_batch(conversations, **GREEDY)) == choices(singles)
        assert len(mlx_split._CPU_STREAMS) == 3
    finally:
        client.close()


def test_split_batch_with_stop_strings_and_n(split_client) -> None:
    full = [content(split_client.create(m, **GREEDY)) for m in PROMPTS]
    stop = full[0][3:5]
    singles = [split_client.create(m, stop=stop, **GREEDY) for m in PROMPTS]
    batch = split_client.create_batch(PROMPTS, stop=stop, **GREEDY)
    assert choices(batch) == choices(singles)
    assert batch[0]["choices"][0]["finish_reason"] == "stop"  # freed early, the rest went on
    assert [b["usage"] for b in batch] == [s["usage"] for s in singles]
    [out] = split_client.create_batch([USER], temperature=0, max_tokens=6, n=3)
    single = content(split_client.create(USER, temperature=0, max_tokens=6))
    assert [c["message"]["content"] for c in out["choices"]] == [single] * 3
    assert out["usage"]["completion_tokens"] == 18


def test_split_batch_with_a_repetition_penalty_equals_one_by_one(split_client) -> None:
    options = {**GREEDY, "repetition_penalty": 1.3}  # reads each row's prompt tokens
    singles = [split_client.create(m, **options) for m in PROMPTS]
    assert choices(split_client.create_batch(PROMPTS, **options)) == choices(singles)


def test_sampled_split_batch_is_reproducible_with_a_seed(split_client) -> None:
    options = {"temperature": 1.0, "max_tokens": 10, "seed": 11}
    first = split_client.create_batch(PROMPTS, **options)
    again = split_client.create_batch(PROMPTS, **options)
    assert choices(first) == choices(again)


def test_split_batch_with_a_schema(split_client) -> None:
    outs = split_client.create_batch(
        [USER, PROMPTS[1]],
        response_format=schema_format(PERSON),
        temperature=1.0,
        seed=4,
        n=2,
        max_tokens=200,
    )
    for out in outs:
        for choice in out["choices"]:
            check_json(choice, PERSON)


def test_breaking_off_a_split_stream_leaves_the_client_usable(split_client) -> None:
    chunks = split_client.create(USER, stream=True, n=3, temperature=0, max_tokens=200)
    for _ in zip(range(3), chunks, strict=False):
        pass
    chunks.close()
    out = split_client.create_batch(PROMPTS, **GREEDY)
    assert all(o["usage"]["completion_tokens"] >= 1 for o in out)


def test_process_exits_cleanly_after_a_split_batch(gemma3_path: Path) -> None:
    result = run_script(
        f"""
        import core
        client = core.GemmaMLXChatCompletion({str(gemma3_path)!r}, cpu_streams=2)
        outs = client.create_batch(
            [[{{"role": "user", "content": "hi"}}], [{{"role": "user", "content": "a b c"}}]],
            temperature=0,
            max_tokens=3,
        )
        print(*[o["usage"]["completion_tokens"] for o in outs])
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert [1 <= int(n) <= 3 for n in result.stdout.split()] == [True, True]
