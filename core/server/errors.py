"""OpenAI's error shape, and which status each failure gets.

Every error the server answers is ``{"error": {"message", "type", "param",
"code"}}`` (what the ``openai`` client reads into its ``APIStatusError``
subclasses). A user's mistake is a 4xx whose message is the one ``create()``
gives for it; 500 is left for the server's own failures.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..errors import (
    ClientClosedError,
    ContextWindowExceededError,
    GemmaLocalError,
    OutOfMemoryError,
    QueueFullError,
)


class APIError(Exception):
    """An HTTP error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_LEADING_NAME = re.compile(r"[A-Za-z_]\w*")


def _param(message: str, body: Mapping[str, Any] | None) -> str | None:
    """The request field a core message starts with ("temperature must be ...")."""
    match = _LEADING_NAME.match(message)
    if match is None or body is None:
        return None
    name = match.group(0)
    return name if name in body else None


def from_exception(exc: BaseException, body: Mapping[str, Any] | None = None) -> APIError:
    """The :class:`APIError` a failure of ``create()`` (or of its stream) is answered with.

    Core checks every option and message before anything runs and raises
    ``ValueError`` / ``TypeError`` (or ``NotImplementedError`` for what a
    backend cannot do): those are the caller's mistakes, 400 with core's
    message. A full queue (:class:`~core.errors.QueueFullError`, the client's
    ``max_batch_size`` rows decoding and ``max_queue`` requests waiting) is 429,
    with ``Retry-After``. ``close()`` of the client (the server shutting down) is 503.
    """
    if isinstance(exc, APIError):
        return exc
    message = str(exc) or type(exc).__name__
    if isinstance(exc, ContextWindowExceededError):
        return APIError(400, message, code="context_length_exceeded", param="messages")
    if isinstance(exc, (ValueError, TypeError, NotImplementedError)):
        return APIError(400, message, param=_param(message, body))
    if isinstance(exc, QueueFullError):
        return APIError(
            429,
            message,
            type="requests",
            code="rate_limit_exceeded",
            headers={"Retry-After": "1"},
        )
    if isinstance(exc, ClientClosedError):
        return APIError(503, message, type="server_error", code="service_unavailable")
    if isinstance(exc, OutOfMemoryError):
        return APIError(500, message, type="server_error", code="out_of_memory")
    if isinstance(exc, GemmaLocalError):
        return APIError(500, message, type="server_error")
    return APIError(
        500,
        f"the server failed while answering ({type(exc).__name__}); see its log",
        type="server_error",
    )
