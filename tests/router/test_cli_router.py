"""The router skill's CLI surface, run in-process through argparse (and once as a real subprocess)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from router_support import Sandbox

from llm402 import Wallet
from llm402.cli_router import image_url, main

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


@pytest.fixture
def sb(start: Callable[..., list[Sandbox]], wallet: Wallet, monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    monkeypatch.setenv("LLM402_PRIVATE_KEY", wallet.export_private_key())
    monkeypatch.delenv("LLM402_POLICY", raising=False)
    (sandbox,) = start("")
    return sandbox


def run(sb: Sandbox, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([*argv, "--base-url", sb.base_url, "--ledger", "memory://"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_models_lists_prices(sb: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(sb, capsys, "models", "--json")
    rows = {row["id"]: row for row in json.loads(out)}
    assert code == 0 and rows["sandbox/small"]["prompt_usd_per_1m"] == "0.15"
    assert (
        rows["sandbox/medium"]["completion_usd_per_1m"] == "10" and rows["sandbox/large"]["context_length"] == 1_000_000
    )
    code, out, _ = run(sb, capsys, "models")
    assert code == 0 and "sandbox/vision" in out and "0.6" in out


def test_chat_plain_json_system_and_history(sb: Sandbox, wallet: Wallet, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(sb, capsys, "chat", "--model", "sandbox/small", "--message", "hello there")
    assert code == 0 and out.strip() == "Echo: hello there"
    assert "sandbox/small" in err and "$0.0" in err
    history = json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Echo: hi"}])
    code, out, _ = run(
        sb,
        capsys,
        "chat",
        "--model",
        "sandbox/medium",
        "--system",
        "be brief",
        "--messages",
        history,
        "--message",
        "and again",
        "--json",
    )
    data = json.loads(out)
    assert code == 0 and data["content"] == "Echo: and again" and data["model"] == "sandbox/medium"
    assert data["cost"] > 0 and data["attempts"][0]["status"] == 200
    assert sb.charged(wallet.address) > data["cost"], "both calls were paid"


def test_chat_streams(sb: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(sb, capsys, "chat", "--model", "sandbox/small", "--message", "stream me", "--stream")
    assert code == 0 and out.strip() == "Echo: stream me"
    code, out, _ = run(sb, capsys, "chat", "--model", "sandbox/small", "--message", "stream me", "--stream", "--json")
    data = json.loads(out)
    assert data["content"] == "Echo: stream me" and data["cost"] > 0 and data["usage"] == {}


def test_chat_auto_and_fallback_lists(sb: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(sb, capsys, "chat", "--model", "auto", "--message", "cheap please", "--json")
    assert code == 0 and json.loads(out)["model"] == "sandbox/small"
    code, out, _ = run(sb, capsys, "chat", "--model", "sandbox/nope,sandbox/vision", "--message", "hi", "--json")
    data = json.loads(out)
    assert code == 0 and data["model"] == "sandbox/vision", "a model the gateway does not offer falls back"
    assert [(a["model"], a["error"]) for a in data["attempts"]] == [
        ("sandbox/nope", "unknown_model"),
        ("sandbox/vision", None),
    ]


def test_vision_sends_a_local_file_as_a_data_url(
    sb: Sandbox, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    picture = tmp_path / "dot.png"
    picture.write_bytes(PNG)
    assert image_url(str(picture)).startswith("data:image/png;base64,iVBOR")
    assert image_url("https://example.com/a.jpg") == "https://example.com/a.jpg"
    code, out, _ = run(
        sb, capsys, "vision", "--model", "sandbox/vision", "--image", str(picture), "--prompt", "what?", "--json"
    )
    data = json.loads(out)
    assert code == 0 and data["content"].startswith("Saw 1 image")


def test_compare_prints_the_table(sb: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    models = "sandbox/small,sandbox/medium,sandbox/large"
    code, out, err = run(sb, capsys, "compare", "--models", models, "--message", "2+2?", "--max-tokens", "8")
    assert code == 0
    assert all(m in out for m in models.split(",")) and "Echo" in out and "latency" in out
    assert "total $0.0" in err
    code, out, _ = run(sb, capsys, "compare", "--models", models, "--message", "2+2?", "--json")
    rows = json.loads(out)
    assert [r["model"] for r in rows] == models.split(",") and all(r["cost"] > 0 and r["error"] is None for r in rows)


def test_errors_have_distinct_exit_codes(
    sb: Sandbox, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = run(sb, capsys, "chat", "--model", "sandbox/small", "--message", "hi", "--max-tokens", "0")
    assert code == 2 and "--max-tokens" in err, "the parser refuses it (usage)"
    code, _, err = run(sb, capsys, "chat", "--model", "sandbox/nope", "--message", "hi")
    assert code == 5 and "gateway error" in err and "Unknown model" in err
    code, _, err = run(sb, capsys, "vision", "--model", "sandbox/vision", "--image", "/no/such/file.png")
    assert code == 3 and "neither a URL nor a readable file" in err
    monkeypatch.delenv("LLM402_PRIVATE_KEY")
    code, _, err = run(sb, capsys, "chat", "--model", "sandbox/small", "--message", "hi")
    assert code == 3 and "wallet error" in err


def test_as_a_subprocess(sb: Sandbox, wallet: Wallet) -> None:
    env = {**os.environ, "LLM402_PRIVATE_KEY": wallet.export_private_key()}
    argv = [sys.executable, "-m", "llm402.cli_router", "chat", "--model", "sandbox/small", "--message", "from a shell"]
    done = subprocess.run(
        [*argv, "--base-url", sb.base_url, "--ledger", "memory://", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["content"] == "Echo: from a shell"
    assert wallet.export_private_key()[2:] not in done.stdout + done.stderr
