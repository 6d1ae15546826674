"""``llm402 spend`` and ``llm402 receipts`` against books the sandbox keeps too: the totals reconcile to what left the
wallet (per-call x402, upto, a credit top-up, credit usage, a plain gateway's usage), every grouping adds up, the caps
in force are shown whatever set them, and the HTML report is self-contained, escaped and renders in a real browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from collections import Counter
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from e2e_support import SandboxView

from llm402 import Gateway, Policy, Wallet
from llm402.budget import open_ledger
from llm402.cli import main
from llm402.receipts import PAYMENT_VIEW_FIELDS, RECEIPT_VIEW_FIELDS, PaymentRecord, Receipt, receipt_view
from llm402.sandbox import SandboxServer

USD = re.compile(r"\d+\.\d{6}")
PAYEE = "0x26048d144cf2D32a966DaC5D7C331588f1062dd3"


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    return json.loads(cli(capsys, *argv, "--json"))


def ask(gw: Gateway, model: str, **extra: Any) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "where did my money go?"}], **extra}
    with gw.http_client() as client:
        headers = {"authorization": f"Bearer {gw.api_key}"}  # as an SDK sends it (a placeholder is removed)
        response = client.post(f"{gw.base_url}/chat/completions", json=body, headers=headers)
    assert response.status_code == 200, response.text


@dataclass
class Books:
    ledger: str
    wallet: Wallet
    view: SandboxView
    receipts: list[Receipt]


@pytest.fixture(scope="module")
def books(sandbox: SandboxServer, tmp_path_factory: pytest.TempPathFactory) -> Books:
    """One wallet's month in one ledger: x402 calls (exact and upto) as "writer", a Token Kiosk top-up and credit calls
    as "reader", and calls on a plain API-key gateway as "plainer"."""
    folder = tmp_path_factory.mktemp("spend")
    ledger = f"sqlite:///{folder}/ledger.db"
    view = SandboxView(sandbox)
    wallet = view.funded_wallet()
    policy = Policy(max_payment_usd="0.05", daily_cap_usd="5", topup_max_usd="2")
    with Gateway(
        f"{sandbox.url}/v1", wallet=wallet, policy=policy, ledger=ledger, agent="writer", intent="drafting"
    ) as gw:
        ask(gw, "sandbox/small")
        ask(gw, "sandbox/small")
        ask(gw, "sandbox/medium")
    with Gateway(f"{sandbox.url}/upto/v1", wallet=wallet, policy=policy, ledger=ledger, agent="writer") as gw:
        ask(gw, "sandbox/medium", max_tokens=800)
    key_file = folder / "kiosk.key"
    kiosk = Gateway(
        f"{sandbox.url}/kiosk/v1",
        wallet=wallet,
        profile="token-kiosk",
        policy=policy,
        ledger=ledger,
        agent="reader",
        intent="research",
        key_store=str(key_file),
    )
    with kiosk:
        kiosk.load_prices()
        ask(kiosk, "sandbox/small")  # mints a key, tops up $1, then draws on the credit
        ask(kiosk, "sandbox/large", max_tokens=64)
    # The same credit seen through another origin with only its API key: a plain gateway to llm402.
    plain_url = f"http://localhost:{sandbox.port}/kiosk/v1"
    key = key_file.read_text().strip()
    with Gateway(plain_url, profile="plain", api_key=key, policy=policy, ledger=ledger, agent="plainer") as gw:
        gw.load_prices()
        ask(gw, "sandbox/small")
    reader = open_ledger(ledger)
    receipts = list(reader.receipts())
    reader.close()
    return Books(ledger, wallet, view, receipts)


def usd(amount: int) -> str:
    return f"{amount // 10**6}.{amount % 10**6:06d}"


def test_spend_reconciles_to_what_left_the_wallet(books: Books, capsys: pytest.CaptureFixture[str]) -> None:
    report = cli_json(capsys, "spend", "--ledger", books.ledger)
    totals = report["totals"]
    wallet_drop = books.view.spent(books.wallet.address)
    paid = [r for r in books.receipts if r.payment is not None and r.payment.kind == "call"]
    topups = [r for r in books.receipts if r.payment is not None and r.payment.kind == "topup"]
    assert len(paid) == 4 and len(topups) == 1
    assert totals["wallet"] == wallet_drop == sum(r.cost for r in paid) + 1_000_000, "x402 payments + the top-up"
    assert totals["paid"] == sum(r.cost for r in paid) and totals["topups"] == 1_000_000 == topups[0].cost
    credit = [r for r in books.receipts if r.agent == "reader" and r.payment is None and r.cost]
    plain = [r for r in books.receipts if r.agent == "plainer" and r.cost]
    assert len(credit) == 2 and len(plain) == 1
    assert totals["credit_usage"] == sum(r.cost for r in credit) > 0
    assert totals["plain_usage"] == plain[0].cost > 0
    assert totals["cost"] == totals["paid"] + totals["credit_usage"] + totals["plain_usage"]
    assert totals["calls"] == 7 and totals["topup_count"] == 1
    (upto,) = [r for r in paid if r.payment is not None and r.payment.scheme == "upto"]
    assert upto.payment is not None
    assert totals["upto_calls"] == 1 and totals["upto_ceiling"] == upto.payment.amount
    assert 0 < totals["upto_settled"] == upto.cost < totals["upto_ceiling"]
    for name in ("wallet", "paid", "topups", "cost", "credit_usage", "plain_usage", "upto_ceiling", "upto_settled"):
        assert USD.fullmatch(totals[f"{name}_usd"]) and totals[f"{name}_usd"] == usd(totals[name])


@pytest.mark.parametrize("by", ["day", "agent", "intent", "model", "gateway", "payee", "billing"])
def test_every_grouping_adds_up(books: Books, capsys: pytest.CaptureFixture[str], by: str) -> None:
    report = cli_json(capsys, "spend", "--by", by, "--ledger", books.ledger)
    groups, totals = report["groups"], report["totals"]
    for name in ("wallet", "paid", "topups", "cost", "credit_usage", "plain_usage", "calls", "topup_count"):
        assert sum(g[name] for g in groups) == totals[name], name
    keys = {g["key"] for g in groups}
    today = datetime.now(UTC).date().isoformat()
    expected = {
        "day": {today},
        "agent": {"writer", "reader", "plainer"},
        "intent": {"drafting", "research", None},
        "model": {"sandbox/small", "sandbox/medium", "sandbox/large", None},
        "gateway": {books.receipts[0].gateway, f"http://localhost:{books.receipts[0].gateway.rsplit(':', 1)[1]}"},
        "payee": {PAYEE, None},
        "billing": {"x402", "topup", "credit", "plain"},
    }[by]
    assert keys == expected
    if by == "payee":
        (payee,) = [g for g in groups if g["key"] == PAYEE]
        assert payee["wallet"] == totals["wallet"], "everything that left the wallet went to the sandbox's payee"
    if by == "billing":
        rows = {g["key"]: g for g in groups}
        assert rows["topup"]["wallet"] == 1_000_000 and rows["topup"]["cost"] == 0
        assert rows["credit"]["wallet"] == 0 and rows["plain"]["wallet"] == 0


def test_caps_in_force_whatever_set_them(
    books: Books, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    caps = cli_json(capsys, "spend", "--ledger", books.ledger)["caps"]
    assert caps["max_payment"] == 1_000_000 and caps["daily_cap"] == 10_000_000
    assert caps["max_payment_usd"] == "1.000000" and caps["total_budget"] is None
    assert set(caps["defaults"]) == {"max_payment_usd", "daily_cap_usd"} and "safe defaults" in caps["source"]
    writer = next(a for a in caps["agents"] if a["agent"] == "writer")
    spent = sum(r.cost for r in books.receipts if r.agent == "writer")
    assert writer["today_spent"] == spent and writer["today_left"] == 10_000_000 - spent
    (tmp_path / "policy.toml").write_text('max_payment_usd = "0.25"\ndaily_cap_usd = "3"\ntotal_budget_usd = "20"\n')
    caps = cli_json(capsys, "spend", "--ledger", books.ledger, "--policy", str(tmp_path / "policy.toml"))["caps"]
    assert caps["max_payment"] == 250_000 and caps["daily_cap"] == 3_000_000 and caps["defaults"] == []
    writer = next(a for a in caps["agents"] if a["agent"] == "writer")
    assert writer["today_left"] == 3_000_000 - spent and writer["total_left"] == 20_000_000 - spent
    monkeypatch.setenv("LLM402_POLICY", str(tmp_path / "policy.toml"))
    caps = cli_json(capsys, "spend", "--ledger", books.ledger, "--agent", "reader")["caps"]
    assert "LLM402_POLICY" in caps["source"] and [a["agent"] for a in caps["agents"]] == ["reader"]
    assert caps["agents"][0]["topups_today"] == 1_000_000
    text = cli(capsys, "spend", "--ledger", books.ledger)
    assert "max ticket (one payment)    $0.250000" in text and "(default)" not in text
    monkeypatch.delenv("LLM402_POLICY")
    text = cli(capsys, "spend", "--ledger", books.ledger)
    assert "$1.000000 (default)" in text and "$10.000000 (default)" in text


def test_the_terminal_report(books: Books, capsys: pytest.CaptureFixture[str]) -> None:
    text = cli(capsys, "spend", "--by", "model", "--ledger", books.ledger)
    report = cli_json(capsys, "spend", "--ledger", books.ledger)["totals"]
    assert f"left the wallet  {'$' + report['wallet_usd']:>14} = x402 payments ${report['paid_usd']}" in text
    assert "+ credit top-ups $1.000000 (1)" in text
    assert f"upto settled     {'$' + report['upto_settled_usd']:>14} of ${report['upto_ceiling_usd']}" in text
    assert "spend by model" in text and "sandbox/medium" in text
    chart = text[text.index("cost by day and model") :]
    assert re.search(r"\d{4}-\d\d-\d\d █+ +\$\d+\.\d{6}", chart)
    assert "■ sandbox/" in chart
    assert "caps in force" in text


def test_an_empty_ledger_still_answers(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    text = cli(capsys, "spend", "--ledger", f"sqlite:///{tmp_path}/none.db")
    assert "No calls recorded" in text and "no ledger file yet" in text and "max ticket" in text
    report = cli_json(capsys, "spend", "--ledger", "memory://")
    assert report["totals"]["wallet"] == 0 and report["groups"] == [] and report["caps"]["daily_cap"] == 10_000_000
    assert cli_json(capsys, "receipts", "--ledger", "memory://") == []
    assert not (tmp_path / "none.db").exists()


def test_receipts_lists_calls_with_their_transactions(books: Books, capsys: pytest.CaptureFixture[str]) -> None:
    rows = cli_json(capsys, "receipts", "--ledger", books.ledger)
    assert len(rows) == len(books.receipts) and all(
        list(r)[: len(RECEIPT_VIEW_FIELDS)] == list(RECEIPT_VIEW_FIELDS) for r in rows
    )
    paid = [r for r in rows if r["payment"]]
    assert len(paid) == 5 and all(re.fullmatch(r"0x[0-9a-f]{64}", r["payment"]["transaction"]) for r in paid)
    assert {r["billing"] for r in rows} >= {"x402", "topup", "credit", "plain"}
    writer = cli_json(capsys, "receipts", "--ledger", books.ledger, "--agent", "writer")
    assert len(writer) == 4 and {r["agent"] for r in writer} == {"writer"}
    medium = cli_json(capsys, "receipts", "--ledger", books.ledger, "--model", "sandbox/medium")
    assert [r["payment"]["scheme"] for r in medium] == ["exact", "upto"]
    assert cli_json(capsys, "receipts", "--ledger", books.ledger, "--since", "2999-01-01") == []
    (last,) = cli_json(capsys, "receipts", "--ledger", books.ledger, "--limit", "1")
    assert last["call_id"] == rows[-1]["call_id"]
    text = cli(capsys, "receipts", "--ledger", books.ledger, "--agent", "writer")
    assert "x402 upto" in text and "x402 exact" in text and "0x" in text


def test_receipt_view_has_fixed_names_and_both_units() -> None:
    payment = PaymentRecord(
        "upto", "eip155:84532", "0xasset", 8008, "0xpayer", "0xpayee", "0xtx", True, settled_amount=48
    )
    receipt = Receipt(
        "c1",
        "a",
        "i",
        "http://gw",
        "POST",
        "/v1/chat/completions",
        "m",
        200,
        False,
        1_735_689_600.25,
        12.5,
        cost=10_249,
    )
    view = receipt_view(receipt)
    assert tuple(view) == RECEIPT_VIEW_FIELDS
    assert view["cost"] == 10_249 and view["cost_usd"] == "0.010249" and view["time"] == "2025-01-01T00:00:00.250Z"
    assert view["payment"] is None
    view = receipt_view(replace(receipt, payment=payment))
    assert tuple(view["payment"]) == PAYMENT_VIEW_FIELDS
    assert view["payment"]["amount_usd"] == "0.008008" and view["payment"]["settled_amount_usd"] == "0.000048"
    json.dumps(view)


def test_units_topup_in_usd_and_quote_in_iso_time(
    sandbox: SandboxServer,
    wallet: Wallet,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("LLM402_PRIVATE_KEY", wallet.export_private_key())
    (tmp_path / "policy.toml").write_text('topup_max_usd = "2"\n')
    base = ["--base-url", f"{sandbox.url}/kiosk/v1", "--profile", "token-kiosk", "--ledger", "memory://"]
    base += ["--policy", str(tmp_path / "policy.toml")]
    text = cli(capsys, "topup", "--amount", "1", *base)
    assert "$1.000000" in text and "1000000" not in text
    (row,) = cli_json(capsys, "topup", "--amount", "1.5", *base)
    assert row["amount"] == 1_500_000 and row["amount_usd"] == "1.500000"
    assert row["receipt"]["payment"]["kind"] == "topup" and row["receipt"]["cost_usd"] == "1.500000"
    balance = cli_json(capsys, "balance", *base)
    assert balance["available_usdc"] == 2_500_000 and balance["available_usd"] == "2.500000"
    quote = cli_json(capsys, "quote", "--base-url", f"{sandbox.url}/v1", "--model", "sandbox/small")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", quote["valid_until"])
    assert quote["amount_usd"] == usd(quote["amount"]) and isinstance(quote["valid_until_unix"], float)
    text = cli(capsys, "quote", "--base-url", f"{sandbox.url}/v1", "--model", "sandbox/small")
    assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d", text) and not re.search(r"\d{10}\.\d+", text)


# --- the HTML report ---------------------------------------------------------------------------------------------

HOSTILE = {
    "model": "<script>alert('model')</script>",
    "agent": '"><img src=x onerror=alert(1)>',
    "intent": "research & <b>development</b>",
    "gateway": "https://evil.example/'><svg onload=alert(2)>",
}


def hostile_ledger(folder: Path) -> str:
    """Receipts over five days and three models, some with values an attacker chose (a gateway's model name, ...)."""
    url = f"sqlite:///{folder}/hostile.db"
    ledger = open_ledger(url)
    base = datetime(2025, 3, 1, 12, tzinfo=UTC).timestamp()
    models = ["sandbox/small", "sandbox/medium", HOSTILE["model"]]
    for i in range(15):
        payment = PaymentRecord(
            "exact", "eip155:84532", "0xasset", 1000 * (i + 1), "0xpayer", "<i>payee</i>", f"0x{i:064x}", True
        )
        ledger.record(
            Receipt(
                f"call-{i}",
                HOSTILE["agent"] if i % 2 else "writer",
                HOSTILE["intent"] if i % 3 else None,
                HOSTILE["gateway"] if i % 4 == 0 else "http://127.0.0.1:8402",
                "POST",
                "/v1/chat/completions",
                models[i % 3],
                200,
                False,
                base + (i % 5) * 86400 + i,
                10.0,
                cost=1000 * (i + 1),
                prompt_tokens=10,
                completion_tokens=5,
                payment=payment,
            )
        )
    ledger.close()
    return url


def write_report(capsys: pytest.CaptureFixture[str], ledger: str, out: Path) -> str:
    text = cli(capsys, "spend", "--ledger", ledger, "--html", str(out))
    assert "HTML report written to" in text
    return out.read_text(encoding="utf-8")


def test_html_report_is_self_contained(books: Books, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    page = write_report(capsys, books.ledger, tmp_path / "report.html")
    assert page.startswith("<!doctype html>") and "<svg" in page and "Where the money went" in page
    assert "default-src 'none'" in page, "a Content-Security-Policy forbids loading anything"
    assert not re.search(r"(?i)<(script|link|iframe|object|embed|img)\b|\b(src|href)\s*=|url\(|@import", page)
    totals = cli_json(capsys, "spend", "--ledger", books.ledger)["totals"]
    assert f"${totals['wallet_usd']}" in page and f"${totals['upto_ceiling_usd']}" in page
    tx = next(r.payment.transaction for r in books.receipts if r.payment is not None and r.payment.transaction)
    assert tx in page, "the calls are listed with their transaction hashes"


def test_html_report_escapes_every_value_from_the_ledger(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    page = write_report(capsys, hostile_ledger(tmp_path), tmp_path / "report.html")
    for value in (*HOSTILE.values(), "<i>payee</i>"):
        assert value not in page
    assert "&lt;script&gt;alert(&#x27;model&#x27;)&lt;/script&gt;" in page
    assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in page and "&lt;i&gt;payee&lt;/i&gt;" in page
    assert not re.search(r"(?i)<(script|img)\b", page)


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB/RGBA PNG (what Chromium writes) into RGB rows; no imaging library needed."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width, height, channels = 8, b"", 0, 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and color in (2, 6), (depth, color)
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
    raw = zlib.decompress(idat)
    stride, rows, previous, at = width * channels, [], bytearray(width * channels), 0
    for _ in range(height):
        kind, line = raw[at], bytearray(raw[at + 1 : at + 1 + stride])
        at += 1 + stride
        for x in range(stride):
            a = line[x - channels] if x >= channels else 0
            b = previous[x]
            c = previous[x - channels] if x >= channels else 0
            if kind == 1:
                line[x] = (line[x] + a) & 0xFF
            elif kind == 2:
                line[x] = (line[x] + b) & 0xFF
            elif kind == 3:
                line[x] = (line[x] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(bytes(v for i, v in enumerate(line) if i % channels < 3))
        previous = line
    return width, height, rows


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    reason = "no chromium on PATH: the HTML report's screenshot test needs Debian's chromium (apt-get install chromium)"
    if os.environ.get("CI"):
        pytest.fail(reason + "; CI installs it (.ci/run), so it is never skipped there")
    pytest.skip(reason)


def test_html_report_screenshot_in_headless_chromium(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    browser = chromium()
    report = tmp_path / "report.html"
    write_report(capsys, hostile_ledger(tmp_path), report)
    png = tmp_path / "report.png"
    profile = tmp_path / "chromium-profile"
    done = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            "--window-size=1200,900",
            report.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert png.exists(), f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}"
    width, height, rows = png_pixels(png.read_bytes())
    assert (width, height) == (1200, 900)
    colors = Counter(row[i : i + 3] for row in rows for i in range(0, len(row), 3))
    background, most = colors.most_common(1)[0]
    assert most < 0.97 * width * height, "the page is not blank"
    assert len(colors) > 50, "text and charts, not a flat page"

    def near(rgb: tuple[int, int, int]) -> int:
        return sum(n for c, n in colors.items() if all(abs(c[k] - rgb[k]) <= 12 for k in range(3)))

    # The chart's bars, in the report's first two series colors (#2f6fdf, #e0672b): the inline SVG rendered.
    assert near((0x2F, 0x6F, 0xDF)) > 300 and near((0xE0, 0x67, 0x2B)) > 300, colors.most_common(12)
    assert background != b"\x00\x00\x00"
