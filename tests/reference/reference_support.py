"""The x402 reference implementations as counterparties: how the tests reach each peer, and the scenarios every peer
must pass through an unchanged ``openai.OpenAI`` on an llm402 client.

A peer is the official SDK's server middleware with the SDK's own facilitator in-process over a fake chain (in-memory
balances and nonces, fake transaction hashes; signature verification is the SDK's). Both peers serve the same routes
(see ``python_peer.py`` and ``node/server.mjs``): ``exact``, ``upto``, ``pending`` and ``siwx``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import openai
import pytest
from eth_account import Account

from llm402 import Gateway, Policy, Wallet
from llm402.approval import Approval, PaymentProposal
from llm402.errors import PaymentRequiredError
from llm402.openai import typed_error

FUNDS = 5_000_000  # $5 of the peer's test USDC
EXACT_PRICE = 1_000  # $0.001, what the exact, pending and siwx routes ask
UPTO_CEILING = 10_000  # $0.01, the upto route's ceiling
MESSAGES = [{"role": "user", "content": "Say ok"}]
NODE_DIR = Path(__file__).parent / "node"


class Peer(Protocol):
    """What a test needs from a reference peer."""

    url: str

    def fund(self, address: str, amount: int = FUNDS) -> None: ...

    def balance(self, address: str) -> int: ...

    def settlements(self, payer: str) -> list[dict[str, Any]]:
        """What the fake chain executed for ``payer``: ``scheme, payer, payee, amount, transaction, confirmed``."""
        ...

    def seen(self, route: str) -> list[dict[str, Any]]:
        """Requests that reached ``/<route>/`` and what they got: ``payment_signature, sign_in_with_x, status,
        payment_response, payment_required`` (the x402 headers as received and sent, base64)."""
        ...


# --- helpers ------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def decode_header(value: str | None) -> dict[str, Any]:
    """An x402 v2 header (base64 JSON) as a dict."""
    assert value, "the header is missing"
    data: dict[str, Any] = json.loads(base64.b64decode(value))
    return data


def gateway(peer: Peer, route: str, wallet: Any, **kw: Any) -> Gateway:
    kw.setdefault("policy", Policy(max_payment_usd="0.05"))
    return Gateway(f"{peer.url}/{route}/v1", wallet=wallet, ledger="memory://", **kw)


def client(gw: Gateway, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=gw.api_key, http_client=gw.http_client(), **kw)


def chat(gw: Gateway, model: str = "reference", **kw: Any) -> Any:
    return client(gw, **kw).chat.completions.create(model=model, messages=MESSAGES)  # type: ignore[arg-type]


def counted(gw: Gateway) -> int:
    """What llm402's ledger counts for the gateway's agent today (spent plus still reserved)."""
    totals = gw.ledger.totals(gw.agent, time.strftime("%Y-%m-%d", time.gmtime()))
    return int(totals.day_spent + totals.day_reserved)


def spent(gw: Gateway) -> int:
    """What llm402's ledger counts as spent for the gateway's agent today (an authorization the gateway refused may
    stay reserved as exposure until it expires: llm402 cannot know it will never settle)."""
    return int(gw.ledger.totals(gw.agent, time.strftime("%Y-%m-%d", time.gmtime())).day_spent)


def funded_wallet(peer: Peer) -> Wallet:
    wallet = Wallet.create()
    peer.fund(wallet.address)
    return wallet


def paid_signatures(peer: Peer, route: str) -> list[str]:
    return [s["payment_signature"] for s in peer.seen(route) if s["payment_signature"]]


@dataclass
class ForgedSigner:
    """Claims ``victim``'s address but signs with another key: what a forger holding no key of the victim sends."""

    victim: str
    key: Any

    @property
    def address(self) -> str:
        return self.victim

    def sign_typed_data(self, domain: Any, types: dict[str, Any], primary_type: str, message: dict[str, Any]) -> bytes:
        return Wallet.from_key(self.key.key).sign_typed_data(domain, types, primary_type, message)

    def sign_message(self, message: str) -> bytes:
        return Wallet.from_key(self.key.key).sign_message(message)


# --- the Node peer --------------------------------------------------------------------------------------------------


def require_tool(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(
            f"`{tool}` is not installed: the @x402/express reference tests need Node.js 20+ and npm "
            "(apt-get install nodejs npm); they never skip"
        )
    return path


def install_node_modules() -> float:
    """``npm ci`` into tests/reference/node/node_modules from the committed lock file, unless it is already there.
    Returns the seconds it took (0 when nothing was installed)."""
    node, npm = require_tool("node"), require_tool("npm")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    if not version.startswith("v") or int(version[1:].split(".")[0]) < 20:
        pytest.fail(f"the @x402/express reference tests need Node.js 20 or later, found {version or 'nothing'}")
    installed = NODE_DIR / "node_modules" / ".package-lock.json"
    lock = NODE_DIR / "package-lock.json"
    if installed.exists() and installed.stat().st_mtime >= lock.stat().st_mtime:
        return 0.0
    started = time.monotonic()
    result = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error"],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "npm_config_update_notifier": "false"},
    )
    if result.returncode != 0:
        pytest.fail(f"npm ci failed in {NODE_DIR} (exit {result.returncode}):\n{result.stdout}\n{result.stderr}")
    return time.monotonic() - started


