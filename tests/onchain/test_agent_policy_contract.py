"""AgentPolicy on a real (in-process) chain: the contract itself, `policy_from_contract`, and the refreshing source."""

from __future__ import annotations

from decimal import Decimal

import pytest
from eth_tester.exceptions import TransactionFailed
from onchain_support import UNLIMITED, Chain, Compiled, FakeClock

from llm402 import Policy, Wallet
from llm402.errors import PolicyRefusal
from llm402.policy_sources import (
    ContractPolicySource,
    PolicySourceError,
    PolicyUnavailable,
    RefreshingPolicySource,
    agent_policy_abi,
    deploy_agent_policy,
    name_hash,
    policy_from_contract,
)


def agent() -> str:
    return Wallet.create().address


def test_the_shipped_abi_is_the_compiled_one(compiled: dict[str, Compiled]) -> None:
    key = lambda item: (item["type"], item.get("name", ""))  # noqa: E731
    assert sorted(agent_policy_abi(), key=key) == sorted(compiled["AgentPolicy"].abi, key=key)


def test_deploy_helper_makes_the_sender_owner(chain: Chain) -> None:
    address = deploy_agent_policy(chain.w3, sender=chain.stranger)
    contract = chain.w3.eth.contract(address=address, abi=agent_policy_abi())
    assert contract.functions.owner().call() == chain.stranger


def test_the_owner_writes_and_anyone_reads(chain: Chain) -> None:
    who = agent()
    fns = chain.policy.functions
    assert not fns.has_policy(who).call()
    assert not fns.intent_allowed(who, name_hash("judging")).call(), "no policy: nothing is allowed"
    fns.set_policy(who, 50_000, 5_000_000, UNLIMITED).transact()
    fns.allow_intent(who, name_hash("judging")).transact()
    fns.allow_model(who, name_hash("gpt-5.2")).transact()
    assert fns.has_policy(who).call()
    assert (fns.max_ticket_minor(who).call(), fns.daily_cap_minor(who).call()) == (50_000, 5_000_000)
    assert fns.total_budget_minor(who).call() == UNLIMITED
    assert fns.intent_allowed(who, name_hash("judging")).call()
    assert not fns.intent_allowed(who, name_hash("commentary")).call()
    assert fns.model_allowed(who, name_hash("gpt-5.2")).call()
    assert fns.intents_listed(who, [name_hash("commentary"), name_hash("judging")]).call() == [False, True]
    fns.set_any_intent(who, True).transact()
    assert fns.intent_allowed(who, name_hash("commentary")).call(), "the any flag admits every intent"
    assert not fns.intent_listed(who, name_hash("commentary")).call(), "…without listing it"
    fns.disallow_model(who, name_hash("gpt-5.2")).transact()
    assert not fns.model_allowed(who, name_hash("gpt-5.2")).call()
    before = fns.revision(who).call()
    fns.revoke(who).transact()
    assert not fns.has_policy(who).call() and fns.revision(who).call() == before + 1
    assert not fns.intent_allowed(who, name_hash("commentary")).call(), "revoked: nothing is allowed"


def test_only_the_owner_writes(chain: Chain) -> None:
    who = agent()
    fns = chain.policy.functions
    for call in (
        fns.set_policy(who, 1, 1, 1),
        fns.allow_intent(who, name_hash("judging")),
        fns.set_any_model(who, True),
        fns.revoke(who),
        fns.transfer_ownership(chain.stranger),
    ):
        with pytest.raises(TransactionFailed, match="not the owner"):
            call.transact({"from": chain.stranger})
    assert not fns.has_policy(who).call()


def test_policy_from_contract_maps_caps_and_candidate_names(chain: Chain) -> None:
    who = agent()
    chain.set_policy(who, ticket=50_000, daily=2_500_000, intents=("judging", "commentary"), models=("gpt-5.2",))
    policy = policy_from_contract(
        chain.w3, chain.policy.address, who, intents={"judging", "captioning"}, models={"gpt-5.2", "gpt-4o"}
    )
    assert policy.max_payment_usd == Decimal("0.05") and policy.daily_cap_usd == Decimal("2.5")
    assert policy.total_budget_usd is None, "max_value(uint256) is no limit"
    assert policy.allowed_intents == {"judging"}, "only candidates the contract lists ('commentary' was not asked)"
    assert policy.allowed_models == {"gpt-5.2"}
    policy.check_call("judging", "gpt-5.2")
    with pytest.raises(PolicyRefusal) as refused:
        policy.check_call("captioning", "gpt-5.2")
    assert refused.value.code == "intent_not_allowed"
    with pytest.raises(PolicyRefusal) as refused:
        policy.check_call("judging", "gpt-4o")
    assert refused.value.code == "model_not_allowed"


