"""The on-chain sources in front of the sandbox gateway: a change written on chain changes what the next call may
do after the source's refresh, and a refused call never reaches the network; a verified ENS name is the agent."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from onchain_support import UNLIMITED, Chain, FakeClock, Traffic

from llm402 import Gateway, Policy, Wallet
from llm402.identity import Identity, IdentityError
from llm402.money import atomic_to_usd
from llm402.policy_sources import ContractPolicySource, EnsPolicySource, MergedPolicySource, name_hash
from llm402.sandbox import SandboxServer

BODY = {"model": "sandbox/small", "messages": [{"role": "user", "content": "judge this battle"}], "max_tokens": 32}
_names = iter(range(10_000))


def fresh_name() -> str:
    return f"crew{next(_names)}.krump.eth"


def signatures(sandbox: SandboxServer, wallet: Wallet) -> int:
    stats: dict[str, Any] = httpx.get(f"{sandbox.url}/sandbox/stats", params={"payer": wallet.address}).json()
    return int(stats["signatures_seen"])


def today() -> str:
    return datetime.now(UTC).date().isoformat()


@pytest.fixture
def client_of() -> Iterator[Any]:
    opened: list[tuple[Gateway, httpx.Client]] = []

    def make(gateway: Gateway) -> httpx.Client:
        gateway.load_prices()  # real estimates, so the budget guard reserves before any payment traffic
        client = gateway.http_client(base_url=gateway.base_url)
        opened.append((gateway, client))
        return client

    yield make
    for gateway, client in opened:
        client.close()
        gateway.close()


def test_a_policy_changed_on_chain_refuses_the_next_call_before_any_traffic(
    chain: Chain, sandbox: SandboxServer, funded: Wallet, traffic: Traffic, client_of: Any
) -> None:
    clock = FakeClock()
    chain.set_policy(funded.address, ticket=50_000, daily=5_000_000, intents=("judging",), any_model=True)
    source = ContractPolicySource(
        chain.w3, chain.policy.address, funded.address, intents={"judging", "commentary"}, ttl=30, clock=clock
    )
    gw = Gateway(f"{sandbox.url}/v1", wallet=funded, policy=source, intent="judging", ledger="memory://")
    client = client_of(gw)

    assert client.post("/chat/completions", json=BODY).status_code == 200
    first = gw.last_receipt
    assert first is not None and first.cost > 0 and first.error is None
    assert signatures(sandbox, funded) == 1

    # The owner lowers the daily cap to what the agent has already spent today.
    chain.policy.functions.set_policy(funded.address, 50_000, first.cost, UNLIMITED).transact()
    clock.advance(29)
    assert client.post("/chat/completions", json=BODY).status_code == 200, "until the refresh, the old policy holds"
    assert signatures(sandbox, funded) == 2

    clock.advance(1)  # the TTL has passed: the next call reads the chain again
    before = traffic.count
    refused = client.post("/chat/completions", json=BODY)
    assert refused.status_code == 402 and refused.json()["error"]["code"] == "budget_exceeded"
    assert refused.headers["x-should-retry"] == "false"
    assert traffic.count == before, f"the refusal never reached the network: {traffic.requests[before:]}"
    assert signatures(sandbox, funded) == 2
    assert gw.last_receipt is not None and gw.last_receipt.error == "budget_exceeded"
    assert gw.policy.daily_cap == first.cost

    # The owner then withdraws the intent: refused by the policy itself, still before any traffic.
    chain.policy.functions.set_policy(funded.address, 50_000, 5_000_000, UNLIMITED).transact()
    chain.policy.functions.disallow_intent(funded.address, name_hash("judging")).transact()
    clock.advance(30)
    refused = client.post("/chat/completions", json=BODY)
    assert refused.status_code == 402 and refused.json()["error"]["code"] == "intent_not_allowed"
    assert traffic.count == before and signatures(sandbox, funded) == 2

    # And revoking the agent is a kill switch.
    chain.policy.functions.allow_intent(funded.address, name_hash("judging")).transact()
    chain.policy.functions.revoke(funded.address).transact()
    clock.advance(30)
    refused = client.post("/chat/completions", json=BODY)
    assert refused.status_code == 402 and refused.json()["error"]["code"] == "policy_unavailable"
    assert traffic.count == before and signatures(sandbox, funded) == 2


def test_a_verified_ens_name_is_the_agent_on_receipts_and_budgets(
    chain: Chain, sandbox: SandboxServer, funded: Wallet, client_of: Any
) -> None:
    name = fresh_name()
    chain.register(name, funded.address)
    identity = Identity.resolve(funded, name, web3=chain.w3)
    gw = Gateway(
        f"{sandbox.url}/v1",
        wallet=funded,
        agent=identity,
        intent="judging",
        policy=Policy(max_payment_usd="0.05"),
        ledger="memory://",
    )
    assert (gw.agent, gw.identity) == (name, identity)
    client = client_of(gw)
    assert client.post("/chat/completions", json=BODY).status_code == 200
    receipt = gw.last_receipt
    assert receipt is not None and receipt.agent == name and receipt.payment is not None
    assert receipt.payment.payer == funded.address
    assert [r.agent for r in gw.receipts()] == [name]
    assert gw.ledger.totals(name, today()).day_spent == receipt.cost > 0


def test_a_name_that_belongs_to_another_address_is_refused_before_any_call(
    chain: Chain, funded: Wallet, traffic: Traffic
) -> None:
    name = fresh_name()
    chain.register(name, Wallet.create().address)
    with pytest.raises(IdentityError, match="not to the signing wallet"):
        Identity.resolve(funded, name, web3=chain.w3)
    assert traffic.count == 0


def test_text_records_and_the_contract_combine_strictest_wins(
    chain: Chain, sandbox: SandboxServer, funded: Wallet, traffic: Traffic, client_of: Any
) -> None:
    clock = FakeClock()
    name = fresh_name()
    chain.register(name, funded.address)
    chain.set_policy(funded.address, ticket=50_000, daily=5_000_000, intents=("judging", "commentary"), any_model=True)
    chain.set_text(name, "llm402.max_ticket", "0.02")
    chain.set_text(name, "llm402.daily_cap", "1")
    chain.set_text(name, "llm402.intents", "judging")
    identity = Identity.resolve(funded, name, web3=chain.w3)
    contract = ContractPolicySource(
        chain.w3, chain.policy.address, funded.address, intents={"judging", "commentary"}, ttl=30, clock=clock
    )
    ens = EnsPolicySource(chain.w3, name, ttl=30, clock=clock)
    code = Policy(total_budget_usd="3", allowed_models=frozenset({"sandbox/small", "sandbox/medium"}))
    combined = MergedPolicySource(code, contract, ens)
    policy = combined.current()
    assert policy.max_payment == 20_000, "ENS's ticket is below the contract's"
    assert policy.daily_cap == 1_000_000, "ENS's daily cap is below the contract's"
    assert policy.total_budget == 3_000_000, "the code's total, the only one set"
    assert policy.allowed_intents == {"judging"}, "the contract allows commentary; ENS does not"
    assert policy.allowed_models == {"sandbox/small", "sandbox/medium"}

    commentary = Gateway(
        f"{sandbox.url}/v1", wallet=funded, agent=identity, intent="commentary", policy=combined, ledger="memory://"
    )
    before = traffic.count
    refused = commentary.http_client().post(f"{commentary.base_url}/chat/completions", json=BODY)
    assert refused.status_code == 402 and refused.json()["error"]["code"] == "intent_not_allowed"
    assert traffic.count == before
    commentary.close()

    judging = Gateway(
        f"{sandbox.url}/v1", wallet=funded, agent=identity, intent="judging", policy=combined, ledger="memory://"
    )
    client = client_of(judging)
    assert client.post("/chat/completions", json=BODY).status_code == 200
    spent = judging.last_receipt.cost if judging.last_receipt else 0
    assert spent > 0

    # The name's owner lowers the ENS daily cap below the contract's: after the refresh it binds.
    chain.set_text(name, "llm402.daily_cap", format(atomic_to_usd(spent), "f"))
    clock.advance(30)
    before = traffic.count
    refused = client.post("/chat/completions", json=BODY)
    assert refused.status_code == 402 and refused.json()["error"]["code"] == "budget_exceeded"
    assert traffic.count == before and signatures(sandbox, funded) == 1
