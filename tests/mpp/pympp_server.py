"""pympp's own server (from PyPI) on 127.0.0.1: an OpenAI-compatible chat endpoint behind ``evm/charge``.

Two routes: ``/mpp/v1`` offers MPP alone (the method's x402 side switched off) and ``/dual/v1`` is pympp's default,
dual-rail (MPP and x402 ``exact`` with mppx's route binding). Settlement goes through a hook that verifies the
EIP-3009 signature itself (eth-account's typed-data recovery, independent of pympp's and llm402's code), refuses a
reused nonce and keeps its own books: what the tests compare llm402's receipts with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn
from eth_account import Account
from eth_account.messages import encode_typed_data
from mpp.methods.evm import BASE_SEPOLIA_USDC
from mpp.methods.evm import server as evm
from mpp.server import Mpp
from mpp.server import Request as MppRequest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

PAYEE = "0x26048d144cf2D32a966DaC5D7C331588f1062dd3"
PRICE = "0.002"  # USDC per call: 2000 base units
PRICE_ATOMIC = 2000


class Books:
    """What the settle hook saw and settled."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.settled: list[dict[str, Any]] = []
        self.nonces: set[str] = set()
        self.credentials: list[tuple[str, str, str]] = []
        """(path, header, value) of every request that carried a payment credential."""
        self.accept_payment: list[str | None] = []
        """The ``Accept-Payment`` of every request without a credential."""
        self.authorizations: list[str | None] = []
        """The ``Authorization`` of every paid request (what the caller's own credential became)."""

    def settle(self, authorization: Any) -> str:
        payload = authorization.payload
        request = authorization.request
        domain = {
            "name": BASE_SEPOLIA_USDC.name,
            "version": BASE_SEPOLIA_USDC.version,
            "chainId": request["methodDetails"]["chainId"],
            "verifyingContract": request["currency"],
        }
        message = {
            "from": payload["from"],
            "to": payload["to"],
            "value": int(payload["value"]),
            "validAfter": int(payload["validAfter"]),
            "validBefore": int(payload["validBefore"]),
            "nonce": bytes.fromhex(payload["nonce"][2:]),
        }
        types = {
            "TransferWithAuthorization": [
                {"name": "from", "type": "address"},
                {"name": "to", "type": "address"},
                {"name": "value", "type": "uint256"},
                {"name": "validAfter", "type": "uint256"},
                {"name": "validBefore", "type": "uint256"},
                {"name": "nonce", "type": "bytes32"},
            ]
        }
        signable = encode_typed_data(domain_data=domain, message_types=types, message_data=message)
        signer = Account.recover_message(signable, signature=payload["signature"])
        if signer.lower() != payload["from"].lower():
            raise ValueError("the signature does not recover to the payer")
        if payload["to"].lower() != request["recipient"].lower() or payload["value"] != request["amount"]:
            raise ValueError("the authorization does not pay the charge")
        with self.lock:
            key = f"{payload['from'].lower()}:{payload['nonce'].lower()}"
            if key in self.nonces:
                raise ValueError("nonce already used")
            self.nonces.add(key)
            reference = "0x" + hashlib.sha256(key.encode()).hexdigest()
            self.settled.append(
                {
                    "payer": payload["from"],
                    "amount": int(payload["value"]),
                    "nonce": payload["nonce"],
                    "reference": reference,
                }
            )
        return reference

    def of(self, payer: str) -> list[dict[str, Any]]:
        with self.lock:
            return [s for s in self.settled if s["payer"].lower() == payer.lower()]


def _completion(model: str, stream: bool) -> Any:
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    if not stream:
        return {
            "id": "chatcmpl-pympp",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi there"}, "finish_reason": "stop"}],
            "usage": usage,
        }

    def events() -> Iterator[bytes]:
        base = {"id": "chatcmpl-pympp", "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
        for piece in ("hi", " there"):
            chunk = {**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
            yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
        yield (
            b"data: "
            + json.dumps({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}).encode()
            + b"\n\n"
        )
        yield b"data: " + json.dumps({**base, "choices": [], "usage": usage}).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    return events()


def create_app(books: Books, *, requires_auth: bool = False) -> Starlette:
    dual = evm.charge(currency=BASE_SEPOLIA_USDC, recipient=PAYEE, settle=books.settle)
    alone = dataclasses.replace(dual, x402=None)
    servers = {
        "mpp": Mpp(methods=alone, realm="pympp.test", secret_key="pympp-test-secret", requires_auth=requires_auth),
        "dual": Mpp(methods=dual, realm="pympp.test", secret_key="pympp-test-secret", requires_auth=requires_auth),
    }

    def endpoint(mount: str) -> Any:
        handler = servers[mount].charge(amount=PRICE)

        async def chat(request: Request) -> Response:
            body = await request.body()
            paid = False
            for name in ("authorization", "payment-authorization", "payment-signature"):
                value = request.headers.get(name)
                if value and (name == "payment-signature" or value.lower().startswith("payment ")):
                    paid = True
                    with books.lock:
                        books.credentials.append((request.url.path, name, value))
            if not paid:
                with books.lock:
                    books.accept_payment.append(request.headers.get("accept-payment"))
            result = await handler(MppRequest(request.method, str(request.url), list(request.headers.items()), body))
            if result.status != 200:
                challenge = result.challenge
                response = Response(challenge.body or b"", challenge.status)
                response.raw_headers = [
                    (k.lower().encode("latin-1"), v.encode("latin-1"))
                    for k, v in challenge.headers.multi_items()
                    if k.lower() != "content-length"
                ] + [(b"content-length", str(len(challenge.body or b"")).encode())]
                return response
            with books.lock:
                books.authorizations.append(request.headers.get("authorization"))
            if request.headers.get("x-test-fail-after-settle"):  # settled, then the answer is lost
                return JSONResponse({"error": "failed after settlement"}, status_code=500)
            data = json.loads(body)
            answer = _completion(data.get("model", "pympp/small"), bool(data.get("stream")))
            if isinstance(answer, dict):
                return result.with_receipt(JSONResponse(answer))
            return result.with_receipt(StreamingResponse(answer, media_type="text/event-stream"))

        return chat

    return Starlette(
        routes=[
            Route("/mpp/v1/chat/completions", endpoint("mpp"), methods=["POST"]),
            Route("/dual/v1/chat/completions", endpoint("dual"), methods=["POST"]),
        ]
    )


class PymppServer:
    """uvicorn in a daemon thread on a free port of 127.0.0.1."""

    def __init__(self, *, requires_auth: bool = False) -> None:
        self.books = Books()
        self.app = create_app(self.books, requires_auth=requires_auth)
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> PymppServer:
        import socket

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the pympp server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.server is not None and self.thread is not None
        self.server.should_exit = True
        self.thread.join(timeout=10)
