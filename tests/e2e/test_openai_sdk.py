"""The unchanged OpenAI SDK pays the sandbox in all three dialects, and never pays twice for one logical call."""

from __future__ import annotations

import asyncio
import logging

import httpx
import openai
import pytest
from e2e_support import FUNDS, SandboxView

from llm402 import Gateway, Policy, Wallet
from llm402.openai import refusal_from_error
from llm402.sandbox import SandboxServer

OPENAI_3 = openai.__version__.startswith("3")
DIALECTS = ["/v1", "/x402v1/v1", "/kiosk/v1"]
MESSAGES = [{"role": "user", "content": "Explain x402 in one line"}]


def make_gateway(sandbox: SandboxServer, wallet: Wallet, prefix: str = "/v1", **kw: object) -> Gateway:
    kw.setdefault("policy", Policy(max_payment_usd="0.05"))
    return Gateway(f"{sandbox.url}{prefix}", wallet=wallet, ledger="memory://", **kw)  # type: ignore[arg-type]


def sync_client(gw: Gateway, **kw: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=gw.api_key, http_client=gw.http_client(), **kw)  # type: ignore[arg-type]


def async_client(gw: Gateway, **kw: object) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.base_url, api_key=gw.api_key, http_client=gw.async_http_client(), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("prefix", DIALECTS)
def test_sync_plain_and_stream_pay_exactly_the_receipts(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet, prefix: str
) -> None:
    gw = make_gateway(sandbox, wallet, prefix)
    client = sync_client(gw)
    completion = client.chat.completions.create(model="sandbox/small", messages=MESSAGES)  # type: ignore[arg-type]
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.prompt_tokens > 0
    chunks = list(client.chat.completions.create(model="sandbox/medium", messages=MESSAGES, stream=True))  # type: ignore[call-overload]
    assert all(c.choices for c in chunks), "the usage chunk llm402 asked for must not reach a caller who did not"
    receipts = list(gw.receipts())
    assert len(receipts) == 2 and all(r.payment is not None and r.payment.transaction for r in receipts)
    assert receipts[1].streamed and receipts[1].completion_tokens > 0
    assert FUNDS - view.balance(wallet.address) == sum(r.cost for r in receipts) > 0
    assert view.stats(wallet.address)["signatures_seen"] == 2


@pytest.mark.parametrize("prefix", DIALECTS)
async def test_async_plain_and_stream(sandbox: SandboxServer, view: SandboxView, wallet: Wallet, prefix: str) -> None:
    gw = make_gateway(sandbox, wallet, prefix)
    client = async_client(gw)
    results = await asyncio.gather(
        *[client.chat.completions.create(model="sandbox/small", messages=MESSAGES) for _ in range(3)]  # type: ignore[arg-type]
    )
    assert all(r.choices[0].message.content for r in results)
    stream = await client.chat.completions.create(
        model="sandbox/small",
        messages=MESSAGES,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = None
    async for chunk in stream:
        usage = chunk.usage or usage
    assert usage is not None, "a caller who asked for usage still gets it"
    receipts = list(gw.receipts())
    assert len(receipts) == 4
    assert FUNDS - view.balance(wallet.address) == sum(r.cost for r in receipts)


def test_failure_after_settlement_signs_once(sandbox: SandboxServer, view: SandboxView, wallet: Wallet) -> None:
    gw = make_gateway(sandbox, wallet)
    client = sync_client(gw, default_headers={"X-Sandbox-Fault": "fail_after_settle"})  # default max_retries=2
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="sandbox/small", messages=MESSAGES)  # type: ignore[arg-type]
    assert view.stats(wallet.address)["signatures_seen"] == 1
    assert FUNDS - view.balance(wallet.address) == sum(r.cost for r in gw.receipts())


def test_stall_past_client_timeout_signs_once(sandbox: SandboxServer, view: SandboxView, wallet: Wallet) -> None:
    gw = make_gateway(sandbox, wallet)
    client = sync_client(gw, timeout=1.0, default_headers={"X-Sandbox-Fault": "stall_after_settle=2"})
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="sandbox/small", messages=MESSAGES)  # type: ignore[arg-type]
    refusal = refusal_from_error(info.value)
    # the SDK's retry re-sent the one authorization; the gateway's nonce_already_used shows it settled
    assert refusal is not None and refusal.code == "paid_answer_lost"
    assert view.stats(wallet.address)["signatures_seen"] == 1
    assert FUNDS - view.balance(wallet.address) == sum(r.cost for r in gw.receipts())


def test_malformed_402_is_typed_and_unsigned(sandbox: SandboxServer, view: SandboxView, wallet: Wallet) -> None:
    gw = make_gateway(sandbox, wallet)
    for kind in ("bad_base64", "bad_json", "missing_payee", "negative_amount", "fractional_amount", "huge_amount"):
        client = sync_client(gw, default_headers={"X-Sandbox-Fault": f"malformed_402={kind}"})
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model="sandbox/small", messages=MESSAGES)  # type: ignore[arg-type]
        refusal = refusal_from_error(info.value)
        assert refusal is not None and refusal.code == "malformed_payment_required", (kind, refusal)
    for kind, code in (("unknown_asset", "asset_not_allowed"), ("unknown_network", "malformed_payment_required")):
        client = sync_client(gw, default_headers={"X-Sandbox-Fault": f"malformed_402={kind}"})
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model="sandbox/small", messages=MESSAGES)  # type: ignore[arg-type]
        refusal = refusal_from_error(info.value)
        assert refusal is not None and refusal.code == code, (kind, refusal)
    assert view.stats(wallet.address)["signatures_seen"] == 0
    assert view.balance(wallet.address) == FUNDS


