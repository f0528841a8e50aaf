"""The adapters on every core backend by name: ``backend="llamacpp"`` and ``backend="vllm"``.

``ChatGemmaLocal`` (LangChain) and ``GemmaLocal`` (LlamaIndex) build their
client with :func:`core.create_gemma_client`, after
:func:`core.factory.check_backend_settings` refused what the backend cannot
take. On llama.cpp they run the tiny float32 Gemma 3 GGUF of
:mod:`core.tiny.gguf` (xllamacpp, the library CI installs), and every reply
equals what their own core client answers to the same request. vLLM is not
installed in the main environment (it has one of its own, ``.gl/vllm``), so
there the adapters must say so before anything is created; the test hides the
package to be sure of that whatever is installed.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import jsonschema
import pytest
from langchain_core.load import dumps, loads
from langchain_core.messages import AIMessageChunk, HumanMessage
from llama_index.core.llms import ChatMessage
from llama_index.core.tools import FunctionTool
from pydantic import BaseModel, Field, ValidationError

from core import GemmaLlamaCppChatCompletion, MissingDependencyError, ModelNotFoundError
from core.factory import check_backend_settings
from core.tiny.gguf import write_tiny_gemma3_gguf
from langchain_gemma_local import ChatGemmaLocal
from llama_index_gemma_local import GemmaLocal, to_openai_tool

pytestmark = pytest.mark.filterwarnings("ignore::langchain_core._api.LangChainBetaWarning")

#: xllamacpp's library, one thread (the machine is shared); a client option like any other.
LLAMACPP_OPTIONS = {"library": "xllamacpp", "n_threads": 1}
PROMPT = "Hello there, how are you?"
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 12}


class Weather(BaseModel):
    """Bounded values, so that a random model's forced call ends."""

    city: Literal["Paris", "Rome"]
    days: int = Field(ge=1, le=9)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": Weather.model_json_schema(),
    },
}


def get_weather(city: str, days: int) -> str:
    """Current weather of a city."""
    return f"Sunny in {city} for {days} days."


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gemma3_gguf(tmp_path_factory.mktemp("adapters") / "tiny-gemma3.gguf")


@pytest.fixture(scope="module")
def chat(tiny_gguf: Path) -> Iterator[ChatGemmaLocal]:
    model = ChatGemmaLocal(
        backend="llamacpp", model=str(tiny_gguf), client_kwargs=LLAMACPP_OPTIONS, **GREEDY
    )
    yield model
    model._core().close()


@pytest.fixture(scope="module")
def llm(tiny_gguf: Path) -> Iterator[GemmaLocal]:
    model = GemmaLocal(str(tiny_gguf), backend="llamacpp", client_kwargs=LLAMACPP_OPTIONS, **GREEDY)
    yield model
    model.client.close()


def reference(client: Any, **options: Any) -> dict[str, Any]:
    """What the core client answers to PROMPT, greedily: the adapters' expected reply."""
    message = client.create([{"role": "user", "content": PROMPT}], **{**GREEDY, **options})
    return dict(message["choices"][0]) | {"usage": message["usage"]}


# ------------------------------------------------------------ before anything loads


