"""Sampling options: validated once, before any load; ``None`` means the default."""

from __future__ import annotations

import math

import pytest
from conftest import BACKENDS, make_client
from test_core_support import USER, content

from core import SamplingParams
from core.params import ACCEPTED_OPTIONS, MAX_N, MAX_STOP_SEQUENCES


def test_defaults() -> None:
    p = SamplingParams.build()
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.stop, p.seed, p.n) == (
        0.7,
        1.0,
        0,
        2048,
        (),
        None,
        1,
    )
    assert p.repetition_penalty is None and p.logit_bias == () and not p.greedy


def test_zero_values_are_kept_not_defaulted() -> None:
    p = SamplingParams.build(temperature=0, seed=0, top_k=0)
    assert p.temperature == 0.0 and p.greedy
    assert p.seed == 0
    assert p.top_k == 0


def test_none_keeps_defaults_from_a_base() -> None:
    base = SamplingParams.build(temperature=0.2, max_tokens=7, stop="x", seed=3)
    p = SamplingParams.build(temperature=None, max_tokens=None, top_p=0.5, defaults=base)
    assert (p.temperature, p.max_tokens, p.stop, p.seed, p.top_p) == (0.2, 7, ("x",), 3, 0.5)


def test_values_are_normalised() -> None:
    p = SamplingParams.build(
        temperature=1,
        stop=["a", "b", "a"],
        repetition_penalty=1.0,
        logit_bias={"106": 100, 5: -2.5},
        n=2,
    )
    assert isinstance(p.temperature, float)
    assert p.stop == ("a", "b")  # duplicates dropped, order kept
    assert p.repetition_penalty is None  # 1.0 disables it
    assert p.logit_bias == ((5, -2.5), (106, 100.0))
    assert SamplingParams.build(stop="end").stop == ("end",)
    assert SamplingParams.build(stop=[]).stop == ()
    assert SamplingParams.build(stop=("x",)).stop == ("x",)


def test_params_are_frozen() -> None:
    p = SamplingParams.build()
    with pytest.raises(AttributeError):
        p.temperature = 1.0  # type: ignore[misc]
    assert p.with_max_tokens(3).max_tokens == 3 and p.max_tokens == 2048


@pytest.mark.parametrize(
    "edges",
    [
        {"temperature": 0},
        {"temperature": 2},
        {"top_p": 1},
        {"top_p": 1e-6},
        {"top_k": 0},
        {"top_k": 10_000},
        {"max_tokens": 1},
        {"seed": 0},
        {"seed": 2**63 - 1},
        {"stop": ["s"] * MAX_STOP_SEQUENCES},
        {"n": 1},
        {"n": MAX_N},
        {"repetition_penalty": 10},
        {"logit_bias": {0: -100, 1: 100}},
        {"user": "ignored", "stream_options": {"include_usage": True}},
    ],
    ids=lambda d: ",".join(d),
)
def test_bounds_are_accepted(edges) -> None:
    SamplingParams.build(**edges)


BAD = [
    ("temperature", -1, r"temperature must be in \[0.0, 2.0\], got -1"),
    ("temperature", 3, "temperature must be in"),
    ("temperature", 2.0001, "temperature must be in"),
    ("temperature", True, "temperature must be a number, got True"),
    ("temperature", "0.5", "temperature must be a number"),
    ("temperature", math.nan, "temperature must be a number"),
    ("top_p", 0, r"top_p must be in \(0.0, 1.0\]"),
    ("top_p", 1.5, "top_p must be in"),
    ("top_p", -0.1, "top_p must be in"),
    ("top_p", False, "top_p must be a number"),
    ("top_k", -1, "top_k must be >= 0, got -1"),
    ("top_k", 1.5, "top_k must be an integer"),
    ("top_k", True, "top_k must be an integer"),
    ("max_tokens", 0, "max_tokens must be >= 1, got 0"),
    ("max_tokens", -5, "max_tokens must be >= 1"),
    ("max_tokens", 10.0, "max_tokens must be an integer"),
    ("max_tokens", True, "max_tokens must be an integer"),
    ("stop", ["s"] * (MAX_STOP_SEQUENCES + 1), f"at most {MAX_STOP_SEQUENCES}"),
    ("stop", "", "non-empty string"),
    ("stop", [""], "non-empty string"),
    ("stop", ["ok", 3], "non-empty string"),
    ("stop", 7, "string or a list of strings"),
    ("stop", {"a"}, "string or a list of strings"),
    ("seed", -1, "seed must be in"),
    ("seed", 2**63, "seed must be in"),
    ("seed", 1.0, "seed must be an integer"),
    ("seed", True, "seed must be an integer"),
    ("repetition_penalty", 0, "repetition_penalty must be in"),
    ("repetition_penalty", -1, "repetition_penalty must be in"),
    ("repetition_penalty", 11, "repetition_penalty must be in"),
    ("logit_bias", {5: 101}, "must be in"),
    ("logit_bias", {5: True}, "must be a number"),
    ("logit_bias", {-1: 5}, "token ids must be >= 0"),
    ("logit_bias", {"abc": 5}, "keys must be token ids"),
    ("logit_bias", {1.5: 5}, "keys must be token ids"),  # not silently token 1
    ("logit_bias", {True: 5}, "keys must be token ids"),
    ("logit_bias", [(5, 1)], "must be a mapping"),
    ("n", 0, "n must be in"),
    ("n", MAX_N + 1, "n must be in"),
    ("n", True, "n must be an integer"),
]


