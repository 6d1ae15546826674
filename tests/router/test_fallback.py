"""Fallback across gateways over real HTTP: who answered, who was paid, and that nobody was paid twice."""

from __future__ import annotations

import socket
from collections.abc import Callable

import httpx
import openai
import pytest
from router_support import MESSAGES, Sandbox, tried
from tenacity import stop_after_attempt, wait_none

from llm402 import Gateway, Policy, Wallet
from llm402.budget import Ledger
from llm402.openai import refusal_from_error
from llm402.router import ROUTE_HEADER, FallbackRules, RetryPolicy, Route, Router

Start = Callable[..., list[Sandbox]]
MakeGateway = Callable[..., Gateway]


def sdk(router: Router, **kw: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.base_url, api_key=router.api_key, http_client=router.http_client(), **kw)  # type: ignore[arg-type]


def ledger_total(ledger: Ledger) -> int:
    return sum(r.cost for r in ledger.receipts())


def test_500_before_payment_answers_from_b_and_only_b_is_paid(
    start: Start, gateway: MakeGateway, wallet: Wallet, ledger: Ledger
) -> None:
    a, b = start("status=500", "")
    router = Router([Route(gateway(a), "sandbox/small", name="A"), Route(gateway(b), "sandbox/medium", name="B")])
    response = sdk(router).chat.completions.with_raw_response.create(model="any-name", messages=MESSAGES)  # type: ignore[arg-type]
    completion = response.parse()
    assert completion.model == "sandbox/medium" and completion.choices[0].message.content
    assert response.headers[ROUTE_HEADER] == "B"
    receipt = router.last_receipt
    assert receipt is not None and receipt.route == "B"
    assert [(x["route"], x["status"], x["paid"]) for x in tried(receipt)] == [("A", 500, False), ("B", 200, True)]
    assert a.stats(wallet.address)["signatures_seen"] == 0 and a.charged(wallet.address) == 0
    assert b.stats(wallet.address)["signatures_seen"] == 1
    assert receipt.cost == b.charged(wallet.address) == ledger_total(ledger) > 0


def test_settled_then_failed_is_not_paid_twice(
    start: Start, gateway: MakeGateway, wallet: Wallet, ledger: Ledger
) -> None:
    a, b = start("fail_after_settle", "")
    router = Router([Route(gateway(a), "sandbox/small", name="A"), Route(gateway(b), "sandbox/small", name="B")])
    completion = sdk(router).chat.completions.create(model="sandbox/small", messages=MESSAGES)  # type: ignore[arg-type]
    assert completion.choices[0].message.content
    receipt = router.last_receipt
    assert receipt is not None and receipt.route == "B"
    steps = [(x["route"], x["status"], x["error"], x["paid"], x["resend"]) for x in tried(receipt)]
    assert steps == [
        ("A", 500, "http_500", True, False),  # paid, settled, answer lost
        ("A", 402, "paid_answer_lost", False, True),  # the same payment again: the gateway shows it settled
        ("B", 200, None, True, False),  # B pays its own price
    ]
    assert a.stats(wallet.address)["signatures_seen"] == 1 and a.stats(wallet.address)["settled"] == 1
    assert b.stats(wallet.address)["signatures_seen"] == 1
    charged = a.charged(wallet.address) + b.charged(wallet.address)
    assert receipt.cost == ledger_total(ledger) == charged
    assert a.charged(wallet.address) > 0 and b.charged(wallet.address) > 0


def test_timeout_after_payment_resends_once_then_falls_back(
    start: Start, gateway: MakeGateway, wallet: Wallet, ledger: Ledger
) -> None:
    a, b = start("stall_after_settle=2", "")
    router = Router([Route(gateway(a), "sandbox/small", name="A"), Route(gateway(b), "sandbox/small", name="B")])
    with router.http_client(timeout=1.0) as client:
        response = client.post(f"{router.base_url}/chat/completions", json={"model": "m", "messages": MESSAGES})
    assert response.status_code == 200, response.text
    receipt = router.last_receipt
    assert receipt is not None
    assert [(x["route"], x["error"]) for x in tried(receipt)] == [
        ("A", "ReadTimeout"),
        ("A", "paid_answer_lost"),  # the one authorization re-sent: A shows it settled, nothing is signed again
        ("B", None),
    ]
    assert a.stats(wallet.address)["signatures_seen"] == 1 and a.stats(wallet.address)["settled"] == 1
    assert receipt.cost == ledger_total(ledger) == a.charged(wallet.address) + b.charged(wallet.address)


