"""Running the app with uvicorn: in the foreground (``gemma-local serve``) or on a thread.

:func:`serve` blocks until Ctrl-C / SIGTERM; :class:`BackgroundServer` runs
the same server on a thread of its own (tests, notebooks) and stops and joins
it on :meth:`~BackgroundServer.close`. Neither closes the client: its owner does.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import uvicorn

from ..base import BaseGemmaChatCompletion
from .app import create_app

#: Seconds open streams get to finish when the server is stopped; then they are cancelled.
GRACEFUL_SHUTDOWN_S = 3


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port=0``: a free one), or a clear error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"cannot listen on host {host!r}: {exc.strerror}") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ValueError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port "
            "(or stop what uses this one)"
        ) from exc
    sock.set_inheritable(True)
    return sock


def base_url(sock: socket.socket) -> str:
    """``http://host:port`` of a listening socket (an IPv6 host in brackets)."""
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


class _Server(uvicorn.Server):
    """uvicorn's server, telling the app when it starts to shut down, so that open
    streams end at their next chunk instead of running into the graceful timeout."""

    def __init__(self, app: Any, *, log_level: str, quiet: bool) -> None:
        super().__init__(_config(app, log_level=log_level, quiet=quiet))
        self._app = app
        #: the signals that stopped it (Ctrl-C: SIGINT), in arrival order
        self.signals: list[int] = []

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.signals.append(sig)
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._app.state.stopping = True
        await super().shutdown(sockets)


def _config(app: Any, *, log_level: str, quiet: bool) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        log_level=log_level,
        # log_config=None leaves the process's logging alone (a library must not
        # reconfigure it); the command line lets uvicorn set up its own.
        log_config=None if quiet else uvicorn.config.LOGGING_CONFIG,
        access_log=not quiet,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        lifespan="off",
    )


def serve(
    client: BaseGemmaChatCompletion,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    sock: socket.socket | None = None,
    log_level: str = "info",
    **app_options: Any,
) -> list[int]:
    """Serve ``client`` until interrupted (``app_options``: see :func:`~core.server.create_app`);
    the signals that stopped it.

    ``sock``: an already listening socket (see :func:`listen`) instead of ``host:port``.
    uvicorn shuts down gracefully on SIGINT / SIGTERM, then raises the signal again;
    whether that reaches the caller as ``KeyboardInterrupt`` depends on when asyncio's
    own SIGINT handler sees it (before or after the server's task has ended), so the
    signals are returned too: ``gemma-local serve`` exits 130 after Ctrl-C either way.
    """
    app = create_app(client, **app_options)
    own = sock is None
    listening = listen(host, port) if sock is None else sock
    server = _Server(app, log_level=log_level, quiet=False)
    try:
        server.run(sockets=[listening])
    finally:
        if own:
            listening.close()
    return list(server.signals)


class BackgroundServer:
    """The server on a thread of its own; a context manager that stops and joins it.

    >>> with BackgroundServer(client, api_key="sk-local") as server:   # doctest: +SKIP
    ...     OpenAI(base_url=server.url + "/v1", api_key="sk-local")

    ``port=0`` (the default) picks a free port; :attr:`url` says which.
    ``app_options`` go to :func:`~core.server.create_app`.
    """

    def __init__(
        self,
        client: BaseGemmaChatCompletion,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        start_timeout: float = 30.0,
        **app_options: Any,
    ) -> None:
        self.app = create_app(client, **app_options)
        self._host, self._port = host, port
        self._log_level = log_level
        self._start_timeout = start_timeout
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._error: BaseException | None = None
        self.url = ""

    def start(self) -> BackgroundServer:
        if self._thread is not None:
            return self
        self._sock = listen(self._host, self._port)
        self.url = base_url(self._sock)
        self._server = _Server(self.app, log_level=self._log_level, quiet=True)
        self._thread = threading.Thread(
            target=self._run, name=f"gemma-local-server:{self.url}", daemon=True
        )
        self._thread.start()
        waited = 0.0
        while not self._server.started:
            if not self._thread.is_alive():
                self.close()
                raise RuntimeError(f"the server on {self.url} failed to start") from self._error
            if waited >= self._start_timeout:
                self.close()
                raise TimeoutError(f"the server on {self.url} did not start in {waited:.0f}s")
            self._thread.join(0.02)
            waited += 0.02
        return self

    def _run(self) -> None:
        assert self._server is not None and self._sock is not None
        try:
            self._server.run(sockets=[self._sock])
        except BaseException as exc:  # startup failures reach start()
            self._error = exc

    def close(self) -> None:
        """Stop serving (open streams get a few seconds, then are cancelled) and join the thread."""
        thread, self._thread = self._thread, None
        if self._server is not None:
            self._server.should_exit = True
        if thread is not None:
            thread.join()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