@pytest.mark.parametrize(
    ("name", "value", "match"), BAD, ids=[f"{n}={v!r}"[:40] for n, v, _ in BAD]
)
def test_out_of_range_raises_value_error_naming_option(name, value, match) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingParams.build(**{name: value})


def test_unknown_option_is_a_type_error_listing_allowed() -> None:
    with pytest.raises(TypeError) as info:
        SamplingParams.build(frequency_penalty=0.5, temprature=1)
    text = str(info.value)
    assert "frequency_penalty" in text and "temprature" in text
    for name in ACCEPTED_OPTIONS:
        assert name in text


# ----------------------------------------------------- through the clients, before any load

BAD_CREATE = [
    {"temperature": -1},
    {"temperature": 3},
    {"top_p": 0},
    {"top_p": 1.5},
    {"top_k": -1},
    {"max_tokens": 0},
    {"max_tokens": True},
    {"temperature": True},
    {"stop": ["s"] * 17},
    {"stop": ""},
    {"stop": [""]},
    {"seed": -1},
    {"n": 0},
    {"logit_bias": {-3: 1}},
]


@pytest.fixture(params=BACKENDS)
def fresh_client(request, gemma3_path):
    """A client that is never loaded (constructing one is cheap)."""
    client = make_client(request.param, gemma3_path)
    yield client
    assert not client.is_loaded, "validation must happen before the model loads"
    client.close()


@pytest.mark.parametrize("options", BAD_CREATE, ids=lambda d: f"{d}"[:40])
def test_bad_values_raise_before_load(fresh_client, options) -> None:
    with pytest.raises(ValueError):
        fresh_client.create(USER, **options)
    with pytest.raises(ValueError):
        fresh_client.create(USER, stream=True, **options)
    with pytest.raises(ValueError):
        fresh_client.create_batch([USER], **options)


async def test_bad_values_raise_before_load_async(fresh_client) -> None:
    with pytest.raises(ValueError, match="temperature"):
        await fresh_client.acreate(USER, temperature=5)
    with pytest.raises(ValueError, match="top_p"):
        await fresh_client.acreate(USER, top_p=0, stream=True)
    with pytest.raises(ValueError, match="max_tokens"):
        await fresh_client.acreate_batch([USER], max_tokens=0)


def test_unknown_kwarg_raises_type_error_before_load(fresh_client) -> None:
    with pytest.raises(TypeError, match=r"unexpected option.*'best_of'.*allowed options: .*top_k"):
        fresh_client.create(USER, best_of=2)


def test_model_mismatch_raises_before_load(fresh_client) -> None:
    with pytest.raises(ValueError, match="not 'google/gemma-2-2b-it'"):
        fresh_client.create(USER, model="google/gemma-2-2b-it")


def test_bad_messages_raise_before_load(fresh_client) -> None:
    for messages in (
        [],
        [{"role": "bot", "content": "x"}],
        [USER[0], {"role": "assistant", "content": "r"}],
    ):
        with pytest.raises(ValueError):
            fresh_client.create(messages)
    with pytest.raises(ValueError, match="system message after"):
        fresh_client.create_batch([USER, [*USER, {"role": "system", "content": "late"}]])
    # an image path that does not exist is named before anything loads
    with pytest.raises(ValueError, match=r"messages\[0\]\['content'\]\[0\]: 'x' does not exist"):
        fresh_client.format_prompt(
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
        )
    assert not fresh_client.is_loaded


def test_empty_batch_returns_empty_list_without_loading(fresh_client) -> None:
    assert fresh_client.create_batch([]) == []


def test_matching_model_name_and_openai_extras_are_accepted(client) -> None:
    out = client.create(
        USER, model=client.model_name, temperature=0, max_tokens=2, user="u1", stream_options=None
    )
    assert out["model"] == client.model_name
    assert out["usage"]["completion_tokens"] == 2 and isinstance(content(out), str)


def test_logit_bias_outside_vocabulary_raises(client) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        client.create(USER, temperature=0, max_tokens=2, logit_bias={10**6: 5})
    assert client.create(USER, temperature=0, max_tokens=1)["usage"]["completion_tokens"] == 1
