"""The LangChain examples run end to end with one command each (they start their own sandbox)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run(name: str, capsys: pytest.CaptureFixture[str]) -> str:
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return " ".join(capsys.readouterr().out.split())


def test_agent_example_runs_the_tool_loop_and_prints_receipts(capsys: pytest.CaptureFixture[str]) -> None:
    out = run("langchain_agent.py", capsys)
    assert "The tool returned: 100.0" in out and "The tool returned: 144" in out
    assert "4 paid calls" in out and "daily cap $0.250000" in out


def test_lcel_example_hits_the_daily_cap_and_falls_back(capsys: pytest.CaptureFixture[str]) -> None:
    out = run("langchain_lcel.py", capsys)
    assert "refused" in out and "budget_exceeded" in out and "fallback sandbox/small" in out
    assert "stream ended" in out and "total $" in out