class NodePeer:
    """``node server.mjs <port>`` (@x402/express) as a child process on 127.0.0.1; its state read over HTTP."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("w")
        self._proc = subprocess.Popen(
            [require_tool("node"), "server.mjs", str(self.port)],
            cwd=NODE_DIR,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._http = httpx.Client(base_url=self.url, timeout=10)
        deadline = time.monotonic() + 30
        while True:
            try:
                if self._http.get("/_peer/seen").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the @x402/express peer did not start on port {self.port}:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        self._http.close()
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()

    def fund(self, address: str, amount: int = FUNDS) -> None:
        self._http.post("/_peer/fund", json={"address": address, "amount": str(amount)}).raise_for_status()

    def balance(self, address: str) -> int:
        return int(self._http.get("/_peer/state", params={"payer": address}).json()["balance"])

    def settlements(self, payer: str) -> list[dict[str, Any]]:
        found = self._http.get("/_peer/state", params={"payer": payer}).json()["settlements"]
        return [{**s, "amount": int(s["amount"])} for s in found]

    def seen(self, route: str) -> list[dict[str, Any]]:
        return [
            {
                "payment_signature": s["paymentSignature"],
                "sign_in_with_x": s["signInWithX"],
                "status": s["status"],
                "payment_response": s["paymentResponse"],
                "payment_required": s["paymentRequired"],
            }
            for s in self._http.get("/_peer/seen").json()
            if s["path"].startswith(f"/{route}/")
        ]


# --- the scenarios every peer must pass ------------------------------------------------------------------------------


def exact_pays_once_and_counts_what_settled(peer: Peer) -> None:
    wallet = funded_wallet(peer)
    gw = gateway(peer, "exact", wallet)
    before = len(paid_signatures(peer, "exact"))
    reply = chat(gw)
    assert reply.choices[0].message.content == "ok"
    [settled] = peer.settlements(wallet.address)
    assert settled["scheme"] == "exact" and settled["amount"] == EXACT_PRICE and settled["confirmed"]
    assert len(paid_signatures(peer, "exact")) == before + 1, "one authorization signed and sent"
    receipt = gw.last_receipt
    assert receipt is not None and receipt.payment is not None
    assert receipt.cost == settled["amount"] == FUNDS - peer.balance(wallet.address)
    assert receipt.payment.transaction == settled["transaction"] and receipt.payment.settled
    assert counted(gw) == EXACT_PRICE


def replayed_authorization_is_refused(peer: Peer) -> None:
    wallet = funded_wallet(peer)
    chat(gateway(peer, "exact", wallet))
    captured = paid_signatures(peer, "exact")[-1]
    assert decode_header(captured)["payload"]["authorization"]["from"] == wallet.address

    # the reference itself refuses the same authorization a second time (the nonce is spent)
    raw = httpx.post(
        f"{peer.url}/exact/v1/chat/completions",
        json={"model": "reference", "messages": MESSAGES},
        headers={"PAYMENT-SIGNATURE": captured},
    )
    assert raw.status_code == 402
    assert "nonce" in str(decode_header(raw.headers.get("payment-required")).get("error")), raw.headers

    # ... and so through llm402, replaying it as a payment made elsewhere: typed, counted as nothing
    def replay(proposal: PaymentProposal) -> Approval:
        return Approval.external(captured)

    gw = gateway(peer, "exact", wallet, approver=replay)
    with pytest.raises(openai.APIStatusError) as info:
        chat(gw)
    error = typed_error(info.value)
    assert isinstance(error, PaymentRequiredError), error
    assert "nonce" in str(error), f"the peer's reason must reach the caller: {error}"
    assert len(peer.settlements(wallet.address)) == 1, "nothing moved a second time"
    assert peer.balance(wallet.address) == FUNDS - EXACT_PRICE


def forged_signature_is_refused(peer: Peer) -> None:
    victim = funded_wallet(peer)
    forger = ForgedSigner(victim.address, Account.create())
    gw = gateway(peer, "exact", forger)
    with pytest.raises(openai.APIStatusError) as info:
        chat(gw)
    error = typed_error(info.value)
    assert isinstance(error, PaymentRequiredError) and error.code == "payment_rejected", error
    assert "signature" in str(error), "the peer's reason reaches the caller"
    [answered] = [s for s in peer.seen("exact") if s["payment_signature"]][-1:]
    forged = decode_header(answered["payment_signature"])
    assert forged["payload"]["authorization"]["from"] == victim.address
    refusal = decode_header(answered["payment_required"])
    assert answered["status"] == 402 and "signature" in str(refusal.get("error")), refusal.get("error")
    assert peer.settlements(victim.address) == [] and peer.balance(victim.address) == FUNDS
    assert gw.last_receipt is not None and gw.last_receipt.cost == 0 and spent(gw) == 0


def upto_settles_the_override(peer: Peer, amount: int = 1_234) -> None:
    wallet = funded_wallet(peer)
    gw = gateway(peer, "upto", wallet)
    raw = client(gw).chat.completions.with_raw_response.create(model=f"settle-{amount}", messages=MESSAGES)  # type: ignore[arg-type]
    report = decode_header(raw.headers.get("payment-response"))
    assert report["success"] is True and int(report["amount"]) == amount
    [settled] = peer.settlements(wallet.address)
    assert settled["scheme"] == "upto" and settled["amount"] == amount
    receipt = gw.last_receipt
    assert receipt is not None and receipt.payment is not None and receipt.payment.scheme == "upto"
    assert receipt.payment.amount == UPTO_CEILING, "the ceiling signed"
    assert receipt.cost == receipt.payment.settled_amount == amount == FUNDS - peer.balance(wallet.address)
    assert receipt.payment.transaction == settled["transaction"]
    assert raw.headers["llm402-cost"] == str(amount)
    assert counted(gw) == amount, "the ledger keeps what moved, not the ceiling"


def upto_zero_settlement_counts_nothing(peer: Peer) -> None:
    wallet = funded_wallet(peer)
    gw = gateway(peer, "upto", wallet)
    raw = client(gw).chat.completions.with_raw_response.create(model="settle-0", messages=MESSAGES)  # type: ignore[arg-type]
    assert raw.parse().choices[0].message.content == "ok"
    [answered] = [s for s in peer.seen("upto") if s["payment_signature"]][-1:]
    report = decode_header(answered["payment_response"])
    assert report["success"] is True and report["transaction"] == "" and str(report["amount"]) == "0", report
    assert peer.settlements(wallet.address) == [] and peer.balance(wallet.address) == FUNDS
    receipt = gw.last_receipt
    assert receipt is not None and receipt.payment is not None and receipt.error is None
    problems = []
    if not (receipt.payment.settled and receipt.payment.settled_amount == 0):
        problems.append(f"the zero settlement is not read as one: {receipt.payment}")
    if receipt.cost != 0 or counted(gw) != 0:
        problems.append(f"a legal settlement of nothing counts {receipt.cost} (ledger {counted(gw)}), not 0")
    assert not problems, "; ".join(problems)


def settlement_pending_counts_the_payment(peer: Peer) -> None:
    wallet = funded_wallet(peer)
    gw = gateway(peer, "pending", wallet)
    with pytest.raises(openai.APIStatusError) as info:
        chat(gw, max_retries=0)
    [settled] = peer.settlements(wallet.address)
    assert settled["amount"] == EXACT_PRICE and not settled["confirmed"], "the transfer was sent; money moved"
    paid = [s for s in peer.seen("pending") if s["payment_signature"]]
    assert len(paid) == 1 and paid[0]["status"] == 402
    report = decode_header(paid[0]["payment_response"])
    assert report["success"] is False and report["errorReason"] == "settlement_pending", report
    assert report["transaction"] == settled["transaction"]

    error = typed_error(info.value)
    assert isinstance(error, PaymentRequiredError), error
    receipt = gw.last_receipt
    assert receipt is not None and receipt.payment is not None
    assert FUNDS - peer.balance(wallet.address) == EXACT_PRICE
    problems = []
    if "settlement_pending" not in str(error):
        problems.append(f"the peer's errorReason does not reach the caller: {error}")
    if receipt.cost != EXACT_PRICE or spent(gw) != EXACT_PRICE:
        problems.append(f"the pending settlement counts {receipt.cost} (ledger spent {spent(gw)}), not {EXACT_PRICE}")
    assert not problems, "; ".join(problems)


def sign_in_with_x_pays_at_most_once(peer: Peer) -> None:
    wallet = funded_wallet(peer)
    gw = gateway(peer, "siwx", wallet)
    for _ in range(3):
        assert chat(gw).choices[0].message.content == "ok"
    mine = [
        s
        for s in peer.seen("siwx")
        if s["payment_signature"]
        and decode_header(s["payment_signature"])["payload"]["authorization"]["from"] == wallet.address
    ]
    assert len(mine) <= 1, f"llm402 signed {len(mine)} authorizations over 3 calls; the proof alone gets in"
    assert [s["amount"] for s in peer.settlements(wallet.address)] == [EXACT_PRICE]
    assert sum(r.cost for r in gw.receipts()) == EXACT_PRICE == FUNDS - peer.balance(wallet.address)
    assert counted(gw) == EXACT_PRICE
