"""The router skill's commands for ``llm402``: ``chat``, ``vision``, ``models`` and ``compare``.

``register(subparsers)`` adds them to the main parser. Every paid command goes through a `Router` on the gateway named
by ``--base-url`` (``--model a,b`` falls back from a to b, ``--model auto`` takes the cheapest model that fits), pays
with the wallet from the environment (``LLM402_PRIVATE_KEY``) under the policy of ``--policy`` or ``LLM402_POLICY``
(else the safe defaults), and prints the cost from the call's receipt. ``--json`` prints machine-readable output
instead. Errors go through the ``llm402`` error boundary (`llm402.cli.run`): one line on stderr, a distinct exit code.
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from rich.markup import escape
from rich.table import Table

from .cli import (
    Interrupted,
    Parser,
    gateway_options,
    load_policy,
    make_console,
    positive_float,
    positive_int,
    run,
    temperature_arg,
)
from .errors import ConfigurationError, GatewayError, gateway_error, refusal_from_envelope
from .money import atomic_to_usd, format_usd
from .receipts import receipt_view, usd_string

if TYPE_CHECKING:
    from .gateway import Gateway
    from .receipts import Receipt
    from .router import Router

out = make_console()
err = make_console(stderr=True)


# --- building blocks ---------------------------------------------------------------------------------------------


def _gateway(args: argparse.Namespace, *, wallet: bool = True) -> Gateway:
    from .gateway import Gateway
    from .wallet import Wallet

    return Gateway(
        args.base_url,
        wallet=Wallet.from_env() if wallet else None,
        policy=load_policy(args),
        profile=args.profile,
        ledger=args.ledger if wallet else "memory://",
        agent=args.agent,
    )


def _router(gateway: Gateway, spec: str) -> tuple[Router, str]:
    """``a,b,c``: fall back in that order; ``auto``: every priced model of the gateway, cheapest fit first.
    Returns the router and the model name to send."""
    from .router import AUTO, Route, Router

    names = [m.strip() for m in spec.split(",") if m.strip()]
    if not names:
        raise ConfigurationError("--model needs a model name, a comma-separated fallback list, or 'auto'")
    if names == [AUTO]:
        models = sorted(gateway.load_prices().models())
        if not models:
            raise ConfigurationError("--model auto needs a gateway whose /models lists prices")
        router = Router([Route(gateway, m) for m in models], strategy="cheapest")
        router.ensure_catalog()
        return router, AUTO
    return Router([Route(gateway, m) for m in names]), names[0]


def _messages(args: argparse.Namespace) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if args.messages:
        try:
            loaded = json.loads(args.messages)
        except ValueError:
            raise ConfigurationError("--messages must be a JSON array of {role, content} objects") from None
        if not isinstance(loaded, list) or not all(isinstance(m, dict) and "role" in m for m in loaded):
            raise ConfigurationError("--messages must be a JSON array of {role, content} objects")
        messages = loaded
    if args.system:
        messages.insert(0, {"role": "system", "content": args.system})
    if args.message:
        messages.append({"role": "user", "content": args.message})
    if not any(m.get("role") != "system" for m in messages):
        raise ConfigurationError("give a --message (or --messages)")
    return messages


def image_url(value: str) -> str:
    """An image reference for a chat message: URLs and data: URLs as they are, a local file as a data: URL."""
    if value.startswith(("http://", "https://", "data:")):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigurationError(f"--image {value!r} is neither a URL nor a readable file")
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def _raise_for(response: httpx.Response) -> None:
    """A failed answer as a typed llm402 error (a local refusal, or the gateway's error table)."""
    if response.is_success:
        return
    refusal = refusal_from_envelope(response.content)
    if refusal is not None:
        raise refusal
    raise gateway_error(response.status_code, response.content, response.headers.get("retry-after")) or GatewayError(
        f"HTTP {response.status_code}", status=response.status_code
    )


def _summary(receipt: Receipt | None) -> dict[str, Any]:
    if receipt is None:
        return {"route": None, "cost": 0, "cost_usd": usd_string(0), "attempts": [], "receipt": None}
    return {
        "route": receipt.route,
        "cost": receipt.cost,
        "cost_usd": usd_string(receipt.cost),
        "attempts": list(receipt.attempts),
        "receipt": receipt_view(receipt),
    }


def _tokens(usage: dict[str, Any], receipt: Receipt | None) -> tuple[int, int]:
    """Prompt and completion tokens: the receipt's (metered once the answer ended), else what the answer said."""
    if receipt is not None and receipt.total_tokens:
        return receipt.prompt_tokens, receipt.completion_tokens
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


def _footer(model: str | None, usage: dict[str, Any], receipt: Receipt | None) -> None:
    prompt, completion = _tokens(usage, receipt)
    tokens = f"{prompt}+{completion} tokens"
    cost = format_usd(receipt.cost) if receipt else "?"
    tried = sum(1 for a in receipt.attempts if not a.get("skipped")) if receipt else 0
    more = f" after {tried} attempts" if tried > 1 else ""
    err.print(f"[dim]{escape(str(model))} · {tokens} · {cost}{more}[/]", soft_wrap=True)


def _interrupted(router: Router) -> Interrupted:
    """Ctrl-C during a call: what it cost so far (the receipt is published once the stream is closed)."""
    receipt = router.last_receipt
    if receipt is None:
        return Interrupted("interrupted before the call finished (see `llm402 receipts` for what it cost)")
    prompt, completion = receipt.prompt_tokens, receipt.completion_tokens
    return Interrupted(
        f"interrupted: this call cost {format_usd(receipt.cost)} so far ({receipt.model or 'no model'}, "
        f"{prompt}+{completion} tokens)",
        cost=receipt.cost,
        cost_usd=usd_string(receipt.cost),
        call_id=receipt.call_id,
        model=receipt.model,
    )


def _sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        try:
            event = json.loads(payload)
        except ValueError:
            continue
        if isinstance(event, dict):
            yield event


# --- commands ----------------------------------------------------------------------------------------------------


def _complete(args: argparse.Namespace, messages: list[dict[str, Any]]) -> int:
    with _gateway(args) as gateway:
        router, model = _router(gateway, args.model)
        body: dict[str, Any] = {"model": model, "messages": messages}
        if args.max_tokens is not None:
            body["max_tokens"] = args.max_tokens
        if args.temperature is not None:
            body["temperature"] = args.temperature
        url = f"{router.base_url}/chat/completions"
        with router.http_client(timeout=args.timeout) as client:
            if getattr(args, "stream", False):
                return _stream(args, client, url, {**body, "stream": True}, router)
            try:
                response = client.post(url, json=body, headers={"authorization": f"Bearer {router.api_key}"})
            except KeyboardInterrupt:
                raise _interrupted(router) from None
            _raise_for(response)
            data = response.json()
    choice = (data.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content = message.get("content") or (json.dumps(message.get("tool_calls")) if message.get("tool_calls") else "")
    usage = data.get("usage") or {}
    receipt = router.last_receipt
    if args.json:
        result = {
            "model": data.get("model"),
            "content": content,
            "finish_reason": choice.get("finish_reason"),
            "usage": usage,
            **_summary(receipt),
        }
        print(json.dumps(result, indent=2, default=str))
        return 0
    print(content)
    _footer(data.get("model"), usage, receipt)
    return 0


def _stream(args: argparse.Namespace, client: httpx.Client, url: str, body: dict[str, Any], router: Router) -> int:
    parts: list[str] = []
    usage: dict[str, Any] = {}
    model: str | None = None
    headers = {"authorization": f"Bearer {router.api_key}"}
    try:
        with client.stream("POST", url, json=body, headers=headers) as response:
            if not response.is_success:
                response.read()
                _raise_for(response)
            for event in _sse(response.iter_lines()):
                model = event.get("model") or model
                usage = event.get("usage") or usage
                for choice in event.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        parts.append(text)
                        if not args.json:
                            sys.stdout.write(text)
                            sys.stdout.flush()
    except KeyboardInterrupt:
        if parts and not args.json:
            sys.stdout.write("\n")
        raise _interrupted(router) from None
    receipt = router.last_receipt  # read once the stream has ended: its tokens and cost are final
    if args.json:
        print(json.dumps({"model": model, "content": "".join(parts), "usage": usage, **_summary(receipt)}, indent=2))
        return 0
    print()
    _footer(model, usage, receipt)
    return 0


def _chat(args: argparse.Namespace) -> int:
    return _complete(args, _messages(args))


def _vision(args: argparse.Namespace) -> int:
    content = [
        {"type": "text", "text": args.prompt},
        {"type": "image_url", "image_url": {"url": image_url(args.image)}},
    ]
    return _complete(args, [{"role": "user", "content": content}])


def _models(args: argparse.Namespace) -> int:
    from .gateway import PLACEHOLDER_API_KEY
    from .pricing import PriceCatalog
    from .router import capabilities_from_listing

    with _gateway(args, wallet=False) as gateway:
        key = gateway.api_key if gateway.api_key != PLACEHOLDER_API_KEY else None
        headers = {"authorization": f"Bearer {key}"} if key else {}
        response = httpx.get(f"{gateway.base_url}/models", headers=headers, timeout=args.timeout)
    _raise_for(response)
    prices = PriceCatalog.from_models_response(response.content).models()
    capabilities = capabilities_from_listing(response.content)
    entries = response.json().get("data") or []
    rows: list[dict[str, Any]] = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            continue
        price = prices.get(entry["id"])
        caps = capabilities.get(entry["id"])
        rows.append(
            {
                "id": entry["id"],
                "prompt_usd_per_1m": str(atomic_to_usd(price.prompt_per_1m)) if price else None,
                "completion_usd_per_1m": str(atomic_to_usd(price.completion_per_1m)) if price else None,
                "context_length": price.context_length if price else None,
                "tools": caps.tools if caps else None,
                "vision": caps.vision if caps else None,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title=f"models at {args.base_url}")
    for column in ("model", "prompt $/1M", "completion $/1M", "context", "tools", "vision"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in rows:
        flags = ["?" if row[k] is None else ("yes" if row[k] else "no") for k in ("tools", "vision")]
        table.add_row(
            row["id"],
            row["prompt_usd_per_1m"] or "-",
            row["completion_usd_per_1m"] or "-",
            str(row["context_length"] or "-"),
            *flags,
        )
    out.print(table)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

    from .compare import CompareRow, compare, rows_table

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if len(models) < 1:
        raise ConfigurationError("--models needs a comma-separated list of models")
    messages = _messages(args)
    with _gateway(args) as gateway:
        if args.json:
            rows = compare(gateway, models, messages, max_tokens=args.max_tokens, timeout=args.timeout)
        else:
            columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
            progress = Progress(*columns, console=err, transient=True)
            with progress:
                task = progress.add_task(f"asking {len(models)} models", total=len(models))

                def done(row: CompareRow) -> None:
                    status = "answered" if row.ok else "failed"
                    progress.update(task, advance=1, description=escape(f"{row.model} {status}"))

                rows = compare(gateway, models, messages, max_tokens=args.max_tokens, timeout=args.timeout, on_row=done)
    if args.json:
        print(json.dumps([{**row.to_dict(), "cost_usd": usd_string(row.cost)} for row in rows], indent=2))
        return 0
    out.print(rows_table(rows))
    total = sum(row.cost for row in rows)
    err.print(f"[dim]{len(rows)} models · total {format_usd(total)}[/]")
    return 0


# --- the parser --------------------------------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser) -> None:
    gateway_options(parser)
    parser.add_argument(
        "--timeout", type=positive_float, default=120.0, metavar="SECONDS", help="seconds per request (default 120)"
    )


def _asking(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-tokens", type=positive_int, default=None, metavar="N", help="the most tokens the answer may have"
    )
    parser.add_argument(
        "--temperature", type=temperature_arg, default=None, metavar="T", help="sampling temperature, 0 to 2"
    )


def _conversation(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--message", default=None, help="the user message")
    parser.add_argument("--system", default=None, help="a system prompt")
    parser.add_argument(
        "--messages", default=None, metavar="JSON", help="the conversation so far, a JSON array of {role, content}"
    )


def register(subparsers: argparse._SubParsersAction[Any], *, epilog: str | None = None) -> None:
    """Add ``chat``, ``vision``, ``models`` and ``compare`` to the ``llm402`` command."""
    chat = subparsers.add_parser(
        "chat", help="one paid chat completion (with fallback: --model a,b or auto)", epilog=epilog
    )
    chat.add_argument("--model", required=True, help="a model, a comma-separated fallback list, or 'auto'")
    _conversation(chat)
    chat.add_argument("--stream", action="store_true", help="print the answer as it streams")
    _asking(chat)
    _common(chat)
    chat.set_defaults(run=_chat)

    vision = subparsers.add_parser(
        "vision", help="ask about an image (a URL, or a local file sent as a data: URL)", epilog=epilog
    )
    vision.add_argument("--model", required=True, help="a model, a comma-separated fallback list, or 'auto'")
    vision.add_argument("--image", required=True, help="an image URL or a local file")
    vision.add_argument("--prompt", default="Describe this image.", help="the question about the image")
    _asking(vision)
    _common(vision)
    vision.set_defaults(run=_vision)

    models = subparsers.add_parser("models", help="the gateway's models with their prices", epilog=epilog)
    _common(models)
    models.set_defaults(run=_models)

    comparison = subparsers.add_parser(
        "compare", help="the same question to several models, side by side", epilog=epilog
    )
    comparison.add_argument("--models", required=True, help="comma-separated models")
    _conversation(comparison)
    _asking(comparison)
    _common(comparison)
    comparison.set_defaults(run=_compare)


def build_parser() -> argparse.ArgumentParser:
    """A parser with only these commands."""
    parser = Parser(prog="llm402", description="Chat, vision, models and compare through llm402.")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an unexpected error")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run only these commands (``python -m llm402.cli_router``); ``llm402`` itself wires them into its parser."""
    return run(build_parser, argv)


if __name__ == "__main__":
    from llm402.cli_router import main as entry  # the package's module, not a second copy named __main__

    sys.exit(entry())
