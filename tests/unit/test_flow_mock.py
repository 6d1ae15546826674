"""The call flow over an in-memory gateway (httpx.MockTransport): rules that need no server."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

import httpx
import pytest

from llm402 import Gateway, Policy, Wallet
from llm402.errors import PaymentOutcomeUnknown, refusal_from_envelope

ASSET = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
PAYEE = "0x" + "ab" * 20


def requirements(amount: str = "5000", **over: object) -> dict[str, object]:
    entry: dict[str, object] = {
        "scheme": "exact",
        "network": "eip155:84532",
        "asset": ASSET,
        "amount": amount,
        "payTo": PAYEE,
        "maxTimeoutSeconds": 60,
        "extra": {"name": "USDC", "version": "2"},
    }
    entry.update(over)
    return {"x402Version": 2, "resource": {"url": "http://127.0.0.1/v1/chat/completions"}, "accepts": [entry]}


def b64(data: object) -> str:
    return base64.b64encode(json.dumps(data).encode()).decode()


class FakeGateway:
    """Answers 402 without a payment header; records what it saw."""

    def __init__(self, challenge: Callable[[], httpx.Response], paid: Callable[[httpx.Request], httpx.Response]):
        self.challenge = challenge
        self.paid = paid
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if "payment-signature" in request.headers or "x-payment" in request.headers:
            return self.paid(request)
        return self.challenge()

    @property
    def signatures(self) -> set[str]:
        return {
            r.headers.get("payment-signature") or r.headers.get("x-payment") or ""
            for r in self.requests
            if "payment-signature" in r.headers or "x-payment" in r.headers
        }


def ok(request: httpx.Request) -> httpx.Response:
    body = {"choices": [{"message": {"content": "hi"}}], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    return httpx.Response(200, json=body)


def v2_challenge(amount: str = "5000", **over: object) -> Callable[[], httpx.Response]:
    return lambda: httpx.Response(402, headers={"PAYMENT-REQUIRED": b64(requirements(amount, **over))}, json={})


def gateway(fake: FakeGateway, policy: Policy | None = None, **kw: object) -> tuple[Gateway, httpx.Client]:
    gw = Gateway(
        "http://127.0.0.1:9/v1",
        wallet=Wallet.create(),
        policy=policy or Policy(max_payment_usd="0.05"),
        ledger="memory://",
        **kw,  # type: ignore[arg-type]
    )
    from llm402.transport import PaymentTransport

    return gw, httpx.Client(transport=PaymentTransport(gw.engine, httpx.MockTransport(fake)))


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}


def test_pays_once_and_marks_no_retry() -> None:
    fake = FakeGateway(v2_challenge(), ok)
    gw, client = gateway(fake)
    response = client.post("http://127.0.0.1:9/v1/chat/completions", json=CHAT)
    assert response.status_code == 200
    assert response.headers["x-should-retry"] == "false"
    assert len(fake.requests) == 2 and len(fake.signatures) == 1
    receipt = gw.last_receipt
    assert receipt is not None and receipt.cost == 5000 and receipt.payment is not None
    assert receipt.payment.amount == 5000 and receipt.prompt_tokens == 3


@pytest.mark.parametrize(
    ("challenge", "code"),
    [
        (lambda: httpx.Response(402, headers={"PAYMENT-REQUIRED": "%%%not-base64"}), "malformed_payment_required"),
        (
            lambda: httpx.Response(402, headers={"PAYMENT-REQUIRED": base64.b64encode(b"{nope").decode()}),
            "malformed_payment_required",
        ),
        (v2_challenge(payTo=None), "malformed_payment_required"),
        (v2_challenge("-5"), "malformed_payment_required"),
        (v2_challenge("1.5"), "malformed_payment_required"),
        (v2_challenge(str(2**256)), "malformed_payment_required"),
        (v2_challenge("60000"), "payment_over_ticket"),
        (v2_challenge(asset="0x" + "11" * 20), "asset_not_allowed"),
        (v2_challenge(network="eip155:999999"), "asset_not_allowed"),
        (v2_challenge(network="solana:mainnet"), "malformed_payment_required"),
        (v2_challenge(maxTimeoutSeconds=86_400), "validity_too_long"),
    ],
)
def test_bad_challenges_are_typed_and_nothing_is_signed(challenge: Callable[[], httpx.Response], code: str) -> None:
    fake = FakeGateway(challenge, ok)
    _, client = gateway(fake)
    response = client.post("http://127.0.0.1:9/v1/chat/completions", json=CHAT)
    assert response.status_code == 402
    assert response.headers["x-should-retry"] == "false"
    error = refusal_from_envelope(response.content)
    assert error is not None and error.code == code, response.text
    assert fake.signatures == set()


def test_network_allow_list() -> None:
    fake = FakeGateway(v2_challenge(), ok)
    _, client = gateway(fake, Policy(allowed_networks=frozenset({"eip155:8453"})))
    response = client.post("http://127.0.0.1:9/v1/chat/completions", json=CHAT)
    error = refusal_from_envelope(response.content)
    assert error is not None and error.code == "network_not_allowed"
    assert fake.signatures == set()


def test_payee_allow_list() -> None:
    fake = FakeGateway(v2_challenge(), ok)
    _, client = gateway(fake, Policy(allowed_payees=frozenset({"0x" + "cd" * 20})))
    error = refusal_from_envelope(client.post("http://127.0.0.1:9/v1/chat/completions", json=CHAT).content)
    assert error is not None and error.code == "payee_not_allowed"
    assert fake.signatures == set()


def test_402_on_replay_is_a_typed_error_not_a_loop() -> None:
    fake = FakeGateway(
        v2_challenge(), lambda r: httpx.Response(402, json={"error": "invalid_exact_evm_payload_signature"})
    )
    _, client = gateway(fake)
    response = client.post("http://127.0.0.1:9/v1/chat/completions", json=CHAT)
    error = refusal_from_envelope(response.content)
    assert error is not None and error.code == "payment_rejected"
    assert len(fake.requests) == 2 and len(fake.signatures) == 1


def test_retry_after_lost_answer_resends_same_payment() -> None:
    state = {"n": 0}

    def paid(request: httpx.Request) -> httpx.Response:
        state["n"] += 1
        if state["n"] == 1:
            raise httpx.ReadTimeout("stalled after settlement", request=request)
        return httpx.Response(402, json={"error": "nonce_already_used"})

    fake = FakeGateway(v2_challenge(), paid)
    gw, client = gateway(fake)
    with pytest.raises(httpx.ReadTimeout):
        client.post("http://127.0.0.1:9/v1/chat/completions", json=CHAT)
    for _ in range(4):  # every retry re-sends the one authorization; a refusal that shows it settled is typed
        retry = client.post("http://127.0.0.1:9/v1/chat/completions", json=CHAT)
        error = refusal_from_envelope(retry.content)
        assert error is not None and error.code == "paid_answer_lost"
        assert isinstance(error, PaymentOutcomeUnknown)
    assert len(fake.signatures) == 1
    costs = [r.cost for r in gw.receipts()]
    assert sum(costs) == 5000


def test_intent_refused_before_any_traffic() -> None:
    fake = FakeGateway(v2_challenge(), ok)
    _, client = gateway(fake, Policy(allowed_intents=frozenset({"judging"})), intent="chatting")
    response = client.post("http://127.0.0.1:9/v1/chat/completions", json=CHAT)
    error = refusal_from_envelope(response.content)
    assert error is not None and error.code == "intent_not_allowed"
    assert fake.requests == []


def test_insecure_mainnet_gateway_refused() -> None:
    base = "http://gateway.example/v1"
    challenge = v2_challenge(network="eip155:8453", asset="0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913")
    fake = FakeGateway(challenge, ok)
    gw = Gateway(base, wallet=Wallet.create(), policy=Policy(max_payment_usd="1"), ledger="memory://")
    from llm402.transport import PaymentTransport

    client = httpx.Client(transport=PaymentTransport(gw.engine, httpx.MockTransport(fake)))
    error = refusal_from_envelope(client.post(f"{base}/chat/completions", json=CHAT).content)
    assert error is not None and error.code == "insecure_gateway"
    assert fake.signatures == set()


def test_placeholder_key_never_reaches_the_wire() -> None:
    fake = FakeGateway(v2_challenge(), ok)
    gw, client = gateway(fake)
    client.post("http://127.0.0.1:9/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {gw.api_key}"})
    assert all("authorization" not in r.headers for r in fake.requests)


def test_current_receipt_reaches_the_caller_after_a_stream() -> None:
    from llm402.receipts import current_receipt

    sse = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\ndata: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\ndata: [DONE]\n\n'
    fake = FakeGateway(v2_challenge(), lambda r: httpx.Response(200, content=sse))
    gw, client = gateway(fake)
    seen: list[object] = []
    gw.on_receipt(seen.append)
    with client.stream("POST", "http://127.0.0.1:9/v1/chat/completions", json={**CHAT, "stream": True}) as response:
        body = b"".join(response.iter_bytes())
    assert b"usage" not in body
    receipt = current_receipt.get()
    assert receipt is not None
    assert receipt is gw.last_receipt
    assert seen == [receipt]
    assert receipt.completion_tokens == 1


def test_identity_travels_in_headers() -> None:
    fake = FakeGateway(v2_challenge(), ok)
    _, client = gateway(fake, intent="judging")
    client.post("http://127.0.0.1:9/v1/chat/completions", json=CHAT)
    assert all(r.headers["llm402-intent"] == "judging" for r in fake.requests)
    assert all(r.headers["llm402-agent"].startswith("0x") for r in fake.requests)


def test_sign_in_with_x_proof_alone_once_the_wallet_has_paid() -> None:
    import datetime

    now = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
    challenge = requirements()
    challenge["extensions"] = {
        "sign-in-with-x": {
            "info": {
                "domain": "127.0.0.1:9",
                "uri": "http://127.0.0.1:9/v1/chat/completions",
                "version": "1",
                "nonce": "a1b2c3d4e5f60718293a4b5c6d7e8f90",
                "issuedAt": now,
            },
            "supportedChains": [{"chainId": "eip155:84532", "type": "eip191"}],
        }
    }

    def gate(request: httpx.Request) -> httpx.Response:  # a wallet that paid before gets in on the proof alone
        if "sign-in-with-x" in request.headers and fake.signatures:
            return ok(request)
        return httpx.Response(402, headers={"PAYMENT-REQUIRED": b64(challenge)}, json={})

    fake = FakeGateway(lambda: gate(fake.requests[-1]), ok)
    _, client = gateway(fake)
    assert client.post("http://127.0.0.1:9/v1/chat/completions", json=CHAT).status_code == 200
    unpaid, paid = fake.requests
    assert "sign-in-with-x" not in unpaid.headers  # a first payment carries no proof: the payment is what counts
    assert "sign-in-with-x" not in paid.headers
    for _ in range(2):
        assert client.post("http://127.0.0.1:9/v1/chat/completions", json=CHAT).status_code == 200
    assert len(fake.signatures) == 1  # later calls got in on the proof alone: no authorization signed for them
    assert all("sign-in-with-x" in r.headers for r in fake.requests[3::2])