def test_any_flags_lift_the_lists_and_no_candidates_allow_nothing(chain: Chain) -> None:
    who = agent()
    chain.set_policy(who, any_model=True, intents=("judging",))
    policy = policy_from_contract(chain.w3, chain.policy.address, who)
    assert policy.allowed_models is None
    assert policy.allowed_intents == frozenset(), "without candidate names no intent can be confirmed: fail closed"
    assert policy.max_payment is None and policy.daily_cap is None


def test_zero_caps_mean_nothing(chain: Chain) -> None:
    who = agent()
    chain.set_policy(who, ticket=0, daily=0, total=0, any_intent=True, any_model=True)
    policy = policy_from_contract(chain.w3, chain.policy.address, who)
    assert (policy.max_payment, policy.daily_cap, policy.total_budget) == (0, 0, 0)


def test_more_candidates_than_one_batch(chain: Chain) -> None:
    who = agent()
    names = [f"intent-{i}" for i in range(150)]
    chain.set_policy(who, intents=tuple(names[::7]), any_model=True)
    policy = policy_from_contract(chain.w3, chain.policy.address, who, intents=names)
    assert policy.allowed_intents == set(names[::7])


def test_an_agent_without_a_policy_is_refused(chain: Chain) -> None:
    with pytest.raises(PolicySourceError, match="has no policy"):
        policy_from_contract(chain.w3, chain.policy.address, agent())
    with pytest.raises(ValueError, match="must be an Ethereum address"):
        policy_from_contract(chain.w3, "0x1234", agent())


def test_the_source_refreshes_after_its_ttl(chain: Chain) -> None:
    who = agent()
    clock = FakeClock()
    chain.set_policy(who, daily=5_000_000, intents=("judging",), any_model=True)
    source = ContractPolicySource(
        chain.w3, chain.policy.address, who, intents={"judging", "commentary"}, ttl=30, clock=clock
    )
    first = source.current()
    assert first.daily_cap == 5_000_000 and first.allowed_intents == {"judging"}
    chain.policy.functions.set_policy(who, UNLIMITED, 1_000, UNLIMITED).transact()
    chain.policy.functions.allow_intent(who, name_hash("commentary")).transact()
    clock.advance(29)
    assert source.current() is first, "within the TTL the cached policy is served"
    clock.advance(1)
    second = source.current()
    assert second.daily_cap == 1_000 and second.allowed_intents == {"judging", "commentary"}
    clock.advance(30)
    assert source.current() is second, "an unchanged revision is not read again"
    chain.policy.functions.revoke(who).transact()
    assert source.current() is second, "the kill switch applies at the next read"
    with pytest.raises(PolicyUnavailable, match="revoked"):
        source.refresh()
    clock.advance(30)
    with pytest.raises(PolicyUnavailable) as refused:
        source.current()
    assert refused.value.code == "policy_unavailable" and isinstance(refused.value, PolicyRefusal)


def test_live_checks_for_any_name(chain: Chain) -> None:
    who = agent()
    chain.set_policy(who, intents=("judging",), models=("gpt-5.2",))
    source = ContractPolicySource(chain.w3, chain.policy.address, who)
    assert source.allows_intent("judging") and not source.allows_intent("commentary")
    assert source.allows_model("gpt-5.2") and not source.allows_model("gpt-4o")


class Flaky(RefreshingPolicySource):
    """A source whose reads succeed or fail on demand (the caching rules, independent of any chain)."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(ttl=10, max_stale=20, retry_seconds=2, clock=clock)
        self.answer: Policy | Exception = Policy(daily_cap_usd="1")
        self.reads = 0

    def load(self) -> Policy:
        self.reads += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_an_unreachable_source_serves_the_last_policy_until_max_stale() -> None:
    clock = FakeClock()
    source = Flaky(clock)
    good = source.current()
    source.answer = ConnectionError("rpc down")
    clock.advance(10)
    assert source.current() is good and source.reads == 2
    clock.advance(1)
    assert source.current() is good and source.reads == 2, "a failed read is retried after retry_seconds, not per call"
    clock.advance(1)
    assert source.current() is good and source.reads == 3
    clock.advance(18)  # 30 s after the read: ttl (10) + max_stale (20) have passed
    with pytest.raises(PolicyUnavailable, match="unreachable"):
        source.current()
    source.answer = Policy(daily_cap_usd="2")
    clock.advance(2)
    assert source.current().daily_cap == 2_000_000, "it recovers on the next successful read"


def test_a_definitive_refusal_is_not_hidden_by_the_cache() -> None:
    clock = FakeClock()
    source = Flaky(clock)
    source.current()
    source.answer = PolicySourceError("agent revoked")
    clock.advance(10)
    with pytest.raises(PolicyUnavailable, match="agent revoked"):
        source.current()