def test_connection_error_falls_back(start: Start, gateway: MakeGateway, wallet: Wallet) -> None:
    (b,) = start("")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"  # nobody listens once the socket closes
    down = Gateway(dead, wallet=wallet, policy=Policy(max_payment_usd="0.05"), ledger="memory://")
    router = Router([Route(down, "sandbox/small", name="down"), Route(gateway(b), "sandbox/small", name="B")])
    completion = sdk(router).chat.completions.create(model="sandbox/small", messages=MESSAGES)  # type: ignore[arg-type]
    assert completion.choices[0].message.content
    receipt = router.last_receipt
    assert receipt is not None and [x["error"] for x in tried(receipt)] == ["ConnectError", None]


def test_stream_failing_before_its_first_chunk_falls_back(
    start: Start, gateway: MakeGateway, wallet: Wallet, ledger: Ledger
) -> None:
    a, b, c = start("stream_cut=0", "status=502", "")
    router = Router(
        [
            Route(gateway(a), "sandbox/small", name="A"),  # paid and settled, then cut before any chunk
            Route(gateway(b), "sandbox/small", name="B"),  # 502 before payment
            Route(gateway(c), "sandbox/medium", name="C"),
        ]
    )
    stream = sdk(router).chat.completions.create(model="sandbox/small", messages=MESSAGES, stream=True)  # type: ignore[call-overload]
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text.startswith("Echo:")
    receipt = router.last_receipt
    assert receipt is not None and receipt.route == "C" and receipt.streamed
    assert [(x["route"], x["error"]) for x in tried(receipt)] == [
        ("A", "RemoteProtocolError"),
        ("A", "paid_answer_lost"),  # re-sent once: A shows the payment settled
        ("B", "http_502"),
        ("C", None),
    ]
    assert a.stats(wallet.address)["signatures_seen"] == 1 and a.stats(wallet.address)["settled"] == 1
    assert b.stats(wallet.address)["signatures_seen"] == 0
    charged = sum(s.charged(wallet.address) for s in (a, b, c))
    assert receipt.cost == ledger_total(ledger) == charged


