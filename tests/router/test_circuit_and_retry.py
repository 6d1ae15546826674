"""Circuit breaking and Retry-After over real HTTP: skipped routes get no traffic (counted at the sandbox)."""

from __future__ import annotations

import time
from collections.abc import Callable

import openai
from router_support import MESSAGES, Sandbox, tried
from tenacity import stop_after_attempt, wait_none

from llm402 import Gateway
from llm402.router import CircuitBreaker, RetryPolicy, Route, Router

Start = Callable[..., list[Sandbox]]
MakeGateway = Callable[..., Gateway]
ONE_PASS = RetryPolicy(stop=stop_after_attempt(1), wait=wait_none())


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ask(router: Router) -> str | None:
    with router.http_client() as client:
        response = client.post(f"{router.base_url}/chat/completions", json={"model": "x", "messages": MESSAGES})
    assert response.status_code == 200, response.text
    assert router.last_receipt is not None
    return router.last_receipt.route


def test_open_circuit_skips_the_route_without_traffic_until_one_probe_decides(
    start: Start, gateway: MakeGateway
) -> None:
    a, b = start("status=500;times=2", "")  # A fails twice, then is healthy again
    clock = FakeClock()
    router = Router(
        [Route(gateway(a), "sandbox/small", name="A"), Route(gateway(b), "sandbox/small", name="B")],
        breaker=CircuitBreaker(failures=2, cooldown=10.0),
        retry=ONE_PASS,
        clock=clock,
    )
    assert [ask(router), ask(router)] == ["B", "B"]
    assert router.status()[0]["state"] == "open" and a.requests() == 2
    assert ask(router) == "B"
    assert a.requests() == 2, "an open circuit sends nothing"
    assert router.last_receipt is not None
    assert router.last_receipt.attempts[0] == {
        "route": "A",
        "gateway": a.base_url,
        "model": "sandbox/small",
        "status": None,
        "cost": 0,
        "error": "circuit_open",
        "skipped": True,
    }
    clock.now += 10.0
    assert router.status()[0]["state"] == "half_open"
    assert ask(router) == "A", "after the cool-down, one probe goes to A and its success closes the circuit"
    assert a.requests() == 4, "the probe: a 402 and its paid replay"
    assert router.status()[0]["state"] == "closed"


def test_a_failed_probe_opens_the_circuit_again(start: Start, gateway: MakeGateway) -> None:
    a, b = start("status=500", "")
    clock = FakeClock()
    router = Router(
        [Route(gateway(a), "sandbox/small", name="A"), Route(gateway(b), "sandbox/small", name="B")],
        breaker=CircuitBreaker(failures=1, cooldown=5.0),
        retry=ONE_PASS,
        clock=clock,
    )
    assert ask(router) == "B" and a.requests() == 1
    clock.now += 5.0
    assert ask(router) == "B" and a.requests() == 2, "exactly one probe"
    assert router.status()[0]["state"] == "open"
    assert ask(router) == "B" and a.requests() == 2, "the failed probe re-opened the circuit for a new cool-down"


def test_retry_after_is_waited_for_when_no_other_route_can_answer(start: Start, gateway: MakeGateway) -> None:
    (a,) = start("status=429;retry_after=1;times=1")
    router = Router([Route(gateway(a), "sandbox/small", name="A")], retry=RetryPolicy(wait=wait_none()))
    client = openai.OpenAI(base_url=router.base_url, api_key=router.api_key, http_client=router.http_client())
    started = time.monotonic()
    completion = client.chat.completions.create(model="x", messages=MESSAGES)  # type: ignore[arg-type]
    elapsed = time.monotonic() - started
    assert completion.choices[0].message.content
    assert 1.0 <= elapsed < 3.0, elapsed
    assert a.requests() == 3, "the 429, then a 402 and its paid replay"
    assert router.last_receipt is not None
    assert [(x["status"], x["error"]) for x in tried(router.last_receipt)] == [(429, "http_429"), (200, None)]


def test_retry_after_holds_the_route_for_later_calls_while_others_answer(start: Start, gateway: MakeGateway) -> None:
    a, b = start("status=429;retry_after=30;times=1", "")
    clock = FakeClock()
    router = Router(
        [Route(gateway(a), "sandbox/small", name="A"), Route(gateway(b), "sandbox/small", name="B")], clock=clock
    )
    started = time.monotonic()
    assert ask(router) == "B"
    assert time.monotonic() - started < 1.0, "another route answers at once: nobody waits for A"
    assert ask(router) == "B" and a.requests() == 1, "A is held for its Retry-After: no traffic"
    assert router.last_receipt is not None and router.last_receipt.attempts[0]["error"] == "rate_limited"
    clock.now += 30.0
    assert ask(router) == "A" and a.requests() == 3
