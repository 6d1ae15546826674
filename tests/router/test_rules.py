"""The routing rules as values, evaluated without a network: circuits, Retry-After, needs, facts and ranking."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_fixed

from llm402 import Gateway, Wallet
from llm402.budget import open_ledger
from llm402.budget.base import Caps
from llm402.pricing import ModelPrice
from llm402.router import (
    Admission,
    CircuitBreaker,
    FallbackRules,
    Needs,
    RetryPolicy,
    Route,
    RouteHealth,
    Router,
    capabilities_from_listing,
    retry_after_seconds,
    wait_retry_after,
)
from llm402.router.plan import BudgetBlock, RoutesFailed
from llm402.router.rules import looks_like_context_error


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_circuit_opens_after_consecutive_failures_and_lets_one_probe_through() -> None:
    clock = Clock()
    health = RouteHealth(CircuitBreaker(failures=3, cooldown=10), clock)
    for _ in range(2):
        health.record("failure", Admission.CLOSED)
    health.record("success", Admission.CLOSED)  # a success resets the count: failures must be consecutive
    for _ in range(3):
        assert health.admit() is Admission.CLOSED
        health.record("failure", Admission.CLOSED)
    assert health.state == "open" and health.admit() == "circuit_open"
    clock.now = 9.9
    assert health.admit() == "circuit_open"
    clock.now = 10.0
    assert health.state == "half_open"
    assert health.admit() is Admission.PROBE
    assert health.admit() == "circuit_open", "one probe at a time"
    health.record("failure", Admission.PROBE)
    assert health.state == "open" and health.reopens_in() == 10.0
    clock.now = 20.0
    assert health.admit() is Admission.PROBE
    health.record("success", Admission.PROBE)
    assert health.state == "closed" and health.admit() is Admission.CLOSED


def test_a_neutral_probe_leaves_the_circuit_half_open() -> None:
    clock = Clock()
    health = RouteHealth(CircuitBreaker(failures=1, cooldown=1), clock)
    health.record("failure", Admission.CLOSED)
    clock.now = 1.0
    assert health.admit() is Admission.PROBE
    health.record("neutral", Admission.PROBE)  # e.g. a local refusal: says nothing about the route
    assert health.state == "half_open" and health.admit() is Admission.PROBE


def test_a_hold_keeps_traffic_off_until_it_ends() -> None:
    clock = Clock()
    health = RouteHealth(CircuitBreaker(), clock)
    health.hold(2.5)
    assert health.admit() == "rate_limited" and health.held_for() == 2.5
    clock.now = 2.5
    assert health.admit() is Admission.CLOSED


def test_retry_after_in_every_form() -> None:
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    now = datetime(2026, 1, 1, tzinfo=UTC)
    date = format_datetime(now + timedelta(seconds=7), usegmt=True)
    assert retry_after_seconds({"retry-after": date}, now=now.timestamp) == 7.0
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None


def test_wait_retry_after_waits_the_longer_of_the_hint_and_the_backoff() -> None:
    waits: list[float] = []
    outcomes = iter([RoutesFailed(2.0, True), RoutesFailed(None, True), None])

    def attempt() -> str:
        error = next(outcomes)
        if error is not None:
            raise error
        return "answered"

    retrying = Retrying(
        stop=stop_after_attempt(3),
        wait=wait_retry_after(wait_fixed(0.5)),
        retry=retry_if_exception_type(RoutesFailed),
        sleep=waits.append,
    )
    assert retrying(attempt) == "answered"
    assert waits == [2.0, 0.5]


def test_context_errors_are_recognised_by_their_words() -> None:
    assert looks_like_context_error(400, b'{"error":{"code":"context_length_exceeded"}}')
    assert looks_like_context_error(400, b'{"message":"prompt (9) + max_tokens (9) exceeds the context length 10"}')
    assert not looks_like_context_error(400, b'{"message":"messages must be a non-empty array"}')
    assert not looks_like_context_error(500, b"context length")


def test_capabilities_from_the_shapes_gateways_use() -> None:
    listing = {
        "data": [
            {
                "id": "or/vision",
                "architecture": {"input_modalities": ["text", "image"]},
                "supported_parameters": ["tools"],
            },
            {"id": "or/text", "architecture": {"input_modalities": ["text"]}, "supported_parameters": ["temperature"]},
            {"id": "caps/dict", "capabilities": {"vision": False, "function_calling": True}},
            {"id": "caps/list", "capabilities": ["vision"]},
            {"id": "litellm", "supports_vision": True},
            {"id": "kiosk", "promptPricePer1MTokens": 1},
        ]
    }
    caps = capabilities_from_listing(listing)
    assert (caps["or/vision"].tools, caps["or/vision"].vision) == (True, True)
    assert (caps["or/text"].tools, caps["or/text"].vision) == (False, False)
    assert (caps["caps/dict"].tools, caps["caps/dict"].vision) == (True, False)
    assert (caps["caps/list"].tools, caps["caps/list"].vision) == (False, True)
    assert (caps["litellm"].tools, caps["litellm"].vision) == (None, True)
    assert "kiosk" not in caps, "a listing that says nothing leaves the facts unknown"


def test_needs_of_a_request() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://x/y.png"}}
    needs = Needs.of(
        {"messages": [{"role": "user", "content": [image]}], "tools": [{"type": "function"}], "max_tokens": 10}
    )
    assert needs.tools and needs.vision and needs.tokens > 10
    plain = Needs.of({"messages": [{"role": "user", "content": "hi"}]})
    assert not plain.tools and not plain.vision and plain.tokens > 1024, "no max_tokens: the default budget counts"
    assert Needs.of(None) == Needs()


def _gateway(url: str) -> Gateway:
    prices = {
        "m/cheap": ModelPrice.from_usd("0.1", "0.1", context_length=1000),
        "m/mid": ModelPrice.from_usd("1", "1"),
        "m/dear": ModelPrice.from_usd("5", "5"),
    }
    return Gateway(url, wallet=Wallet.create(), ledger="memory://", prices=prices)


def test_ranking_without_traffic() -> None:
    gw = _gateway("http://127.0.0.1:9/v1")
    router = Router(
        [
            Route(gw, "m/dear", name="dear"),
            Route(gw, "m/unpriced", name="unpriced"),
            Route(gw, "m/cheap", name="cheap", vision=False),
            Route(gw, "m/mid", name="mid"),
        ]
    )
    names = lambda order: [router.routes[i].name for i in order]  # noqa: E731
    text = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
    assert names(router.rank(text, "auto")) == ["cheap", "mid", "dear", "unpriced"]
    assert names(router.rank(text, "whatever")) == ["dear", "unpriced", "cheap", "mid"]
    assert names(router.rank(text, "m/mid")) == ["mid", "dear", "unpriced", "cheap"]
    long = {**text, "max_tokens": 5000}  # over cheap's 1000-token window
    assert names(router.rank(long, "auto")) == ["mid", "dear", "unpriced", "cheap"]
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]}
    assert "cheap" not in names(router.rank(image, "auto")), "known not to see images: left out"
    assert router.facts(2).context_length == 1000 and router.estimate(0, text) > router.estimate(2, text)


def test_values_are_printable_and_validated() -> None:
    gw = _gateway("http://127.0.0.1:9/v1")
    route = Route(gw, "m/cheap", headers={"authorization": "Bearer sk-secret"})
    assert route.name == "m/cheap@127.0.0.1:9" and "sk-secret" not in repr(route)
    assert "max_retry_after=30.0" in repr(RetryPolicy())
    assert FallbackRules(refusals=frozenset({"payment_over_ticket"})).falls_back_on_refusal("budget_exceeded") is False
    assert FallbackRules().falls_back_on_refusal("anything")
    with pytest.raises(ValueError, match="failures"):
        CircuitBreaker(failures=0)
    with pytest.raises(ValueError, match="unique"):
        Router([Route(gw, "m/cheap"), Route(gw, "m/cheap")])
    with pytest.raises(ValueError, match="strategy"):
        Router([route], strategy="fastest")  # type: ignore[arg-type]


def test_a_cap_refusal_covers_only_the_routes_it_would_refuse_again() -> None:
    ledger, other = open_ledger("memory://"), open_ledger("memory://")
    caps = Caps(daily=2000, total=None, global_=5000)
    daily = BudgetBlock(ledger, "judge", "daily", 2000, requested=1500)
    assert daily.covers(ledger, "judge", caps, 1500)
    assert not daily.covers(ledger, "judge", caps, 1499), "a cheaper route may still fit"
    assert not daily.covers(ledger, "commentator", caps, 9999), "another agent has its own daily cap"
    assert not daily.covers(other, "judge", caps, 9999), "another ledger has its own budget"
    assert not daily.covers(ledger, "judge", Caps(daily=9000), 9999), "another cap"
    shared = BudgetBlock(ledger, "judge", "global", 5000, requested=100)
    assert shared.covers(ledger, "commentator", caps, 100), "the global cap counts every agent of the ledger"
