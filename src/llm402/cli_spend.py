"""``llm402 spend`` and ``llm402 receipts``: where the money went, from the ledger's receipts.

Every receipt is put in one of four kinds of billing, so the totals reconcile to what left the wallet:

- ``x402``: a per-call payment (left the wallet; for ``upto``, the settled amount out of the authorized ceiling);
- ``topup``: credit bought with an x402 payment (left the wallet, spent later as credit usage);
- ``credit``: a call drawn from prepaid credit (a gateway that reports credit, or one the wallet topped up);
- ``plain``: a metered call on an API-key gateway (billed by the gateway, not paid from the wallet);
- ``unpaid``: a call that cost nothing (refused, failed before any payment, answered from the cache).

``wallet`` = x402 + top-ups is what left the wallet; ``cost`` = x402 + credit + plain is what the calls consumed.
Groupings (day, agent, intent, model, gateway, payee, billing) are computed here from ``ledger.receipts(since)``, the
same for every ledger backend. The caps shown are those of the policy the command loads (``--policy``,
``LLM402_POLICY`` or the safe defaults), with what each agent has left today.
"""

from __future__ import annotations

import argparse
import html
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rich import box
from rich.table import Table
from rich.text import Text

from .cli import (
    EXIT_OK,
    console,
    emit_json,
    ledger_options,
    load_policy,
    output_options,
    policy_source,
    positive_int,
    safe_url,
    since_arg,
)
from .receipts import Receipt, iso_time, receipt_view, usd_string

GROUPS = ("day", "agent", "intent", "model", "gateway", "payee", "billing")
BILLINGS = ("x402", "topup", "credit", "plain", "unpaid")
MONEY = ("wallet", "paid", "topups", "cost", "credit_usage", "plain_usage", "saved", "upto_ceiling", "upto_settled")
"""The amounts of a spend row, each as an atomic integer and a ``*_usd`` string."""
PALETTE = ("#2f6fdf", "#e0672b", "#2a9d5c", "#b8418f", "#c9a227", "#1aa3b8", "#7a5cd6", "#8c8c8c")
TERMINAL_PALETTE = ("blue", "dark_orange", "green", "magenta", "yellow", "cyan", "medium_purple", "grey50")
TOP_MODELS = len(PALETTE) - 1
"""Models charted by name; the rest are one "other" series."""
HTML_CALLS = 2000
"""The most recent calls listed in the HTML report."""


# --- what each receipt was -----------------------------------------------------------------------------------------


def credit_gateways(receipts: Iterable[Receipt]) -> frozenset[str]:
    """Gateways the wallet bought credit from (their unpaid calls draw on that credit)."""
    return frozenset(r.gateway for r in receipts if r.payment is not None and r.payment.kind == "topup")


def billing_of(receipt: Receipt, credit: frozenset[str] = frozenset()) -> str:
    """``x402``, ``topup``, ``credit``, ``plain`` or ``unpaid`` (see the module's docstring)."""
    payment = receipt.payment
    if payment is not None:
        return "topup" if payment.kind == "topup" else "x402"
    if receipt.cost == 0:
        return "unpaid"
    if receipt.credits_remaining is not None or receipt.gateway in credit:
        return "credit"
    return "plain"


def _day(receipt: Receipt) -> str:
    return datetime.fromtimestamp(receipt.started_at, UTC).date().isoformat()


def group_key(receipt: Receipt, by: str, credit: frozenset[str]) -> str | None:
    """The group a receipt falls in."""
    if by == "day":
        return _day(receipt)
    if by == "payee":
        return receipt.payment.payee if receipt.payment is not None else None
    if by == "billing":
        return billing_of(receipt, credit)
    value = getattr(receipt, by)
    return None if value is None else str(value)


