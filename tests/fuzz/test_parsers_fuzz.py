"""Property-based fuzzing of every parser that reads gateway input.

Properties: only typed llm402 errors escape; nothing is selected (so nothing signed) that the policy does not allow;
well-formed input parses and re-encodes to the same values.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import itertools
import json
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llm402 import Policy
from llm402.errors import ConfigurationError, Llm402Error, PolicyRefusal
from llm402.metering import UsageMeter
from llm402.pricing import PriceCatalog
from llm402.x402 import Challenge, Dialect, decode_settlement, parse_challenge, select_requirement

ASSETS = ["0x036CbD53842c5426634e7929541eC2318f3dCF7e", "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913", "0x" + "11" * 20]
PAYEES = ["0x" + "ab" * 20, "0x" + "cd" * 20]
NETWORKS = ["eip155:84532", "eip155:8453", "base-sepolia", "base", "eip155:1", "solana:mainnet", "eip155:0", "nope"]

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20,
)
amounts = st.one_of(
    st.integers(min_value=-(10**80), max_value=10**80).map(str),
    st.integers(min_value=0, max_value=10**7),
    st.sampled_from(["1.5", "-1", "", "0x10", "1e6", " 5", "٣"]),
    st.text(max_size=8),
)
entries = st.fixed_dictionaries(
    {},
    optional={
        "scheme": st.sampled_from(["exact", "upto", ""]) | st.text(max_size=5),
        "network": st.sampled_from(NETWORKS) | st.text(max_size=10),
        "asset": st.sampled_from(ASSETS) | st.text(max_size=10),
        "amount": amounts,
        "maxAmountRequired": amounts,
        "payTo": st.sampled_from(PAYEES) | st.text(max_size=10) | st.none(),
        "maxTimeoutSeconds": st.integers(min_value=-5, max_value=100_000) | json_scalars,
        "extra": st.fixed_dictionaries(
            {"name": st.just("USDC"), "version": st.just("2")},
            optional={
                "facilitatorAddress": st.sampled_from(PAYEES) | json_scalars,
                "assetTransferMethod": st.sampled_from(["permit2", "eip3009"]) | json_scalars,
            },
        )
        | json_values,
    },
)
challenges = st.fixed_dictionaries(
    {"accepts": st.lists(entries | json_values, max_size=4)},
    optional={"x402Version": st.sampled_from([1, 2, 3, "2"]) | json_scalars, "error": json_scalars},
)

plausible_entries = st.fixed_dictionaries(
    {
        "scheme": st.sampled_from(["exact", "upto", "stream"]),
        "network": st.sampled_from(NETWORKS[:5]),
        "asset": st.sampled_from(ASSETS),
        "amount": st.integers(min_value=1, max_value=10**7).map(str),
        "payTo": st.sampled_from(PAYEES),
        "maxTimeoutSeconds": st.sampled_from([30, 60, 3600, 7200]),
        "extra": st.fixed_dictionaries(
            {"name": st.just("USDC"), "version": st.just("2")},
            optional={
                "facilitatorAddress": st.sampled_from([*PAYEES, "0x12"]),
                "assetTransferMethod": st.sampled_from(["permit2", "eip3009"]),
            },
        ),
    }
)
"""Entries that mostly parse, so selection (not only parsing) meets every kind of offer."""
plausible_challenges = st.fixed_dictionaries(
    {"accepts": st.lists(plausible_entries | entries, min_size=1, max_size=4)},
    optional={"x402Version": st.sampled_from([1, 2])},
)


def b64(data: object) -> str:
    return base64.b64encode(json.dumps(data).encode()).decode()


@given(plausible_challenges | challenges, st.sampled_from(["header", "body"]))
def test_challenge_parsing_only_raises_typed_errors(challenge: dict[str, Any], where: str) -> None:
    headers = httpx.Headers({"payment-required": b64(challenge)} if where == "header" else {})
    body = b"{}" if where == "header" else json.dumps(challenge).encode()
    try:
        parsed = parse_challenge(headers, body)
    except Llm402Error:
        return
    if parsed is None:
        return
    for requirement in parsed.requirements:
        assert requirement.amount > 0
        assert requirement.network.startswith("eip155:")
        assert requirement.pay_to in PAYEES


@given(st.binary(max_size=300), st.text(max_size=300))
def test_garbage_bodies_and_headers(body: bytes, header: str) -> None:
    with contextlib.suppress(Llm402Error):
        parse_challenge(httpx.Headers({"payment-required": header} if header.isascii() else {}), body)
    decode_settlement(httpx.Headers({"payment-response": header} if header.isascii() else {}))


policies = st.builds(
    Policy,
    max_payment_usd=st.sampled_from([None, "0.001", "0.01", "1"]),
    allowed_networks=st.sampled_from([None, frozenset({"eip155:84532"}), frozenset({"eip155:8453"})]),
    allowed_payees=st.sampled_from([None, frozenset({PAYEES[0]})]),
    allowed_assets=st.sampled_from([None, frozenset({ASSETS[2]})]),
    max_validity_seconds=st.sampled_from([60, 3600]),
    allowed_schemes=st.sampled_from([frozenset({"exact", "upto"}), frozenset({"exact"}), frozenset({"upto"})]),
    prefer_upto=st.booleans(),
)


@given(plausible_challenges | challenges, policies)
def test_selection_never_admits_what_the_policy_refuses(challenge: dict[str, Any], policy: Policy) -> None:
    try:
        parsed = parse_challenge(httpx.Headers({"payment-required": b64(challenge)}), b"{}")
    except Llm402Error:
        return
    if parsed is None:
        return
    try:
        chosen = select_requirement(parsed, policy)
    except PolicyRefusal:
        return
    assert policy.max_payment is None or chosen.amount <= policy.max_payment
    assert policy.allowed_networks is None or chosen.network in policy.allowed_networks
    assert policy.allowed_payees is None or chosen.pay_to.lower() in {p.lower() for p in policy.allowed_payees}
    assert chosen.max_timeout_seconds <= policy.max_validity_seconds
    assert chosen.scheme in policy.allowed_schemes & {"exact", "upto"}
    if chosen.scheme == "upto":
        assert parsed.dialect.value == "x402-v2"
        assert chosen.extra.get("facilitatorAddress") in PAYEES
        assert chosen.extra.get("assetTransferMethod", "permit2") == "permit2"
    elif policy.prefer_upto and "upto" in policy.allowed_schemes:  # exact won: no upto offer was acceptable
        for offer in (r for r in parsed.requirements if r.scheme == "upto"):
            with pytest.raises(PolicyRefusal):
                select_requirement(Challenge(parsed.dialect, (offer,), None, None), policy)
    if policy.allowed_assets is not None:
        assert chosen.asset in policy.allowed_assets
    else:
        assert chosen.asset != ASSETS[2], "an asset the SDK does not know is refused unless allowed"


good_entries = st.fixed_dictionaries(
    {
        "scheme": st.just("exact"),
        "network": st.sampled_from(["eip155:84532", "eip155:8453"]),
        "asset": st.sampled_from(ASSETS[:2]),
        "amount": st.integers(min_value=1, max_value=2**255).map(str),
        "payTo": st.sampled_from(PAYEES),
        "maxTimeoutSeconds": st.integers(min_value=1, max_value=86_400),
        "extra": st.just({"name": "USDC", "version": "2"}),
    }
)


ACCEPTS_DIALECTS = [Dialect.V2, Dialect.V1, Dialect.KIOSK]
"""The dialects that carry an x402 ``accepts`` list (MPP's challenge is a ``WWW-Authenticate`` header instead)."""


@given(st.lists(good_entries, min_size=1, max_size=3), st.sampled_from(ACCEPTS_DIALECTS))
def test_well_formed_challenges_round_trip(accepts: list[dict[str, Any]], dialect: Dialect) -> None:
    if dialect is Dialect.V2:
        parsed = parse_challenge(httpx.Headers({"payment-required": b64({"x402Version": 2, "accepts": accepts})}), b"")
    elif dialect is Dialect.V1:
        legacy = [{**a, "maxAmountRequired": a.pop("amount")} for a in [dict(x) for x in accepts]]
        parsed = parse_challenge(httpx.Headers({}), json.dumps({"x402Version": 1, "accepts": legacy}).encode())
    else:
        parsed = parse_challenge(httpx.Headers({}), json.dumps({"accepts": accepts}).encode())
    assert parsed is not None
    assert parsed.dialect is dialect
    assert [(r.amount, r.pay_to, r.network, r.asset) for r in parsed.requirements] == [
        (int(a["amount"]), a["payTo"], a["network"], a["asset"]) for a in accepts
    ]
    again = parse_challenge(
        httpx.Headers(
            {"payment-required": b64({"x402Version": 2, "accepts": [dict(r.raw) for r in parsed.requirements]})}
        ),
        b"",
    )
    assert again is not None
    assert [r.describe() for r in again.requirements] == [r.describe() for r in parsed.requirements]


settlements = st.fixed_dictionaries(
    {
        "success": st.booleans(),
        "transaction": st.text(alphabet="0123456789abcdef", min_size=1, max_size=64).map(lambda t: "0x" + t),
        "network": st.sampled_from(["eip155:84532", "base"]),
        "payer": st.sampled_from(PAYEES),
    },
    optional={"amount": st.integers(min_value=1, max_value=10**12).map(str)},
)


@given(settlements, st.sampled_from(["payment-response", "x-payment-response"]))
def test_settlement_round_trip(data: dict[str, Any], header: str) -> None:
    decoded = decode_settlement(httpx.Headers({header: b64(data)}))
    assert decoded is not None
    assert (decoded.success, decoded.transaction, decoded.network, decoded.payer) == (
        data["success"],
        data["transaction"],
        data["network"],
        data["payer"],
    )
    assert decoded.amount == (int(data["amount"]) if "amount" in data else None)


events = st.lists(
    st.one_of(
        st.builds(lambda t: {"choices": [{"delta": {"content": t}}]}, st.text(max_size=10)),
        st.builds(
            lambda p, c: {"choices": [], "usage": {"prompt_tokens": p, "completion_tokens": c}},
            st.integers(0, 10**6),
            st.integers(0, 10**6),
        ),
        st.just(": keep-alive"),
    ),
    max_size=8,
)


def sse(items: list[Any], crlf: bool) -> bytes:
    sep = b"\r\n\r\n" if crlf else b"\n\n"
    out = b""
    for item in items:
        out += (item.encode() if isinstance(item, str) else b"data: " + json.dumps(item).encode()) + sep
    return out + b"data: [DONE]" + sep


@given(events, st.booleans(), st.booleans(), st.lists(st.integers(0, 2000), max_size=6), st.booleans())
def test_sse_meter_at_any_split(items: list[Any], crlf: bool, packed: bool, cuts: list[int], strip: bool) -> None:
    wire = sse(items, crlf)
    if packed:
        wire = gzip.compress(wire)
    meter = UsageMeter(streaming=True, content_encoding="gzip" if packed else None, strip_usage_event=strip)
    points = sorted({min(c, len(wire)) for c in cuts} | {0, len(wire)})
    out = b"".join(meter.feed(wire[a:b]) for a, b in itertools.pairwise(points)) + meter.finish()
    usages = [i["usage"] for i in items if isinstance(i, dict) and "usage" in i]
    if usages:
        assert meter.usage is not None
        assert (meter.usage.prompt_tokens, meter.usage.completion_tokens) == (
            usages[-1]["prompt_tokens"],
            usages[-1]["completion_tokens"],
        )
    else:
        assert meter.usage is None
    assert meter.done
    if not strip or packed:
        assert out == wire
    else:
        assert b'"usage"' not in out
        assert out.endswith(b"data: [DONE]" + (b"\r\n\r\n" if crlf else b"\n\n"))


@given(json_values)
def test_catalog_parsing_never_raises(data: Any) -> None:
    catalog = PriceCatalog.from_models_response({"data": data} if not isinstance(data, dict) else data)
    for price in catalog.models().values():
        assert price.prompt_per_1m >= 0
        assert price.completion_per_1m >= 0


@given(st.dictionaries(st.sampled_from([*Policy.model_fields, "bogus"]), json_values, max_size=6))
def test_policy_mappings_give_a_policy_or_a_configuration_error(data: dict[str, Any]) -> None:
    try:
        policy = Policy.from_mapping(data)
    except ConfigurationError as error:
        assert str(error).startswith("invalid policy")
        return
    for cap in (policy.max_payment, policy.daily_cap, policy.total_budget, policy.global_cap):
        assert cap is None or (isinstance(cap, int) and cap >= 0)
