"""A reference x402 peer in Python: the official SDK's resource server and its Starlette middleware
(``PaymentMiddlewareASGI``) in front of a tiny OpenAI-compatible ``/v1/chat/completions``, paid through the SDK's own
in-process facilitator (``x402Facilitator`` with the SDK's EVM ``exact`` and ``upto`` schemes) over `FakeChain`.

Routes (each an OpenAI base URL ``{url}/<route>/v1``):

- ``exact``: $0.001 exact (EIP-3009);
- ``upto``: an upto (Permit2) ceiling of $0.01; the handler settles what the model name says (``settle-1234`` -> 1234
  atomic units) through the SDK's ``Settlement-Overrides`` response header;
- ``pending``: $0.001 exact to a payee whose transfers never confirm (the SDK answers ``settlement_pending``);
- ``siwx``: $0.001 exact, declaring the SDK's ``sign-in-with-x`` extension (a wallet that paid before gets in on
  the sign-in proof alone).

The peer records every ``PAYMENT-SIGNATURE`` and ``sign-in-with-x`` header it receives (`Seen`), before the SDK sees
them, so a test can count the authorizations a client signed.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
import types
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import asdict, dataclass, field
from typing import Any

import uvicorn
from eth_account import Account
from eth_account.messages import encode_defunct
from fake_chain import NETWORK, FakeChain
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from x402 import x402Facilitator, x402ResourceServer
from x402.extensions.sign_in_with_x import (
    CreateSIWxResourceServerExtensionOptions,
    DeclareSIWxOptions,
    InMemorySIWxStorage,
    create_siwx_resource_server_extension,
    declare_siwx_extension,
)
from x402.extensions.sign_in_with_x.types import SIWxVerifyOptions
from x402.mechanisms.evm.exact import ExactEvmFacilitatorScheme, ExactEvmServerScheme
from x402.mechanisms.evm.upto import UptoEvmFacilitatorScheme, UptoEvmServerScheme

PAYEE = "0x" + "be" * 20
UNCONFIRMED_PAYEE = "0x" + "de" * 20

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


def _sdk_starlette_middleware() -> tuple[type, Callable[[Response, dict[str, Any]], None]]:
    """The SDK's ``PaymentMiddlewareASGI`` and ``set_settlement_overrides``, unchanged.

    The SDK ships them in ``x402.http.middleware.fastapi``, whose only FastAPI imports are Starlette's own classes
    re-exported (``fastapi.Request`` is ``starlette.requests.Request``, and so on). When FastAPI is not installed
    the module is imported with those names pointed at Starlette directly; the stand-in modules are removed again
    right after the import, so nothing else in the process sees a ``fastapi``.
    """
    shimmed: list[str] = []
    try:
        import fastapi  # noqa: F401
    except ImportError:
        from starlette import responses

        stand_in = types.ModuleType("fastapi")
        stand_in.Request = Request  # type: ignore[attr-defined]
        stand_in.Response = Response  # type: ignore[attr-defined]
        stand_in_responses = types.ModuleType("fastapi.responses")
        stand_in_responses.HTMLResponse = responses.HTMLResponse  # type: ignore[attr-defined]
        stand_in_responses.JSONResponse = responses.JSONResponse  # type: ignore[attr-defined]
        stand_in.responses = stand_in_responses  # type: ignore[attr-defined]
        sys.modules["fastapi"], sys.modules["fastapi.responses"] = stand_in, stand_in_responses
        shimmed = ["fastapi", "fastapi.responses"]
    try:
        from x402.http.middleware.fastapi import PaymentMiddlewareASGI, set_settlement_overrides
    finally:
        for name in shimmed:
            sys.modules.pop(name, None)
    return PaymentMiddlewareASGI, set_settlement_overrides


async def _eip191_verifier(*, address: str, message: str, signature: str) -> bool:
    """The SDK's ``SIWxVerifyOptions.evm_verifier`` hook, for EOAs: EIP-191 recovery.

    The SDK's default verifier calls the ``signinwithethereum`` package's API (``verify(uri=, chain_id=,
    strict=)``); llm402 pins the older ``siwe`` 4, whose ``verify`` takes none of those, so the default would refuse
    every proof. Message parsing and validation (domain, URI, nonce, times) stay the SDK's.
    """
    recovered = Account.recover_message(encode_defunct(text=message), signature=signature)
    return bool(recovered.lower() == address.lower())


def completion(model: str) -> dict[str, Any]:
    """A tiny fixed OpenAI chat completion, with usage."""
    return {
        "id": "chatcmpl-reference",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop", "logprobs": None}
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }


@dataclass
class Seen:
    """What reached the peer, per request, before the SDK looked at it."""

    path: str
    payment_signature: str | None
    sign_in_with_x: str | None
    status: int = 0
    payment_response: str | None = None
    payment_required: str | None = None


@dataclass
class PythonPeer:
    """The reference peer on ``127.0.0.1`` and a free port, served by uvicorn in a daemon thread."""

    chain: FakeChain = field(default_factory=FakeChain)
    requests: list[Seen] = field(default_factory=list)
    port: int = 0
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None
    _socket: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- the tests' view (reference_support.Peer) ------------------------------------------------------------
    def fund(self, address: str, amount: int = 5_000_000) -> None:
        self.chain.fund(address, amount)

    def balance(self, address: str) -> int:
        return self.chain.balance(address)

    def settlements(self, payer: str) -> list[dict[str, Any]]:
        return [asdict(s) for s in self.chain.settled_by(payer)]

    def seen(self, route: str) -> list[dict[str, Any]]:
        return [asdict(s) for s in self.requests if s.path.startswith(f"/{route}/")]

    def build_app(self) -> Starlette:
        payment_middleware, set_settlement_overrides = _sdk_starlette_middleware()
        self.chain.unconfirmed_payees.add(UNCONFIRMED_PAYEE.lower())

        facilitator = x402Facilitator()
        facilitator.register([NETWORK], ExactEvmFacilitatorScheme(self.chain))
        facilitator.register([NETWORK], UptoEvmFacilitatorScheme(self.chain))
        server = x402ResourceServer(facilitator)
        server.register(NETWORK, ExactEvmServerScheme())
        server.register(NETWORK, UptoEvmServerScheme())
        server.register_extension(
            create_siwx_resource_server_extension(
                CreateSIWxResourceServerExtensionOptions(
                    storage=InMemorySIWxStorage(),
                    origin=self.url,
                    verify_options=SIWxVerifyOptions(evm_verifier=_eip191_verifier),
                )
            )
        )

        def exact(pay_to: str) -> dict[str, Any]:
            return {"scheme": "exact", "payTo": pay_to, "price": "$0.001", "network": NETWORK}

        routes: dict[str, Any] = {
            "POST /exact/v1/chat/completions": {"accepts": exact(PAYEE), "description": "exact"},
            "POST /upto/v1/chat/completions": {
                "accepts": {"scheme": "upto", "payTo": PAYEE, "price": "$0.01", "network": NETWORK},
                "description": "upto",
            },
            "POST /pending/v1/chat/completions": {"accepts": exact(UNCONFIRMED_PAYEE), "description": "pending"},
            "POST /siwx/v1/chat/completions": {
                "accepts": exact(PAYEE),
                "description": "sign-in-with-x",
                "extensions": declare_siwx_extension(
                    DeclareSIWxOptions(network=NETWORK, statement="Sign in to the reference peer")
                ),
            },
        }

        async def chat(request: Request) -> Response:
            body = await request.json()
            model = str(body.get("model") or "reference")
            response = JSONResponse(completion(model))
            if model.startswith("settle-"):
                set_settlement_overrides(response, {"amount": model.removeprefix("settle-")})
            return response

        paths = [key.split(" ", 1)[1] for key in routes]
        return Starlette(
            routes=[Route(path, chat, methods=["POST"]) for path in paths],
            middleware=[Middleware(payment_middleware, routes=routes, server=server)],
        )

    def _recording(self, app: ASGIApp) -> ASGIApp:
        async def recorder(scope: Scope, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            entry = Seen(scope["path"], headers.get("payment-signature"), headers.get("sign-in-with-x"))
            self.requests.append(entry)

            async def sending(message: Any) -> None:
                if message["type"] == "http.response.start":
                    entry.status = int(message["status"])
                    answered = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in message["headers"]}
                    entry.payment_response = answered.get("payment-response")
                    entry.payment_required = answered.get("payment-required")
                await send(message)

            await app(scope, receive, sending)

        return recorder

    def start(self) -> PythonPeer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        sock.setblocking(False)
        self.port = int(sock.getsockname()[1])
        app = self._recording(self.build_app())
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", ws="none", http="h11")
        self._server = uvicorn.Server(config)
        self._socket = sock
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="x402-python-peer", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the Python reference peer did not start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None
