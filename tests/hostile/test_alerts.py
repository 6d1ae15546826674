"""Approaching-limit alerts fire once per cap, threshold and period, across processes sharing one ledger."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

from hostile_gateway import HostileGateway, Seen, chat_answer

from llm402 import Gateway, Policy
from llm402.alerts import BudgetAlert
from llm402.pricing import ModelPrice

WORKER = textwrap.dedent(
    """
    import sys, openai
    from llm402 import Gateway, Policy
    from llm402.pricing import ModelPrice
    url, ledger, webhook, calls = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    policy = Policy(daily_cap_usd="0.02", alert_at=["0.5", "0.8"], alert_webhook=webhook)
    gw = Gateway(url, profile="plain", api_key="sk-x", ledger=ledger, policy=policy, agent="fleet",
                 prices={"m": ModelPrice.from_usd("20", "20")})
    client = openai.OpenAI(base_url=gw.base_url, api_key=gw.api_key, http_client=gw.http_client(), max_retries=0)
    for _ in range(calls):
        try:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], max_tokens=100)
        except openai.APIStatusError:
            pass
    """
)


def answer(seen: Seen) -> tuple[int, dict[str, str], bytes]:
    # 105 tokens at $20 per 1M: $0.0021 a call, within its reservation (the prompt estimate plus max_tokens)
    return 200, {"content-type": "application/json"}, chat_answer(5, 100)


def test_two_processes_cross_50_and_80_percent_and_each_alert_fires_once(tmp_path: Path) -> None:
    alerts: list[dict[str, Any]] = []
    lock = threading.Lock()

    def webhook(seen: Seen) -> tuple[int, dict[str, str], bytes]:
        with lock:
            alerts.append(seen.json())
        return 204, {}, b""

    with HostileGateway(answer) as gateway, HostileGateway(webhook) as hook:
        ledger = f"sqlite:///{tmp_path}/fleet.db"
        args = [gateway.url + "/v1", ledger, hook.url + "/alerts", "7"]
        workers = [subprocess.Popen([sys.executable, "-c", WORKER, *args]) for _ in range(2)]
        assert [w.wait(timeout=120) for w in workers] == [0, 0]
        assert gateway.count("/v1/chat/completions") == 9  # $0.02 cap, $0.0021 a call: the cap held
    fired = sorted((a["cap"], a["threshold"]) for a in alerts)
    assert fired == [("daily", "0.5"), ("daily", "0.8")]
    assert all(a["agent"] == "fleet" and a["limit"] == 20_000 for a in alerts)


def test_listeners_hear_each_alert_once_in_process() -> None:
    heard: list[BudgetAlert] = []
    with HostileGateway(answer) as gateway:
        gw = Gateway(
            gateway.url + "/v1",
            profile="plain",
            api_key="sk-x",
            ledger="memory://",
            policy=Policy(daily_cap_usd="0.01", alert_at=[Decimal("0.5")]),
            prices={"m": ModelPrice.from_usd("20", "20")},
        )
        gw.on_alert(heard.append)
        client = gw.http_client()
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100}
        for _ in range(4):
            client.post(gw.base_url + "/chat/completions", content=json.dumps(body))
    assert [(a.cap, a.threshold) for a in heard] == [("daily", Decimal("0.5"))]
    assert heard[0].used >= 5_000 and sum(r.cost for r in gw.receipts()) <= 10_000


def test_a_webhook_url_never_reaches_a_repr() -> None:
    policy = Policy(alert_at=["0.8"], alert_webhook="https://hooks.example/services/T0/B0/s3cr3t-token")
    assert "s3cr3t-token" not in repr(policy) and "s3cr3t-token" not in str(policy)