@dataclass(slots=True)
class Tally:
    """Sums over receipts, in atomic units."""

    calls: int = 0
    topup_count: int = 0
    paid_calls: int = 0
    credit_calls: int = 0
    plain_calls: int = 0
    paid: int = 0
    topups: int = 0
    credit_usage: int = 0
    plain_usage: int = 0
    saved: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    upto_calls: int = 0
    upto_ceiling: int = 0
    upto_settled: int = 0

    def add(self, receipt: Receipt, billing: str) -> None:
        """Count one receipt."""
        if billing == "topup":
            self.topup_count += 1
            self.topups += receipt.cost
            return
        self.calls += 1
        self.saved += receipt.saved
        self.prompt_tokens += receipt.prompt_tokens
        self.completion_tokens += receipt.completion_tokens
        if billing == "x402":
            self.paid_calls += 1
            self.paid += receipt.cost
            payment = receipt.payment
            if payment is not None and payment.scheme == "upto" and not payment.reused:
                self.upto_calls += 1
                self.upto_ceiling += payment.amount
                self.upto_settled += receipt.cost
        elif billing == "credit":
            self.credit_calls += 1
            self.credit_usage += receipt.cost
        elif billing == "plain":
            self.plain_calls += 1
            self.plain_usage += receipt.cost

    @property
    def wallet(self) -> int:
        """What left the wallet: per-call payments and top-ups."""
        return self.paid + self.topups

    @property
    def cost(self) -> int:
        """What the calls consumed: per-call payments, credit usage and plain usage."""
        return self.paid + self.credit_usage + self.plain_usage

    def to_dict(self, key: str | None = None) -> dict[str, Any]:
        """A JSON row: counts, tokens, and each amount of `MONEY` as an integer and a ``*_usd`` string."""
        row: dict[str, Any] = {
            "key": key,
            "calls": self.calls,
            "topup_count": self.topup_count,
            "paid_calls": self.paid_calls,
            "credit_calls": self.credit_calls,
            "plain_calls": self.plain_calls,
        }
        for name in MONEY:
            amount = getattr(self, name)
            row[name] = amount
            row[f"{name}_usd"] = usd_string(amount)
        row.update(
            prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens, upto_calls=self.upto_calls
        )
        return row


def spend_rows(receipts: Sequence[Receipt], by: str, credit: frozenset[str]) -> list[dict[str, Any]]:
    """Receipts grouped by ``by``: days in order, other groups by money moved (most first), then by name."""
    tallies: dict[str | None, Tally] = {}
    for receipt in receipts:
        tallies.setdefault(group_key(receipt, by, credit), Tally()).add(receipt, billing_of(receipt, credit))
    rows = [tally.to_dict(key) for key, tally in tallies.items()]
    rows.sort(key=lambda row: (row["key"] is None, str(row["key"] or "")))
    if by != "day":
        rows.sort(key=lambda row: -(row["cost"] + row["topups"]))
    return rows


def totals(receipts: Sequence[Receipt], credit: frozenset[str]) -> dict[str, Any]:
    """One row over every receipt."""
    tally = Tally()
    for receipt in receipts:
        tally.add(receipt, billing_of(receipt, credit))
    return tally.to_dict("total")


# --- reading the ledger --------------------------------------------------------------------------------------------


def _ledger_url(args: argparse.Namespace) -> str:
    from .budget import default_ledger_url

    return str(args.ledger or default_ledger_url())


def _missing_sqlite(url: str) -> Path | None:
    """The file of a ``sqlite:///`` ledger that does not exist yet (a report never creates one)."""
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        return None
    path = Path(parts.path).expanduser()
    return None if path.exists() or parts.path in ("", "/:memory:") else path


def _read(
    args: argparse.Namespace, *, with_caps: bool = True
) -> tuple[list[Receipt], frozenset[str], dict[str, Any] | None]:
    """The selected receipts, the credit gateways, and (``with_caps``) the caps of the policy in force with today's
    totals."""
    from .budget import open_ledger

    policy = load_policy(args) if with_caps else None  # a bad policy is a configuration error before any reading
    url = _ledger_url(args)
    if _missing_sqlite(url) is not None:
        return [], frozenset(), caps_view(args, policy, None, []) if policy is not None else None
    ledger = open_ledger(url)
    try:
        everything = list(ledger.receipts(args.since))
        # A gateway is a credit gateway if the wallet ever topped up there, before the window too.
        credit = credit_gateways(everything if args.since is None else ledger.receipts())
        selected = [r for r in everything if _selected(r, args)]
        agents = [args.agent] if args.agent else _agents(selected)
        caps = caps_view(args, policy, ledger, agents) if policy is not None else None
    finally:
        ledger.close()
    return selected, credit, caps


def _selected(receipt: Receipt, args: argparse.Namespace) -> bool:
    if args.agent and receipt.agent != args.agent:
        return False
    if getattr(args, "model", None) and receipt.model != args.model:
        return False
    gateway = getattr(args, "gateway", None)
    return not gateway or receipt.gateway == gateway.rstrip("/")


def _agents(receipts: Sequence[Receipt], limit: int = 20) -> list[str]:
    spent: dict[str, int] = {}
    for receipt in receipts:
        spent[receipt.agent] = spent.get(receipt.agent, 0) + receipt.cost
    return sorted(spent, key=lambda agent: (-spent[agent], agent))[:limit]


