"""The OpenAI-style API on both backends: schema, exact usage, streaming, stop, seeds, end ids, batches.

Every test runs on the real tiny Gemma 3 checkpoint through the real loading
code, once per backend (the ``client`` fixture). Tiny random models write
gibberish, so the assertions are about structure, exact counts and equality
with other routes to the same tokens (greedy decoding is deterministic).
"""

from __future__ import annotations

import time

import pytest
from test_core_support import (
    BOS,
    END_OF_TURN,
    EOS,
    PROMPTS,
    USER,
    content,
    generated_ids,
    stream_text,
)

GREEDY = {"temperature": 0, "max_tokens": 16}


def byte_bias(tokenizer) -> dict[int, float]:
    """Push the model towards the byte tokens that make up multi-byte UTF-8 characters."""
    ids = tokenizer.convert_tokens_to_ids([f"<0x{b:02X}>" for b in range(256)])
    bias = {ids[b]: 8.0 for b in range(0x80, 0xF0) if b not in (0xC0, 0xC1)}
    bias.update({ids[b]: 4.0 for b in range(0xF0, 0xF5)})
    return bias


# ------------------------------------------------------------------------ schema


def test_completion_schema_and_exact_usage(client) -> None:
    before = int(time.time())
    out = client.create(USER, temperature=0, max_tokens=8)
    assert set(out) == {"id", "object", "created", "model", "choices", "usage"}
    assert out["id"].startswith("chatcmpl-") and len(out["id"]) > len("chatcmpl-")
    assert out["object"] == "chat.completion"
    assert isinstance(out["created"], int) and before <= out["created"] <= time.time() + 1
    assert out["model"] == client.model_name
    [choice] = out["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] == "length"
    prompt = client.format_prompt(USER)
    rendered = client.tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
    assert out["usage"] == {
        "prompt_tokens": len(prompt.ids),
        "completion_tokens": 8,
        "total_tokens": len(prompt.ids) + 8,
    }
    assert list(prompt.ids) == list(rendered)


def test_ids_are_unique(client) -> None:
    ids = {client.create(USER, temperature=0, max_tokens=1)["id"] for _ in range(3)}
    assert len(ids) == 3


def test_prompt_matches_the_chat_template_with_exactly_one_bos(client) -> None:
    messages = PROMPTS[2]
    prompt = client.format_prompt(messages)
    assert prompt.ids[0] == BOS and prompt.ids[1] != BOS
    assert list(prompt.ids).count(BOS) == 1
    # The trap core avoids: the rendered text already holds <bos>, so encoding it with
    # special tokens on would add a second one.
    assert client.tokenizer(prompt.text)["input_ids"][:2] == [BOS, BOS]
    assert prompt.text.startswith("<bos><start_of_turn>user\n")
    assert prompt.text.endswith("<start_of_turn>model\n")
    assert "Answer in one sentence." in prompt.text
    template = client.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert prompt.text == template


@pytest.mark.parametrize("max_tokens", [1, 5, 13])
def test_length_finish_counts_exactly_max_tokens(client, max_tokens) -> None:
    bias = {EOS: -100, END_OF_TURN: -100}
    out = client.create(USER, temperature=0, max_tokens=max_tokens, logit_bias=bias)
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == max_tokens


def test_content_is_decode_of_generated_ids(client) -> None:
    ids, _ = generated_ids(client, USER, max_tokens=16)
    out = client.create(USER, **GREEDY)
    assert len(ids) == out["usage"]["completion_tokens"] == 16
    assert content(out) == client.tokenizer.decode(ids, skip_special_tokens=True)


# ---------------------------------------------------------------------- end ids


def test_end_of_turn_ends_generation(client) -> None:
    out = client.create(USER, temperature=0, max_tokens=16, logit_bias={END_OF_TURN: 100})
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] == 1
    assert content(out) == ""