def test_amount_above_max_ticket_refused(sandbox: SandboxServer, view: SandboxView, wallet: Wallet) -> None:
    gw = make_gateway(sandbox, wallet, policy=Policy(max_payment_usd="0.000001"))
    with pytest.raises(openai.APIStatusError) as info:
        sync_client(gw).chat.completions.create(model="sandbox/large", messages=MESSAGES)  # type: ignore[arg-type]
    refusal = refusal_from_error(info.value)
    assert refusal is not None and refusal.code == "payment_over_ticket"
    assert refusal.details["requested"] > refusal.details["cap"] == 1
    assert view.stats(wallet.address)["signatures_seen"] == 0


def test_every_endpoint_is_paid(sandbox: SandboxServer, view: SandboxView, wallet: Wallet) -> None:
    gw = make_gateway(sandbox, wallet)
    client = sync_client(gw)
    embedding = client.embeddings.create(model="sandbox/small", input=["pay per call"])
    assert embedding.data[0].embedding
    image = client.images.generate(model="sandbox/small", prompt="a receipt", n=1)
    assert image.data
    with gw.http_client() as http:
        native = http.post(
            f"{gw.base_url}/models/sandbox-small:generateContent".replace("sandbox-small", "sandbox%2Fsmall"),
            json={
                "contents": [{"role": "user", "parts": [{"text": "hi"}]}],
                "generationConfig": {"maxOutputTokens": 8},
            },
        )
    assert native.status_code == 200, native.text
    receipts = list(gw.receipts())
    assert [r.payment is not None for r in receipts] == [True, True, True]
    assert FUNDS - view.balance(wallet.address) == sum(r.cost for r in receipts)


class CapturingTransport(httpx.HTTPTransport):
    """The real wire transport, remembering every payment header llm402 put on the wire."""

    def __init__(self) -> None:
        super().__init__()
        self.payment_headers: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for name in ("payment-signature", "x-payment"):
            if name in request.headers:
                self.payment_headers.append(request.headers[name])
        return super().handle_request(request)


def test_no_secret_in_logs_reprs_or_errors(
    sandbox: SandboxServer, view: SandboxView, caplog: pytest.LogCaptureFixture
) -> None:
    from llm402.transport import PaymentTransport

    wallet = Wallet.create()
    view.fund(wallet.address)
    key = wallet.export_private_key()
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    wire = CapturingTransport()
    for prefix in DIALECTS:
        gw = make_gateway(sandbox, wallet, prefix)
        http = httpx.Client(transport=PaymentTransport(gw.engine, wire))
        client = openai.OpenAI(base_url=gw.base_url, api_key=gw.api_key, http_client=http)
        completion = client.chat.completions.create(model="sandbox/small", messages=MESSAGES)  # type: ignore[arg-type]
        chunks = list(client.chat.completions.create(model="sandbox/small", messages=MESSAGES, stream=True))  # type: ignore[call-overload]
        texts += [repr(completion), *(repr(c) for c in chunks)]
        faulty = openai.OpenAI(
            base_url=gw.base_url,
            api_key=gw.api_key,
            http_client=httpx.Client(transport=PaymentTransport(gw.engine, wire)),
            default_headers={"X-Sandbox-Fault": "replay_402"},
        )
        with pytest.raises(openai.APIStatusError) as info:
            faulty.chat.completions.create(model="sandbox/small", messages=MESSAGES)  # type: ignore[arg-type]
        texts += [str(info.value), repr(info.value), info.value.response.text, repr(refusal_from_error(info.value))]
        texts += [repr(gw), str(gw), repr(gw.wallet), *(repr(r) for r in gw.receipts())]
    texts += [r.getMessage() for r in caplog.records] + [repr(r.args) for r in caplog.records]
    blob = "\n".join(texts)
    assert len(wire.payment_headers) == 9
    assert key[2:].lower() not in blob.lower()
    for header in wire.payment_headers:
        assert header not in blob
        assert header[:40] not in blob


def test_httpx2_clients(sandbox: SandboxServer, view: SandboxView, wallet: Wallet) -> None:
    """openai 3.x is built on httpx2: through the SDK there, and through raw httpx2 clients here."""
    gw = make_gateway(sandbox, wallet)
    url = f"{gw.base_url}/chat/completions"
    body = {"model": "sandbox/small", "messages": MESSAGES}
    if OPENAI_3:
        client = openai.OpenAI(base_url=gw.base_url, api_key=gw.api_key, http_client=gw.httpx2_client())
        assert client.chat.completions.create(**body).choices  # type: ignore[call-overload]
        assert list(client.chat.completions.create(**body, stream=True))  # type: ignore[call-overload]
    else:
        with gw.httpx2_client() as http2:
            assert http2.post(url, json=body).status_code == 200
            with http2.stream("POST", url, json={**body, "stream": True}) as streamed:
                assert b"[DONE]" in b"".join(streamed.iter_bytes())

    async def go() -> None:
        async with gw.async_httpx2_client() as http2:
            if OPENAI_3:
                aclient = openai.AsyncOpenAI(base_url=gw.base_url, api_key=gw.api_key, http_client=http2)
                assert (await aclient.chat.completions.create(**body)).choices  # type: ignore[call-overload]
            else:
                assert (await http2.post(url, json=body)).status_code == 200

    asyncio.run(go())
    receipts = list(gw.receipts())
    assert len(receipts) == 3 and all(r.payment is not None for r in receipts)
    assert FUNDS - view.balance(wallet.address) == sum(r.cost for r in receipts)
