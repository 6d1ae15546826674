"""`compare`: the same messages to several models at once, with answer, latency, tokens and cost side by side.

Works on anything that makes llm402 clients (a `Gateway` or a `Router`): calls run concurrently on its async client,
each paid and receipted on its own, and each row's cost is read from that call's receipt (never estimated).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import Any, Protocol

import httpx

from .errors import gateway_error, refusal_from_envelope
from .money import atomic_to_usd, format_usd
from .receipts import Receipt

EXCERPT_CHARS = 120


class ClientMaker(Protocol):
    """What `compare` needs: a base URL, a key for it, and llm402's async client (`Gateway`, `Router`)."""

    @property
    def base_url(self) -> str: ...

    @property
    def api_key(self) -> str: ...

    def async_http_client(self, **kwargs: Any) -> httpx.AsyncClient: ...

    def on_receipt(self, listener: Callable[[Receipt], None]) -> None: ...


_row_receipts: contextvars.ContextVar[list[Receipt] | None] = contextvars.ContextVar("llm402_compare", default=None)


def _collect(receipt: Receipt) -> None:
    """A receipt listener: receipts land in the list of the comparison task that made the call (each model runs in
    its own task, and llm402 publishes a call's receipt in that call's context)."""
    box = _row_receipts.get()
    if box is not None:
        box.append(receipt)


def _stop_listening(target: ClientMaker) -> None:
    remove = getattr(target, "remove_listener", None) or getattr(
        getattr(target, "engine", None), "remove_listener", None
    )
    if remove is not None:
        remove(_collect)


@dataclass(frozen=True, slots=True)
class CompareRow:
    """One model's answer to the compared messages. ``cost`` in micro-USDC (every attempt of a routed call)."""

    model: str
    answer: str
    latency_ms: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: int = 0
    error: str | None = None
    route: str | None = None

    @property
    def ok(self) -> bool:
        """The model answered."""
        return self.error is None

    @property
    def cost_usd(self) -> Decimal:
        """The cost in USD (display)."""
        return atomic_to_usd(self.cost)

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    def excerpt(self, chars: int = EXCERPT_CHARS) -> str:
        """The answer on one line, cut to ``chars``."""
        text = " ".join(self.answer.split())
        return text if len(text) <= chars else text[: chars - 1] + "…"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (with ``cost_usd`` as a string)."""
        return {**asdict(self), "cost_usd": str(self.cost_usd)}


def _answer_text(data: Mapping[str, Any]) -> str:
    choices = data.get("choices")
    message = choices[0].get("message") if isinstance(choices, list) and choices else None
    if not isinstance(message, Mapping):
        return ""
    content = message.get("content")
    if isinstance(content, str) and content:
        return content
    calls = message.get("tool_calls") or message.get("function_call")
    return json.dumps(calls) if calls else ""


def _failure(response: httpx.Response) -> str:
    refusal = refusal_from_envelope(response.content)
    if refusal is not None:
        return f"{refusal.code}: {refusal.message}"
    error = gateway_error(response.status_code, response.content, response.headers.get("retry-after"))
    return str(error) if error is not None else f"HTTP {response.status_code}"


async def _one(
    client: httpx.AsyncClient, url: str, headers: Mapping[str, str], body: dict[str, Any], model: str
) -> CompareRow:
    receipts: list[Receipt] = []
    _row_receipts.set(receipts)  # this task's own list: the receipts below are this call's
    started = time.perf_counter()
    try:
        response = await client.post(url, json=body, headers=dict(headers))
    except httpx.HTTPError as exc:
        latency = round((time.perf_counter() - started) * 1000, 1)
        cost = sum(r.cost for r in receipts)
        return CompareRow(model, "", latency, cost=cost, error=type(exc).__name__)
    latency = round((time.perf_counter() - started) * 1000, 1)
    receipt = receipts[-1] if receipts else None
    cost = receipt.cost if receipt is not None else 0
    route = receipt.route if receipt is not None else None
    if not response.is_success:
        return CompareRow(model, "", latency, cost=cost, error=_failure(response), route=route)
    try:
        data = response.json()
    except ValueError:
        return CompareRow(model, "", latency, cost=cost, error="invalid_json", route=route)
    usage = data.get("usage") if isinstance(data, Mapping) else None
    usage = usage if isinstance(usage, Mapping) else {}
    return CompareRow(
        model=model,
        answer=_answer_text(data) if isinstance(data, Mapping) else "",
        latency_ms=latency,
        prompt_tokens=int(usage.get("prompt_tokens") or (receipt.prompt_tokens if receipt else 0)),
        completion_tokens=int(usage.get("completion_tokens") or (receipt.completion_tokens if receipt else 0)),
        cost=cost,
        route=route,
    )


async def acompare(
    target: ClientMaker,
    models: Sequence[str],
    messages: Sequence[Mapping[str, Any]],
    *,
    max_tokens: int | None = None,
    extra: Mapping[str, Any] | None = None,
    concurrency: int = 8,
    timeout: float = 120.0,
    on_row: Callable[[CompareRow], None] | None = None,
) -> list[CompareRow]:
    """Ask every model in ``models`` the same ``messages`` concurrently; rows in the order of ``models``.

    ``on_row`` is called as each model finishes (the CLI's progress display). A failing model is a row with
    ``error`` set, not an exception: a comparison reports what each model did.
    """
    if not models:
        return []
    target.on_receipt(_collect)
    try:
        return await _run_all(target, models, messages, max_tokens, extra, concurrency, timeout, on_row)
    finally:
        _stop_listening(target)


async def _run_all(
    target: ClientMaker,
    models: Sequence[str],
    messages: Sequence[Mapping[str, Any]],
    max_tokens: int | None,
    extra: Mapping[str, Any] | None,
    concurrency: int,
    timeout: float,
    on_row: Callable[[CompareRow], None] | None,
) -> list[CompareRow]:
    url = f"{target.base_url}/chat/completions"
    headers = {"authorization": f"Bearer {target.api_key}"}
    gate = asyncio.Semaphore(max(1, concurrency))
    async with target.async_http_client(timeout=timeout) as client:

        async def run(model: str) -> CompareRow:
            body: dict[str, Any] = {**(extra or {}), "model": model, "messages": [dict(m) for m in messages]}
            if max_tokens is not None:
                body["max_tokens"] = max_tokens
            async with gate:
                row = await _one(client, url, headers, body, model)
            if on_row is not None:
                on_row(row)
            return row

        return list(await asyncio.gather(*(run(m) for m in models)))


def compare(
    target: ClientMaker,
    models: Sequence[str],
    messages: Sequence[Mapping[str, Any]],
    **kwargs: Any,
) -> list[CompareRow]:
    """`acompare` from synchronous code (inside a running event loop, await `acompare` instead)."""
    return asyncio.run(acompare(target, models, messages, **kwargs))


def rows_table(rows: Sequence[CompareRow], title: str = "model comparison") -> Any:
    """A ``rich`` table of the rows (model, answer excerpt, latency, tokens, cost)."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title)
    for column, justify in (
        ("model", "left"),
        ("answer", "left"),
        ("latency", "right"),
        ("tokens", "right"),
        ("cost", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        answer = Text(row.excerpt(60)) if row.ok else Text(str(row.error), style="red")  # answers are not markup
        tokens = f"{row.prompt_tokens}+{row.completion_tokens}"
        table.add_row(row.model, answer, f"{row.latency_ms:.0f} ms", tokens, format_usd(row.cost))
    return table
