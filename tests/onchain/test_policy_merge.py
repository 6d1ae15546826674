"""Combining policy sources: the strictest rule of each kind wins, whatever the order; ENS text-record parsing."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llm402 import Policy
from llm402.errors import PolicyRefusal
from llm402.policy_sources import (
    MergedPolicySource,
    PolicySource,
    PolicySourceError,
    merge_policies,
    policy_from_text_records,
)

USDC_BASE = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
NAMES = st.sampled_from(["judging", "commentary", "captioning", "gpt-5.2", "gpt-4o", "*"])
caps = st.none() | st.integers(0, 10_000_000).map(lambda n: Decimal(n) / 1_000_000)
name_sets = st.none() | st.frozensets(NAMES, max_size=4)
policies = st.builds(
    Policy,
    max_payment_usd=caps,
    daily_cap_usd=caps,
    total_budget_usd=caps,
    allowed_intents=name_sets,
    allowed_models=name_sets,
    models_by_intent=st.none() | st.dictionaries(NAMES, st.frozensets(NAMES, min_size=1, max_size=3), max_size=3),
)


def allows(policy: Policy, intent: str | None, model: str | None) -> bool:
    try:
        policy.check_call(intent, model)
    except PolicyRefusal:
        return False
    return True


@given(st.lists(policies, min_size=1, max_size=4), st.none() | NAMES, st.none() | NAMES)
def test_merged_allows_a_call_only_when_every_source_does(
    sources: list[Policy], intent: str | None, model: str | None
) -> None:
    merged = merge_policies(*sources)
    assert allows(merged, intent, model) == all(allows(p, intent, model) for p in sources)
    assert merge_policies(*reversed(sources)) == merged, "order never matters"


@given(st.lists(policies, min_size=1, max_size=4))
def test_merged_caps_are_the_smallest(sources: list[Policy]) -> None:
    merged = merge_policies(*sources)
    for cap in ("max_payment", "daily_cap", "total_budget"):
        values = [getattr(p, cap) for p in sources if getattr(p, cap) is not None]
        assert getattr(merged, cap) == (min(values) if values else None)


def test_every_field_merges_strictly() -> None:
    loose = Policy(
        allowed_networks=frozenset({"eip155:8453", "eip155:84532"}),
        allowed_payees=frozenset({"0xAbC0000000000000000000000000000000000001"}),
        allowed_assets=frozenset({USDC_BASE.lower(), "0x0000000000000000000000000000000000000bad"}),
        max_validity_seconds=3600,
        topup_min_usd=Decimal("5"),
        topup_max_usd=Decimal("20"),
        allow_insecure_http=True,
        one_round_trip=True,
        global_cap_usd=Decimal("100"),
    )
    strict = Policy(
        allowed_networks=frozenset({"eip155:84532"}),
        allowed_payees=frozenset({"0xabc0000000000000000000000000000000000001"}),
        max_validity_seconds=60,
        topup_min_usd=Decimal("2"),
        global_cap_usd=Decimal("50"),
        allowed_schemes=frozenset({"exact"}),
        prefer_upto=False,
    )
    merged = merge_policies(loose, strict)
    assert merged.allowed_networks == {"eip155:84532"}
    assert merged.allowed_payees == {"0xAbC0000000000000000000000000000000000001"}, "addresses compare case-blind"
    assert merged.allowed_assets == {USDC_BASE.lower()}, "None (SDK-known stablecoins) drops an unknown token"
    assert merged.max_validity_seconds == 60 and merged.global_cap_usd == Decimal("50")
    assert merged.topup_min_usd == Decimal("2") and merged.topup_max_usd == Decimal("20")
    assert not merged.allow_insecure_http and not merged.one_round_trip
    assert merged.allowed_schemes == {"exact"} and not merged.prefer_upto
    assert merge_policies() == Policy() and merge_policies(strict) is strict


def test_models_by_intent_intersect_per_intent() -> None:
    a = Policy(models_by_intent={"judging": frozenset({"*"}), "commentary": frozenset({"gpt-4o", "gpt-5.2"})})
    b = Policy(models_by_intent={"judging": frozenset({"gpt-5.2"}), "commentary": frozenset({"gpt-4o"})})
    merged = merge_policies(a, b)
    assert merged.models_by_intent == {"judging": {"gpt-5.2"}, "commentary": {"gpt-4o"}}


def test_a_merged_source_reads_every_live_source_each_time() -> None:
    class Live:
        def __init__(self) -> None:
            self.policy = Policy(daily_cap_usd="3")

        def current(self) -> Policy:
            return self.policy

    live = Live()
    assert isinstance(live, PolicySource)
    merged = MergedPolicySource(Policy(daily_cap_usd="2", allowed_intents=frozenset({"judging"})), live)
    assert merged.current().daily_cap_usd == Decimal("2")
    live.policy = Policy(daily_cap_usd="1", allowed_intents=frozenset({"judging", "commentary"}))
    assert merged.current() == Policy(daily_cap_usd="1", allowed_intents=frozenset({"judging"}))
    with pytest.raises(ValueError, match="at least one"):
        MergedPolicySource()


def test_text_records() -> None:
    records = {
        "llm402.max_ticket": " 0.05 ",
        "llm402.daily_cap": "$2.5",
        "llm402.total_budget": "",
        "llm402.intents": "judging, commentary ,,",
        "llm402.models": "*",
        "llm402.unrelated": "ignored",
    }
    policy = policy_from_text_records(records)
    assert policy == Policy(
        max_payment_usd=Decimal("0.05"),
        daily_cap_usd=Decimal("2.5"),
        allowed_intents=frozenset({"judging", "commentary"}),
    )
    assert policy_from_text_records({}) == Policy(), "no records: no restriction from this source"
    with pytest.raises(PolicySourceError, match=r"llm402\.daily_cap='lots' is not a USD amount"):
        policy_from_text_records({"llm402.daily_cap": "lots"})
    with pytest.raises(PolicySourceError, match="more than 6 decimals"):
        policy_from_text_records({"llm402.max_ticket": "0.0000001"})