def test_eos_ends_generation_too(client) -> None:
    out = client.create(USER, temperature=0, max_tokens=16, logit_bias={EOS: 100})
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] == 1
    assert content(out) == ""


def test_end_ids_are_every_end_token_not_only_eos_token_id(client) -> None:
    assert client.tokenizer.eos_token_id == EOS
    assert {EOS, END_OF_TURN} <= client._eos_ids


# --------------------------------------------------------------------- streaming


def test_stream_chunk_schema(client) -> None:
    chunks = list(client.create(USER, temperature=0, max_tokens=8, stream=True))
    reference = client.create(USER, temperature=0, max_tokens=8)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["model"] for c in chunks} == {client.model_name}
    assert len({c["created"] for c in chunks}) == 1
    first, *middle, finish, final = chunks
    assert first["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    for chunk in middle:
        [choice] = chunk["choices"]
        assert set(choice["delta"]) == {"content"} and choice["delta"]["content"]
        assert choice["finish_reason"] is None and "usage" not in chunk
    assert finish["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    ]
    assert final["choices"] == [] and final["usage"] == reference["usage"]
    assert stream_text(chunks) == content(reference)


def test_stream_equals_non_stream_equals_decode(client) -> None:
    for messages in PROMPTS:
        ids, _ = generated_ids(client, messages, max_tokens=16)
        text = client.tokenizer.decode(ids, skip_special_tokens=True)
        chunks = list(client.create(messages, stream=True, **GREEDY))
        assert stream_text(chunks) == content(client.create(messages, **GREEDY)) == text
        assert chunks[-1]["usage"]["completion_tokens"] == len(ids)


def test_stream_of_multi_byte_characters_is_exact(client) -> None:
    """Biased towards UTF-8 byte tokens, streamed text still equals ``decode(ids)``."""
    bias = byte_bias(client.tokenizer)
    ids, deltas = generated_ids(client, USER, max_tokens=24, logit_bias=bias)
    names = client.tokenizer.convert_ids_to_tokens(ids)
    assert sum(n.startswith("<0x") for n in names) >= 12, names  # mostly byte tokens
    expected = client.tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(d.text for d in deltas) == expected
    out = client.create(USER, temperature=0, max_tokens=24, logit_bias=bias)
    assert content(out) == expected
    chunks = list(client.create(USER, temperature=0, max_tokens=24, logit_bias=bias, stream=True))
    assert stream_text(chunks) == expected


def test_stream_with_cjk_and_ascii_tokens_is_exact(client) -> None:
    tok = client.tokenizer
    nihon = tok.encode("日本", add_special_tokens=False)
    bias = {i: 100.0 for i in {*nihon, *tok.encode(" a", add_special_tokens=False)}}
    for seed in range(3):
        options = {"temperature": 1.0, "seed": seed, "max_tokens": 24, "logit_bias": bias}
        ids, _ = generated_ids(client, USER, **options)
        assert set(ids) <= set(bias)
        expected = tok.decode(ids, skip_special_tokens=True)
        assert content(client.create(USER, **options)) == expected
        assert stream_text(list(client.create(USER, stream=True, **options))) == expected


def test_stream_n2_has_role_first_and_finish_last_per_choice(client) -> None:
    chunks = list(client.create(USER, temperature=0, max_tokens=4, n=2, stream=True))
    assert [c["choices"][0]["index"] for c in chunks[:2]] == [0, 1]
    assert all(c["choices"][0]["delta"].get("role") == "assistant" for c in chunks[:2])
    for index in (0, 1):
        mine = [c for c in chunks[2:-1] if c["choices"][0]["index"] == index]
        assert mine[-1]["choices"][0]["finish_reason"] == "length"
        assert all(c["choices"][0]["finish_reason"] is None for c in mine[:-1])
    assert chunks[-1]["usage"]["completion_tokens"] == 8
    assert stream_text(chunks, 0) == stream_text(chunks, 1)


# ------------------------------------------------------------------------- stop


def boundary_stop(client, ids: list[int]) -> str:
    """A stop string made of the end of one generated token and the start of the next."""
    tok = client.tokenizer
    names = tok.convert_ids_to_tokens(ids)
    full = tok.decode(ids, skip_special_tokens=True)
    for k in range(2, len(ids)):
        prev, nxt = tok.decode([ids[k - 1]]), tok.decode([ids[k]])
        clean = not any(n.startswith("<") for n in names[k - 1 : k + 1])
        if clean and prev.strip() and nxt.strip():
            end = len(tok.decode(ids[:k]))
            assert full[end - len(prev) : end] == prev
            stop = full[end - min(2, len(prev)) : end + min(2, len(nxt))]
            if full.index(stop) > 0:
                return stop
    raise AssertionError(f"no usable token boundary in {names}")


def test_stop_across_token_boundary(client) -> None:
    ids, _ = generated_ids(client, USER, max_tokens=24)
    full = client.tokenizer.decode(ids, skip_special_tokens=True)
    stop = boundary_stop(client, ids)
    expected = full[: full.index(stop)]
    for value in (stop, [stop], ["never-in-output", stop]):
        out = client.create(USER, temperature=0, max_tokens=24, stop=value)
        assert content(out) == expected
        assert out["choices"][0]["finish_reason"] == "stop"
        assert out["usage"]["completion_tokens"] < 24
        chunks = list(client.create(USER, temperature=0, max_tokens=24, stop=value, stream=True))
        assert stream_text(chunks) == expected  # nothing of the stop text leaks
        assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


def test_stop_string_not_in_output_changes_nothing(client) -> None:
    plain = client.create(USER, **GREEDY)
    out = client.create(USER, stop=["\x00never\x00", "qqqqq"], **GREEDY)
    assert content(out) == content(plain) and out["usage"] == plain["usage"]
    assert out["choices"][0]["finish_reason"] == "length"


def test_stop_at_the_first_character_gives_empty_content(client) -> None:
    full = content(client.create(USER, **GREEDY))
    out = client.create(USER, stop=full[0], **GREEDY)
    assert content(out) == "" and out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] >= 1


# ------------------------------------------------------------- sampling and seeds


def test_greedy_is_deterministic(client) -> None:
    runs = [client.create(USER, **GREEDY) for _ in range(2)]
    assert content(runs[0]) == content(runs[1]) and runs[0]["usage"] == runs[1]["usage"]


def test_same_seed_same_output_different_seeds_differ(client) -> None:
    options = {"temperature": 1.0, "max_tokens": 12}
    a = content(client.create(USER, seed=7, **options))
    client.create(USER, temperature=1.0, max_tokens=3)  # unseeded use in between
    b = content(client.create(USER, seed=7, **options))
    assert a == b
    others = {content(client.create(USER, seed=s, **options)) for s in (1, 2, 3, 4)}
    assert len(others | {a}) >= 3
    assert content(client.create(USER, seed=0, **options)) == content(
        client.create(USER, seed=0, **options)
    )


def test_seeded_stream_equals_seeded_create(client) -> None:
    options = {"temperature": 0.9, "max_tokens": 10, "seed": 11}
    assert stream_text(list(client.create(USER, stream=True, **options))) == content(
        client.create(USER, **options)
    )


@pytest.mark.parametrize(
    "options",
    [{"top_k": 1, "temperature": 1.5, "seed": 3}, {"top_p": 1e-6, "temperature": 1.0, "seed": 5}],
    ids=["top_k=1", "tiny-top_p"],
)
def test_truncated_sampling_equals_greedy(client, options) -> None:
    greedy = client.create(USER, **GREEDY)
    out = client.create(USER, **{**options, "max_tokens": 16})
    assert content(out) == content(greedy) and out["usage"] == greedy["usage"]


def test_sampling_options_give_valid_completions(client) -> None:
    options = {
        "temperature": 0.8,
        "top_p": 0.9,
        "top_k": 20,
        "repetition_penalty": 1.3,
        "seed": 1,
        "max_tokens": 10,
    }
    ids, _ = generated_ids(client, USER, **options)
    out = client.create(USER, **options)
    assert content(out) == client.tokenizer.decode(ids, skip_special_tokens=True)
    assert out["usage"]["completion_tokens"] == len(ids) <= 10
    greedy_penalised = client.create(USER, temperature=0, max_tokens=10, repetition_penalty=1.5)
    assert greedy_penalised["usage"]["completion_tokens"] <= 10
    assert greedy_penalised["choices"][0]["finish_reason"] in ("stop", "length")


def test_n_gives_n_choices(client) -> None:
    out = client.create(USER, temperature=0, max_tokens=4, n=2)
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert (
        content(out, 0)
        == content(out, 1)
        == content(client.create(USER, temperature=0, max_tokens=4))
    )
    assert out["usage"]["completion_tokens"] == 8
    assert out["usage"]["prompt_tokens"] == len(client.format_prompt(USER).ids)
    sampled = client.create(USER, temperature=1.0, max_tokens=8, n=3, seed=2)
    assert len(sampled["choices"]) == 3


# ------------------------------------------------------------------------ batches


def test_create_batch_equals_one_by_one(client) -> None:
    singles = [client.create(m, **GREEDY) for m in PROMPTS]
    batch = client.create_batch(PROMPTS, **GREEDY)
    assert len(batch) == 3 and len({b["id"] for b in batch}) == 3
    for one, row in zip(singles, batch, strict=True):
        assert row["object"] == "chat.completion"
        assert row["choices"] == one["choices"]
        assert row["usage"] == one["usage"]
    assert len({b["usage"]["prompt_tokens"] for b in batch}) == 3  # different lengths


def test_create_batch_with_stop_and_end_ids(client) -> None:
    full = [content(client.create(m, **GREEDY)) for m in PROMPTS]
    stop = full[0][3:5]
    singles = [client.create(m, stop=stop, **GREEDY) for m in PROMPTS]
    batch = client.create_batch(PROMPTS, stop=stop, **GREEDY)
    assert [b["choices"] for b in batch] == [s["choices"] for s in singles]
    assert [b["usage"] for b in batch] == [s["usage"] for s in singles]
    assert batch[0]["choices"][0]["finish_reason"] == "stop"
    ended = client.create_batch(PROMPTS, temperature=0, max_tokens=8, logit_bias={END_OF_TURN: 100})
    assert all(b["usage"]["completion_tokens"] == 1 and content(b) == "" for b in ended)


def test_create_batch_with_n(client) -> None:
    batch = client.create_batch(PROMPTS[:2], temperature=0, max_tokens=4, n=2)
    assert [len(b["choices"]) for b in batch] == [2, 2]
    for messages, row in zip(PROMPTS[:2], batch, strict=True):
        single = content(client.create(messages, temperature=0, max_tokens=4))
        assert content(row, 0) == content(row, 1) == single
        assert row["usage"]["completion_tokens"] == 8


# -------------------------------------------------------------------------- async


async def test_acreate_equals_create(client) -> None:
    reference = client.create(USER, **GREEDY)
    out = await client.acreate(USER, **GREEDY)
    assert out["object"] == "chat.completion"
    assert out["choices"] == reference["choices"] and out["usage"] == reference["usage"]
    chunks = [c async for c in await client.acreate(USER, stream=True, **GREEDY)]
    assert stream_text(chunks) == content(reference)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["usage"] == reference["usage"]
    batch = await client.acreate_batch(PROMPTS, **GREEDY)
    assert [b["choices"] for b in batch] == [
        b["choices"] for b in client.create_batch(PROMPTS, **GREEDY)
    ]
