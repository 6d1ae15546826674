"""Running the sandbox: `SandboxServer` (uvicorn in a background thread, for tests and demos) and `serve` (the CLI)."""

from __future__ import annotations

import socket
import sys
import threading
import time
from dataclasses import replace
from types import TracebackType
from typing import TextIO

import uvicorn

from .app import create_app
from .config import SandboxConfig

START_TIMEOUT_SECONDS = 10.0


KEEP_ALIVE_SECONDS = 75
"""How long an idle connection stays open: longer than clients keep pooled ones (httpx: 5 s), so the server never
closes a connection just as a client sends a request on it (a POST would then fail without a retry)."""


def _bind(host: str, port: int) -> socket.socket:
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets that say so, and without it every
    # response (headers and body are two writes) waits ~40 ms for a delayed ACK.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.setblocking(False)
    return sock


class SandboxServer:
    """The sandbox on ``127.0.0.1`` and a free port, served by uvicorn in a daemon thread.

    >>> with SandboxServer(SandboxConfig(db_path=":memory:")) as sb:  # doctest: +SKIP
    ...     httpx.get(f"{sb.url}/health")
    """

    def __init__(self, config: SandboxConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config = config or SandboxConfig()
        self.host = host
        self._requested_port = port
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (no trailing slash)."""
        if not self.port:
            raise RuntimeError("the sandbox is not running")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> SandboxServer:
        """Bind, start serving, and return once requests are accepted."""
        if self._thread is not None:
            return self
        app = create_app(self.config)
        try:
            sock = _bind(self.host, self._requested_port)
        except OSError:
            app.state.sandbox.store.close()
            raise
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="on",
            ws="none",
            http="h11",
            loop="asyncio",
            timeout_graceful_shutdown=1,
            timeout_keep_alive=KEEP_ALIVE_SECONDS,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="llm402-sandbox", daemon=True)
        self._server, self._thread, self._socket = server, thread, sock
        thread.start()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the sandbox did not start")
            time.sleep(0.002)
        return self

    def stop(self) -> None:
        """Stop serving and wait for the thread (idempotent)."""
        server, thread, sock = self._server, self._thread, self._socket
        self._server = self._thread = self._socket = None
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(timeout=START_TIMEOUT_SECONDS)
            if thread.is_alive() and server is not None:
                server.force_exit = True
                thread.join(timeout=START_TIMEOUT_SECONDS)
        if sock is not None:
            sock.close()
        self.port = 0

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.url if self.port else "stopped"
        return f"SandboxServer({where}, db={self.config.db_path!r}, dialect={self.config.default_dialect})"


def banner(url: str, config: SandboxConfig) -> str:
    """What `serve` prints: where it listens, and a curl line that shows a 402."""
    body = '{"model":"sandbox/small","messages":[{"role":"user","content":"Hello"}],"max_tokens":16}'
    return (
        f"llm402 sandbox listening on {url}  (dialect {config.default_dialect}, db {config.db_path}, "
        f"network {config.network}, payee {config.payee})\n"
        f"  try: curl -i {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'\n"
        f"  fund a wallet: curl {url}/sandbox/faucet -H 'Content-Type: application/json' "
        '-d \'{"address":"0xYourAddress","amount":5000000}\'\n'
    )


def serve(
    host: str = "127.0.0.1",
    port: int = 8402,
    db_path: str | None = None,
    config: SandboxConfig | None = None,
    *,
    out: TextIO | None = None,
) -> None:
    """Run the sandbox in the foreground until interrupted (Ctrl-C)."""
    cfg = config or SandboxConfig()
    if db_path is not None:
        cfg = replace(cfg, db_path=db_path)
    sock = _bind(host, port)
    bound = int(sock.getsockname()[1])
    shown = f"[{host}]" if ":" in host else host
    stream = out or sys.stdout
    stream.write(banner(f"http://{shown}:{bound}", cfg))
    stream.flush()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(cfg),
            log_level="info",
            ws="none",
            http="h11",
            lifespan="on",
            timeout_keep_alive=KEEP_ALIVE_SECONDS,
        )
    )
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
