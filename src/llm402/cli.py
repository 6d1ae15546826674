"""The ``llm402`` command: demo, sandbox, spend, quote, and credit-gateway account operations."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()


def _sandbox(args: argparse.Namespace) -> int:
    from .sandbox.__main__ import main as sandbox_main

    argv = ["--port", str(args.port), "--host", args.host]
    if args.db:
        argv += ["--db", args.db]
    if args.dialect:
        argv += ["--dialect", args.dialect]
    return sandbox_main(argv)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(console)
    return 0


def _print(args: argparse.Namespace, title: str, rows: list[dict[str, Any]], data: Any = None) -> None:
    if args.json:
        print(json.dumps(data if data is not None else rows, indent=2, default=str))
        return
    table = Table(title=title)
    columns = list(rows[0]) if rows else []
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row[c]) for c in columns))
    console.print(table)


def _since(value: str | None) -> float | None:
    if value is None:
        return None
    if value.endswith("d") and value[:-1].isdigit():
        return time.time() - int(value[:-1]) * 86400
    return datetime.fromisoformat(value).replace(tzinfo=UTC).timestamp()


def _spend(args: argparse.Namespace) -> int:
    from .budget import open_ledger
    from .money import format_usd
    from .policy import Policy

    ledger = open_ledger(args.ledger)
    rows = ledger.spend_report(args.by, _since(args.since))
    shown = [
        {**row, "cost_usd": format_usd(int(row["cost"])), "saved_usd": format_usd(int(row.get("saved", 0)))}
        for row in rows
    ]
    _print(args, f"spend by {args.by}", shown)
    policy = Policy.from_env()
    if args.agent and not args.json:
        day = datetime.now(UTC).date().isoformat()
        totals = ledger.totals(args.agent, day)
        for name, cap, spent, reserved in (
            ("daily", policy.daily_cap, totals.day_spent, totals.day_reserved),
            ("total", policy.total_budget, totals.agent_spent, totals.agent_reserved),
            ("global", policy.global_cap, totals.global_spent, totals.global_reserved),
        ):
            left = "no cap" if cap is None else format_usd(cap - spent - reserved)
            console.print(f"{name:>6}: spent {format_usd(spent)}, reserved {format_usd(reserved)}, remaining {left}")
    ledger.close()
    return 0


def _gateway(args: argparse.Namespace) -> Any:
    from .gateway import Gateway
    from .wallet import Wallet

    wallet = Wallet.from_env()
    return Gateway(
        args.base_url,
        wallet=wallet,
        profile=args.profile,
        api_key=getattr(args, "api_key", None),
        ledger=args.ledger,
        agent=args.agent,
        key_store=getattr(args, "key_store", None),
    )


def _quote(args: argparse.Namespace) -> int:
    from .gateway import Gateway

    gw = Gateway(args.base_url, ledger="memory://", profile=args.profile)
    body = {"model": args.model, "messages": [{"role": "user", "content": args.message}]}
    if args.max_tokens:
        body["max_tokens"] = args.max_tokens
    quote = gw.quote(body)
    data = quote.to_dict()
    _print(args, "quote", [{k: v for k, v in data.items() if k != "options"}], data)
    return 0


def _keys(args: argparse.Namespace) -> int:
    with _gateway(args) as gw, gw.credit_account() as account:
        if args.action == "create":
            data = account.create_key(args.label, store=args.key_store)
            shown = {**data, "key": data["key"] if not args.key_store else f"(stored in {args.key_store})"}
            _print(args, "new API key (shown once)", [shown])
        elif args.action == "list":
            _print(args, "API keys", account.list_keys())
        else:
            _print(args, "revoke", [{"id": args.id, "revoked": account.revoke_key(args.id)}])
    return 0


def _account(args: argparse.Namespace) -> int:
    with _gateway(args) as gw, gw.credit_account() as account:
        if args.command == "balance":
            data = account.balance()
            _print(args, "balance", [data], data)
        elif args.command == "usage":
            data = account.usage()
            _print(args, "usage", data.get("keys", []), data)
        else:
            receipt = account.topup(args.amount)
            payment = receipt.payment
            row = {
                "amount": payment.amount if payment else 0,
                "transaction": payment.transaction if payment else None,
                "status": receipt.status,
            }
            _print(args, "top-up", [row])
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (subcommands)."""
    parser = argparse.ArgumentParser(prog="llm402", description="Pay-per-call LLM access for agents.")
    sub = parser.add_subparsers(dest="command", required=True)

    sandbox = sub.add_parser("sandbox", help="run the local reference gateway")
    sandbox.add_argument("--port", type=int, default=8402)
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--db", default=None, help="SQLite file for the sandbox's state (default: in memory)")
    sandbox.add_argument("--dialect", choices=["v2", "v1", "kiosk"], default=None)
    sandbox.set_defaults(run=_sandbox)

    sub.add_parser("demo", help="paid calls through the OpenAI SDK against the embedded sandbox").set_defaults(
        run=_demo
    )

    def common(p: argparse.ArgumentParser, gateway: bool = True) -> None:
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("--ledger", default=None, help="ledger URL (default: LLM402_LEDGER or ~/.llm402/ledger.db)")
        p.add_argument("--agent", default=None)
        if gateway:
            p.add_argument("--base-url", required=True, help="the gateway's OpenAI base URL, e.g. https://gw/v1")
            p.add_argument("--profile", default="auto", choices=["auto", "x402", "token-kiosk", "aisa", "plain"])

    spend = sub.add_parser("spend", help="totals and remaining budget from the ledger")
    spend.add_argument("--by", choices=["agent", "intent", "model", "day"], default="agent")
    spend.add_argument("--since", default=None, help="ISO date/time (UTC) or Nd, e.g. 7d")
    common(spend, gateway=False)
    spend.set_defaults(run=_spend)

    quote = sub.add_parser("quote", help="what a request would cost, without paying")
    quote.add_argument("--model", required=True)
    quote.add_argument("--message", default="hello")
    quote.add_argument("--max-tokens", type=int, default=None)
    common(quote)
    quote.set_defaults(run=_quote)

    keys = sub.add_parser("keys", help="API keys of a credit gateway (SIWE)")
    keys.add_argument("action", choices=["create", "list", "revoke"])
    keys.add_argument("--label", default="llm402")
    keys.add_argument("--id", default=None)
    keys.add_argument("--key-store", default=None, help="env:NAME or a file (mode 0600) for a created key")
    common(keys)
    keys.set_defaults(run=_keys)

    for name, text in (("balance", "available credit"), ("usage", "credit usage per key"), ("topup", "buy credit")):
        p = sub.add_parser(name, help=text)
        if name == "topup":
            p.add_argument("--amount", required=True, help="USD, e.g. 5")
        p.add_argument("--api-key", default=None)
        common(p)
        p.set_defaults(run=_account)

    from .cli_router import register

    register(sub)  # chat, vision, models, compare: the router skill's CLI surface
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except Exception as exc:
        from .errors import Llm402Error

        if not isinstance(exc, Llm402Error):
            raise
        console.print(f"[red]{type(exc).__name__}[/]: {exc}")
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
