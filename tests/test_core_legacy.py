"""Subclasses: the original design (``_generate_response`` returns a whole text) and a scripted
token backend (the fast tier: the real engine and tokenizer, no model)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from test_core_support import (
    BOS,
    END_OF_TURN,
    EOS,
    USER,
    Gemma4ScriptedClient,
    ScriptedClient,
    content,
    stream_text,
)

from core import BaseGemmaChatCompletion, SamplingParams
from core.stream import REPLACEMENT_CHAR

SYSTEM = [{"role": "system", "content": "Be brief."}, *USER]


class LegacyClient(BaseGemmaChatCompletion):
    """The original design: load a tokenizer, return whole replies."""

    def __init__(self, path: Any, reply: str = "Hello there. STOP and more") -> None:
        super().__init__(str(path))
        self.reply = reply
        self.calls: list[tuple[str, float, int, float, dict[str, Any]]] = []

    def _load_model_and_tokenizer(self) -> None:
        from transformers import AutoTokenizer

        self.model = None
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_name)

    def _generate_response(
        self, prompt_str: str, temperature: float, max_tokens: int, top_p: float, **kwargs: Any
    ) -> str:
        self.calls.append((prompt_str, temperature, max_tokens, top_p, kwargs))
        return self.reply


@pytest.fixture
def legacy(gemma3_path):
    client = LegacyClient(gemma3_path)
    yield client
    client.close()


def count(client, text: str) -> int:
    client.load()
    return len(client.tokenizer.encode(text, add_special_tokens=False))


def test_legacy_create(legacy) -> None:
    out = legacy.create(USER, temperature=0.3, max_tokens=50, top_p=0.9, top_k=7, seed=4)
    assert content(out) == legacy.reply
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["id"].startswith("chatcmpl-") and out["object"] == "chat.completion"
    [(prompt_str, temperature, max_tokens, top_p, kwargs)] = legacy.calls
    prompt = legacy.format_prompt(USER)
    assert prompt_str == prompt.text and prompt_str.startswith("<bos><start_of_turn>user\n")
    assert (temperature, max_tokens, top_p) == (0.3, 50, 0.9)
    assert kwargs == {"top_k": 7, "seed": 4}
    assert prompt.ids[0] == BOS and prompt.ids[1] != BOS
    completion = count(legacy, legacy.reply)
    assert out["usage"] == {
        "prompt_tokens": len(prompt.ids),
        "completion_tokens": completion,
        "total_tokens": len(prompt.ids) + completion,
    }


def test_legacy_hook_receives_every_set_option(legacy) -> None:
    """repetition_penalty and logit_bias reach _generate_response instead of vanishing."""
    legacy.create(USER, max_tokens=20, repetition_penalty=1.3, logit_bias={5: 2.0})
    [(*_, kwargs)] = legacy.calls
    assert kwargs == {"top_k": 0, "seed": None, "repetition_penalty": 1.3, "logit_bias": {5: 2.0}}


def test_legacy_length_when_reply_uses_all_tokens(legacy) -> None:
    n = count(legacy, legacy.reply)
    out = legacy.create(USER, max_tokens=n)
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == n


def test_legacy_stream_is_one_chunk(legacy) -> None:
    chunks = list(legacy.create(USER, stream=True))
    role, text, finish, usage = chunks
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert text["choices"][0]["delta"] == {"content": legacy.reply}
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == count(
        legacy, legacy.reply
    )


@pytest.mark.parametrize("stop", ["STOP", ["zzz", "STOP"], [". S"]])
def test_legacy_stop_strings(legacy, stop) -> None:
    expected = legacy.reply[: legacy.reply.index(stop if isinstance(stop, str) else stop[-1])]
    out = legacy.create(USER, stop=stop)
    assert content(out) == expected and out["choices"][0]["finish_reason"] == "stop"
    assert stream_text(list(legacy.create(USER, stop=stop, stream=True))) == expected


async def test_legacy_async_and_batch(legacy) -> None:
    out = await legacy.acreate(USER)
    assert content(out) == legacy.reply
    chunks = [c async for c in await legacy.acreate(USER, stream=True)]
    assert stream_text(chunks) == legacy.reply
    batch = legacy.create_batch([USER, SYSTEM, USER], n=2)
    assert [len(b["choices"]) for b in batch] == [2, 2, 2]
    assert all(content(b, i) == legacy.reply for b in batch for i in (0, 1))
    assert len(legacy.calls) == 2 + 6


def test_legacy_on_a_gemma2_tokenizer_folds_system(gemma2_path) -> None:
    client = LegacyClient(gemma2_path, reply="ok")
    try:
        assert content(client.create(SYSTEM)) == "ok"
        prompt_str = client.calls[0][0]
        assert prompt_str.startswith("<bos><start_of_turn>user\nBe brief.\n\nWrite a short poem")
    finally:
        client.close()


def test_subclass_implementing_nothing_gets_a_clear_type_error(gemma3_path) -> None:
    class Nothing(BaseGemmaChatCompletion):
        pass

    client = Nothing(str(gemma3_path))
    with pytest.raises(
        TypeError, match=r"Nothing must implement _load_model_and_tokenizer\(\)"
    ) as info:
        client.create(USER)
    assert "_generate_response" in str(info.value) and "_generate(" in str(info.value)
    assert not client.is_loaded
    client.close()


def test_subclass_without_a_generation_hook_gets_a_clear_type_error(gemma3_path) -> None:
    class LoadOnly(BaseGemmaChatCompletion):
        def _load_model_and_tokenizer(self) -> None:
            raise AssertionError("never reached")

    with pytest.raises(
        TypeError, match=r"LoadOnly must implement _generate\(.*or _generate_response"
    ):
        LoadOnly(str(gemma3_path)).create(USER)


def test_subclass_that_sets_no_tokenizer_gets_a_clear_type_error(gemma3_path) -> None:
    class NoTokenizer(LegacyClient):
        def _load_model_and_tokenizer(self) -> None:
            self.model = object()

    client = NoTokenizer(gemma3_path)
    with pytest.raises(TypeError, match=r"must set self\.tokenizer"):
        client.create(USER)
    assert not client.is_loaded
    client.close()


def test_builtin_backends_still_offer_generate_response(client) -> None:
    prompt = client.format_prompt(USER)
    reply = client._worker.call(lambda: client._generate_response(prompt.text, 0.0, 8, 1.0))
    assert reply == content(client.create(USER, temperature=0, max_tokens=8))


# ----------------------------------------------- the original design on Gemma 4
#
# A whole text cannot say which of its characters a control token's id wrote. The
# engine encodes it with the checkpoint's tokenizer (each control token's text is
# that token) and reads the ids as any token stream: the replies below give, through
# the hook, exactly what the same ids give a token backend.

Q = '<|"|>'
WHOLE_REPLIES = {
    "plain": "Plain answer.",
    "thought-then-answer": "<|channel>thought\nhm<channel|>Yes<mask>.",
    "answer-then-end": "Done.<turn|>never read",
    "tool-response-ends": "ok<|tool_response>response:x{}",
    "a-call": f"<|tool_call>call:get_weather{{city:{Q}Paris{Q}}}<tool_call|>",
    "noncharacters": "a\ufdd0b\ufdd3c",  # the sentinels' range, written as text
}


def reply_shape(out: dict[str, Any]) -> dict[str, Any]:
    """A completion without its random ids."""
    [choice] = out["choices"]
    message = dict(choice["message"])
    calls = message.pop("tool_calls", None) or []
    message["calls"] = [(c["function"]["name"], c["function"]["arguments"]) for c in calls]
    return {"message": message, "finish": choice["finish_reason"], "usage": out["usage"]}


@pytest.fixture
def legacy4(gemma4_path):
    client = LegacyClient(gemma4_path)
    yield client
    client.close()


@pytest.fixture
def scripted4(gemma4_path):
    client = Gemma4ScriptedClient(gemma4_path)
    yield client
    client.close()


@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("reply", list(WHOLE_REPLIES.values()), ids=list(WHOLE_REPLIES))
def test_gemma4_whole_reply_reads_as_the_token_path(legacy4, scripted4, reply, thinking) -> None:
    # each ended by <turn|> (a token script that just runs out ends with "length")
    legacy4.reply = reply + "<turn|>"
    whole = legacy4.create(USER, max_tokens=64, thinking=thinking)
    scripted4.enqueue(ids_of(scripted4, legacy4.reply))
    tokens = scripted4.create(USER, max_tokens=64, thinking=thinking)
    assert reply_shape(whole) == reply_shape(tokens)
    chunks = list(legacy4.create(USER, max_tokens=64, thinking=thinking, stream=True))
    assert stream_text(chunks) == (content(whole) or "")
    kinds = [
        kind
        for c in chunks
        if c["choices"]
        for kind in ("reasoning_content", "content", "tool_calls")
        if c["choices"][0]["delta"].get(kind)
    ]
    assert len(kinds) == len(set(kinds))  # the whole reply in one delta: each kind once


def test_gemma4_whole_reply_markers_and_ends(legacy4) -> None:
    legacy4.reply = WHOLE_REPLIES["thought-then-answer"]
    out = legacy4.create(USER, max_tokens=64, thinking=True)
    message = out["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("hm", "Yes.")
    assert out["usage"]["completion_tokens"] == count(legacy4, legacy4.reply)
    assert (
        0
        < out["usage"]["completion_tokens_details"]["reasoning_tokens"]
        < count(legacy4, legacy4.reply)
    )
    # an end token's text ends the reply where its id would: the rest is never read
    legacy4.reply = WHOLE_REPLIES["answer-then-end"]
    out = legacy4.create(USER, max_tokens=64)
    assert (content(out), out["choices"][0]["finish_reason"]) == ("Done.", "stop")
    assert out["usage"]["completion_tokens"] == count(legacy4, "Done.") + 1
    # characters of the sentinels' range written as text are never read as markers
    legacy4.reply = WHOLE_REPLIES["noncharacters"]
    out = legacy4.create(USER, max_tokens=64)
    assert content(out) == f"a{REPLACEMENT_CHAR}b{REPLACEMENT_CHAR}c"
    # max_tokens cuts a longer reply as it cuts a token stream
    legacy4.reply = "Plain answer, and a long one."
    out = legacy4.create(USER, max_tokens=3)
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 3
    assert legacy4.reply.startswith(content(out)) and content(out) != legacy4.reply


def test_gemma4_markers_in_the_users_messages_are_not_parsed(legacy4) -> None:
    """Only the reply is parsed: a user who writes Gemma 4's markers in a message gets them
    rendered into the prompt the hook receives (as the chat template writes user text),
    and the reply the hook returns is read on its own."""
    typed = '<|channel>thought\nsecret<channel|><|tool_call>call:x{a:<|"|>b<|"|>}<tool_call|>'
    legacy4.reply = "Plain answer."
    out = legacy4.create([{"role": "user", "content": typed}], max_tokens=64, thinking=True)
    [(prompt_str, *_)] = legacy4.calls
    assert typed in prompt_str
    message = out["choices"][0]["message"]
    assert message["content"] == "Plain answer." and out["choices"][0]["finish_reason"] == "stop"
    assert "reasoning_content" not in message and "tool_calls" not in message


# ----------------------------------------------------------- scripted token backend


@pytest.fixture
def scripted(gemma3_path):
    client = ScriptedClient(gemma3_path)
    yield client
    client.close()


def ids_of(client: ScriptedClient, text: str) -> list[int]:
    client.load()
    return client.tokenizer.encode(text, add_special_tokens=False)


def test_scripted_tokens_become_exact_text(scripted) -> None:
    text = "Hello 日本 and 😀, naïve!"
    ids = ids_of(scripted, text)
    scripted.enqueue([*ids, END_OF_TURN, 50, 51])
    out = scripted.create(USER, max_tokens=100)
    assert content(out) == text
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] == len(ids) + 1
    assert scripted.pushed == len(ids) + 1  # nothing generated after <end_of_turn>
    scripted.enqueue(ids)
    chunks = list(scripted.create(USER, max_tokens=100, stream=True))
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert "".join(pieces) == text
    assert not any(REPLACEMENT_CHAR in p for p in pieces)
    assert chunks[-1]["usage"]["completion_tokens"] == len(ids)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"  # the script ran out


def test_scripted_eos_ends_like_end_of_turn(scripted) -> None:
    ids = ids_of(scripted, "hi there")
    scripted.enqueue([*ids, EOS, *ids])
    out = scripted.create(USER, max_tokens=100)
    assert content(out) == "hi there" and out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] == len(ids) + 1


def test_scripted_stop_across_tokens(scripted) -> None:
    text = "the sea is wide and deep"
    ids = ids_of(scripted, text)
    pieces = scripted.tokenizer.convert_ids_to_tokens(ids)
    assert "▁is" in pieces and "▁sea" in pieces  # the stop below spans two tokens
    for stream in (False, True):
        scripted.enqueue(ids)
        result = scripted.create(USER, max_tokens=100, stop=["a is"], stream=stream)
        if stream:
            chunks = list(result)
            assert stream_text(chunks) == "the se"
            assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
            assert chunks[-1]["usage"]["completion_tokens"] == pieces.index("▁is") + 1
        else:
            assert content(result) == "the se" and result["choices"][0]["finish_reason"] == "stop"
    assert scripted.pushed == 2 * (pieces.index("▁is") + 1)


def test_scripted_partial_stop_is_released(scripted) -> None:
    ids = ids_of(scripted, "the sea is")
    scripted.enqueue(ids)
    out = scripted.create(USER, max_tokens=len(ids), stop="is wide")
    assert content(out) == "the sea is" and out["choices"][0]["finish_reason"] == "length"


def test_scripted_requests_carry_prompt_and_params(scripted) -> None:
    scripted.enqueue([])
    scripted.create(SYSTEM, temperature=0.5, max_tokens=9, stop="x", seed=3, n=2)
    [(prompts, params)] = scripted.history
    assert len(prompts) == 2 and prompts[0] == prompts[1]
    assert prompts[0].ids[0] == BOS and prompts[0].ids[1] != BOS
    assert params == SamplingParams.build(temperature=0.5, max_tokens=9, stop="x", seed=3, n=2)


def test_scripted_exception_mid_stream(scripted) -> None:
    ids = ids_of(scripted, "one two three four")

    def fail(_row: int, step: int) -> None:
        if step == 2:
            raise RuntimeError("scripted failure")

    scripted.on_token = fail
    scripted.enqueue(ids)
    chunks = []
    with pytest.raises(RuntimeError, match="scripted failure"):
        for chunk in scripted.create(USER, max_tokens=100, stream=True):
            chunks.append(chunk)
    assert stream_text(chunks) == scripted.tokenizer.decode(ids[:2])
    scripted.on_token = None
    scripted.enqueue(ids)
    assert content(scripted.create(USER, max_tokens=100)) == "one two three four"


def test_scripted_break_cancels_before_the_next_token(scripted) -> None:
    ids = ids_of(scripted, "a b c d e f g h i j k l")
    gate = threading.Event()
    steps: list[int] = []

    def wait_after_two(_row: int, step: int) -> None:
        steps.append(step)
        if step >= 2:
            gate.wait(5)

    scripted.on_token = wait_after_two
    scripted.enqueue(ids)
    stream = scripted.create(USER, max_tokens=100, stream=True)
    assert next(stream)["choices"][0]["delta"]["role"] == "assistant"
    assert next(stream)["choices"][0]["delta"]["content"] == "a"
    gate.set()
    stream.close()
    assert scripted.pushed <= 4 and steps[-1] <= 3