def test_llamacpp_builds_a_llamacpp_client_and_loads_nothing(tiny_gguf: Path) -> None:
    chat = ChatGemmaLocal(backend="llamacpp", model=str(tiny_gguf), client_kwargs=LLAMACPP_OPTIONS)
    assert isinstance(chat.client, GemmaLlamaCppChatCompletion)
    assert chat.model == str(tiny_gguf)
    assert chat._identifying_params["backend"] == "llamacpp"
    assert chat.client.n_threads == 1 and not chat.client.is_loaded
    # same settings, same shared client (one copy of the weights)
    again = ChatGemmaLocal(backend="llamacpp", model=str(tiny_gguf), client_kwargs=LLAMACPP_OPTIONS)
    assert again.client is chat.client

    llm = GemmaLocal(str(tiny_gguf), backend="llamacpp", client_kwargs=LLAMACPP_OPTIONS)
    assert isinstance(llm.client, GemmaLlamaCppChatCompletion)
    assert llm.metadata.model_name == llm.model == str(tiny_gguf)
    assert llm.metadata.is_function_calling_model
    assert GemmaLocal(
        str(tiny_gguf), backend="llamacpp", client_kwargs=LLAMACPP_OPTIONS
    ).client is (llm.client)
    assert not llm.client.is_loaded


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"use_4bit_quantization": True}, "use_4bit_quantization applies to the transformers"),
        ({"device_map": "cpu"}, "device_map applies to the transformers backend only"),
        (
            {"use_4bit_quantization": True, "device_map": "cpu"},
            "use_4bit_quantization and device_map apply to the transformers",
        ),
    ],
)
def test_transformers_options_on_llamacpp_fail_at_construction(
    tiny_gguf: Path, settings: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValidationError, match=match) as caught:
        ChatGemmaLocal(backend="llamacpp", model=str(tiny_gguf), **settings)
    assert "backend='llamacpp'" in str(caught.value) and "GGUF" in str(caught.value)
    with pytest.raises(ValueError, match=match) as raised:
        GemmaLocal(str(tiny_gguf), backend="llamacpp", client_kwargs=settings)
    assert "n_threads" in str(raised.value)  # what applies on llama.cpp instead


def test_transformers_options_on_mlx_and_vllm_name_what_applies() -> None:
    with pytest.raises(ValueError, match="4-bit MLX checkpoint"):
        check_backend_settings("mlx", "m", {"use_4bit_quantization": True})
    with pytest.raises(ValueError, match=r"backend='vllm'.*engine_args"):
        check_backend_settings("vllm", "m", {"device_map": "auto"})
    check_backend_settings("transformers", None, {"use_4bit_quantization": True})  # its own
    check_backend_settings("llamacpp", "m.gguf", {"use_4bit_quantization": False})  # off: fine
    with pytest.raises(ValueError, match="once resolved"):
        check_backend_settings("auto", "m", {})


def test_llamacpp_without_a_model_fails_at_construction() -> None:
    with pytest.raises(ValidationError, match=r"backend='llamacpp' needs model: .*\.gguf"):
        ChatGemmaLocal(backend="llamacpp")
    with pytest.raises(ValueError, match=r"backend='llamacpp' needs model: .*\.gguf"):
        GemmaLocal(backend="llamacpp")


def test_llamacpp_with_a_hub_id_fails_at_construction() -> None:
    # core's ModelNotFoundError (an OSError, which pydantic passes on as it is)
    with pytest.raises(ModelNotFoundError, match=r"local \.gguf file or Hugging Face folder"):
        ChatGemmaLocal(backend="llamacpp", model="google/gemma-3-1b-it")
    with pytest.raises(ModelNotFoundError, match=r"local \.gguf file or Hugging Face folder"):
        GemmaLocal("google/gemma-3-1b-it", backend="llamacpp")


