"""Router test kit: sandboxes that count the requests they receive, and what each says about a wallet."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from typing import Any

import httpx

from llm402.sandbox import SandboxConfig, SandboxServer
from llm402.sandbox import server as sandbox_server

FUNDS = 5_000_000  # $5 of sandbox test USDC
CHAT_PATH = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Explain x402 in one line"}]


class CountingApp:
    """The sandbox's ASGI app, counting the HTTP requests that reach it (per path): "no traffic" made measurable."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.state = app.state
        self.requests: collections.Counter[str] = collections.Counter()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.requests[scope["path"]] += 1
        await self.app(scope, receive, send)


class Sandbox:
    """A sandbox of its own (own store, own fault book) and the independent view of what it saw and charged."""

    def __init__(self, faults: str = "") -> None:
        self.counter: CountingApp | None = None
        create = sandbox_server.create_app

        def counting(config: SandboxConfig) -> Any:
            self.counter = CountingApp(create(config))
            return self.counter

        sandbox_server.create_app = counting  # type: ignore[assignment]
        try:
            self.server = SandboxServer(SandboxConfig(db_path=":memory:", faults=faults)).start()
        finally:
            sandbox_server.create_app = create
        self.url = self.server.url
        self.base_url = f"{self.url}/v1"

    def requests(self, path: str = CHAT_PATH) -> int:
        assert self.counter is not None
        return self.counter.requests[path]

    def fund(self, address: str, amount: int = FUNDS) -> None:
        httpx.post(f"{self.url}/sandbox/faucet", json={"address": address, "amount": amount}).raise_for_status()

    def charged(self, address: str) -> int:
        """What this sandbox took from the wallet (its own test-USDC ledger)."""
        return FUNDS - int(httpx.get(f"{self.url}/sandbox/balance/{address}").json()["balance"])

    def stats(self, payer: str) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(f"{self.url}/sandbox/stats", params={"payer": payer}).json()
        return data

    def stop(self) -> None:
        self.server.stop()


@contextlib.contextmanager
def sandboxes(*faults: str) -> Iterator[list[Sandbox]]:
    started: list[Sandbox] = []
    try:
        for spec in faults:
            started.append(Sandbox(spec))
        yield started
    finally:
        for sandbox in started:
            sandbox.stop()


def tried(receipt: Any) -> list[dict[str, Any]]:
    """The attempts of a router receipt that sent traffic (skips left out)."""
    return [a for a in receipt.attempts if not a.get("skipped")]
