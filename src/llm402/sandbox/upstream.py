"""Optional forwarding of chat completions to a real OpenAI-compatible upstream (a local model server, say).

The body goes upstream as it came (streams ask upstream for usage); answers and streams are piped back event by
event, never buffered; usage is taken from upstream. Any upstream failure (connection, timeout, HTTP >= 400) is an
`UpstreamFailure`, which the gateway answers with 502 UPSTREAM_ERROR and no charge.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from .models import StreamEvent


class UpstreamFailure(Exception):
    """The model could not answer (the gateway says 502 and charges nothing)."""


@dataclass
class UsageBox:
    """Usage as it becomes known (for a piped stream: when the upstream usage chunk passes)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    known: bool = False


class Upstream:
    """An OpenAI-compatible upstream at ``base_url`` (e.g. ``http://127.0.0.1:11434/v1``)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 120.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = timeout
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout, headers=self._headers)
        return self._client

    async def aclose(self) -> None:
        """Close the connection pool."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def chat(self, body: dict[str, Any]) -> tuple[dict[str, Any], UsageBox]:
        """A non-streamed completion and its usage."""
        try:
            response = await self._http().post(f"{self.base_url}/chat/completions", json={**body, "stream": False})
        except httpx.HTTPError as exc:
            raise UpstreamFailure(f"upstream unreachable: {type(exc).__name__}") from None
        if response.status_code >= 400:
            raise UpstreamFailure(f"upstream answered HTTP {response.status_code}")
        try:
            data = response.json()
        except ValueError:
            raise UpstreamFailure("upstream answered something that is not JSON") from None
        if not isinstance(data, dict):
            raise UpstreamFailure("upstream answered something that is not a JSON object")
        raw_usage = data.get("usage")
        usage: dict[str, Any] = raw_usage if isinstance(raw_usage, dict) else {}
        box = UsageBox(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0), bool(usage))
        return data, box

    async def chat_stream(
        self, body: dict[str, Any], include_usage: bool
    ) -> tuple[AsyncIterator[StreamEvent], UsageBox]:
        """Open an upstream stream (HTTP errors raise here, before anything is paid) and pipe its events."""
        payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
        client = self._http()
        request = client.build_request("POST", f"{self.base_url}/chat/completions", json=payload)
        try:
            response = await client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise UpstreamFailure(f"upstream unreachable: {type(exc).__name__}") from None
        if response.status_code >= 400:
            await response.aclose()
            raise UpstreamFailure(f"upstream answered HTTP {response.status_code}")
        box = UsageBox()
        return _pipe(response, box, include_usage), box


async def _pipe(response: httpx.Response, box: UsageBox, include_usage: bool) -> AsyncIterator[StreamEvent]:
    lines: list[str] = []
    try:
        async for line in response.aiter_lines():
            if line:
                lines.append(line)
                continue
            if lines:
                event = _event(lines, box, include_usage)
                lines = []
                if event is not None:
                    yield event
        if lines:
            event = _event(lines, box, include_usage)
            if event is not None:
                yield event
    except httpx.HTTPError as exc:
        raise UpstreamFailure(f"upstream stream broke: {type(exc).__name__}") from None
    finally:
        await response.aclose()


def _event(lines: list[str], box: UsageBox, include_usage: bool) -> StreamEvent | None:
    data = "\n".join(line[5:].lstrip() for line in lines if line.startswith("data:"))
    raw = ("\n".join(lines) + "\n\n").encode()
    if data == "[DONE]":
        return StreamEvent(raw, 0, "done")
    try:
        chunk = json.loads(data) if data else None
    except ValueError:
        return StreamEvent(raw)
    if not isinstance(chunk, dict):
        return StreamEvent(raw)
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        box.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        box.completion_tokens = int(usage.get("completion_tokens") or 0)
        box.known = True
    choices = chunk.get("choices")
    if not choices:
        return StreamEvent(raw, 0, "usage") if include_usage else None
    first: dict[str, Any] = choices[0] if isinstance(choices, list) and isinstance(choices[0], dict) else {}
    raw_delta = first.get("delta")
    delta: dict[str, Any] = raw_delta if isinstance(raw_delta, dict) else {}
    if first.get("finish_reason"):
        return StreamEvent(raw, 0, "finish")
    has_content = bool(delta.get("content") or delta.get("tool_calls") or delta.get("function_call"))
    return StreamEvent(raw, 1 if has_content else 0, "content")