def test_vllm_not_installed_names_the_extra_and_its_environment(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed, whatever is
    modules = set(sys.modules)
    for build in (
        lambda: ChatGemmaLocal(backend="vllm", model="some/gemma"),
        lambda: GemmaLocal("some/gemma", backend="vllm"),
        lambda: GemmaLocal(backend="vllm"),
    ):
        with pytest.raises(MissingDependencyError) as caught:
            build()
        message = str(caught.value)
        assert 'pip install "gemma-local[vllm]"' in message
        assert "scripts/vllm_env.sh" in message
    # nothing was imported for it, let alone loaded
    assert not {m for m in set(sys.modules) - modules if m.split(".")[0] in ("torch", "vllm")}


def test_vllm_transformers_options_fail_before_the_dependency_check(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ValidationError, match=r"use_4bit_quantization .*backend='vllm'"):
        ChatGemmaLocal(backend="vllm", model="some/gemma", use_4bit_quantization=True)


def test_serialization_round_trip_keeps_llamacpp(tiny_gguf: Path) -> None:
    model = ChatGemmaLocal(
        backend="llamacpp", model=str(tiny_gguf), client_kwargs=LLAMACPP_OPTIONS, temperature=0
    )
    text = dumps(model)
    kwargs = json.loads(text)["kwargs"]
    assert kwargs == {
        "model": str(tiny_gguf),
        "backend": "llamacpp",
        "client_kwargs": LLAMACPP_OPTIONS,
        "temperature": 0.0,
    }
    rebuilt = loads(
        text,
        valid_namespaces=["langchain_gemma_local"],
        allowed_objects=[ChatGemmaLocal],
    )
    assert isinstance(rebuilt, ChatGemmaLocal) and rebuilt == model
    assert rebuilt.client is model.client  # the shared client of those settings
    assert not rebuilt.client.is_loaded


# ------------------------------------------------------------ on the tiny GGUF


def test_langchain_invoke_and_stream_equal_the_client(chat: ChatGemmaLocal) -> None:
    expected = reference(chat.client)
    reply = chat.invoke([HumanMessage(PROMPT)])
    assert reply.content == expected["message"]["content"]
    assert reply.response_metadata["finish_reason"] == expected["finish_reason"]
    assert reply.response_metadata["model_name"] == chat.model
    assert reply.usage_metadata is not None
    assert reply.usage_metadata["input_tokens"] == expected["usage"]["prompt_tokens"]
    assert reply.usage_metadata["output_tokens"] == expected["usage"]["completion_tokens"]
    chunks = list(chat.stream(PROMPT))
    assert len(chunks) > 1
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole += chunk
    assert isinstance(whole, AIMessageChunk)
    assert whole.content == reply.content and whole.usage_metadata == reply.usage_metadata


def test_langchain_forced_tool_call(chat: ChatGemmaLocal) -> None:
    forced = {"type": "function", "function": {"name": "get_weather"}}
    expected = reference(chat.client, tools=[WEATHER], tool_choice=forced, max_tokens=200)
    (want,) = expected["message"]["tool_calls"]
    bound = chat.bind_tools([WEATHER], tool_choice="get_weather", max_tokens=200)
    reply = bound.invoke(PROMPT)
    (call,) = reply.tool_calls
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], Weather.model_json_schema())
    assert call["args"] == json.loads(want["function"]["arguments"])
    assert reply.response_metadata["finish_reason"] == "tool_calls"
    streamed = [c for c in bound.stream(PROMPT)]
    whole = streamed[0]
    for chunk in streamed[1:]:
        whole += chunk
    assert isinstance(whole, AIMessageChunk)
    assert [(c["name"], c["args"]) for c in whole.tool_calls] == [(call["name"], call["args"])]


def test_llama_index_chat_and_stream_equal_the_client(llm: GemmaLocal) -> None:
    expected = reference(llm.client)
    answer = llm.chat([ChatMessage(role="user", content=PROMPT)])
    assert answer.message.content == expected["message"]["content"]
    assert answer.additional_kwargs["prompt_tokens"] == expected["usage"]["prompt_tokens"]
    assert answer.additional_kwargs["completion_tokens"] == expected["usage"]["completion_tokens"]
    streamed = list(llm.stream_chat([ChatMessage(role="user", content=PROMPT)]))
    assert len(streamed) > 1
    assert "".join(r.delta or "" for r in streamed) == expected["message"]["content"]
    assert streamed[-1].message.content == expected["message"]["content"]
    assert llm.complete(PROMPT).text == expected["message"]["content"]


def test_llama_index_forced_tool_call(llm: GemmaLocal) -> None:
    tool = FunctionTool.from_defaults(
        get_weather, name="get_weather", description="Current weather of a city.", fn_schema=Weather
    )
    forced = {"type": "function", "function": {"name": "get_weather"}}
    spec = to_openai_tool(tool)  # the declaration the adapter sends
    expected = reference(
        llm.client, tools=[spec], tool_choice=forced, parallel_tool_calls=False, max_tokens=200
    )
    (want,) = expected["message"]["tool_calls"]
    response = llm.chat_with_tools(
        [tool], user_msg=PROMPT, tool_choice="get_weather", max_tokens=200
    )
    (selection,) = llm.get_tool_calls_from_response(response)
    assert selection.tool_name == "get_weather"
    Weather.model_validate(selection.tool_kwargs)
    assert selection.tool_kwargs == json.loads(want["function"]["arguments"])
    assert tool(**selection.tool_kwargs).content.startswith("Sunny in ")
