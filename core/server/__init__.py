"""``gemma-local serve``: an OpenAI-compatible HTTP server over one client.

Routes: ``POST /v1/chat/completions`` (JSON, or server-sent events with
``stream: true``), ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``.
Data flow::

    HTTP request ──app (key, size limit, JSON)──▶ client.acreate(messages, **options)
        ──core.openai_format──▶ chat.completion / chat.completion.chunk dicts
        ──▶ JSON response, or ``data: {chunk}\\n\\n`` ... ``data: [DONE]\\n\\n``

Every option ``create()`` takes passes through the body unchanged and is
checked by ``create()`` itself; its errors come back as OpenAI's error JSON
(:mod:`core.server.errors`). Needs the ``server`` extra (FastAPI, uvicorn).

>>> from core import create_gemma_client                          # doctest: +SKIP
>>> from core.server import serve
>>> serve(create_gemma_client(model_name="google/gemma-3-1b-it"), port=8000)
"""

from __future__ import annotations

from ..errors import require

require("fastapi", "uvicorn", feature="gemma-local's server")

from .app import (  # noqa: E402  (after the dependency check)
    DEFAULT_MAX_BODY_SIZE,
    INLINE_MEDIA_ONLY,
    ServerSettings,
    create_app,
    default_served_names,
)
from .errors import APIError  # noqa: E402
from .run import BackgroundServer, listen, serve  # noqa: E402

__all__ = [
    "DEFAULT_MAX_BODY_SIZE",
    "INLINE_MEDIA_ONLY",
    "APIError",
    "BackgroundServer",
    "ServerSettings",
    "create_app",
    "default_served_names",
    "listen",
    "serve",
]
