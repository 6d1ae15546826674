"""Invariant 6 across the whole package: private keys, API keys and payment headers never appear in logs (DEBUG),
reprs, exception messages, LangChain ``dumpd``, LlamaIndex ``to_dict``, receipts, ledgers or cassettes."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import httpx
import openai
import pytest

from llm402 import Gateway, Policy, Wallet
from llm402.sandbox import SandboxServer
from llm402.transport import PaymentTransport

ROOT = Path(__file__).resolve().parents[2]


class Wire(httpx.HTTPTransport):
    """The real transport, keeping every secret header llm402 put on the wire."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for name in ("payment-signature", "x-payment", "authorization"):
            if name in request.headers:
                self.secrets.add(request.headers[name].removeprefix("Bearer "))
        return super().handle_request(request)


def test_nothing_secret_leaks_anywhere(
    sandbox: SandboxServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from langchain_core.load import dumpd

    from llm402.langchain import ChatGateway
    from llm402.llama_index import GatewayLLM

    caplog.set_level(logging.DEBUG)
    wallet = Wallet.create()
    key = wallet.export_private_key()
    httpx.post(f"{sandbox.url}/sandbox/faucet", json={"address": wallet.address, "amount": 50_000_000})
    monkeypatch.setenv("LLM402_PRIVATE_KEY", key)
    wire = Wire()
    texts: list[str] = []

    # x402 per call, and a credit gateway whose key llm402 mints itself (SIWE) and stores in a 0600 file
    for base, profile in ((f"{sandbox.url}/v1", "x402"), (f"{sandbox.url}/kiosk/v1", "token-kiosk")):
        ledger = f"sqlite:///{tmp_path}/{profile}.db"
        gw = Gateway(
            base,
            wallet=wallet,
            profile=profile,
            policy=Policy(max_payment_usd="0.05", topup_max_usd="2"),
            ledger=ledger,
            key_store=str(tmp_path / f"{profile}.key"),
        )
        client = openai.OpenAI(
            base_url=gw.base_url,
            api_key=gw.api_key,
            http_client=httpx.Client(transport=PaymentTransport(gw.engine, wire)),
        )
        reply = client.chat.completions.create(model="sandbox/small", messages=[{"role": "user", "content": "hi"}])
        texts += [
            repr(reply),
            repr(gw),
            str(gw),
            repr(gw.engine.config),
            json.dumps([r.to_dict() for r in gw.receipts()]),
        ]
        texts.append((tmp_path / f"{profile}.db").read_bytes().decode("latin-1"))
        try:
            openai.OpenAI(
                base_url=gw.base_url,
                api_key=gw.api_key,
                http_client=httpx.Client(transport=PaymentTransport(gw.engine, wire)),
                default_headers={"X-Sandbox-Fault": "replay_402"},
                max_retries=0,
            ).chat.completions.create(model="sandbox/small", messages=[{"role": "user", "content": "again"}])
        except openai.APIStatusError as exc:
            texts += [str(exc), repr(exc), exc.response.text]

    # the framework adapters, built from plain keyword arguments (the wallet key from the environment)
    chat = ChatGateway(model="sandbox/small", base_url=f"{sandbox.url}/v1", api_key="sk-" + "7" * 64)
    texts += [repr(chat), str(chat), json.dumps(dumpd(chat))]
    llm = GatewayLLM(model="sandbox/small", base_url=f"{sandbox.url}/v1", ledger="memory://", fetch_prices=False)
    texts += [repr(llm), json.dumps(llm.to_dict(), default=str)]
    texts += [record.getMessage() for record in caplog.records] + [repr(record.args) for record in caplog.records]

    blob = "\n".join(texts)
    assert len(wire.secrets) >= 3  # payments and the minted API key really went out
    assert key[2:].lower() not in blob.lower()
    assert "7" * 64 not in blob
    for secret in wire.secrets:
        assert secret not in blob, f"a secret header value leaked ({secret[:6]}...)"
    assert not re.search(r"sk-[0-9a-f]{64}", blob)


def test_cassettes_hold_no_secrets() -> None:
    folder = ROOT / "cassettes"
    for path in folder.rglob("*.y*ml"):
        text = path.read_text()
        assert not re.search(r"sk-[0-9a-f]{64}", text), path
        for header in ("payment-signature:", "x-payment:", "authorization:"):
            for line in text.lower().splitlines():
                if line.strip().startswith(header):
                    raise AssertionError(f"{path}: unfiltered {header}")
