"""A gateway cannot stop the router's fallback by dressing its answer up as llm402's own refusal.

The hostile gateway is a real HTTP server on 127.0.0.1 that answers every request with the llm402 refusal envelope
and header (a ``budget_exceeded`` naming a cap every route shares). Only a refusal llm402 made locally may skip routes
or end the call; a gateway's 402, whatever it says, is a gateway failure, and the honest route behind it answers.
"""

from __future__ import annotations

import collections
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from router_support import MESSAGES, Sandbox, tried

from llm402 import Gateway, Policy, Wallet
from llm402.budget import Ledger
from llm402.errors import REFUSAL_HEADER
from llm402.router import ROUTE_HEADER, FallbackRules, Route, Router

Start = Callable[..., list[Sandbox]]
MakeGateway = Callable[..., Gateway]

FORGED = {
    "error": {
        "code": "budget_exceeded",
        "type": "llm402_refusal",
        "message": "the global cap is reached",
        "cap_name": "global",  # the cap every route of a shared ledger books into, for any agent
        "cap": None,
        "requested": 0,  # "even the cheapest route is over it"
    }
}


class HostileGateway:
    """Answers every request with a forged llm402 refusal (402, the envelope, ``x-llm402-refusal`` and
    ``llm402-refusal``), and counts the requests that reached it per path."""

    def __init__(self) -> None:
        self.requests: collections.Counter[str] = collections.Counter()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                owner.requests[self.path] += 1
                self.rfile.read(int(self.headers.get("content-length") or 0))
                body = json.dumps(FORGED).encode()
                self.send_response(402)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.send_header(REFUSAL_HEADER, "budget_exceeded")
                self.send_header("llm402-refusal", "budget_exceeded")
                self.send_header("x-should-retry", "false")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def calls(self) -> int:
        return self.requests["/v1/chat/completions"]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


@pytest.fixture
def hostile() -> Iterator[HostileGateway]:
    server = HostileGateway()
    yield server
    server.stop()


def routes(hostile: HostileGateway, honest: Gateway, wallet: Wallet, ledger: Ledger) -> list[Route]:
    """The hostile gateway first, booking into the same ledger for the same agent as the honest one behind it."""
    forger = Gateway(hostile.base_url, wallet=wallet, policy=Policy(max_payment_usd="0.05"), ledger=ledger)
    return [Route(forger, "sandbox/small", name="hostile"), Route(honest, "sandbox/small", name="honest")]


def post(client: httpx.Client, router: Router) -> httpx.Response:
    return client.post(f"{router.base_url}/chat/completions", json={"model": "x", "messages": MESSAGES})


def test_a_forged_budget_refusal_does_not_skip_the_honest_route(
    start: Start, gateway: MakeGateway, hostile: HostileGateway, wallet: Wallet, ledger: Ledger
) -> None:
    (b,) = start("")
    router = Router(routes(hostile, gateway(b), wallet, ledger))
    with router.http_client() as client:
        response = post(client, router)
    assert response.status_code == 200, response.text
    assert response.headers[ROUTE_HEADER] == "honest"
    receipt = router.last_receipt
    assert receipt is not None and receipt.route == "honest"
    assert [(x["route"], x["status"], x["error"]) for x in receipt.attempts] == [
        ("hostile", 402, "http_402"),  # a gateway failure, not a refusal: no cap was blocked by it
        ("honest", 200, None),
    ]
    assert hostile.calls() == 1
    assert b.requests() == 2, "the honest 402 challenge and its paid replay"
    assert b.charged(wallet.address) == receipt.cost > 0


def test_a_forged_refusal_is_not_final_even_when_refusals_do_not_fall_back(
    start: Start, gateway: MakeGateway, hostile: HostileGateway, wallet: Wallet, ledger: Ledger
) -> None:
    """With local ``budget_exceeded`` refusals configured as final, a gateway saying it still cannot end the call."""
    (b,) = start("")
    rules = FallbackRules(refusals=frozenset({"payment_over_ticket"}))
    router = Router(routes(hostile, gateway(b), wallet, ledger), fallback=rules)
    with router.http_client() as client:
        response = post(client, router)
    assert response.status_code == 200, response.text
    assert response.headers[ROUTE_HEADER] == "honest"
    assert hostile.calls() == 1 and b.requests() == 2


async def test_async_a_forged_budget_refusal_does_not_skip_the_honest_route(
    start: Start, gateway: MakeGateway, hostile: HostileGateway, wallet: Wallet, ledger: Ledger
) -> None:
    (b,) = start("")
    router = Router(routes(hostile, gateway(b), wallet, ledger))
    async with router.async_http_client() as client:
        body = {"model": "x", "messages": MESSAGES}
        response = await client.post(f"{router.base_url}/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.headers[ROUTE_HEADER] == "honest"
    receipt = router.last_receipt
    assert receipt is not None and [(x["route"], x["error"]) for x in tried(receipt)] == [
        ("hostile", "http_402"),
        ("honest", None),
    ]
    assert hostile.calls() == 1
