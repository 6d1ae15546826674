"""An in-memory OpenAI-compatible x402 gateway (httpx.MockTransport) for the adapter's unit tests: no sockets."""

from __future__ import annotations

import base64
import json
import threading
from typing import Any

import httpx

from llm402 import Gateway, ModelPrice, Policy, Wallet
from llm402.transport import AsyncPaymentTransport, PaymentTransport

BASE_URL = "http://127.0.0.1:9/v1"
ASSET = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"  # USDC on Base Sepolia
PAYEE = "0x" + "ab" * 20
PRICES = {
    "fake/small": ModelPrice.from_usd("1", "2", context_length=32_000),
    "fake/large": ModelPrice.from_usd("3", "6", context_length=128_000),
}
AMOUNTS = {"fake/small": 2_000, "fake/large": 7_000}  # micro-USDC per call


def _b64(data: object) -> str:
    return base64.b64encode(json.dumps(data).encode()).decode()


class FakeGateway:
    """Answers 402 (x402 v2) to unpaid calls and OpenAI chat completions to paid ones; remembers what it saw.

    Faults by request header ``x-fake-fault``: ``fail_after_settle`` (settle, then 500), ``busy=N`` (503 before
    any payment, N times). A signature seen before is refused with 402, as a facilitator refuses a used nonce.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[httpx.Request] = []
        self.signatures: list[str] = []
        self.settled: dict[str, int] = {}
        self.busy_left: int | None = None

    # --- what the fake says about itself ------------------------------------------------------------------------
    @property
    def spent(self) -> int:
        return sum(self.settled.values())

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.requests.append(request)
        body = json.loads(request.content) if request.content else {}
        model = body.get("model", "fake/small")
        fault = request.headers.get("x-fake-fault", "")
        signature = request.headers.get("payment-signature")
        if fault.startswith("busy="):
            with self.lock:
                if self.busy_left is None:
                    self.busy_left = int(fault.split("=")[1])
                if self.busy_left > 0:
                    self.busy_left -= 1
                    return httpx.Response(503, json={"error": {"message": "busy"}})
        if signature is None:
            return self._challenge(model)
        with self.lock:
            self.signatures.append(signature)
            if signature in self.settled:
                return httpx.Response(402, json={"error": "nonce already used"})
            self.settled[signature] = AMOUNTS.get(model, 2_000)
        # the x402 settlement report names the payer (llm402 ignores one that does not) and the network
        payer = json.loads(base64.b64decode(signature))["payload"]["authorization"]["from"]
        settlement = {"success": True, "transaction": "0x" + "cd" * 32, "network": "eip155:84532", "payer": payer}
        headers = {"PAYMENT-RESPONSE": _b64(settlement)}
        if fault == "fail_after_settle":
            return httpx.Response(500, json={"error": {"message": "upstream failed"}}, headers=headers)
        if body.get("stream"):
            return self._stream(body, headers)
        return httpx.Response(200, json=self._completion(body), headers=headers)

    def _challenge(self, model: str) -> httpx.Response:
        required = {
            "x402Version": 2,
            "resource": {"url": f"{BASE_URL}/chat/completions"},
            "accepts": [
                {
                    "scheme": "exact",
                    "network": "eip155:84532",
                    "asset": ASSET,
                    "amount": str(AMOUNTS.get(model, 2_000)),
                    "payTo": PAYEE,
                    "maxTimeoutSeconds": 60,
                    "extra": {"name": "USDC", "version": "2"},
                }
            ],
        }
        return httpx.Response(402, headers={"PAYMENT-REQUIRED": _b64(required)}, json={})

    @staticmethod
    def _wants_tool(body: dict[str, Any]) -> dict[str, Any] | None:
        messages = body.get("messages") or [{}]
        if body.get("tools") and messages[-1].get("role") != "tool":
            return body["tools"][0]["function"]
        return None

    def _completion(self, body: dict[str, Any]) -> dict[str, Any]:
        tool = self._wants_tool(body)
        message: dict[str, Any] = {"role": "assistant", "content": None if tool else "Paid answer."}
        if tool:
            args = dict.fromkeys(tool.get("parameters", {}).get("properties", {}), 2)
            message["tool_calls"] = [
                {"id": "call_1", "type": "function", "function": {"name": tool["name"], "arguments": json.dumps(args)}}
            ]
        return {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model"),
            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if tool else "stop"}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14},
        }

    def _stream(self, body: dict[str, Any], headers: dict[str, str]) -> httpx.Response:
        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
            data = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": body.get("model"),
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **extra,
            }
            return b"data: " + json.dumps(data).encode() + b"\n\n"

        events = [chunk({"role": "assistant", "content": ""})]
        events += [chunk({"content": word}) for word in ("Paid ", "stream ", "answer.")]
        events.append(chunk({}, "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
            events.append(
                b"data: "
                + json.dumps(
                    {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "choices": [], "usage": usage}
                ).encode()
                + b"\n\n"
            )
        events.append(b"data: [DONE]\n\n")
        return httpx.Response(200, content=b"".join(events), headers={**headers, "content-type": "text/event-stream"})


def fake_gateway(policy: Policy | None = None, **kw: Any) -> Gateway:
    kw.setdefault("prices", PRICES)
    return Gateway(
        BASE_URL,
        wallet=Wallet.create(),
        policy=policy or Policy(max_payment_usd="0.05"),
        ledger="memory://",
        **kw,
    )


def clients(gw: Gateway, fake: FakeGateway) -> tuple[httpx.Client, httpx.AsyncClient]:
    """The gateway's transports over the fake instead of the network."""
    return (
        httpx.Client(transport=PaymentTransport(gw.engine, httpx.MockTransport(fake))),
        httpx.AsyncClient(transport=AsyncPaymentTransport(gw.engine, httpx.MockTransport(fake))),
    )