def _money(name: str, amount: int | None) -> dict[str, Any]:
    return {name: amount, f"{name}_usd": None if amount is None else usd_string(amount)}


def caps_view(args: argparse.Namespace, policy: Any, ledger: Any, agents: Sequence[str]) -> dict[str, Any]:
    """The caps of the policy in force (``None``: no cap), which of them are the safe defaults, and per agent what
    today (UTC) and all time have used and left."""
    from .budget.base import topup_agent

    day = datetime.now(UTC).date().isoformat()
    view: dict[str, Any] = {"source": policy_source(args), "defaults": list(policy.default_limits), "day": day}
    limits = {
        "max_payment": policy.max_payment,
        "daily_cap": policy.daily_cap,
        "total_budget": policy.total_budget,
        "global_cap": policy.global_cap,
        "topup_max": policy.topup_max,
        "daily_topup_cap": policy.daily_topup_cap,
    }
    for name, cap in limits.items():
        view.update(_money(name, cap))

    def left(cap: int | None, used: int) -> int | None:
        return None if cap is None else max(0, cap - used)

    rows: list[dict[str, Any]] = []
    global_used: tuple[int, int] = (0, 0)
    for agent in agents:
        calls = ledger.totals(agent, day) if ledger is not None else None
        bought = ledger.totals(topup_agent(agent), day) if ledger is not None else None
        today = (calls.day_spent, calls.day_reserved) if calls else (0, 0)
        ever = (calls.agent_spent, calls.agent_reserved) if calls else (0, 0)
        topped = (bought.day_spent + bought.day_reserved) if bought else 0
        if calls is not None:
            global_used = (calls.global_spent, calls.global_reserved)
        row: dict[str, Any] = {"agent": agent}
        for name, amount in (
            ("today_spent", today[0]),
            ("today_reserved", today[1]),
            ("today_left", left(policy.daily_cap, sum(today))),
            ("total_spent", ever[0]),
            ("total_left", left(policy.total_budget, sum(ever))),
            ("topups_today", topped),
            ("topups_left", left(policy.daily_topup_cap, topped)),
        ):
            row.update(_money(name, amount))
        rows.append(row)
    view["agents"] = rows
    view["global"] = {
        **_money("spent", global_used[0]),
        **_money("reserved", global_used[1]),
        **_money("left", left(policy.global_cap, sum(global_used))),
    }
    return view


# --- spend ---------------------------------------------------------------------------------------------------------


def spend_document(args: argparse.Namespace) -> tuple[dict[str, Any], list[Receipt], frozenset[str]]:
    """The report as JSON, and the receipts behind it."""
    receipts, credit, caps = _read(args)
    url = _ledger_url(args)
    document = {
        "ledger": safe_url(url),
        "ledger_exists": _missing_sqlite(url) is None,
        "since": None if args.since is None else iso_time(args.since),
        "agent": args.agent,
        "model": args.model,
        "by": args.by,
        "totals": totals(receipts, credit),
        "groups": spend_rows(receipts, args.by, credit),
        "caps": caps,
    }
    return document, receipts, credit


def _spend(args: argparse.Namespace) -> int:
    document, receipts, credit = spend_document(args)
    if args.html:
        Path(args.html).expanduser().write_text(html_report(document, receipts, credit), encoding="utf-8")
    if args.json:
        emit_json(document)
        return EXIT_OK
    _print_summary(document)
    if receipts:
        _print_groups(document)
        chart = terminal_chart(receipts, credit)
        if chart is not None:
            console.print(chart)
    _print_caps(document["caps"])
    if args.html:
        console.print(f"HTML report written to {html.escape(str(args.html))}", markup=False)
    return EXIT_OK


def _usd(amount: int | None) -> str:
    return "no cap" if amount is None else f"${usd_string(amount)}"


