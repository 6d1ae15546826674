"""A scriptable hostile gateway: a real HTTP server on 127.0.0.1 whose answers a test writes as a function.

Each request is recorded (method, path, headers, body); the test's handler returns ``(status, headers, body)``, where
``body`` is bytes or an iterator of byte chunks (sent as they come, then the connection closes).
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ASSET = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"  # USDC on Base Sepolia (known to the x402 SDK)
PAYEE = "0x" + "ab" * 20
NETWORK = "eip155:84532"
PAYMENT_HEADERS = ("payment-signature", "x-payment")


@dataclass(frozen=True)
class Seen:
    """One request as the gateway received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def payment(self) -> str | None:
        return next((self.headers[h] for h in PAYMENT_HEADERS if h in self.headers), None)

    def json(self) -> Any:
        return json.loads(self.body or b"null")


Reply = tuple[int, dict[str, str], bytes | Iterable[bytes]]
Handler = Callable[[Seen], Reply]


@dataclass
class HostileGateway:
    """Start with ``with HostileGateway(handler) as gw:``; ``gw.url`` is ``http://127.0.0.1:<port>``."""

    handler: Handler
    seen: list[Seen] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> HostileGateway:
        outer = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args: object) -> None:
                pass

            def _any(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                request = Seen(
                    self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, self.rfile.read(length)
                )
                with outer._lock:
                    outer.seen.append(request)
                status, headers, body = outer.handler(request)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if isinstance(body, bytes):
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.end_headers()
                try:
                    for chunk in body:
                        self.wfile.write(chunk)
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_POST = do_DELETE = _any

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def payments(self, path: str | None = None) -> list[str]:
        """Every payment header received (on ``path`` when given), in order."""
        with self._lock:
            return [s.payment for s in self.seen if s.payment and (path is None or s.path == path)]

    def count(self, path: str) -> int:
        with self._lock:
            return sum(1 for s in self.seen if s.path == path)


def b64(data: object) -> str:
    return base64.b64encode(json.dumps(data).encode()).decode()


def accepts(amount: int, scheme: str = "exact", **extra: object) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "scheme": scheme,
        "network": NETWORK,
        "asset": ASSET,
        "amount": str(amount),
        "payTo": PAYEE,
        "maxTimeoutSeconds": 60,
        "extra": {"name": "USDC", "version": "2", **extra},
    }
    return entry


def challenge_v2(amount: int, url: str = "http://127.0.0.1/v1/chat/completions", **more: Any) -> dict[str, str]:
    """A 402's headers: x402 v2 ``PAYMENT-REQUIRED`` for one exact requirement."""
    body = {"x402Version": 2, "resource": {"url": url}, "accepts": [accepts(amount)], **more}
    return {"PAYMENT-REQUIRED": b64(body), "content-type": "application/json"}


def chat_answer(prompt: int = 10, completion: int = 5) -> bytes:
    return json.dumps(
        {
            "id": "c1",
            "object": "chat.completion",
            "created": 0,
            "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        }
    ).encode()


def settlement(payer: str, amount: int | None = None, **more: Any) -> str:
    report: dict[str, Any] = {"success": True, "transaction": "0x" + "77" * 32, "network": NETWORK, "payer": payer}
    if amount is not None:
        report["amount"] = str(amount)
    report.update(more)
    return b64(report)


def stream_chunks(chunks: Iterator[bytes]) -> Iterator[bytes]:
    yield from chunks
