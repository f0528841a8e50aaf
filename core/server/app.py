"""The FastAPI application: ``/v1/chat/completions``, ``/v1/models``, ``/health``.

One request, in order::

    API key (401) ─▶ body read up to the limit (413) ─▶ JSON (400) ─▶ model name (404)
        ─▶ client.acreate(...) (400 with create()'s message; 429 when its queue is full)
        ─▶ a chat.completion, or server-sent events of its chunks

The generation is the client's own async API: nothing here formats a reply
(:mod:`core.openai_format` does), and nothing blocks the event loop (the
model runs on the client's worker thread). There is one limit on requests,
the client's own (:mod:`core.scheduler`): ``max_batch_size`` rows decode
together and ``max_queue`` requests wait for a row; one more gets the client's
:class:`~core.errors.QueueFullError`, answered at once with 429 (never a
wait). A client that goes away (a closed stream, a
dropped connection while it waits) cancels its generation: the reply's
iterator is closed, which cancels the job on the model thread.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from ..base import BaseGemmaChatCompletion
from ..media import Sources, media_kinds, resolve_messages
from .errors import APIError, error_body, from_exception
from .protocol import (
    PARSE_IN_THREAD_BYTES,
    SSE_DONE,
    chat_request,
    check_length_header,
    parse_body,
    sse_event,
    too_large,
    wire_chunk,
)

logger = logging.getLogger("gemma_local.server")

T = TypeVar("T")

#: Defaults of :func:`create_app` (and of ``gemma-local serve``).
DEFAULT_MAX_BODY_SIZE = 10 * 1024 * 1024
#: Media a request may reference: inline only (data URIs, base64 audio). A path or
#: file:// URL would read the server's files, an http(s) URL make it fetch addresses
#: of the sender's choosing.
INLINE_MEDIA_ONLY = Sources(local_files=False, urls=False)


def default_served_names(model_name: str) -> tuple[str, ...]:
    """The names a request may use for ``model_name``: a local folder's (or file's) own name first."""
    path = Path(model_name).expanduser()
    if path.exists() and path.name and path.name != model_name:
        return (path.name, model_name)
    return (model_name,)


class Active:
    """How many chat requests the server is answering (for ``/health``; event loop only).

    Not a limit: the client's queue is (``max_batch_size`` / ``max_queue``), whose
    :class:`~core.errors.QueueFullError` the server answers with 429.
    """

    def __init__(self) -> None:
        self.count = 0

    def enter(self) -> Ticket:
        self.count += 1
        return Ticket(self)


class Ticket:
    """One request being answered; :meth:`release` (idempotent) ends it."""

    def __init__(self, active: Active) -> None:
        self._active: Active | None = active

    def release(self) -> None:
        if self._active is not None:
            self._active.count -= 1
            self._active = None


@dataclass(frozen=True)
class ServerSettings:
    """What :func:`create_app` was given, checked.

    Attributes:
        served_names: the model names requests may use; the first is listed first.
        api_key: the bearer token every ``/v1`` request must send; ``None``: no key.
        max_body_size: the largest request body in bytes (larger: 413, unread).
        media_sources: where image / audio parts may be read from besides the request
            itself (:class:`core.media.Sources`); by default neither the server's files
            nor URLs (:data:`INLINE_MEDIA_ONLY`), whatever the client allows.
    """

    served_names: tuple[str, ...]
    api_key: str | None
    max_body_size: int
    media_sources: Sources = INLINE_MEDIA_ONLY

    @classmethod
    def build(
        cls,
        model_name: str,
        served_names: Sequence[str] | None = None,
        api_key: str | None = None,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        media_sources: Sources | None = None,
    ) -> ServerSettings:
        if served_names is None:
            names = default_served_names(model_name)
        else:
            if isinstance(served_names, str) or not served_names:
                raise ValueError(
                    f"served_names must be a non-empty list of names, got {served_names!r}"
                )
            names = tuple(served_names)
        for name in names:
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"each served model name must be a non-empty string, got {name!r}")
        if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
            raise ValueError("api_key must be a non-empty string, or None for no key")
        if (
            not isinstance(max_body_size, int)
            or isinstance(max_body_size, bool)
            or max_body_size < 1
        ):
            raise ValueError(f"max_body_size must be an integer >= 1, got {max_body_size!r}")
        if media_sources is None:
            media_sources = INLINE_MEDIA_ONLY
        elif not isinstance(media_sources, Sources):
            raise TypeError(
                f"media_sources must be a core.media.Sources, got {type(media_sources).__name__}"
            )
        names = tuple(dict.fromkeys(names))
        return cls(names, api_key, max_body_size, media_sources)


def create_app(
    client: BaseGemmaChatCompletion,
    *,
    served_names: Sequence[str] | None = None,
    api_key: str | None = None,
    max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    media_sources: Sources | None = None,
) -> FastAPI:
    """An OpenAI-compatible app serving ``client``'s model (see the module doc).

    The app does not own ``client``: whoever made it closes it. Requests name
    the model by one of ``served_names`` (default: the model name, and a local
    folder's own name); ``api_key`` (if set) must come as ``Authorization:
    Bearer <key>`` on every ``/v1`` route (``/health`` is open). Image and audio parts
    must come inline unless ``media_sources`` allows more (see :class:`ServerSettings`).
    How many requests run and wait is the client's to say (its ``max_batch_size`` and
    ``max_queue``): one more than it takes is a 429.
    """
    settings = ServerSettings.build(
        client.model_name, served_names, api_key, max_body_size, media_sources
    )
    active = Active()
    created = int(time.time())
    app = FastAPI(
        title="gemma-local",
        description=f"OpenAI-compatible chat completions for {settings.served_names[0]}",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.client = client
    app.state.settings = settings
    app.state.active = active
    app.state.stopping = False  # set by core.server.run when the server shuts down

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = "not_found" if exc.status_code == 404 else None
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see GET /v1/models"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return JSONResponse(
            error_body(message, "invalid_request_error", None, code),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else ""
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            message = (
                "incorrect API key provided"
                if given
                else "no API key provided: send it as 'Authorization: Bearer <key>' "
                "(the key gemma-local serve was started with)"
            )
            raise APIError(
                401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
            )

    def model_card(name: str) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "gemma-local",
            "root": client.model_name,
        }

    def unknown_model(name: str) -> APIError:
        served = ", ".join(map(repr, settings.served_names))
        return APIError(
            404,
            f"the model {name!r} does not exist on this server; it serves {served}",
            code="model_not_found",
            param="model",
        )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": settings.served_names[0],
            "loaded": client.is_loaded,
            "requests": {
                "active": active.count,
                "max_batch_size": client.max_batch_size,
                "max_queue": client.max_queue,
            },
        }

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [model_card(n) for n in settings.served_names]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request) -> dict[str, Any]:
        authorize(request)
        if name not in settings.served_names:
            raise unknown_model(name)
        return model_card(name)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        ticket = active.enter()
        try:
            return await _answer(request, client, settings, ticket, unknown_model)
        except BaseException:
            ticket.release()
            raise

    return app


async def _answer(
    request: Request,
    client: BaseGemmaChatCompletion,
    settings: ServerSettings,
    ticket: Ticket,
    unknown_model: Callable[[str], APIError],
) -> Response:
    raw = await _read_body(request, settings.max_body_size)
    if len(raw) > PARSE_IN_THREAD_BYTES:
        body = await asyncio.to_thread(parse_body, raw)
    else:
        body = parse_body(raw)
    chat = chat_request(body)
    if chat.model not in settings.served_names:
        raise unknown_model(chat.model)
    try:
        messages = chat.messages
        if media_kinds(messages):
            # Decoded here, from the sources the server allows (the client then finds
            # them decoded), off the event loop.
            messages = await asyncio.to_thread(resolve_messages, messages, settings.media_sources)
        if not chat.stream:
            reply = await _unless_disconnected(request, client.acreate(messages, **chat.options))
            reply["model"] = chat.model
            ticket.release()
            return JSONResponse(reply)
        chunks = await client.acreate(messages, stream=True, **chat.options)
    except APIError:
        raise
    except Exception as exc:
        raise _logged(from_exception(exc, body), exc) from exc
    # The first chunk comes once the request is formatted and its first token is
    # out: a failure before it (a prompt over the context window) is still a 4xx.
    try:
        first = await _unless_disconnected(request, anext(chunks))
    except BaseException as exc:
        await chunks.aclose()
        if isinstance(exc, Exception) and not isinstance(exc, APIError):
            raise _logged(from_exception(exc, body), exc) from exc
        raise
    events = _events(
        first, chunks, chat.model, chat.include_usage, lambda: request.app.state.stopping
    )
    return _EventStream(events, chunks, ticket)


def _logged(error: APIError, exc: BaseException) -> APIError:
    if error.status >= 500:
        logger.error("request failed: %s", error.message, exc_info=exc)
    return error


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to pass ``limit`` bytes."""
    check_length_header(request.headers.get("content-length"), limit)
    parts: list[bytes] = []
    size = 0
    try:
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise too_large(limit)
            parts.append(part)
    except ClientDisconnect:
        raise APIError(400, "the client disconnected while sending the request") from None
    return b"".join(parts)