def _line(text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _print_summary(document: Mapping[str, Any]) -> None:
    t = document["totals"]
    since = f" since {document['since']}" if document["since"] else ""
    who = f" for agent {document['agent']}" if document["agent"] else ""
    model = f" on model {document['model']}" if document["model"] else ""
    where = f"ledger {document['ledger']}{since}{who}{model}"
    if t["calls"] == 0 and t["topup_count"] == 0:
        note = "" if document["ledger_exists"] else " (no ledger file yet: nothing has been paid through it)"
        _line(f"No calls recorded in {where}{note}.")
        return
    _line(where)
    _line(
        f"left the wallet  {_usd(t['wallet']):>14} = x402 payments {_usd(t['paid'])} "
        f"+ credit top-ups {_usd(t['topups'])} ({t['topup_count']})"
    )
    _line(
        f"calls consumed   {_usd(t['cost']):>14} = x402 {_usd(t['paid'])} + from credit {_usd(t['credit_usage'])} "
        f"+ plain gateways {_usd(t['plain_usage'])}, {t['calls']} calls"
    )
    if t["upto_calls"]:
        released = t["upto_ceiling"] - t["upto_settled"]
        _line(
            f"upto settled     {_usd(t['upto_settled']):>14} of {_usd(t['upto_ceiling'])} authorized over "
            f"{t['upto_calls']} calls ({_usd(released)} never moved)"
        )
    if t["saved"]:
        _line(f"saved by cache   {_usd(t['saved']):>14}")
    _line(f"tokens           {t['prompt_tokens']} prompt + {t['completion_tokens']} completion")


def _print_groups(document: Mapping[str, Any]) -> None:
    rows = document["groups"]
    money = [
        (title, name)
        for title, name in (
            ("left wallet", "wallet"),
            ("x402", "paid"),
            ("top-ups", "topups"),
            ("credit", "credit_usage"),
            ("plain", "plain_usage"),
            ("saved", "saved"),
        )
        if name == "wallet" or any(row[name] for row in rows)  # an all-zero column says nothing
    ]
    table = Table(title=f"spend by {document['by']}")
    table.add_column(document["by"], overflow="fold")
    table.add_column("calls", justify="right")
    for title, _ in money:
        table.add_column(title, justify="right", no_wrap=True)
    table.add_column("tokens", justify="right", no_wrap=True)
    for row in rows:
        table.add_row(
            Text("-" if row["key"] is None else str(row["key"])),
            Text(str(row["calls"] + row["topup_count"])),
            *(Text(_usd(row[name])) for _, name in money),
            Text(f"{row['prompt_tokens']}+{row['completion_tokens']}"),
        )
    console.print(table)


def _print_caps(caps: Mapping[str, Any]) -> None:
    _line(f"caps in force, from {caps['source']}:")
    defaults = set(caps["defaults"])
    for label, name, default_name in (
        ("max ticket (one payment)", "max_payment", "max_payment_usd"),
        ("daily cap per agent (UTC)", "daily_cap", "daily_cap_usd"),
        ("total budget per agent", "total_budget", None),
        ("global cap (all agents)", "global_cap", None),
        ("largest top-up", "topup_max", None),
        ("top-ups per agent per day", "daily_topup_cap", None),
    ):
        _line(f"  {label:<27} {_usd(caps[name])}{' (default)' if default_name in defaults else ''}")
    for row in caps["agents"]:
        reserved = f" (+{_usd(row['today_reserved'])} reserved)" if row["today_reserved"] else ""
        left = "" if row["today_left"] is None else f", {_usd(row['today_left'])} left"
        total = "" if row["total_left"] is None else f", {_usd(row['total_left'])} left of the total budget"
        topups = f"; top-ups today {_usd(row['topups_today'])}" if row["topups_today"] else ""
        _line(
            f"  agent {row['agent']}: today ({caps['day']}) {_usd(row['today_spent'])}{reserved}{left}; "
            f"all time {_usd(row['total_spent'])}{total}{topups}"
        )
    if caps["global_cap"] is not None:
        g = caps["global"]
        _line(f"  all agents: {_usd(g['spent'])} spent, {_usd(g['reserved'])} reserved, {_usd(g['left'])} left")


# --- charts ----------------------------------------------------------------------------------------------------------


def day_model_costs(receipts: Sequence[Receipt], credit: frozenset[str]) -> tuple[list[str], list[str], dict[Any, int]]:
    """Consumed cost per (day, model): the days in order, the charted models (most spent first, then "other"),
    and the amounts."""
    per_model: dict[str, int] = {}
    cells: dict[tuple[str, str], int] = {}
    for receipt in receipts:
        if billing_of(receipt, credit) == "topup" or receipt.cost == 0:
            continue
        model = receipt.model or "(no model)"
        per_model[model] = per_model.get(model, 0) + receipt.cost
        cells[(_day(receipt), model)] = cells.get((_day(receipt), model), 0) + receipt.cost
    ranked = sorted(per_model, key=lambda m: (-per_model[m], m))
    named = ranked if len(ranked) <= TOP_MODELS + 1 else ranked[:TOP_MODELS]
    models = named + (["other"] if len(ranked) > len(named) else [])
    amounts: dict[Any, int] = {}
    for (day, model), cost in cells.items():
        series = model if model in named else "other"
        amounts[(day, series)] = amounts.get((day, series), 0) + cost
    days = sorted({day for day, _ in cells})
    return days, models, amounts


def terminal_chart(receipts: Sequence[Receipt], credit: frozenset[str], width: int = 40, last: int = 31) -> Text | None:
    """Stacked bars, one a day, one color a model, of what the calls consumed; ``None`` when nothing cost anything."""
    days, models, amounts = day_model_costs(receipts, credit)
    if not days:
        return None
    shown = days[-last:]
    day_totals = {day: sum(amounts.get((day, m), 0) for m in models) for day in shown}
    top = max(day_totals.values()) or 1
    text = Text(f"cost by day and model{' (last ' + str(last) + ' days)' if len(days) > last else ''}\n")
    for day in shown:
        text.append(f"{day} ")
        done = 0
        cumulative = 0
        for index, model in enumerate(models):
            cumulative += amounts.get((day, model), 0)
            edge = round(cumulative * width / top)
            if edge > done:
                text.append("█" * (edge - done), style=TERMINAL_PALETTE[index % len(TERMINAL_PALETTE)])
                done = edge
        text.append(" " * (width - done) + f" ${usd_string(day_totals[day])}\n")
    for index, model in enumerate(models):
        text.append("■ ", style=TERMINAL_PALETTE[index % len(TERMINAL_PALETTE)])
        text.append(f"{model}  ")
    return text


# --- the HTML report -------------------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2330;background:#f6f7f9;margin:0}
main{max-width:1140px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.meta{color:#5b6475;margin:0 0 16px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(200px,1fr));gap:12px}
.card{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:12px 14px}
.card b{display:block;font-size:22px;margin-top:2px}.card small{color:#5b6475}
.card.main{border-color:#2f6fdf;box-shadow:inset 4px 0 0 #2f6fdf}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #dde1e8;font-size:13px}
th,td{padding:5px 8px;border-bottom:1px solid #edf0f4;text-align:left;vertical-align:top}
th{background:#eef1f6;font-weight:600}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
td code{font-size:12px;word-break:break-all}
.chart{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:8px}
.legend{display:flex;flex-wrap:wrap;gap:6px 16px;margin:6px 4px 0;padding:0;list-style:none}
.legend i{display:inline-block;width:12px;height:12px;border-radius:2px;margin-right:6px;vertical-align:-1px}
.empty{color:#5b6475;font-style:italic}
"""


def _e(value: Any) -> str:
    """Any value, escaped for HTML text and attributes."""
    return html.escape("-" if value is None else str(value), quote=True)


def _d(amount: int | None) -> str:
    return _e(_usd(amount))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _card(title: str, amount: int, note: str, main: bool = False) -> str:
    return (
        f'<div class="card{" main" if main else ""}"><small>{_e(title)}</small><b>{_d(amount)}</b>'
        f"<small>{_e(note)}</small></div>"
    )


def _nice_top(top: int) -> int:
    """The smallest 1, 2, 2.5 or 5 times a power of ten (atomic units) at or above ``top``: round axis labels."""
    scale = 1
    while True:
        for tenths in (10, 20, 25, 50):
            if tenths * scale % 10 == 0 and tenths * scale // 10 >= top:
                return tenths * scale // 10
        scale *= 10


def _ticks(top: int) -> list[int]:
    return [top * i // 4 for i in range(5)]


def svg_day_model_chart(receipts: Sequence[Receipt], credit: frozenset[str]) -> str:
    """Stacked columns (a day each, a color a model) with a USD axis, as inline SVG plus an HTML legend."""
    days, models, amounts = day_model_costs(receipts, credit)
    if not days:
        return '<p class="empty">No cost to chart.</p>'
    days = days[-62:]
    width, height, left, bottom, top_pad = 1080, 300, 90, 40, 12
    plot_w, plot_h = width - left - 10, height - bottom - top_pad
    day_totals = [sum(amounts.get((day, m), 0) for m in models) for day in days]
    top = _nice_top(max(day_totals) or 1)
    slot = plot_w / len(days)
    bar = max(2.0, min(48.0, slot * 0.7))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="100%" role="img" '
        'aria-label="cost by day and model">'
    ]
    for tick in _ticks(top):
        y = top_pad + plot_h - tick * plot_h / top
        parts.append(f'<line x1="{left}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e3e7ee"/>')
        parts.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end" fill="#5b6475">{_d(tick)}</text>'
        )
    label_every = max(1, len(days) // 12)
    for i, day in enumerate(days):
        x = left + i * slot + (slot - bar) / 2
        base = float(top_pad + plot_h)
        for index, model in enumerate(models):
            amount = amounts.get((day, model), 0)
            if not amount:
                continue
            h = amount * plot_h / top
            base -= h
            parts.append(
                f'<rect x="{x:.1f}" y="{base:.1f}" width="{bar:.1f}" height="{max(h, 0.5):.1f}" '
                f'fill="{PALETTE[index % len(PALETTE)]}"><title>{_e(day)} · {_e(model)} · {_d(amount)}</title></rect>'
            )
        if i % label_every == 0:
            parts.append(
                f'<text x="{x + bar / 2:.1f}" y="{height - bottom + 16}" font-size="11" '
                f'text-anchor="middle" fill="#5b6475">{_e(day[5:])}</text>'
            )
    parts.append("</svg>")
    return '<div class="chart">' + "".join(parts) + _legend(models) + "</div>"


def _legend(models: Sequence[str]) -> str:
    items = "".join(
        f'<li><i style="background:{PALETTE[i % len(PALETTE)]}"></i>{_e(m)}</li>' for i, m in enumerate(models)
    )
    return f'<ul class="legend">{items}</ul>'


def svg_model_bars(receipts: Sequence[Receipt], credit: frozenset[str]) -> str:
    """One horizontal bar per model (consumed cost), as inline SVG."""
    _, models, amounts = day_model_costs(receipts, credit)
    if not models:
        return '<p class="empty">No cost to chart.</p>'
    per_model = [(m, sum(v for (_, series), v in amounts.items() if series == m)) for m in models]
    top = max(v for _, v in per_model) or 1
    row_h, label_w, width = 26, 260, 1080
    height = row_h * len(per_model) + 8
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="100%" role="img" '
        'aria-label="cost by model">'
    ]
    for i, (model, amount) in enumerate(per_model):
        y = 4 + i * row_h
        w = max(1.0, amount * (width - label_w - 130) / top)
        parts.append(
            f'<text x="{label_w - 8}" y="{y + 16}" font-size="12" text-anchor="end" fill="#1d2330">'
            f"{_e(model[:40])}</text>"
        )
        parts.append(
            f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 8}" rx="3" '
            f'fill="{PALETTE[i % len(PALETTE)]}"><title>{_e(model)} · {_d(amount)}</title></rect>'
        )
        parts.append(f'<text x="{label_w + w + 6:.1f}" y="{y + 16}" font-size="12" fill="#1d2330">{_d(amount)}</text>')
    parts.append("</svg>")
    return '<div class="chart">' + "".join(parts) + "</div>"


def _group_table(rows: Sequence[Mapping[str, Any]], by: str) -> str:
    head = "".join(
        f'<th class="n">{_e(t)}</th>' if i else f"<th>{_e(t)}</th>"
        for i, t in enumerate(
            (by, "calls", "left the wallet", "x402 paid", "top-ups", "from credit", "plain", "saved", "tokens")
        )
    )
    body = "".join(
        "<tr>"
        f"<td>{_e(row['key'])}</td><td class=n>{_e(row['calls'] + row['topup_count'])}</td>"
        + "".join(
            f"<td class=n>{_d(row[k])}</td>"
            for k in ("wallet", "paid", "topups", "credit_usage", "plain_usage", "saved")
        )
        + f"<td class=n>{_e(row['prompt_tokens'])}+{_e(row['completion_tokens'])}</td></tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _caps_table(caps: Mapping[str, Any]) -> str:
    defaults = set(caps["defaults"])
    rows = "".join(
        f"<tr><td>{_e(label)}</td><td class=n>{_d(caps[name])}"
        f"{' (default)' if default and default in defaults else ''}</td></tr>"
        for label, name, default in (
            ("max ticket (one payment)", "max_payment", "max_payment_usd"),
            ("daily cap per agent (UTC)", "daily_cap", "daily_cap_usd"),
            ("total budget per agent", "total_budget", None),
            ("global cap (all agents)", "global_cap", None),
            ("largest top-up", "topup_max", None),
            ("top-ups per agent per day", "daily_topup_cap", None),
        )
    )
    agents = "".join(
        f"<tr><td>{_e(r['agent'])}</td><td class=n>{_d(r['today_spent'])}</td><td class=n>{_d(r['today_reserved'])}"
        f"</td><td class=n>{_d(r['today_left'])}</td><td class=n>{_d(r['total_spent'])}</td>"
        f"<td class=n>{_d(r['total_left'])}</td><td class=n>{_d(r['topups_today'])}</td></tr>"
        for r in caps["agents"]
    )
    per_agent = (
        f"<h2>Today ({_e(caps['day'])}, UTC) and all time, per agent</h2><table><thead><tr><th>agent</th>"
        '<th class="n">spent today</th><th class="n">reserved</th><th class="n">left today</th>'
        '<th class="n">spent all time</th><th class="n">left all time</th><th class="n">top-ups today</th></tr>'
        f"</thead><tbody>{agents}</tbody></table>"
        if agents
        else ""
    )
    return (
        f"<h2>Caps in force</h2><p class=meta>{_e(caps['source'])}</p>"
        f'<table><thead><tr><th>limit</th><th class="n">value</th></tr></thead><tbody>{rows}</tbody></table>'
        + per_agent
    )


def _calls_table(receipts: Sequence[Receipt], credit: frozenset[str]) -> str:
    recent = list(receipts)[-HTML_CALLS:]
    head = "".join(
        f"<th>{_e(t)}</th>"
        for t in (
            "time (UTC)",
            "agent",
            "intent",
            "model",
            "billing",
            "tokens",
            "cost",
            "paid",
            "settled",
            "payee",
            "transaction",
        )
    )
    body = []
    for r in reversed(recent):
        p = r.payment
        paid = f"{_usd(p.amount)} {p.scheme}" if p is not None else None
        settled = None if p is None or p.settled_amount is None else _usd(p.settled_amount)
        body.append(
            f"<tr><td>{_e(iso_time(r.started_at))}</td><td>{_e(r.agent)}</td><td>{_e(r.intent)}</td>"
            f"<td>{_e(r.model)}</td><td>{_e(billing_of(r, credit))}</td>"
            f"<td class=n>{_e(r.prompt_tokens)}+{_e(r.completion_tokens)}</td><td class=n>{_d(r.cost)}</td>"
            f"<td class=n>{_e(paid)}</td><td class=n>{_e(settled)}</td>"
            f"<td><code>{_e(p.payee if p else None)}</code></td>"
            f"<td><code>{_e(p.transaction if p else None)}</code></td></tr>"
        )
    more = (
        f"<p class=meta>The {HTML_CALLS} most recent of {len(receipts)} calls.</p>"
        if len(receipts) > HTML_CALLS
        else ""
    )
    return f"{more}<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def html_report(document: Mapping[str, Any], receipts: Sequence[Receipt], credit: frozenset[str]) -> str:
    """The spend report as one self-contained HTML page: inline CSS and SVG, no script, no external resource (its
    Content-Security-Policy forbids loading any), and every value from the ledger escaped."""
    t = document["totals"]
    since = f" since {document['since']}" if document["since"] else ""
    meta = (
        f"Ledger {document['ledger']}{since}"
        + (f", agent {document['agent']}" if document["agent"] else "")
        + (f", model {document['model']}" if document["model"] else "")
        + f". Generated {iso_time(datetime.now(UTC).timestamp())}."
    )
    released = t["upto_ceiling"] - t["upto_settled"]
    cards = "".join(
        (
            _card("Left the wallet", t["wallet"], "x402 payments + top-ups", main=True),
            _card("Per-call x402 payments", t["paid"], _count(t["paid_calls"], "paid call")),
            _card("Credit top-ups", t["topups"], _count(t["topup_count"], "top-up")),
            _card("Used from credit", t["credit_usage"], _count(t["credit_calls"], "call") + " on prepaid credit"),
            _card("Plain gateways", t["plain_usage"], _count(t["plain_calls"], "call") + ", billed by the gateway"),
            _card(
                "upto: settled",
                t["upto_settled"],
                f"of {_usd(t['upto_ceiling'])} authorized in {_count(t['upto_calls'], 'call')}; "
                f"{_usd(released)} never moved",
            )
            if t["upto_calls"]
            else "",
            _card("Saved by the cache", t["saved"], "answers not paid twice") if t["saved"] else "",
            _card("All calls", t["cost"], _count(t["calls"], "call") + " consumed"),
        )
    )
    groups = (
        "".join(f"<h2>By {_e(by)}</h2>{_group_table(spend_rows(receipts, by, credit), by)}" for by in GROUPS)
        if receipts
        else '<p class="empty">No calls recorded.</p>'
    )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>llm402 spend report</title><style>{_CSS}</style></head><body><main>"
        f"<h1>Where the money went</h1><p class=meta>{_e(meta)}</p>"
        f'<section class="cards">{cards}</section>'
        f"<h2>Cost by day and model</h2>{svg_day_model_chart(receipts, credit)}"
        f"<h2>Cost by model</h2>{svg_model_bars(receipts, credit)}"
        f"{_caps_table(document['caps'])}{groups}"
        f"<h2>Calls</h2>{_calls_table(receipts, credit) if receipts else '<p class=empty>No calls recorded.</p>'}"
        "</main></body></html>\n"
    )


# --- receipts ----------------------------------------------------------------------------------------------------


def _short(value: str | None, keep: int = 10) -> str:
    """A long hash or address as its start and end (``--json`` prints it whole)."""
    if not value:
        return "-"
    return value if len(value) <= 2 * keep + 1 else f"{value[:keep]}…{value[-4:]}"


def _receipts(args: argparse.Namespace) -> int:
    receipts, credit, _ = _read(args, with_caps=False)
    shown = receipts[-args.limit :] if args.limit else receipts
    if args.json:
        emit_json([{**receipt_view(r), "billing": billing_of(r, credit)} for r in shown])
        return EXIT_OK
    if not shown:
        console.print(f"No calls recorded in {safe_url(_ledger_url(args))}.", markup=False)
        return EXIT_OK
    title = f"receipts ({len(shown)} of {len(receipts)}, newest last)" if len(shown) < len(receipts) else "receipts"
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    ceilings = any(r.payment is not None and r.payment.amount != r.cost for r in shown)
    columns = ["time (UTC)", "agent", "model", "billing", "tokens", "cost", *(["paid"] if ceilings else []), "tx"]
    for column in columns:
        numeric = column in ("tokens", "cost", "paid")
        table.add_column(
            column,
            justify="right" if numeric else "left",
            no_wrap=column != "model",
            min_width={"model": 12, "cost": 9, "paid": 9, "billing": 9}.get(column),
        )
    for r in shown:
        p = r.payment
        cells = [
            iso_time(r.started_at)[5:16].replace("T", " "),
            _short(r.agent, 6),
            r.model or "-",
            billing_of(r, credit) + (f" {p.scheme}" if p is not None and p.kind == "call" else ""),
            f"{r.prompt_tokens}+{r.completion_tokens}",
            _usd(r.cost),
            *([_usd(p.amount) if p is not None else "-"] if ceilings else []),
            _short(p.transaction if p else None, 6),
        ]
        table.add_row(*(Text(cell) for cell in cells))
    console.print(table)
    return EXIT_OK


# --- the parser --------------------------------------------------------------------------------------------------


def _filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--since",
        type=since_arg,
        default=None,
        metavar="WHEN",
        help="only receipts since: 30m, 24h, 7d, 2w, today, or an ISO date/time (UTC unless it names a zone)",
    )
    parser.add_argument("--model", default=None, help="only this model's calls")
    ledger_options(parser, agent_help="only this agent's receipts (and its caps)")
    output_options(parser)


def register(subparsers: argparse._SubParsersAction[Any], *, epilog: str | None = None) -> None:
    """Add ``spend`` and ``receipts`` to the ``llm402`` command."""
    spend = subparsers.add_parser(
        "spend",
        help="where the money went: totals that reconcile to the wallet, groups, caps, a chart",
        description="What left the wallet (per-call x402 payments and credit top-ups), what the calls consumed "
        "(x402, from credit, on plain gateways), grouped; the caps of the policy in force and what is left today.",
        epilog=epilog,
    )
    spend.add_argument("--by", choices=GROUPS, default="agent", help="how to group (default: agent)")
    spend.add_argument(
        "--html", default=None, metavar="FILE", help="also write a self-contained HTML report (charts included)"
    )
    _filters(spend)
    spend.set_defaults(run=_spend)

    receipts = subparsers.add_parser(
        "receipts", help="one line per call, with payments and transaction hashes", epilog=epilog
    )
    receipts.add_argument(
        "--gateway", default=None, metavar="ORIGIN", help="only this gateway's calls (scheme://host:port)"
    )
    receipts.add_argument(
        "--limit", type=positive_int, default=100, metavar="N", help="the N most recent receipts (default 100)"
    )
    _filters(receipts)
    receipts.set_defaults(run=_receipts)