def test_stream_cut_after_its_first_chunk_surfaces_and_is_reconciled(
    start: Start, gateway: MakeGateway, wallet: Wallet, ledger: Ledger
) -> None:
    a, b = start("stream_cut=2", "")
    router = Router([Route(gateway(a), "sandbox/small", name="A"), Route(gateway(b), "sandbox/small", name="B")])
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    received: list[str] = []
    with router.http_client() as client, client.stream("POST", f"{router.base_url}/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        with pytest.raises(httpx.RemoteProtocolError):
            received.extend(lines)
    assert any('"content"' in line for line in received), "the caller got the first chunks"
    assert b.requests() == 0, "no fallback once a chunk reached the caller"
    receipt = router.last_receipt
    assert receipt is not None and receipt.route == "A" and receipt.error
    assert len(tried(receipt)) == 1
    (attempt,) = ledger.receipts()
    assert attempt.streamed and attempt.error and attempt.cost == receipt.cost
    assert receipt.cost == a.charged(wallet.address) > 0


async def test_async_sdk_falls_back_plain_and_streaming(
    start: Start, gateway: MakeGateway, wallet: Wallet, ledger: Ledger
) -> None:
    a, b = start("status=503", "")
    router = Router([Route(gateway(a), "sandbox/small", name="A"), Route(gateway(b), "sandbox/small", name="B")])
    client = openai.AsyncOpenAI(
        base_url=router.base_url, api_key=router.api_key, http_client=router.async_http_client()
    )
    completion = await client.chat.completions.create(model="x", messages=MESSAGES)  # type: ignore[arg-type]
    assert completion.choices[0].message.content
    assert router.last_receipt is not None and router.last_receipt.route == "B"
    stream = await client.chat.completions.create(model="x", messages=MESSAGES, stream=True)  # type: ignore[call-overload]
    pieces = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    assert "".join(pieces).startswith("Echo:")
    assert router.last_receipt is not None and router.last_receipt.route == "B"
    assert a.requests() == 2 and a.stats(wallet.address)["signatures_seen"] == 0
    assert ledger_total(ledger) == b.charged(wallet.address) > 0


def test_a_policy_refusal_falls_back_without_traffic(start: Start, gateway: MakeGateway, wallet: Wallet) -> None:
    a, b = start("", "")
    stingy = gateway(a, policy=Policy(max_payment_usd="0.000001"))  # A's quote is over this ticket
    router = Router([Route(stingy, "sandbox/large", name="A"), Route(gateway(b), "sandbox/small", name="B")])
    completion = sdk(router).chat.completions.create(model="x", messages=MESSAGES)  # type: ignore[arg-type]
    assert completion.model == "sandbox/small"
    receipt = router.last_receipt
    assert receipt is not None and [x["error"] for x in tried(receipt)] == ["payment_over_ticket", None]
    assert a.stats(wallet.address)["signatures_seen"] == 0


def test_budget_refusal_skips_routes_that_would_hit_the_same_cap(
    start: Start, gateway: MakeGateway, wallet: Wallet, ledger: Ledger
) -> None:
    """Shared ledger and agent: after ``medium`` is refused by the daily cap, ``large`` (a bigger estimate, same cap)
    is skipped without a try, and ``small`` (a smaller estimate) fits and answers."""
    a, b = start("", "")
    capped = Policy(max_payment_usd="0.05", daily_cap_usd="0.002")
    gw_a, gw_b = gateway(a, policy=capped), gateway(b, policy=capped)
    for gw in (gw_a, gw_b):
        gw.load_prices()
    router = Router(
        [
            Route(gw_a, "sandbox/medium", name="medium"),
            Route(gw_a, "sandbox/large", name="large"),
            Route(gw_b, "sandbox/small", name="small"),
        ]
    )
    completion = sdk(router).chat.completions.create(model="x", messages=MESSAGES)  # type: ignore[arg-type]
    assert completion.model == "sandbox/small"
    receipt = router.last_receipt
    assert receipt is not None
    assert [(x["route"], x["error"], bool(x.get("skipped"))) for x in receipt.attempts] == [
        ("medium", "budget_exceeded", False),
        ("large", "budget_exceeded", True),
        ("small", None, False),
    ]
    assert a.requests() == 0, "a budget refusal never reaches the gateway"
    assert receipt.cost == ledger_total(ledger) == b.charged(wallet.address)


def test_context_length_errors_fall_back_when_configured(start: Start, gateway: MakeGateway) -> None:
    a, b = start("", "")
    roomy = Policy(max_payment_usd="3")
    routes = [
        Route(gateway(a, policy=roomy), "sandbox/small", name="small-128k"),
        Route(gateway(b, policy=roomy), "sandbox/large", name="large-1m"),
    ]
    body = {"model": "x", "messages": MESSAGES, "max_tokens": 130_000}  # over small's window, inside large's
    router = Router(routes)
    with router.http_client() as client:
        response = client.post(f"{router.base_url}/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert router.last_receipt is not None
    assert [x["error"] for x in tried(router.last_receipt)] == ["context_length", None]
    strict = Router(routes, fallback=FallbackRules(context_length=False))
    with strict.http_client() as client:
        response = client.post(f"{strict.base_url}/chat/completions", json=body)
    assert response.status_code == 400 and response.headers["x-should-retry"] == "false"


def test_the_requests_own_fault_goes_to_the_caller(start: Start, gateway: MakeGateway) -> None:
    a, b = start("", "")
    router = Router([Route(gateway(a), "sandbox/small", name="A"), Route(gateway(b), "sandbox/small", name="B")])
    with router.http_client() as client:
        response = client.post(f"{router.base_url}/chat/completions", json={"model": "x", "messages": []})
    assert response.status_code == 400
    assert b.requests() == 0
    assert router.last_receipt is not None and router.last_receipt.route == "A"


def test_every_route_failing_gives_back_the_last_answer_once(start: Start, gateway: MakeGateway) -> None:
    a, b = start("status=500", "status=502")
    router = Router(
        [Route(gateway(a), "sandbox/small", name="A"), Route(gateway(b), "sandbox/small", name="B")],
        retry=RetryPolicy(stop=stop_after_attempt(2), wait=wait_none()),
    )
    client = sdk(router)  # the SDK's own retries (max_retries=2) must not multiply the router's
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="x", messages=MESSAGES)  # type: ignore[arg-type]
    assert info.value.status_code == 502 and info.value.response.headers["x-should-retry"] == "false"
    assert refusal_from_error(info.value) is None
    assert (a.requests(), b.requests()) == (2, 2), "two passes over two routes, and no SDK retry on top"
    receipt = router.last_receipt
    assert receipt is not None and receipt.route is None and receipt.error == "http_502"
