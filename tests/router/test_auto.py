"""Cost-aware choice: ``model="auto"`` takes the cheapest route that fits the request; the rest follow by price."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from router_support import MESSAGES, Sandbox, tried

from llm402 import Gateway, Policy
from llm402.router import Route, Router

Start = Callable[..., list[Sandbox]]
MakeGateway = Callable[..., Gateway]
IMAGE = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}]


def ask(router: Router, **body: Any) -> tuple[dict[str, Any], str | None]:
    with router.http_client() as client:
        response = client.post(f"{router.base_url}/chat/completions", json={"messages": MESSAGES, **body})
    assert response.status_code == 200, response.text
    assert router.last_receipt is not None
    return response.json(), router.last_receipt.route


@pytest.fixture
def catalog_router(start: Start, gateway: MakeGateway) -> Router:
    (sb,) = start("")
    gw = gateway(sb)
    return Router(
        [
            Route(gw, "sandbox/large", name="large"),  # facts unknown beyond the catalog's price and context
            Route(gw, "sandbox/medium", name="medium", tools=True),
            Route(gw, "sandbox/vision", name="vision", vision=True, tools=False),
            Route(gw, "sandbox/small", name="small", vision=False, tools=False),
        ]
    )


def test_auto_takes_the_cheapest_route_that_fits(catalog_router: Router) -> None:
    data, route = ask(catalog_router, model="auto")
    assert (data["model"], route) == ("sandbox/small", "small")
    image = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "what is it?"}, {"type": "image_url", "image_url": {"url": IMAGE}}],
        }
    ]
    data, route = ask(catalog_router, model="auto", messages=image)
    assert route == "vision" and data["choices"][0]["message"]["content"].startswith("Saw 1 image")
    data, route = ask(catalog_router, model="auto", tools=TOOLS)
    assert route == "medium", "known to call tools beats unknown (large); small and vision are known not to"
    assert data["choices"][0]["message"]["tool_calls"]


def test_the_other_routes_remain_fallbacks_in_price_order(start: Start, gateway: MakeGateway) -> None:
    (sb,) = start("")
    gw = gateway(sb)
    broken = {"X-Sandbox-Fault": "status=500"}
    router = Router(
        [
            Route(gw, "sandbox/large", name="large"),
            Route(gw, "sandbox/medium", name="medium"),
            Route(gw, "sandbox/vision", name="vision", headers=broken),
            Route(gw, "sandbox/small", name="small", headers=broken),
        ]
    )
    _, route = ask(router, model="auto")
    assert route == "medium"
    assert router.last_receipt is not None
    assert [x["route"] for x in tried(router.last_receipt)] == ["small", "vision", "medium"]


def test_cheapest_strategy_ignores_the_callers_model_and_ordered_honors_it(start: Start, gateway: MakeGateway) -> None:
    (sb,) = start("")
    gw = gateway(sb)
    routes = [Route(gw, "sandbox/large", name="large"), Route(gw, "sandbox/small", name="small")]
    assert ask(Router(routes, strategy="cheapest"), model="gpt-4o")[1] == "small"
    assert ask(Router(routes), model="gpt-4o")[1] == "large", "ordered: the configured order"
    assert ask(Router(routes), model="sandbox/small")[1] == "small", "ordered: a route the caller names goes first"


def test_a_route_whose_window_is_too_small_goes_last(start: Start, gateway: MakeGateway) -> None:
    (sb,) = start("")
    gw = gateway(sb)
    router = Router(
        [Route(gw, "sandbox/small", name="tiny", context_length=100), Route(gw, "sandbox/vision", name="vision")]
    )
    assert ask(router, model="auto", max_tokens=200)[1] == "vision"
    assert ask(router, model="auto", max_tokens=20)[1] == "tiny"


def test_auto_respects_the_remaining_budget(start: Start, gateway: MakeGateway, wallet: Any) -> None:
    (sb,) = start("")
    broke = Gateway(sb.base_url, wallet=wallet, policy=Policy(daily_cap_usd="0.0001"), ledger="memory://")
    router = Router(
        [Route(broke, "sandbox/small", name="small-broke"), Route(gateway(sb), "sandbox/vision", name="vision")]
    )
    _, route = ask(router, model="auto")
    assert route == "vision", "small's estimate is over what its gateway's cap has left"
    assert router.last_receipt is not None and len(router.last_receipt.attempts) == 1


def test_no_route_fits_is_answered_without_traffic(start: Start, gateway: MakeGateway) -> None:
    (sb,) = start("")
    gw = gateway(sb)
    router = Router([Route(gw, "sandbox/small", name="small", vision=False)])
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE}}]}]
    with router.http_client() as client:
        response = client.post(f"{router.base_url}/chat/completions", json={"model": "auto", "messages": image})
    assert response.status_code == 503 and response.json()["error"]["code"] == "no_route_available"
    assert sb.requests() == 0
    assert router.last_receipt is not None and router.last_receipt.error == "no_route_available"
