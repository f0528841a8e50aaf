"""Loading several clients at once: one load at a time in the process, tied weights checked.

transformers replaces ``PreTrainedModel.tie_weights`` with a no-op while it
loads; two loads at once undo each other's swap and leave ``lm_head`` untied
(random) in both, and in every later load of the process. Every client's load
runs under ``core.base.LOAD_LOCK`` (whatever its backend), and a transformers
load whose tied weights came back untied raises ``TiedWeightsError``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from conftest import make_client
from test_core_support import USER, content

from core import GemmaTransformersChatCompletion
from core.errors import TiedWeightsError
from core.transformers_backend import untied_weights

GREEDY = {"temperature": 0, "max_tokens": 12}


def lm_head_is_embeddings(model) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_several_clients_loading_at_once_on_both_backends_answer_like_a_lone_load(
    gemma3_path: Path, gemma3_vision_path: Path
) -> None:
    # (backend, folder) of each client: the same folder twice on each backend and
    # a multimodal checkpoint (tied through its text config), all loading together.
    plan = [
        ("transformers", gemma3_path),
        ("transformers", gemma3_path),
        ("transformers", gemma3_vision_path),
        ("mlx", gemma3_path),
        ("mlx", gemma3_path),
    ]
    lone = {}
    for key in dict.fromkeys(plan):
        alone = make_client(*key)
        try:
            lone[key] = content(alone.create(USER, **GREEDY))
        finally:
            alone.close()

    clients = [make_client(*key) for key in plan]
    barrier = threading.Barrier(len(clients))
    errors: list[BaseException] = []

    def load(client) -> None:
        try:
            barrier.wait(10)
            client.load()
        except BaseException as exc:  # reported below, with the others
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(c,)) for c in clients]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        for key, client in zip(plan, clients, strict=True):
            if key[0] == "transformers":
                assert untied_weights(client.model) == []
                assert lm_head_is_embeddings(client.model)
            assert content(client.create(USER, **GREEDY)) == lone[key], key
    finally:
        for client in clients:
            client.close()


def test_loads_of_different_clients_never_overlap(gemma3_path: Path) -> None:
    state = {"now": 0, "most": 0}
    lock = threading.Lock()

    class Counted(GemmaTransformersChatCompletion):
        def _load_model_and_tokenizer(self) -> None:
            with lock:
                state["now"] += 1
                state["most"] = max(state["most"], state["now"])
            time.sleep(0.1)  # long enough for the other threads to try
            try:
                super()._load_model_and_tokenizer()
            finally:
                with lock:
                    state["now"] -= 1

    clients = [Counted(str(gemma3_path), device_map="cpu", torch_dtype="float32") for _ in range(3)]
    threads = [threading.Thread(target=c.load) for c in clients]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(c.is_loaded for c in clients)
        assert state["most"] == 1
    finally:
        for client in clients:
            client.close()


def test_tied_weights_of_text_and_multimodal_checkpoints(gemma3_path, gemma3_vision_path) -> None:
    for path in (gemma3_path, gemma3_vision_path):
        client = make_client("transformers", path).load()
        try:
            model = client.model
            tied = model.all_tied_weights_keys
            assert any(target.endswith("lm_head.weight") for target in tied), tied
            assert untied_weights(model) == []
            # Untie lm_head by hand: the check names the pair, with and without
            # transformers' record of what it ties (the config fallback).
            import torch

            head = model.get_output_embeddings()
            head.weight = torch.nn.Parameter(head.weight.detach().clone())
            target = next(t for t in tied if t.endswith("lm_head.weight"))
            assert untied_weights(model) == [(target, tied[target])]
            del model.all_tied_weights_keys
            assert untied_weights(model) == [(target, tied[target])]
        finally:
            client.close()


def test_a_load_that_leaves_lm_head_untied_fails_loudly(monkeypatch, gemma3_path) -> None:
    """What a process poisoned by a concurrent ``from_pretrained`` elsewhere looks like."""
    from transformers import PreTrainedModel

    def empty_func(*args, **kwargs) -> None:  # transformers' loading-time stand-in
        pass

    client = make_client("transformers", gemma3_path)
    monkeypatch.setattr(PreTrainedModel, "tie_weights", empty_func)
    with pytest.raises(TiedWeightsError, match=r"lm_head\.weight.*Restart the Python process"):
        client.load()
    assert not client.is_loaded and client.model is None
    monkeypatch.undo()
    try:
        client.load()
        assert lm_head_is_embeddings(client.model)
    finally:
        client.close()


def test_llama_index_models_with_the_same_settings_share_one_client(gemma3_path) -> None:
    pytest.importorskip("llama_index.core")
    from llama_index.core.base.llms.types import ChatMessage

    from llama_index_gemma_local import GemmaLocal

    options = {"device_map": "cpu", "torch_dtype": "float32"}
    a = GemmaLocal(str(gemma3_path), backend="transformers", client_kwargs=options, max_tokens=4)
    b = GemmaLocal(str(gemma3_path), backend="transformers", client_kwargs=dict(options))
    other = GemmaLocal(
        str(gemma3_path), backend="transformers", client_kwargs={**options, "device_map": None}
    )
    assert a.client is b.client
    assert other.client is not a.client
    loads = []
    original = a.client._load_model_and_tokenizer

    def counted() -> None:
        loads.append(1)
        original()

    a.client._load_model_and_tokenizer = counted  # type: ignore[method-assign]

    async def both() -> list:
        messages = [ChatMessage(role="user", content="Hi")]
        return await asyncio.gather(
            a.achat(messages, temperature=0), b.achat(messages, temperature=0, max_tokens=4)
        )

    try:
        first, second = asyncio.run(both())
        assert first.message.content == second.message.content
        assert len(loads) == 1
    finally:
        a.client.close()
