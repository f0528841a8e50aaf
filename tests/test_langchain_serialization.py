"""ChatGemmaLocal through LangChain's serialization: ``dumps`` / ``dumpd`` then ``loads`` / ``load``.

The JSON holds the settings only, never the core client; the rebuilt model
gets a client for those settings, loads nothing until its first call, and
then answers like the original.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from langchain_core.load import dumpd, dumps, load, loads

from core import BaseGemmaChatCompletion, GemmaTransformersChatCompletion
from core.factory import resolve_backend
from langchain_gemma_local import ChatGemmaLocal

#: ``load`` / ``loads`` are marked beta in langchain-core and warn on every call.
pytestmark = pytest.mark.filterwarnings("ignore::langchain_core._api.LangChainBetaWarning")

LC_ID = ["langchain_gemma_local", "chat_models", "ChatGemmaLocal"]
#: What loading a third-party class takes: its namespace, and the class allowed.
LOAD_ARGS: dict[str, Any] = {
    "valid_namespaces": ["langchain_gemma_local"],
    "allowed_objects": [ChatGemmaLocal],
}

#: Every serializable field set, falsy values included (0 and False are settings too).
SETTINGS: dict[str, Any] = {
    "model": "some/gemma",
    "backend": "transformers",
    "device_map": "cpu",
    "client_kwargs": {"torch_dtype": "bfloat16", "revision": "main"},
    "temperature": 0.0,
    "max_tokens": 64,
    "top_p": 0.9,
    "top_k": 40,
    "stop": ["\n\n"],
    "seed": 0,
    "repetition_penalty": 1.1,
    "logit_bias": {9: -100.0},
    "streaming": True,
    "timeout": 30.0,
    "max_retries": 0,
}


def document(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The whole JSON document ``dumps`` writes for a ChatGemmaLocal with these kwargs."""
    return {"lc": 1, "type": "constructor", "id": LC_ID, "kwargs": kwargs, "name": "ChatGemmaLocal"}


def test_serializable_under_its_module_path() -> None:
    assert ChatGemmaLocal.is_lc_serializable()
    assert ChatGemmaLocal.get_lc_namespace() == ["langchain_gemma_local", "chat_models"]
    assert ChatGemmaLocal.lc_id() == LC_ID


@pytest.mark.parametrize("as_text", [True, False], ids=["dumps-loads", "dumpd-load"])
def test_round_trip_rebuilds_an_equal_model(as_text: bool) -> None:
    model = ChatGemmaLocal(**SETTINGS)
    if as_text:
        text = dumps(model)
        # JSON object keys are strings; pydantic turns logit_bias's back into ints
        assert json.loads(text) == document({**SETTINGS, "logit_bias": {"9": -100.0}})
        rebuilt = loads(text, **LOAD_ARGS)
    else:
        rebuilt = load(dumpd(model), **LOAD_ARGS)
    assert isinstance(rebuilt, ChatGemmaLocal)
    assert rebuilt == model
    assert {name: getattr(rebuilt, name) for name in SETTINGS} == SETTINGS
    # same settings, so the same (shared) client: still one copy of the weights
    assert rebuilt.client is model.client
    assert not rebuilt.client.is_loaded


def test_loading_needs_the_namespace() -> None:
    text = dumps(ChatGemmaLocal(model="some/gemma", backend="transformers"))
    with pytest.raises(ValueError, match="Invalid namespace"):
        loads(text, allowed_objects=[ChatGemmaLocal])


def test_backend_is_written_resolved() -> None:
    model = ChatGemmaLocal(model="some/gemma")  # backend="auto"
    assert dumpd(model)["kwargs"] == {"model": "some/gemma", "backend": resolve_backend("auto")}


def test_a_passed_client_is_not_serialized() -> None:
    own = GemmaTransformersChatCompletion("some/gemma", device_map="cpu")
    model = ChatGemmaLocal(client=own, temperature=0)
    text = dumps(model)
    assert json.loads(text) == document(
        {"model": "some/gemma", "backend": "transformers", "temperature": 0.0}
    )
    assert "GemmaTransformersChatCompletion" not in text
    rebuilt = loads(text, **LOAD_ARGS)
    assert rebuilt.client is not own
    assert (rebuilt.client.model_name, rebuilt.client.implementation) == (
        "some/gemma",
        "transformers",
    )
    assert not rebuilt.client.is_loaded


def test_a_hub_token_is_never_written() -> None:
    kwargs = {"model": "some/gemma", "backend": "transformers"}
    with_options = ChatGemmaLocal(**kwargs, client_kwargs={"token": "hf_SECRET", "revision": "v1"})
    text = dumps(with_options)
    assert "hf_SECRET" not in text
    assert json.loads(text)["kwargs"]["client_kwargs"] == {"revision": "v1"}
    assert loads(text, **LOAD_ARGS).client_kwargs == {"revision": "v1"}

    token_only = ChatGemmaLocal(**kwargs, client_kwargs={"token": "hf_SECRET"})
    assert json.loads(dumps(token_only)) == document(kwargs)
    assert token_only.client_kwargs == {"token": "hf_SECRET"}  # the model itself keeps it
    # nor shown: reprs end up in logs and tracebacks
    assert "hf_SECRET" not in repr(with_options) + str(with_options)
    assert "'revision': 'v1'" in repr(with_options)


def test_loading_loads_nothing(gemma3_path: Path) -> None:
    # a real checkpoint folder: core checks at construction that the folder holds a model
    text = dumps(ChatGemmaLocal(model=str(gemma3_path), backend="transformers", temperature=0))
    code = (
        "import sys\n"
        "from langchain_core.load import loads\n"
        "from langchain_gemma_local import ChatGemmaLocal\n"
        "m = loads(sys.argv[1], valid_namespaces=['langchain_gemma_local'],\n"
        "          allowed_objects=[ChatGemmaLocal])\n"
        f"assert m.model == {str(gemma3_path)!r} and m.temperature == 0\n"
        "assert not m.client.is_loaded\n"
        "heavy = [k for k in sys.modules if k.split('.')[0] in ('torch', 'transformers', 'mlx', 'mlx_lm')]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-W", "ignore", "-c", code, text], check=True)


def test_rebuilt_model_answers(
    client: BaseGemmaChatCompletion, backend_name: str, gemma3_path: Path
) -> None:
    """Rebuilt from JSON, the tiny model loads from the folder and answers like the original."""
    # the load options of the session's client (conftest.make_client), as fields
    load_options: dict[str, Any] = (
        {"device_map": "cpu", "client_kwargs": {"torch_dtype": "float32"}}
        if backend_name == "transformers"
        else {}
    )
    settings = {"model": str(gemma3_path), "backend": backend_name, **load_options}
    model = ChatGemmaLocal(**settings, temperature=0, max_tokens=8)
    text = dumps(model)
    # the checkpoint folder we passed is the only path in it: no client, no cache paths
    assert json.loads(text) == document({**settings, "temperature": 0.0, "max_tokens": 8})

    rebuilt = loads(text, **LOAD_ARGS)
    assert rebuilt == model
    assert rebuilt.client is not client and not rebuilt.client.is_loaded
    try:
        reply = rebuilt.invoke("Hello")
        assert rebuilt.client.is_loaded
        expected = ChatGemmaLocal(client=client, temperature=0, max_tokens=8).invoke("Hello")
        assert reply.content == expected.content
        assert reply.usage_metadata == expected.usage_metadata
    finally:
        rebuilt.client.close()
