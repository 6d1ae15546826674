"""langchain-tests' standard integration suite for `ChatGateway`, against the sandbox, every call paid through a 402.

One funded throwaway wallet and one ledger per test class; when the class is done, the sandbox's books must agree
with llm402's: every call paid (one signature each), and the wallet charged exactly the receipts' total.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_support import FUNDS, SandboxView
from langchain_tests.integration_tests import ChatModelIntegrationTests

from llm402 import Gateway, Policy
from llm402.langchain import ChatGateway
from llm402.sandbox import SandboxServer


class TestChatGatewayStandardIntegration(ChatModelIntegrationTests):
    gateway: Gateway

    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def _paid_gateway(cls, sandbox: SandboxServer) -> Iterator[None]:
        view = SandboxView(sandbox)
        wallet = view.funded_wallet()
        gateway = Gateway(
            f"{sandbox.url}/v1",
            wallet=wallet,
            ledger="memory://",
            policy=Policy(max_payment_usd="0.05", daily_cap_usd="4"),
            agent="langchain-standard-suite",
        )
        cls.gateway = gateway
        yield
        receipts = list(gateway.receipts())
        assert receipts, "the suite made no calls"
        unpaid = [r for r in receipts if r.payment is None or not r.payment.transaction]
        assert not unpaid, f"calls not paid through a 402: {unpaid[:3]}"
        assert view.stats(wallet.address)["signatures_seen"] == len(receipts)
        assert FUNDS - view.balance(wallet.address) == sum(r.cost for r in receipts) > 0

    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatGateway

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": "sandbox/small", "gateway": type(self).gateway}

    @property
    def model_override_value(self) -> str | None:
        return "sandbox/medium"
