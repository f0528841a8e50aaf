"""The core clients ``ChatGemmaLocal`` makes itself, shared by settings.

Two models built with the same backend, model and load options get one
client, so the weights load once; a caller's own ``client=`` is never kept here.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping
from typing import Any

from core import BaseGemmaChatCompletion
from core.factory import DEFAULT_MODELS, create_gemma_client

#: Clients made by ChatGemmaLocal itself, by (backend, model, load options).
_SHARED_CLIENTS: weakref.WeakValueDictionary[tuple[str, str, str], BaseGemmaChatCompletion] = (
    weakref.WeakValueDictionary()
)
_SHARED_LOCK = threading.Lock()


def _client_key(backend: str, model: str, options: Mapping[str, Any]) -> tuple[str, str, str]:
    return (backend, model, repr(sorted(options.items())))


def _shared_client(
    backend: str, model: str | None, options: dict[str, Any]
) -> BaseGemmaChatCompletion:
    """The core client for these settings, shared by every ChatGemmaLocal built with them.

    Creating a client loads nothing; sharing makes sure that two models built
    with the same settings (or one rebuilt by ``configurable_fields``) never
    load two copies of the same weights.
    """
    name = model if model is not None else DEFAULT_MODELS[backend]
    key = _client_key(backend, name, options)
    with _SHARED_LOCK:
        client = _SHARED_CLIENTS.get(key)
        if client is None:
            client = create_gemma_client(backend, name, **options)
            _SHARED_CLIENTS[key] = client
        return client


def _shared_key(client: BaseGemmaChatCompletion) -> tuple[str, str, str] | None:
    """The settings of a client ChatGemmaLocal made, ``None`` for a caller's own client."""
    with _SHARED_LOCK:
        return next((k for k, c in _SHARED_CLIENTS.items() if c is client), None)