async def _until_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it (and its generation)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_until_disconnected(request.receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watch):
            pending.cancel()
        # Wait for the cancelled generation to stop before answering.
        await asyncio.gather(task, watch, return_exceptions=True)
    if task.cancelled():
        raise APIError(400, "the client disconnected before the reply was ready")
    return task.result()


#: What a stream still open when the server stops ends with.
SHUTTING_DOWN = APIError(
    503,
    "the server is shutting down; the reply was cut short",
    type="server_error",
    code="service_unavailable",
)


async def _events(
    first: dict[str, Any],
    chunks: AsyncIterator[dict[str, Any]],
    model: str,
    include_usage: bool,
    stopping: Callable[[], bool],
) -> AsyncIterator[bytes]:
    """The SSE bytes of a streamed reply; an error after the first chunk becomes an
    ``error`` event (the status is already sent), then ``[DONE]``. When the server
    stops, an open stream ends at its next chunk the same way (its generation is
    cancelled as the response closes)."""
    chunk = wire_chunk(first, model, include_usage)
    if chunk is not None:
        yield sse_event(chunk)
    try:
        async for item in chunks:
            if stopping():
                yield sse_event(SHUTTING_DOWN.body())
                break
            chunk = wire_chunk(item, model, include_usage)
            if chunk is not None:
                yield sse_event(chunk)
    except Exception as exc:
        yield sse_event(_logged(from_exception(exc), exc).body())
    yield SSE_DONE


class _EventStream(StreamingResponse):
    """Server-sent events that close the reply's chunk iterator (cancelling its
    generation) and end the request's count however the response ends:
    finished, failed, or the client gone mid-stream."""

    def __init__(
        self, events: AsyncIterator[bytes], chunks: AsyncIterator[Any], ticket: Ticket
    ) -> None:
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._events = events
        self._chunks = chunks
        self._ticket = ticket

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await _close(self._events)
                await _close(self._chunks)
            finally:
                self._ticket.release()


async def _close(iterator: AsyncIterator[Any]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()
